// Forward of the fused linear -> per-token log-prob op on CPU.
//
// For every (vocabulary tile, token block) a logits tile is computed by a single-threaded GEMM, its
// row maxima and sum of exponentials are merged into running (max, sum) statistics of the worker's
// vocabulary slice (online log-sum-exp), and the target logit is picked from the tile that holds it.
// After the parallel region the per-slice statistics are merged into the log-sum-exp.
//
// Optional per-token statistics, accumulated per slice the same way and merged at the end:
//   entropy           H = log S - T / S, with S = sum e^(x-m) and T = sum e^(x-m) (x - m) (shifted by the
//                     running max: no cancellation of large logits); on a new max m', T' = r (T + (m - m') S)
//   log_sum_sq_probs  log sum e^(2(x-m)) - 2 log S   (rescaled by r^2)
//   mean_logits       sum x / V
//   is_top1           x_t >= max and max_{j < t} x_j < x_t  (the target is the first arg-max, as torch.argmax)
//
// With `with_basis`, the forward also returns the "gradient basis" Q = (softmax(x) * slope) @ W [N, D]
// (slope = softcap derivative, 1 without softcap), accumulated online per slice exactly like the sum
// of exponentials (rescaled whenever the running max grows). With it, dHidden for a frozen head is an
// elementwise expression of the upstream gradients (see logo_kernels/linear_logprobs.py): the backward
// needs no GEMM. Tokens then go in superblocks so that the per-slice [superblock, D] accumulators fit
// `workspace_bytes`.
//
// Gradient filtering (`filter`): the vocabulary is walked in `order` (a permutation, e.g. by mean logit; the
// identity when undefined) in tiles of `block_vocab` rows, and the forward records each token's maximum logit per
// tile and the tile's log-sum-exp. Once the superblock's log-sum-exp is known it marks skippable the pairs whose
// largest probability is below filter_eps and that do not hold the target, and skips them least probable first
// while the token's skipped probability mass stays <= max_skipped_mass (logo_kernels/backends/base.py
// live_pairs, the same ATen ops; its last step, keep_mostly_live_tokens, is applied by backends/cpp.py): live[t, b]
// for the backward.
#include "linear_logprobs.h"

#include <limits>
#include <vector>

namespace logo_kernels {

namespace {

// Per-slice running statistics of all tokens: [slices, N] each (undefined when not asked for).
struct SliceStats {
  at::Tensor max, sum, ent, sq, xsum, max_before;
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_logprobs_fwd_cpu(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& targets, double logit_scale, double inv_temperature, double softcap,
                        int64_t block_tokens, int64_t block_vocab, bool with_basis, bool want_entropy,
                        bool want_log_sum_sq, bool want_mean, bool want_top1, int64_t workspace_bytes, bool filter,
                        int64_t filter_block, double log_filter_eps, double max_skipped_mass,
                        const std::optional<at::Tensor>& order_arg) {
  check_op_inputs(hidden, weight, bias, targets, block_tokens, block_vocab);
  const int64_t n = hidden.size(0);
  const int64_t dim = hidden.size(1);
  const int64_t vocab = weight.size(0);
  auto f32 = hidden.options().dtype(at::kFloat);
  auto none = [&]() { return at::empty({0}, f32); };
  at::Tensor logp = at::empty({n}, f32);
  at::Tensor lse = at::empty({n}, f32);
  at::Tensor basis = with_basis ? at::empty({n, dim}, f32) : none();
  at::Tensor entropy = want_entropy ? at::empty({n}, f32) : none();
  at::Tensor log_sum_sq = want_log_sum_sq ? at::empty({n}, f32) : none();
  at::Tensor mean_logits = want_mean ? at::empty({n}, f32) : none();
  at::Tensor is_top1 = want_top1 ? at::empty({n}, hidden.options().dtype(at::kBool)) : at::empty({0}, at::kBool);
  const int64_t bv = std::min(block_vocab, vocab);
  // filtering's blocks: filter_block ids each, aligned inside the walk's tiles
  TORCH_CHECK(!filter || (filter_block > 0 && block_vocab % filter_block == 0),
              "block_vocab must be a multiple of filter_block");
  const int64_t fb = filter ? std::min(filter_block, bv) : 1;
  const int64_t num_tiles = filter ? ceil_div(vocab, fb) : 0;  // (filter blocks)
  at::Tensor live = filter ? at::zeros({n, num_tiles}, hidden.options().dtype(at::kBool)) : at::empty({0}, at::kBool);
  auto result = [&]() { return std::make_tuple(logp, lse, basis, entropy, log_sum_sq, mean_logits, is_top1, live); };
  if (n == 0) return result();

  const at::Tensor h_walk = walk_hidden(hidden, tile_math(hidden, weight));
  const at::Tensor w = weight.detach().contiguous();
  const at::Tensor b32 = bias.has_value() ? bias->detach().to(at::kFloat).contiguous() : at::Tensor();
  const float* bias_ptr = b32.defined() ? b32.data_ptr<float>() : nullptr;
  TORCH_CHECK(filter || !order_arg.has_value(), "a vocabulary order is only used with filtering");
  const VocabOrder order = VocabOrder::of(order_arg, vocab);
  const int64_t* tgt = targets.data_ptr<int64_t>();
  const at::Tensor target_pos = order.positions_of(targets);  // where each target sits in the walk order
  const int64_t* tpos = target_pos.data_ptr<int64_t>();
  const LogitTransform tf{logit_scale, inv_temperature, softcap};

  const int64_t bn = std::min(block_tokens, n);
  const int64_t slices = num_vocab_slices(vocab, bv);
  const int64_t basis_bytes_per_token = with_basis ? slices * dim * static_cast<int64_t>(sizeof(float)) : 0;
  const int64_t tile_max_bytes_per_token = filter ? 2 * num_tiles * static_cast<int64_t>(sizeof(float)) : 0;
  const int64_t sb = superblock_tokens(n, basis_bytes_per_token + tile_max_bytes_per_token, bn, workspace_bytes);
  // The floor keeps exp(m_old - m_new) finite when a whole tile is -inf (e.g. a bias that masks tokens out).
  const float floor = std::numeric_limits<float>::lowest();
  SliceStats st;
  st.max = at::full({slices, n}, floor, f32);
  st.sum = at::zeros({slices, n}, f32);
  if (want_entropy) st.ent = at::zeros({slices, n}, f32);
  if (want_log_sum_sq) st.sq = at::zeros({slices, n}, f32);
  if (want_mean) st.xsum = at::zeros({slices, n}, f32);
  if (want_top1) st.max_before = at::full({slices, n}, -std::numeric_limits<float>::infinity(), f32);
  at::Tensor target_logit = at::empty({n}, f32);
  float* tl = target_logit.data_ptr<float>();

  const bool need_slope = with_basis && tf.has_softcap();       // in scratch
  const bool need_exp_copy = want_entropy || want_log_sum_sq;  // e = exp(x - m) kept next to x - m
  const int scratch_tiles = (need_slope ? 1 : 0) + (need_exp_copy ? 1 : 0);

  for (int64_t sb0 = 0; sb0 < n; sb0 += sb) {
    const int64_t nsb = std::min(sb, n - sb0);
    std::vector<at::Tensor> basis_partial(slices);
    // the maximum logit and the log-sum-exp of each (token of the superblock, tile): [nsb, tiles]
    const at::Tensor tile_max = filter ? at::empty({nsb, num_tiles}, f32) : at::Tensor();
    const at::Tensor tile_lse = filter ? at::empty({nsb, num_tiles}, f32) : at::Tensor();
    walk_superblock(
        h_walk, w, bias_ptr, tf, order, sb0, nsb, bn, bv, slices, scratch_tiles, need_slope, with_basis,
        [&](int64_t s) {
          if (with_basis) basis_partial[s] = at::zeros({nsb, dim}, f32);
        },
        [&](const TileVisit& t) {
          at::Tensor& x = t.logits;
          const float* xp = x.data_ptr<float>();
          float* max_before = want_top1 ? st.max_before.select(0, t.slice).data_ptr<float>() : nullptr;
          for (int64_t r = 0; r < t.cur_bn; ++r) {
            const int64_t target = tgt[t.n0 + r];
            const int64_t pos = tpos[t.n0 + r];
            const float* row = xp + r * t.cur_bv;
            if (pos >= t.v0 && pos < t.v0 + t.cur_bv) tl[t.n0 + r] = row[pos - t.v0];
            if (max_before != nullptr && t.ids != nullptr) {  // "before" = a smaller vocabulary id, not position
              float mb = max_before[t.n0 + r];
              for (int64_t c = 0; c < t.cur_bv; ++c) mb = (t.ids[c] < target && row[c] > mb) ? row[c] : mb;
              max_before[t.n0 + r] = mb;
            } else if (max_before != nullptr && target > t.v0) {
              const int64_t k = std::min(target - t.v0, t.cur_bv);
              float mb = max_before[t.n0 + r];
              for (int64_t c = 0; c < k; ++c) mb = row[c] > mb ? row[c] : mb;
              max_before[t.n0 + r] = mb;
            }
          }
          if (want_mean) st.xsum.select(0, t.slice).narrow(0, t.n0, t.cur_bn).add_(x.sum(1));
          const at::Tensor& slope = t.scratch;
          at::Tensor m_old = st.max.select(0, t.slice).narrow(0, t.n0, t.cur_bn);
          at::Tensor sum = st.sum.select(0, t.slice).narrow(0, t.n0, t.cur_bn);
          const at::Tensor x_max = x.amax(1);  // amax: no argmax work
          if (filter) {
            for (int64_t c0 = 0; c0 < t.cur_bv; c0 += fb) {
              at::Tensor out = tile_max.select(1, (t.v0 + c0) / fb).narrow(0, t.n0 - sb0, t.cur_bn);
              at::amax_out(out, x.narrow(1, c0, std::min(fb, t.cur_bv - c0)), {1});
            }
          }
          at::Tensor m_new = at::maximum(m_old, x_max).clamp_min_(floor);
          const at::Tensor rescale = (m_old - m_new).exp_();
          x.sub_(m_new.unsqueeze(1));  // x <- y = x - m_new
          at::Tensor e = x;
          if (need_exp_copy) {  // e = exp(y) in a scratch tile, y kept in x
            e = need_slope ? t.scratch2 : t.scratch;
            at::exp_out(e, x);
          } else {
            x.exp_();
          }
          if (want_entropy) {  // T' = r (T + (m_old - m_new) S) + sum e * y  (where S > 0: no -inf * 0)
            at::Tensor ent = st.ent.select(0, t.slice).narrow(0, t.n0, t.cur_bn);
            const at::Tensor shift = at::where(sum > 0, (m_old - m_new) * sum, at::zeros_like(sum));
            ent.add_(shift).mul_(rescale).add_(x.clamp_min_(kLogZeroFloor).mul_(e).sum(1));
          }
          if (want_log_sum_sq) {
            at::Tensor sq = st.sq.select(0, t.slice).narrow(0, t.n0, t.cur_bn);
            at::mul_out(x, e, e);
            sq.mul_(rescale.square()).add_(x.sum(1));
          }
          const at::Tensor tile_sum = e.sum(1);
          if (filter) {
            for (int64_t c0 = 0; c0 < t.cur_bv; c0 += fb) {
              at::Tensor out = tile_lse.select(1, (t.v0 + c0) / fb).narrow(0, t.n0 - sb0, t.cur_bn);
              at::sum_out(out, e.narrow(1, c0, std::min(fb, t.cur_bv - c0)), {1});
              out.log_().add_(m_new);
            }
          }
          sum.mul_(rescale).add_(tile_sum);
          if (with_basis) {
            if (need_slope) e.mul_(slope);
            at::Tensor acc = basis_partial[t.slice].narrow(0, t.n0 - sb0, t.cur_bn).mul_(rescale.unsqueeze(1));
            t.w_tile.product(acc, coefficient_operand(e, t.buffer16, t.w_tile.math), /*accumulate=*/true);
          }
          m_old.copy_(m_new);
        });

    // Every slice has seen every vocabulary row of this superblock: its statistics are final.
    const at::Tensor rmax = st.max.narrow(1, sb0, nsb);
    const at::Tensor m = rmax.amax(0);
    const at::Tensor weights = (rmax - m.unsqueeze(0)).exp_();  // exp(m_s - m) per slice
    const at::Tensor rsum = st.sum.narrow(1, sb0, nsb);
    const at::Tensor total = (rsum * weights).sum(0);
    at::Tensor lse_sb = lse.narrow(0, sb0, nsb);
    lse_sb.copy_(m + total.log());
    if (filter) {  // logo_kernels/backends/base.py live_pairs
      const at::Tensor lse_col = lse_sb.unsqueeze(1);
      at::Tensor dead = (tile_max - lse_col).lt(log_filter_eps);
      dead.scatter_(1, target_pos.narrow(0, sb0, nsb).div(fb, "floor").unsqueeze(1), false);
      const at::Tensor mass = at::where(dead, (tile_lse - lse_col).exp_(), std::numeric_limits<float>::infinity());
      const auto sorted = at::sort(mass, /*stable=*/true, /*dim=*/1, /*descending=*/false);
      const at::Tensor skip = at::zeros_like(dead).scatter_(1, std::get<1>(sorted),
                                                             std::get<0>(sorted).cumsum(1).le(max_skipped_mass));
      live.narrow(0, sb0, nsb).copy_(skip.logical_not());
    }
    if (want_entropy) {  // T = sum_s w_s (T_s + (m_s - m) S_s);  H = log S - T / S
      const at::Tensor shift = at::where(rsum > 0, (rmax - m.unsqueeze(0)) * rsum, at::zeros_like(rsum));
      const at::Tensor t_all = ((st.ent.narrow(1, sb0, nsb) + shift) * weights).sum(0);
      entropy.narrow(0, sb0, nsb).copy_(total.log() - t_all / total);
    }
    if (want_log_sum_sq) {
      const at::Tensor q = (st.sq.narrow(1, sb0, nsb) * weights.square()).sum(0);
      log_sum_sq.narrow(0, sb0, nsb).copy_(q.log() - 2.0 * total.log());
    }
    if (with_basis) {  // Q = sum_s acc_s * exp(m_s - lse)
      const at::Tensor to_probs = (rmax - lse_sb.unsqueeze(0)).exp_();
      at::Tensor q = basis.narrow(0, sb0, nsb);
      q.zero_();
      for (int64_t s = 0; s < slices; ++s) q.addcmul_(basis_partial[s], to_probs[s].unsqueeze(1));
    }
  }
  at::sub_out(logp, target_logit, lse);
  if (want_mean) mean_logits.copy_(st.xsum.sum(0).div_(static_cast<double>(vocab)));
  if (want_top1) {
    const at::Tensor m_all = st.max.amax(0);
    is_top1.copy_(target_logit.ge(m_all).logical_and_(st.max_before.amax(0).lt(target_logit)));
  }
  return result();
}

}  // namespace logo_kernels
