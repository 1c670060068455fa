// bf16 x bf16 -> fp32 tile GEMMs for CPUs with AVX512-BF16 (vdpbf16ps: AMD Zen 4 and later, Intel Cooper Lake,
// Sapphire Rapids and later).
//
// Why: torch has no CPU matmul that reads bf16 and writes fp32 at bf16 speed (torch.mm of bf16 tensors rounds its
// result to bf16, which would put the logits at the naive path's precision), so the tiles of a bf16 model were
// converted to fp32 and multiplied by sgemm at half the machine's bf16 throughput. These kernels multiply the bf16
// operands as they are: every product of two bf16 numbers is exact in fp32 and the sums accumulate in fp32, so the
// logits come out as precise as from the fp32 tiles (different summation order only). The instruction treats bf16
// subnormal inputs as zero and flushes subnormal fp32 results (|x| < 1.2e-38) to zero.
//
// Layout: C[M, N] (+)= A[M, K] B[K, N]. A is read through strides (A(m, k) = a[m * m_stride + k * k_stride], from fp32
// — rounded to the nearest bf16 — or from bf16) and packed per call; B is packed once by the caller into pairs along
// k ([ceil(K / 2)][N] 32-bit words: B(2i, n) in the low half, B(2i + 1, n) in the high half, 0 past K) and reused
// by every call that multiplies by it. Single-threaded: the kernels call it from their own worker threads.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace logo_kernels::bf16_dot {

// True where this machine runs vdpbf16ps (the CPU has it and the OS saves the zmm state) and the environment does not
// turn the path off (LOGO_KERNELS_BF16_DOT=0, read at every call).
bool enabled();

// B[K, N] packed in pairs along k, for gemm().
struct PackedB {
  std::vector<uint32_t> words;  // [ceil(K / 2)][n]
  int64_t k = 0, n = 0;
  bool packed = false;  // pack_b has filled it (words may still be empty: K or N = 0)
};

// B(k, n) = src[k * k_stride + n * n_stride], k < K, n < N.
void pack_b(PackedB& out, const at::BFloat16* src, int64_t K, int64_t N, int64_t k_stride, int64_t n_stride);

// C[M, N] = A B (accumulate: C += A B), C fp32 with rows `ldc` apart; A(m, k) = a[m * m_stride + k * k_stride].
void gemm(int64_t M, const float* a, int64_t m_stride, int64_t k_stride, const PackedB& b, float* c, int64_t ldc,
          bool accumulate);
void gemm(int64_t M, const at::BFloat16* a, int64_t m_stride, int64_t k_stride, const PackedB& b, float* c,
          int64_t ldc, bool accumulate);

}  // namespace logo_kernels::bf16_dot
