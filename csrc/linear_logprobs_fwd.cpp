// Forward of the fused linear -> per-token log-prob op on CPU.
//
// For every (vocabulary tile, token block) a logits tile is computed by a single-threaded GEMM, its
// row maxima and sum of exponentials are merged into running (max, sum) statistics of the worker's
// vocabulary slice (online log-sum-exp), and the target logit is picked from the tile that holds it.
// After the parallel region the per-slice statistics are merged into the log-sum-exp.
//
// With `with_basis`, the forward also returns the "gradient basis" Q = (softmax(x) * slope) @ W [N, D]
// (slope = softcap derivative, 1 without softcap), accumulated online per slice exactly like the sum
// of exponentials (rescaled whenever the running max grows). With it, dHidden for a frozen head is an
// elementwise expression of the upstream gradients (see logo_kernels/linear_logprobs.py): the backward
// needs no GEMM. Tokens then go in superblocks so that the per-slice [superblock, D] accumulators fit
// `workspace_bytes`.
#include "linear_logprobs.h"

#include <limits>
#include <vector>

namespace logo_kernels {

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double inv_temperature, double softcap, int64_t block_tokens,
    int64_t block_vocab, bool with_basis, int64_t workspace_bytes) {
  check_op_inputs(hidden, weight, bias, targets, block_tokens, block_vocab);
  const int64_t n = hidden.size(0);
  const int64_t dim = hidden.size(1);
  const int64_t vocab = weight.size(0);
  auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({n}, f32);
  at::Tensor lse = at::empty({n}, f32);
  at::Tensor basis = with_basis ? at::empty({n, dim}, f32) : at::empty({0}, f32);
  if (n == 0) return {logp, lse, basis};

  const at::Tensor h32 = hidden.detach().to(at::kFloat).contiguous();
  const at::Tensor w = weight.detach().contiguous();
  const at::Tensor b32 = bias.has_value() ? bias->detach().to(at::kFloat).contiguous() : at::Tensor();
  const float* bias_ptr = b32.defined() ? b32.data_ptr<float>() : nullptr;
  const int64_t* tgt = targets.data_ptr<int64_t>();
  const LogitTransform tf{inv_temperature, softcap};

  const int64_t bn = std::min(block_tokens, n);
  const int64_t bv = std::min(block_vocab, vocab);
  const int64_t slices = num_vocab_slices(vocab, bv);
  const int64_t basis_bytes_per_token = with_basis ? slices * dim * static_cast<int64_t>(sizeof(float)) : 0;
  const int64_t sb = superblock_tokens(n, basis_bytes_per_token, bn, workspace_bytes);
  // Running statistics per vocabulary slice; the floor keeps exp(m_old - m_new) finite when a whole
  // tile is -inf (e.g. a bias that masks tokens out).
  const float floor = std::numeric_limits<float>::lowest();
  at::Tensor run_max = at::full({slices, n}, floor, f32);
  at::Tensor run_sum = at::zeros({slices, n}, f32);
  at::Tensor target_logit = at::empty({n}, f32);
  float* tl = target_logit.data_ptr<float>();

  for (int64_t sb0 = 0; sb0 < n; sb0 += sb) {
    const int64_t nsb = std::min(sb, n - sb0);
    std::vector<at::Tensor> basis_partial(slices);
    const bool need_slope = with_basis && tf.has_softcap();
    walk_superblock(
        h32, w, bias_ptr, tf, sb0, nsb, bn, bv, slices, need_slope,
        [&](int64_t s) {
          if (with_basis) basis_partial[s] = at::zeros({nsb, dim}, f32);
        },
        [&](const TileVisit& t) {
          at::Tensor& x = t.logits;
          const float* xp = x.data_ptr<float>();
          for (int64_t r = 0; r < t.cur_bn; ++r) {
            const int64_t target = tgt[t.n0 + r];
            if (target >= t.v0 && target < t.v0 + t.cur_bv) tl[t.n0 + r] = xp[r * t.cur_bv + (target - t.v0)];
          }
          if (need_slope) softcap_slope(t.scratch, x, tf.softcap);
          at::Tensor m_old = run_max.select(0, t.slice).narrow(0, t.n0, t.cur_bn);
          at::Tensor sum = run_sum.select(0, t.slice).narrow(0, t.n0, t.cur_bn);
          at::Tensor m_new = at::maximum(m_old, x.amax(1)).clamp_min_(floor);  // amax: no argmax work
          const at::Tensor rescale = (m_old - m_new).exp_();
          x.sub_(m_new.unsqueeze(1)).exp_();  // x <- exp(x - m_new)
          sum.mul_(rescale).add_(x.sum(1));
          if (with_basis) {
            if (need_slope) x.mul_(t.scratch);
            basis_partial[t.slice].narrow(0, t.n0 - sb0, t.cur_bn).mul_(rescale.unsqueeze(1)).addmm_(x, t.w_tile);
          }
          m_old.copy_(m_new);
        });

    // Every slice has seen every vocabulary row of this superblock: its log-sum-exp is final.
    const at::Tensor rmax = run_max.narrow(1, sb0, nsb);
    const at::Tensor m = rmax.amax(0);
    const at::Tensor weights = (rmax - m.unsqueeze(0)).exp_();  // exp(m_s - m) per slice
    at::Tensor lse_sb = lse.narrow(0, sb0, nsb);
    lse_sb.copy_(m + (run_sum.narrow(1, sb0, nsb) * weights).sum(0).log_());
    if (with_basis) {  // Q = sum_s acc_s * exp(m_s - lse)
      const at::Tensor to_probs = (rmax - lse_sb.unsqueeze(0)).exp_();
      at::Tensor q = basis.narrow(0, sb0, nsb);
      q.zero_();
      for (int64_t s = 0; s < slices; ++s) q.addcmul_(basis_partial[s], to_probs[s].unsqueeze(1));
    }
  }
  at::sub_out(logp, target_logit, lse);
  return {logp, lse, basis};
}

}  // namespace logo_kernels
