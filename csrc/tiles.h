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

namespace logo_kernels {

// OpenMP workers do not inherit the caller's autograd TLS: every parallel region of the kernels runs
// its ATen calls below the autograd keys (and the kernels detach their inputs).
using BelowAutogradGuard = at::AutoDispatchBelowADInplaceOrView;

// Logit transform applied after the GEMM: x = (h.w + b) * inv_temperature; if softcap > 0,
// x = softcap * tanh(x / softcap).
struct LogitTransform {
  double inv_temperature = 1.0;
  double softcap = 0.0;  // 0 disables the cap
  bool has_softcap() const { return softcap > 0.0; }
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

// W rows [v0, v0 + bv) as an fp32 contiguous tile (a view when W is already fp32).
inline at::Tensor weight_tile_fp32(const at::Tensor& weight, int64_t v0, int64_t bv) {
  at::Tensor tile = weight.narrow(0, v0, bv);
  return tile.scalar_type() == at::kFloat ? tile : tile.to(at::kFloat);
}

// out[bn, bv] = transform(h_block @ w_tile^T + bias[v0:v0+bv]); h_block and w_tile fp32 contiguous.
inline void compute_logits_tile(at::Tensor& out, const at::Tensor& h_block, const at::Tensor& w_tile,
                                const float* bias, int64_t v0, const LogitTransform& tf) {
  at::mm_out(out, h_block, w_tile.t());
  const int64_t rows = out.size(0);
  const int64_t cols = out.size(1);
  float* x = out.data_ptr<float>();
  const float inv_t = static_cast<float>(tf.inv_temperature);
  const bool scale = tf.inv_temperature != 1.0;
  if (bias != nullptr || scale) {
    for (int64_t r = 0; r < rows; ++r) {
      float* row = x + r * cols;
      if (bias != nullptr) {
        const float* b = bias + v0;
        for (int64_t c = 0; c < cols; ++c) row[c] = (row[c] + b[c]) * inv_t;
      } else {
        for (int64_t c = 0; c < cols; ++c) row[c] *= inv_t;
      }
    }
  }
  if (tf.has_softcap()) {
    const double cap = tf.softcap;
    out.div_(cap).tanh_().mul_(cap);
  }
}

// out = d(cap * tanh(z / cap)) / dz = 1 - (x / cap)^2, from the capped logits x (same shape).
inline void softcap_slope(at::Tensor& out, const at::Tensor& x, double cap) {
  at::div_out(out, x, cap);
  out.mul_(out).neg_().add_(1.0);
}

}  // namespace logo_kernels
