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
#include "linear_logprobs.h"

namespace logo_kernels {

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_bwd_cpu(
    const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_lse,
    const std::optional<at::Tensor>& grad_entropy, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& lse,
    const std::optional<at::Tensor>& entropy, double logit_scale, double inv_temperature, double softcap,
    int64_t block_tokens, int64_t block_vocab, bool need_hidden, bool need_weight, bool need_bias,
    int64_t workspace_bytes) {
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

  const int64_t bn = std::min(block_tokens, n);
  const int64_t bv = std::min(block_vocab, vocab);
  const int64_t slices = num_vocab_slices(vocab, bv);
  // Slice 0 accumulates dH straight into the output; the others need a [superblock, D] fp32 buffer each.
  const int64_t dh_bytes_per_token = need_hidden ? (slices - 1) * dim * static_cast<int64_t>(sizeof(float)) : 0;
  const int64_t sb = superblock_tokens(n, dh_bytes_per_token, bn, workspace_bytes);
  const int scratch_tiles = (tf.has_softcap() ? 1 : 0) + (with_entropy ? 1 : 0);

  for (int64_t sb0 = 0; sb0 < n; sb0 += sb) {
    const int64_t nsb = std::min(sb, n - sb0);
    std::vector<at::Tensor> dh_partial(slices);
    walk_superblock(
        h32, w, bias_ptr, tf, sb0, nsb, bn, bv, slices, scratch_tiles, tf.has_softcap(),
        [&](int64_t s) {
          if (need_hidden) dh_partial[s] = s == 0 ? dh32.narrow(0, sb0, nsb) : at::zeros({nsb, dim}, f32);
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
