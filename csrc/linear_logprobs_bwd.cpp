// Backward of the fused linear -> per-token log-prob op on CPU, by recomputation.
//
// With x the transformed logits, p = softmax(x), g the upstream gradient of log p[target] and g_lse
// that of the log-sum-exp (0 when unused):
//   dL/dx = g * onehot(target) + (g_lse - g) * p
// then the softcap chain rule (1 - (x/cap)^2) and temperature (1/T); dH = dX W, dW = dX^T H,
// db = sum_rows dX. Each worker owns a slice of the vocabulary: it writes its rows of dW / db alone,
// and accumulates dH for the current token superblock in its own fp32 buffer (slice 0 writes straight
// into the output). The superblock size bounds those buffers (`workspace_bytes`).
#include "linear_logprobs.h"

namespace logo_kernels {

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_bwd_cpu(
    const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_lse, const at::Tensor& hidden,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& targets,
    const at::Tensor& lse, double inv_temperature, double softcap, int64_t block_tokens,
    int64_t block_vocab, bool need_hidden, bool need_weight, bool need_bias, int64_t workspace_bytes) {
  check_op_inputs(hidden, weight, bias, targets, block_tokens, block_vocab);
  const int64_t n = hidden.size(0);
  const int64_t dim = hidden.size(1);
  const int64_t vocab = weight.size(0);
  TORCH_CHECK(grad_logp.dim() == 1 && grad_logp.size(0) == n, "grad_logp must be [N]");
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == n, "lse must be [N]");
  TORCH_CHECK(!need_bias || bias.has_value(), "need_bias without a bias");
  auto f32 = hidden.options().dtype(at::kFloat);

  at::Tensor dh32 = need_hidden ? at::zeros({n, dim}, f32) : at::Tensor();
  at::Tensor dw32 = need_weight ? at::zeros({vocab, dim}, f32) : at::Tensor();
  at::Tensor db32 = need_bias ? at::zeros({vocab}, f32) : at::Tensor();
  auto finish = [&]() {
    return std::make_tuple(need_hidden ? dh32.to(hidden.scalar_type()) : at::empty({0}, hidden.options()),
                           need_weight ? dw32.to(weight.scalar_type()) : at::empty({0}, weight.options()),
                           need_bias ? db32.to(bias->scalar_type()) : at::empty({0}, weight.options()));
  };
  if (n == 0 || !(need_hidden || need_weight || need_bias)) return finish();

  const at::Tensor h32 = hidden.detach().to(at::kFloat).contiguous();
  const at::Tensor w = weight.detach().contiguous();
  const at::Tensor b32 = bias.has_value() ? bias->detach().to(at::kFloat).contiguous() : at::Tensor();
  const float* bias_ptr = b32.defined() ? b32.data_ptr<float>() : nullptr;
  const int64_t* tgt = targets.data_ptr<int64_t>();
  const LogitTransform tf{inv_temperature, softcap};

  // Per-token coefficients with the temperature folded in: dX = coef_p * p + coef_t * onehot.
  const at::Tensor g = grad_logp.to(at::kFloat);
  at::Tensor coef_p = grad_lse.has_value() ? (grad_lse->to(at::kFloat) - g) : -g;
  coef_p = (coef_p * inv_temperature).contiguous();
  const at::Tensor coef_t = (g * inv_temperature).contiguous();
  const float* ct = coef_t.data_ptr<float>();
  const at::Tensor lse32 = lse.to(at::kFloat).contiguous();

  const int64_t bn = std::min(block_tokens, n);
  const int64_t bv = std::min(block_vocab, vocab);
  const int64_t slices = num_vocab_slices(vocab, bv);
  // Slice 0 accumulates dH straight into the output; the others need a [superblock, D] fp32 buffer each.
  const int64_t dh_bytes_per_token = need_hidden ? (slices - 1) * dim * static_cast<int64_t>(sizeof(float)) : 0;
  const int64_t sb = superblock_tokens(n, dh_bytes_per_token, bn, workspace_bytes);

  for (int64_t sb0 = 0; sb0 < n; sb0 += sb) {
    const int64_t nsb = std::min(sb, n - sb0);
    std::vector<at::Tensor> dh_partial(slices);
    walk_superblock(
        h32, w, bias_ptr, tf, sb0, nsb, bn, bv, slices, tf.has_softcap(),
        [&](int64_t s) {
          if (need_hidden) dh_partial[s] = s == 0 ? dh32.narrow(0, sb0, nsb) : at::zeros({nsb, dim}, f32);
        },
        [&](const TileVisit& t) {
          at::Tensor& x = t.logits;
          if (tf.has_softcap()) softcap_slope(t.scratch, x, tf.softcap);
          // x <- p * coef_p (+ coef_t at the target column): the gradient w.r.t. the logits tile.
          x.sub_(lse32.narrow(0, t.n0, t.cur_bn).unsqueeze(1)).exp_();
          x.mul_(coef_p.narrow(0, t.n0, t.cur_bn).unsqueeze(1));
          float* xp = x.data_ptr<float>();
          for (int64_t r = 0; r < t.cur_bn; ++r) {
            const int64_t target = tgt[t.n0 + r];
            if (target >= t.v0 && target < t.v0 + t.cur_bv) xp[r * t.cur_bv + (target - t.v0)] += ct[t.n0 + r];
          }
          if (tf.has_softcap()) x.mul_(t.scratch);
          if (need_hidden) dh_partial[t.slice].narrow(0, t.n0 - sb0, t.cur_bn).addmm_(x, t.w_tile);
          if (need_weight) dw32.narrow(0, t.v0, t.cur_bv).addmm_(x.t(), t.h_block);
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
