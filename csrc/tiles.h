// Shared tile machinery of the fused linear -> log-prob CPU kernels.
//
// Both passes walk the same grid: the vocabulary is cut into tiles of `block_vocab` rows of W, the
// (compacted) tokens into blocks of `block_tokens` rows of H. Worker threads own contiguous slices of
// vocabulary tiles, so every row of dW (and of the bias gradient) has exactly one writer; per-token
// quantities are merged across slices after the parallel region. Tile GEMMs are single-threaded MKL
// calls made from inside at::parallel_for, so a [block_tokens x block_vocab] logits tile is the largest
// logits buffer that ever exists (one per thread).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "bf16_dot.h"

namespace logo_kernels {

// OpenMP workers do not inherit the caller's autograd TLS: every parallel region of the kernels runs
// its ATen calls below the autograd keys (and the kernels detach their inputs).
using BelowAutogradGuard = at::AutoDispatchBelowADInplaceOrView;

// Logit transform applied after the GEMM (the order of Hugging Face models and TRL):
// x = softcap * tanh(logit_scale * (h.w + b) / softcap) * inv_temperature, without the tanh when softcap = 0.
struct LogitTransform {
  double logit_scale = 1.0;
  double inv_temperature = 1.0;
  double softcap = 0.0;  // 0 disables the cap
  bool has_softcap() const { return softcap > 0.0; }
  // d x / d(h.w + b) without the softcap slope
  double chain() const { return logit_scale * inv_temperature; }
  // x = tanh(.) * cap_over_temperature()
  double cap_over_temperature() const { return softcap * inv_temperature; }
};

// A worker's contiguous share of the vocabulary, in whole tiles.
struct VocabSlice {
  int64_t begin = 0;
  int64_t end = 0;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Number of vocabulary slices = number of worker threads (never more slices than tiles).
inline int64_t num_vocab_slices(int64_t vocab, int64_t block_vocab) {
  const int64_t tiles = ceil_div(vocab, block_vocab);
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
}

inline VocabSlice vocab_slice(int64_t slice, int64_t num_slices, int64_t vocab, int64_t block_vocab) {
  const int64_t tiles = ceil_div(vocab, block_vocab);
  const int64_t t0 = slice * tiles / num_slices;
  const int64_t t1 = (slice + 1) * tiles / num_slices;
  return {std::min(vocab, t0 * block_vocab), std::min(vocab, t1 * block_vocab)};
}

// Largest token superblock (a multiple of bn, at least bn) whose per-token fp32 workspace of
// `bytes_per_token` fits `workspace_bytes`; all of n when nothing per token is needed.
inline int64_t superblock_tokens(int64_t n, int64_t bytes_per_token, int64_t bn, int64_t workspace_bytes) {
  if (bytes_per_token <= 0) return n;
  const int64_t fit = std::max<int64_t>(1, workspace_bytes / bytes_per_token);
  return std::min(n, std::max(bn, fit / bn * bn));
}

// The vocabulary order of a walk: tiles hold the rows order[v0 : v0 + bv] of W (a gathered copy), or the rows
// [v0, v0 + bv) when the order is undefined (the identity). `position[id]` is where vocabulary row `id` sits.
struct VocabOrder {
  at::Tensor order;     // [V] int64 permutation, or undefined
  at::Tensor position;  // [V] int64 inverse permutation, or undefined
  bool defined() const { return order.defined(); }
  const int64_t* ids(int64_t v0) const { return defined() ? order.data_ptr<int64_t>() + v0 : nullptr; }
  at::Tensor ids_tensor(int64_t v0, int64_t bv) const { return order.narrow(0, v0, bv); }
  // the position of each of `targets` in this order (the targets themselves without an order)
  at::Tensor positions_of(const at::Tensor& targets) const {
    return defined() ? position.index_select(0, targets).contiguous() : targets;
  }
  static VocabOrder of(const std::optional<at::Tensor>& order, int64_t vocab) {
    VocabOrder o;
    if (!order.has_value()) return o;
    TORCH_CHECK(order->dim() == 1 && order->size(0) == vocab && order->scalar_type() == at::kLong,
                "order must be an int64 permutation of the vocabulary [V]");
    o.order = order->contiguous();
    o.position = at::empty_like(o.order);
    o.position.index_copy_(0, o.order, at::arange(vocab, o.order.options()));
    TORCH_CHECK(o.position.index_select(0, o.order).equal(at::arange(vocab, o.order.options())),
                "order must be a permutation of [0, V)");
    return o;
  }
};

// How a walk multiplies. kFloat32: fp32 tiles through ATen's sgemm (bf16 / fp16 operands converted). kBf16Dot, where
// hidden and weight are both bf16 and bf16_dot::enabled(): the bf16 operands as they are (exact products, fp32 sums:
// the logits keep the fp32 tiles' precision at twice their speed); the two products of the backward and the forward's
// gradient basis multiply coefficient tiles rounded to bf16 — what every bf16 kernel does (naive autograd, Liger,
// Cut-Cross-Entropy), within the project's tolerance rule (tests/test_linear_logprobs.py).
enum class TileMath { kFloat32, kBf16Dot };

inline TileMath tile_math(const at::Tensor& hidden, const at::Tensor& weight) {
  return hidden.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 && bf16_dot::enabled()
             ? TileMath::kBf16Dot
             : TileMath::kFloat32;
}

// The hidden states as a walk reads them: fp32 contiguous, or the bf16 rows as they are (kBf16Dot).
inline at::Tensor walk_hidden(const at::Tensor& hidden, TileMath math) {
  return math == TileMath::kBf16Dot ? hidden.detach().contiguous() : hidden.detach().to(at::kFloat).contiguous();
}

// The math of a walk over walk_hidden's result (it keeps bf16 rows for kBf16Dot only).
inline TileMath walk_math(const at::Tensor& h_walk) {
  return h_walk.scalar_type() == at::kBFloat16 ? TileMath::kBf16Dot : TileMath::kFloat32;
}

// The W rows of the tile at [v0, v0 + bv) of the walk order (a gathered copy, or a view for the identity order) and
// the products a walk makes with them.
struct WeightTile {
  TileMath math = TileMath::kFloat32;
  at::Tensor rows;                 // [bv, D]: fp32 (kFloat32) or bf16 (kBf16Dot), contiguous
  bf16_dot::PackedB transposed;    // kBf16Dot: W^T, for the logits
  bf16_dot::PackedB plain;         // kBf16Dot: W, for coefficients @ W (packed when `with_products`)

  static WeightTile load(const at::Tensor& weight, int64_t v0, int64_t bv, const VocabOrder& order, TileMath math,
                         bool with_products) {
    WeightTile t;
    t.math = math;
    at::Tensor tile = order.defined() ? weight.index_select(0, order.ids_tensor(v0, bv)) : weight.narrow(0, v0, bv);
    if (math == TileMath::kFloat32) {
      t.rows = (tile.scalar_type() == at::kFloat ? tile : tile.to(at::kFloat)).contiguous();
      return t;
    }
    t.rows = tile.contiguous();
    const int64_t dim = t.rows.size(1);
    const auto* w = t.rows.data_ptr<at::BFloat16>();
    bf16_dot::pack_b(t.transposed, w, dim, bv, /*k_stride=*/1, /*n_stride=*/dim);
    if (with_products) bf16_dot::pack_b(t.plain, w, bv, dim, /*k_stride=*/dim, /*n_stride=*/1);
    return t;
  }

  // out[m, bv] = h_rows[m, D] @ W^T; h_rows as walk_hidden gives them (rows contiguous), out fp32 contiguous.
  void logits(at::Tensor& out, const at::Tensor& h_rows) const {
    if (math == TileMath::kFloat32) {
      at::mm_out(out, h_rows, rows.t());
      return;
    }
    bf16_dot::gemm(h_rows.size(0), h_rows.data_ptr<at::BFloat16>(), h_rows.stride(0), 1, transposed,
                   out.data_ptr<float>(), out.stride(0), /*accumulate=*/false);
  }

  // acc[m, D] (+)= coef[m, bv] @ W; acc fp32 with contiguous rows, coef as coefficient_operand gives it.
  void product(at::Tensor& acc, const at::Tensor& coef, bool accumulate) const {
    if (math == TileMath::kFloat32) {
      if (accumulate) {
        acc.addmm_(coef, rows);
      } else {
        at::mm_out(acc, coef, rows);
      }
      return;
    }
    TORCH_CHECK(plain.packed, "WeightTile: products with W were not asked for at load");
    bf16_dot::gemm(coef.size(0), coef.data_ptr<at::BFloat16>(), coef.stride(0), 1, plain, acc.data_ptr<float>(),
                   acc.stride(0), accumulate);
  }
};

// The bf16 buffer coefficient_operand rounds a [bn, bv] tile into (kBf16Dot; undefined for kFloat32), one per thread.
inline at::Tensor coefficient_buffer(TileMath math, int64_t bn, int64_t bv, const at::Tensor& like) {
  return math == TileMath::kBf16Dot ? at::empty({bn * bv}, like.options().dtype(at::kBFloat16)) : at::Tensor();
}

// A coefficient tile [m, bv] (fp32, contiguous) as the products read it: itself (kFloat32), or rounded to bf16 into
// `buffer16` (kBf16Dot: [>= m * bv] bf16; one vectorised conversion serves both products of a visit).
inline at::Tensor coefficient_operand(const at::Tensor& coef, const at::Tensor& buffer16, TileMath math) {
  if (math == TileMath::kFloat32) return coef;
  at::Tensor out = buffer16.narrow(0, 0, coef.numel()).view(coef.sizes());
  out.copy_(coef);
  return out;
}

// acc[bv, D] += coef[m, bv]^T @ h_rows[m, D] (the weight gradient of a tile); acc fp32 with contiguous rows, coef as
// coefficient_operand gives it, h_rows as walk_hidden gives them.
inline void add_weight_product(at::Tensor& acc, const at::Tensor& coef, const at::Tensor& h_rows, TileMath math) {
  if (math == TileMath::kFloat32) {
    acc.addmm_(coef.t(), h_rows);
    return;
  }
  bf16_dot::PackedB hidden_pairs;
  const int64_t m = h_rows.size(0), dim = h_rows.size(1);
  bf16_dot::pack_b(hidden_pairs, h_rows.data_ptr<at::BFloat16>(), m, dim, h_rows.stride(0), 1);
  bf16_dot::gemm(coef.size(1), coef.data_ptr<at::BFloat16>(), /*m_stride=*/1, /*k_stride=*/coef.stride(0), hidden_pairs,
                 acc.data_ptr<float>(), acc.stride(0), /*accumulate=*/true);
}

// The bias values of the tile at [v0, v0 + bv) of the walk order: a pointer into the bias, or into `scratch`
// ([>= bv] floats) where they were gathered; nullptr without a bias.
inline const float* bias_tile(const float* bias, int64_t v0, int64_t bv, const VocabOrder& order, float* scratch) {
  if (bias == nullptr) return nullptr;
  if (!order.defined()) return bias + v0;
  const int64_t* ids = order.ids(v0);
  for (int64_t c = 0; c < bv; ++c) scratch[c] = bias[ids[c]];
  return scratch;
}

// out[bn, bv] = transform(h_block @ w_tile^T + bias_tile); h_block as walk_hidden gives it, bias_tile [bv] or null. With a
// defined `slope` (same shape) and a softcap, also slope = 1 - tanh^2(u) = 1 / cosh^2(u) of the pre-cap value
// u = logit_scale * z / softcap: exact where the cap saturates (1 - tanh^2 from the capped logit would cancel to
// noise there), and cosh^2 overflowing to inf gives the right 0.
inline void compute_logits_tile(at::Tensor& out, const at::Tensor& h_block, const WeightTile& w_tile,
                                const float* bias, const LogitTransform& tf, at::Tensor* slope = nullptr) {
  w_tile.logits(out, h_block);
  const int64_t rows = out.size(0);
  const int64_t cols = out.size(1);
  float* x = out.data_ptr<float>();
  // without a softcap the scale and the temperature fold into one multiplier; with one, u = scale / cap * z
  const double pre_d = tf.has_softcap() ? tf.logit_scale / tf.softcap : tf.chain();
  const float pre = static_cast<float>(pre_d);
  if (bias != nullptr || pre_d != 1.0) {
    for (int64_t r = 0; r < rows; ++r) {
      float* row = x + r * cols;
      if (bias != nullptr) {
        const float* b = bias;
        for (int64_t c = 0; c < cols; ++c) row[c] = (row[c] + b[c]) * pre;
      } else {
        for (int64_t c = 0; c < cols; ++c) row[c] *= pre;
      }
    }
  }
  if (tf.has_softcap()) {
    if (slope != nullptr && slope->defined()) {
      at::cosh_out(*slope, out);
      slope->mul_(*slope).reciprocal_();
    }
    out.tanh_().mul_(tf.cap_over_temperature());
  }
}

// Below this a log-probability's exp is exactly 0 in fp32 (exp underflows under -104): clamping a log p
// there before multiplying it by a finite coefficient changes no p * (...) product and keeps -inf (a token
// masked by a -inf bias) from giving 0 * inf = NaN.
constexpr double kLogZeroFloor = -200.0;

// One visited tile: its coordinates, the transformed logits tile [cur_bn, cur_bv] (the visitor may
// overwrite it), the weight tile [cur_bv, D] and hidden block [cur_bn, D] (walk_hidden's), and a scratch tile of
// the logits' shape each (`scratch_tiles` of them: 0, 1 or 2) when the walk was asked for them; with
// `slope_in_scratch` the first holds the softcap slope of the tile.
struct TileVisit {
  int64_t slice, v0, cur_bv, n0, cur_bn;
  const int64_t* ids;  // the vocabulary ids of the tile's columns (order[v0:]), nullptr for the identity order
  at::Tensor& logits;
  const WeightTile& w_tile;
  const at::Tensor& h_block;
  at::Tensor& scratch;
  at::Tensor& scratch2;
  const at::Tensor& buffer16;  // [>= cur_bn * cur_bv] bf16 for coefficient_operand (kBf16Dot)
};

// The tile walk of both passes over the tokens [sb0, sb0 + nsb) of one superblock: workers own
// vocabulary slices (at::parallel_for, below autograd); `on_slice(s)` runs first in the worker, then
// `on_tile(TileVisit)` for each (vocabulary tile, token block) of the slice, vocabulary-tile-major.
// Both passes walk identical tiles through this one function — same GEMM shapes — so the backward
// recomputes the forward's logits bitwise (softmax(x - lse) is exact where it should be). `with_products`: on_tile
// multiplies coefficient tiles by the weight tile (WeightTile::product).
template <typename OnSlice, typename OnTile>
void walk_superblock(const at::Tensor& h_walk, const at::Tensor& w, const float* bias, const LogitTransform& tf,
                     const VocabOrder& order, int64_t sb0, int64_t nsb, int64_t bn, int64_t bv, int64_t slices,
                     int scratch_tiles, bool slope_in_scratch, bool with_products, OnSlice&& on_slice,
                     OnTile&& on_tile) {
  const int64_t vocab = w.size(0);
  const auto f32 = h_walk.options().dtype(at::kFloat);
  const TileMath math = walk_math(h_walk);
  at::parallel_for(0, slices, 1, [&](int64_t s_begin, int64_t s_end) {
    const BelowAutogradGuard below_autograd;
    const at::Tensor buf = at::empty({bn * bv}, f32);
    const at::Tensor scratch_buf = scratch_tiles >= 1 ? at::empty({bn * bv}, f32) : at::Tensor();
    const at::Tensor scratch2_buf = scratch_tiles >= 2 ? at::empty({bn * bv}, f32) : at::Tensor();
    const at::Tensor buffer16 = coefficient_buffer(math, bn, bv, h_walk);
    std::vector<float> bias_buf(bias != nullptr && order.defined() ? bv : 0);
    for (int64_t s = s_begin; s < s_end; ++s) {
      on_slice(s);
      const VocabSlice slice = vocab_slice(s, slices, vocab, bv);
      for (int64_t v0 = slice.begin; v0 < slice.end; v0 += bv) {
        const int64_t cur_bv = std::min(bv, slice.end - v0);
        const WeightTile wt = WeightTile::load(w, v0, cur_bv, order, math, with_products);
        const float* bt = bias_tile(bias, v0, cur_bv, order, bias_buf.data());
        for (int64_t n0 = sb0; n0 < sb0 + nsb; n0 += bn) {
          const int64_t cur_bn = std::min(bn, sb0 + nsb - n0);
          const at::Tensor h_block = h_walk.narrow(0, n0, cur_bn);
          at::Tensor x = buf.narrow(0, 0, cur_bn * cur_bv).view({cur_bn, cur_bv});
          auto tile_of = [&](const at::Tensor& b) {
            return b.defined() ? b.narrow(0, 0, cur_bn * cur_bv).view({cur_bn, cur_bv}) : at::Tensor();
          };
          at::Tensor scratch = tile_of(scratch_buf);
          at::Tensor scratch2 = tile_of(scratch2_buf);
          compute_logits_tile(x, h_block, wt, bt, tf, slope_in_scratch ? &scratch : nullptr);
          on_tile(TileVisit{s, v0, cur_bv, n0, cur_bn, order.ids(v0), x, wt, h_block, scratch, scratch2, buffer16});
        }
      }
    }
  });
}

}  // namespace logo_kernels
