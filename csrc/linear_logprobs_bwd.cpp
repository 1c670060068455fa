// Backward of the fused linear -> per-token log-prob op on CPU, by recomputation.
//
// With x the transformed logits, p = softmax(x), log p = x - lse, and g, g_lse, g_H the upstream
// gradients of log p[target], the log-sum-exp and the entropy H (the last two optional):
//   dL/dx = g * onehot(target) + p * (a + c * log p),   a = g_lse - g - g_H * H,   c = -g_H
// (dH/dx_j = -p_j (log p_j + H)), then the chain rule of the transform: the softcap slope 1 - tanh^2 and
// logit_scale / temperature; dH = dZ W, dW = dZ^T H, db = sum_rows dZ. Each worker owns a slice of the
// vocabulary: it writes its rows of dW / db alone, and accumulates dH for the current token superblock in
// its own fp32 buffer (slice 0 writes straight into the output). The superblock size bounds those buffers
// (`workspace_bytes`).
//
// Filtered (`live` from the forward): the walk goes over vocabulary tiles (of the forward's `order`; worker s owns
// tiles s, s + slices, ...) and, in each,
// over the tokens whose (token, tile) pair is live only: a dense run of tokens (half or more of them live) is a view
// of H whose skipped rows get a zero gradient, any other set is gathered (index_select) into a contiguous block, its
// dH rows scattered back with index_add_. A
// skipped pair costs nothing — neither its logits nor its products. Every entry of a skipped pair has
// p < filter_eps and is not the target, so its dL/dx lies below chain * filter_eps * (|a| + |c| ln(1/filter_eps)).
#include "linear_logprobs.h"

#include <algorithm>
#include <vector>

namespace logo_kernels {

namespace {

// The per-token coefficients of dL/dx, with the chain factor folded in:
// dZ = slope * (p * (coef_a + coef_c * log p) + coef_t * onehot).
struct Coefficients {
  at::Tensor a, c, t;  // [n] fp32; c undefined without an entropy gradient
  at::Tensor lse;      // [n] fp32
};

// dZ of one tile in place: x holds the transformed logits of the rows whose coefficients are the [rows] tensors
// a, c (or undefined), t and lse; `targets_at` the target's column in the tile per row (-1 when outside);
// `slope` the softcap slope tile (undefined without a softcap); `weights` a scratch tile when c is defined.
inline void grad_logits_tile(at::Tensor& x, const at::Tensor& a, const at::Tensor& c, const float* t,
                             const at::Tensor& lse, const int64_t* targets_at, const at::Tensor& slope,
                             at::Tensor& weights) {
  x.sub_(lse.unsqueeze(1));  // x <- log p
  if (c.defined()) {         // weights = a + c * max(log p, floor); x <- p * weights
    at::clamp_min_out(weights, x, kLogZeroFloor);
    weights.mul_(c.unsqueeze(1)).add_(a.unsqueeze(1));
    x.exp_().mul_(weights);
  } else {
    x.exp_().mul_(a.unsqueeze(1));
  }
  float* xp = x.data_ptr<float>();
  const int64_t cols = x.size(1);
  for (int64_t r = 0; r < x.size(0); ++r) {
    if (targets_at[r] >= 0) xp[r * cols + targets_at[r]] += t[r];
  }
  if (slope.defined()) x.mul_(slope);
}

}  // namespace

// The filtered backward (see the file comment): same results as the unfiltered one on every live pair.
static void filtered_backward(const Coefficients& co, const at::Tensor& h_walk, const at::Tensor& w, const float* bias,
                              const at::Tensor& target_pos, const LogitTransform& tf, const VocabOrder& order,
                              const at::Tensor& live, int64_t fb, int64_t bn, int64_t bv, int64_t slices, int64_t sb,
                              at::Tensor& dh32, at::Tensor& dw, at::Tensor& db32) {
  const int64_t n = h_walk.size(0);
  const int64_t dim = h_walk.size(1);
  const int64_t vocab = w.size(0);
  const int64_t num_blocks = live.size(1);      // filter blocks of fb ids
  const int64_t num_tiles = ceil_div(vocab, bv);  // walk tiles of bv ids (a multiple of fb)
  const bool need_hidden = dh32.defined(), need_weight = dw.defined(), need_bias = db32.defined();
  const bool dw_direct = need_weight && dw.scalar_type() != at::kFloat;  // see linear_logprobs_bwd_cpu
  const bool dw_in_tiles = dw_direct || order.defined();
  const auto f32 = h_walk.options().dtype(at::kFloat);
  const auto i64 = h_walk.options().dtype(at::kLong);
  const TileMath math = walk_math(h_walk);
  const bool* live_p = live.data_ptr<bool>();
  const int64_t* tpos = target_pos.data_ptr<int64_t>();
  const float* ct_all = co.t.data_ptr<float>();
  for (int64_t sb0 = 0; sb0 < n; sb0 += sb) {
    const int64_t nsb = std::min(sb, n - sb0);
    std::vector<at::Tensor> dh_partial(slices);
    at::parallel_for(0, slices, 1, [&](int64_t s_begin, int64_t s_end) {
      const BelowAutogradGuard below_autograd;
      const at::Tensor x_buf = at::empty({bn * bv}, f32);
      const at::Tensor slope_buf = tf.has_softcap() ? at::empty({bn * bv}, f32) : at::Tensor();
      const at::Tensor weights_buf = co.c.defined() ? at::empty({bn * bv}, f32) : at::Tensor();
      const at::Tensor rows_buf = at::empty({bn}, i64);
      const at::Tensor dw_tile = need_weight && dw_in_tiles ? at::empty({bv, dim}, f32) : at::Tensor();
      const at::Tensor dh_rows_buf = need_hidden ? at::empty({bn, dim}, f32) : at::Tensor();  // gathered rows' dH
      const at::Tensor buffer16 = coefficient_buffer(math, bn, bv, h_walk);
      const at::Tensor db_tile = need_bias && order.defined() ? at::empty({bv}, f32) : at::Tensor();
      std::vector<float> bias_buf(bias != nullptr && order.defined() ? bv : 0);
      std::vector<int64_t> targets_at(bn);
      std::vector<float> coef_t(bn);
      for (int64_t s = s_begin; s < s_end; ++s) {
        if (need_hidden) dh_partial[s] = s == 0 ? dh32.narrow(0, sb0, nsb) : at::zeros({nsb, dim}, f32);
        // tiles dealt round-robin: the sorted walk puts the busiest tiles first, contiguous slices would load one
        // worker with most of the live pairs
        for (int64_t tile = s; tile < num_tiles; tile += slices) {
          const int64_t v0 = tile * bv;
          const int64_t cur_bv = std::min(bv, vocab - v0);
          const int64_t b0 = v0 / fb, b1 = ceil_div(v0 + cur_bv, fb);  // the tile's filter blocks
          auto row_live = [&](int64_t token) {
            for (int64_t b = b0; b < b1; ++b) {
              if (live_p[token * num_blocks + b]) return true;
            }
            return false;
          };
          WeightTile wt;  // loaded at the first live token of the tile
          const float* bt = nullptr;
          at::Tensor dw_acc = need_weight ? (dw_in_tiles ? dw_tile.narrow(0, 0, cur_bv) : dw.narrow(0, v0, cur_bv))
                                          : at::Tensor();
          at::Tensor db_acc = need_bias ? (order.defined() ? db_tile.narrow(0, 0, cur_bv) : db32.narrow(0, v0, cur_bv))
                                        : at::Tensor();
          bool visited = false;
          int64_t next = sb0;  // the next token of the superblock to look at
          while (next < sb0 + nsb) {
            // gather up to bn live tokens of this tile, starting at `next`
            int64_t* rows = rows_buf.data_ptr<int64_t>();
            int64_t k = 0;
            for (; next < sb0 + nsb && k < bn; ++next) {
              if (row_live(next)) rows[k++] = next;
            }
            if (k == 0) break;
            if (!visited) {
              visited = true;
              wt = WeightTile::load(w, v0, cur_bv, order, math, /*with_products=*/need_hidden);
              bt = bias_tile(bias, v0, cur_bv, order, bias_buf.data());
              if (need_weight && dw_in_tiles) dw_acc.zero_();
              if (need_bias && order.defined()) db_acc.zero_();
            }
            // a dense run (at least half of a contiguous span of <= bn tokens live) is computed as that span, the
            // dead rows' gradient zeroed after: views of H and of dH instead of a gather and a scatter
            const int64_t span = rows[k - 1] - rows[0] + 1;
            const bool contiguous = span <= bn && 2 * k >= span;
            const int64_t m = contiguous ? span : k;
            const int64_t first = rows[0];
            const at::Tensor idx = rows_buf.narrow(0, 0, k);
            const at::Tensor h_rows = contiguous ? h_walk.narrow(0, first, m) : h_walk.index_select(0, idx);
            auto pick = [&](const at::Tensor& v) {
              return !v.defined() ? at::Tensor() : contiguous ? v.narrow(0, first, m) : v.index_select(0, idx);
            };
            for (int64_t r = 0; r < m; ++r) {
              const int64_t token = contiguous ? first + r : rows[r];
              const int64_t at_col = tpos[token] - v0;
              targets_at[r] = at_col >= 0 && at_col < cur_bv ? at_col : -1;
              coef_t[r] = ct_all[token];
            }
            auto tile_of = [&](const at::Tensor& b) {
              return b.defined() ? b.narrow(0, 0, m * cur_bv).view({m, cur_bv}) : at::Tensor();
            };
            at::Tensor x = tile_of(x_buf);
            at::Tensor slope = tile_of(slope_buf);
            at::Tensor weights = tile_of(weights_buf);
            compute_logits_tile(x, h_rows, wt, bt, tf, slope.defined() ? &slope : nullptr);
            grad_logits_tile(x, pick(co.a), pick(co.c), coef_t.data(), pick(co.lse), targets_at.data(), slope, weights);
            {  // the skipped (token, block) pairs of the computed rows contribute nothing (the rule, exactly)
              float* xp = x.data_ptr<float>();
              for (int64_t r = 0; r < m; ++r) {
                const int64_t token = contiguous ? first + r : rows[r];
                for (int64_t b = b0; b < b1; ++b) {
                  if (live_p[token * num_blocks + b]) continue;
                  const int64_t c0 = b * fb - v0, c1 = std::min(cur_bv, c0 + fb);
                  std::fill(xp + r * cur_bv + c0, xp + r * cur_bv + c1, 0.0f);
                }
              }
            }
            const at::Tensor coef = coefficient_operand(x, buffer16, math);
            if (need_hidden) {
              at::Tensor& acc = dh_partial[s];
              if (contiguous) {
                at::Tensor rows_acc = acc.narrow(0, first - sb0, m);
                wt.product(rows_acc, coef, /*accumulate=*/true);
              } else {
                at::Tensor rows_dh = dh_rows_buf.narrow(0, 0, m);
                wt.product(rows_dh, coef, /*accumulate=*/false);
                acc.index_add_(0, idx - sb0, rows_dh);
              }
            }
            if (need_weight) add_weight_product(dw_acc, coef, h_rows, math);
            if (need_bias) db_acc.add_(x.sum(0));
          }
          if (visited) {  // this slice alone owns these rows of dW / dBias
            const at::Tensor ids = order.defined() ? order.ids_tensor(v0, cur_bv) : at::Tensor();
            if (need_weight && dw_direct) {  // final: written once, in the weight's dtype
              if (order.defined()) {
                dw.index_copy_(0, ids, dw_acc.to(dw.scalar_type()));
              } else {
                dw.narrow(0, v0, cur_bv).copy_(dw_acc);
              }
            } else if (need_weight && order.defined()) {
              dw.index_add_(0, ids, dw_acc);
            }
            if (need_bias && order.defined()) db32.index_add_(0, ids, db_acc);
          }
        }
      }
    });
    if (need_hidden) {
      at::Tensor out = dh32.narrow(0, sb0, nsb);
      for (int64_t s = 1; s < slices; ++s) out.add_(dh_partial[s]);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_bwd_cpu(
    const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_lse,
    const std::optional<at::Tensor>& grad_entropy, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& lse,
    const std::optional<at::Tensor>& entropy, double logit_scale, double inv_temperature, double softcap,
    int64_t block_tokens, int64_t block_vocab, bool need_hidden, bool need_weight, bool need_bias,
    int64_t workspace_bytes, const std::optional<at::Tensor>& live, int64_t filter_block,
    const std::optional<at::Tensor>& order_arg) {
  check_op_inputs(hidden, weight, bias, targets, block_tokens, block_vocab);
  const int64_t n = hidden.size(0);
  const int64_t dim = hidden.size(1);
  const int64_t vocab = weight.size(0);
  TORCH_CHECK(grad_logp.dim() == 1 && grad_logp.size(0) == n, "grad_logp must be [N]");
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == n, "lse must be [N]");
  TORCH_CHECK(!grad_entropy.has_value() || (entropy.has_value() && entropy->numel() == n),
              "grad_entropy needs the forward's entropy [N]");
  TORCH_CHECK(!need_bias || bias.has_value(), "need_bias without a bias");
  auto f32 = hidden.options().dtype(at::kFloat);

  const int64_t bn = std::min(block_tokens, n);
  const int64_t bv = std::min(block_vocab, vocab);
  const int64_t slices = num_vocab_slices(vocab, bv);
  // Slice 0 accumulates dH straight into the output; the others need a [superblock, D] fp32 buffer each.
  const int64_t dh_bytes_per_token = need_hidden ? (slices - 1) * dim * static_cast<int64_t>(sizeof(float)) : 0;
  const int64_t sb = n > 0 ? superblock_tokens(n, dh_bytes_per_token, bn, workspace_bytes) : 0;

  at::Tensor dh32 = need_hidden ? at::zeros({n, dim}, f32) : at::Tensor();
  // dW: accumulated in fp32 over the token superblocks; with one superblock each tile's rows are final when the walk
  // leaves the tile, and a half-precision head gets them written once, converted from a per-thread fp32 tile — no
  // fp32 [V, D] buffer beside the gradient (2 GiB at V 128256, D 4096)
  const bool dw_direct = need_weight && weight.scalar_type() != at::kFloat && sb >= n;
  at::Tensor dw = need_weight ? at::zeros({vocab, dim}, dw_direct ? weight.options() : f32) : at::Tensor();
  at::Tensor db32 = need_bias ? at::zeros({vocab}, f32) : at::Tensor();
  auto finish = [&]() {
    return std::make_tuple(need_hidden ? dh32.to(hidden.scalar_type()) : at::empty({0}, hidden.options()),
                           need_weight ? dw.to(weight.scalar_type()) : at::empty({0}, weight.options()),
                           need_bias ? db32.to(bias->scalar_type()) : at::empty({0}, weight.options()));
  };
  if (n == 0 || !(need_hidden || need_weight || need_bias)) return finish();

  const at::Tensor h_walk = walk_hidden(hidden, tile_math(hidden, weight));
  const at::Tensor w = weight.detach().contiguous();
  const at::Tensor b32 = bias.has_value() ? bias->detach().to(at::kFloat).contiguous() : at::Tensor();
  const float* bias_ptr = b32.defined() ? b32.data_ptr<float>() : nullptr;
  const int64_t* tgt = targets.data_ptr<int64_t>();
  const LogitTransform tf{logit_scale, inv_temperature, softcap};

  // Per-token coefficients with the chain factor (logit_scale / temperature) folded in:
  // dZ = slope * (p * (coef_a + coef_c * log p) + coef_t * onehot).
  const double chain = tf.chain();
  const at::Tensor g = grad_logp.to(at::kFloat);
  at::Tensor coef_a = grad_lse.has_value() ? (grad_lse->to(at::kFloat) - g) : -g;
  at::Tensor coef_c;
  const bool with_entropy = grad_entropy.has_value();
  if (with_entropy) {
    const at::Tensor g_h = grad_entropy->to(at::kFloat);
    coef_a = coef_a - g_h * entropy->to(at::kFloat);
    coef_c = (g_h * (-chain)).contiguous();
  }
  coef_a = (coef_a * chain).contiguous();
  const at::Tensor coef_t = (g * chain).contiguous();
  const float* ct = coef_t.data_ptr<float>();
  const at::Tensor lse32 = lse.to(at::kFloat).contiguous();

  const int scratch_tiles = (tf.has_softcap() ? 1 : 0) + (with_entropy ? 1 : 0);

  TORCH_CHECK(live.has_value() || !order_arg.has_value(), "a vocabulary order is only used with filtering");
  if (live.has_value()) {
    TORCH_CHECK(filter_block > 0 && block_vocab % filter_block == 0, "block_vocab must be a multiple of filter_block");
    const int64_t fb = std::min(filter_block, bv);
    TORCH_CHECK(live->scalar_type() == at::kBool && live->dim() == 2 && live->size(0) == n &&
                    live->size(1) == ceil_div(vocab, fb) && live->is_contiguous(),
                "live must be the forward's contiguous bool [N, ceil(V / filter_block)]");
    const VocabOrder order = VocabOrder::of(order_arg, vocab);
    const Coefficients co{coef_a, coef_c, coef_t, lse32};
    filtered_backward(co, h_walk, w, bias_ptr, order.positions_of(targets), tf, order, live->contiguous(), fb, bn, bv,
                      slices, sb, dh32, dw, db32);
    return finish();
  }

  for (int64_t sb0 = 0; sb0 < n; sb0 += sb) {
    const int64_t nsb = std::min(sb, n - sb0);
    std::vector<at::Tensor> dh_partial(slices);
    std::vector<at::Tensor> dw_tiles(slices);  // dw_direct: each slice's fp32 tile of dW rows
    walk_superblock(
        h_walk, w, bias_ptr, tf, VocabOrder{}, sb0, nsb, bn, bv, slices, scratch_tiles, tf.has_softcap(), need_hidden,
        [&](int64_t s) {
          if (need_hidden) dh_partial[s] = s == 0 ? dh32.narrow(0, sb0, nsb) : at::zeros({nsb, dim}, f32);
          if (dw_direct) dw_tiles[s] = at::empty({bv, dim}, f32);
        },
        [&](const TileVisit& t) {
          at::Tensor& x = t.logits;
          const at::Tensor& slope = t.scratch;  // (with a softcap)
          at::Tensor weights = tf.has_softcap() ? t.scratch2 : t.scratch;
          const at::Tensor a = coef_a.narrow(0, t.n0, t.cur_bn).unsqueeze(1);
          x.sub_(lse32.narrow(0, t.n0, t.cur_bn).unsqueeze(1));  // x <- log p
          if (with_entropy) {  // weights = a + c * max(log p, floor); x <- p * weights
            at::clamp_min_out(weights, x, kLogZeroFloor);
            weights.mul_(coef_c.narrow(0, t.n0, t.cur_bn).unsqueeze(1)).add_(a);
            x.exp_().mul_(weights);
          } else {
            x.exp_().mul_(a);
          }
          float* xp = x.data_ptr<float>();
          for (int64_t r = 0; r < t.cur_bn; ++r) {
            const int64_t target = tgt[t.n0 + r];
            if (target >= t.v0 && target < t.v0 + t.cur_bv) xp[r * t.cur_bv + (target - t.v0)] += ct[t.n0 + r];
          }
          if (tf.has_softcap()) x.mul_(slope);
          const at::Tensor coef = coefficient_operand(x, t.buffer16, t.w_tile.math);
          if (need_hidden) {
            at::Tensor acc = dh_partial[t.slice].narrow(0, t.n0 - sb0, t.cur_bn);
            t.w_tile.product(acc, coef, /*accumulate=*/true);
          }
          if (need_weight && dw_direct) {  // the tile's token blocks come in order: the last one finishes its rows
            at::Tensor acc = dw_tiles[t.slice].narrow(0, 0, t.cur_bv);
            if (t.n0 == sb0) acc.zero_();
            add_weight_product(acc, coef, t.h_block, t.w_tile.math);
            if (t.n0 + t.cur_bn == sb0 + nsb) dw.narrow(0, t.v0, t.cur_bv).copy_(acc);
          } else if (need_weight) {
            at::Tensor acc = dw.narrow(0, t.v0, t.cur_bv);
            add_weight_product(acc, coef, t.h_block, t.w_tile.math);
          }
          if (need_bias) db32.narrow(0, t.v0, t.cur_bv).add_(x.sum(0));
        });
    if (need_hidden) {
      at::Tensor out = dh32.narrow(0, sb0, nsb);
      for (int64_t s = 1; s < slices; ++s) out.add_(dh_partial[s]);
    }
  }
  return finish();
}

}  // namespace logo_kernels
