// Declarations of the CPU kernels of the fused linear -> per-token log-prob op.
//
// Contract (both kernels): hidden [N, D] and weight [V, D] of one floating dtype (fp32/bf16/fp16),
// bias [V] or none, targets [N] int64 all in [0, V) (checked; ignored rows are compacted away by the caller).
// Logits: x = softcap * tanh(logit_scale * (h.w + b) / softcap) * inv_temperature (no tanh for softcap 0).
// Accumulation is fp32; logp/lse are fp32 [N]; gradients come back in the dtypes of their inputs
// (an empty tensor for a gradient that was not asked for). The forward can also return the gradient
// basis Q = (softmax * softcap slope) @ W [N, D] fp32, which turns the frozen-head backward into an
// elementwise expression (an empty tensor when not asked for).
#pragma once

#include <optional>
#include <tuple>

#include "tiles.h"

namespace logo_kernels {

void check_op_inputs(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     const at::Tensor& targets, int64_t block_tokens, int64_t block_vocab);

// -> (logp, lse, basis, entropy, log_sum_sq_probs, mean_logits, is_top1, live); [0]-sized where not asked for.
// With `filter`, live [N, ceil(V / filter_block)] bool marks the (token, block of filter_block ids of the walk
// `order`) pairs the backward must visit (see linear_logprobs_fwd.cpp); block_vocab is a multiple of filter_block.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_logprobs_fwd_cpu(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& targets, double logit_scale, double inv_temperature, double softcap,
                        int64_t block_tokens, int64_t block_vocab, bool with_basis, bool want_entropy,
                        bool want_log_sum_sq, bool want_mean, bool want_top1, int64_t workspace_bytes, bool filter,
                        int64_t filter_block, double log_filter_eps, double max_skipped_mass,
                        const std::optional<at::Tensor>& order);

// -> (grad_hidden, grad_weight, grad_bias); [0]-sized where not asked for. With `live` (the forward's, same
// block_vocab and order) only the live (token, tile) pairs are recomputed and multiplied.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_bwd_cpu(
    const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_lse,
    const std::optional<at::Tensor>& grad_entropy, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& lse,
    const std::optional<at::Tensor>& entropy, double logit_scale, double inv_temperature, double softcap,
    int64_t block_tokens, int64_t block_vocab, bool need_hidden, bool need_weight, bool need_bias,
    int64_t workspace_bytes, const std::optional<at::Tensor>& live, int64_t filter_block,
    const std::optional<at::Tensor>& order);

}  // namespace logo_kernels
