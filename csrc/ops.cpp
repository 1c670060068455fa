// Registers the CPU kernels as torch operators (torch.ops.logo_kernels.*) so that autograd wrappers,
// torch.compile (with the fake kernels registered in Python) and TorchScript can all see them.
#include <torch/library.h>

#include "bf16_dot.h"
#include "linear_logprobs.h"

namespace logo_kernels {

void check_op_inputs(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     const at::Tensor& targets, int64_t block_tokens, int64_t block_vocab) {
  TORCH_CHECK(hidden.dim() == 2, "hidden must be [N, D], got ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2, "weight must be [V, D], got ", weight.sizes());
  TORCH_CHECK(hidden.size(1) == weight.size(1), "hidden and weight disagree on D: ", hidden.size(1), " vs ",
              weight.size(1));
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()) && at::isFloatingType(weight.scalar_type()) &&
                  hidden.scalar_type() != at::kDouble && weight.scalar_type() != at::kDouble,
              "hidden and weight must be float32, bfloat16 or float16 (they may differ: tiles compute in fp32)");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0), "targets must be [N]");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous(), "targets must be contiguous int64");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0)), "bias must be [V]");
  TORCH_CHECK(block_tokens > 0 && block_vocab > 0, "block sizes must be positive");
  TORCH_CHECK(weight.size(0) > 0, "vocabulary must not be empty");
  if (targets.numel() > 0) {  // an id outside [0, V) would read past the head: never trust the caller
    const auto range = at::aminmax(targets);
    TORCH_CHECK(std::get<0>(range).item<int64_t>() >= 0 && std::get<1>(range).item<int64_t>() < weight.size(0),
                "targets must lie in [0, V) (ignored rows are removed before the kernel)");
  }
}

}  // namespace logo_kernels

TORCH_LIBRARY(logo_kernels, m) {
  m.def(
      "linear_logprobs_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, float logit_scale, "
      "float inv_temperature, float softcap, int block_tokens, int block_vocab, bool with_basis, bool want_entropy, "
      "bool want_log_sum_sq, bool want_mean, bool want_top1, int workspace_bytes, bool filter, int filter_block, "
      "float log_filter_eps, float max_skipped_mass, Tensor? order) "
      "-> (Tensor logp, Tensor lse, Tensor basis, Tensor entropy, Tensor log_sum_sq_probs, Tensor mean_logits, "
      "Tensor is_top1, Tensor live)");
  m.def(
      "linear_logprobs_bwd(Tensor grad_logp, Tensor? grad_lse, Tensor? grad_entropy, Tensor hidden, Tensor weight, "
      "Tensor? bias, Tensor targets, Tensor lse, Tensor? entropy, float logit_scale, float inv_temperature, "
      "float softcap, int block_tokens, int block_vocab, bool need_hidden, bool need_weight, bool need_bias, "
      "int workspace_bytes, Tensor? live, int filter_block, Tensor? order) "
      "-> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  // whether bf16 tiles multiply with vdpbf16ps here (csrc/bf16_dot.h), rather than converted to fp32
  m.def("bf16_dot_enabled() -> bool", [] { return logo_kernels::bf16_dot::enabled(); });
}

TORCH_LIBRARY_IMPL(logo_kernels, CPU, m) {
  m.impl("linear_logprobs_fwd", &logo_kernels::linear_logprobs_fwd_cpu);
  m.impl("linear_logprobs_bwd", &logo_kernels::linear_logprobs_bwd_cpu);
}
