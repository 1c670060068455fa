// bf16 x bf16 -> fp32 tile GEMMs with vdpbf16ps (see bf16_dot.h for the contract).
//
// Blocking: k in chunks of KC pairs; per chunk, A is packed into panels of MR = 12 rows ([KC][12] words, zero rows
// past M), and a 12 x 32 block of C lives in 24 zmm accumulators while the micro-kernel walks the chunk: per pair of
// k, two 16-word loads of B and 24 vdpbf16ps with a broadcast word of A each. The chunk of a 32-column panel of B
// (KC x 32 words = 32 KiB) stays in L1 across the row panels.
#include "bf16_dot.h"

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 10))
#define LOGO_BF16_DOT 1
#include <immintrin.h>
#define LOGO_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))
#else
#define LOGO_BF16_DOT 0
#endif

namespace logo_kernels::bf16_dot {

namespace {

constexpr int64_t kRows = 12;      // MR: rows of A per micro-kernel call
constexpr int64_t kColumns = 32;   // NR: columns of B per micro-kernel call (two zmm of fp32)
constexpr int64_t kChunk = 256;    // KC: pairs of k per pass over C

inline uint16_t bits_of(at::BFloat16 x) { return x.x; }
inline uint16_t bits_of(float x) { return c10::detail::round_to_nearest_even(x); }

inline uint32_t pair(uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); }

// The panel of rows [m0, m0 + 12) and pairs [i0, i0 + kc) of A: panel[i][r] = (A(m0 + r, 2i), A(m0 + r, 2i + 1)),
// zero past M and past K.
template <typename T>
void pack_a_panel(const T* a, int64_t M, int64_t K, int64_t m_stride, int64_t k_stride, int64_t m0, int64_t i0,
                  int64_t kc, uint32_t* panel) {
  const int64_t rows = std::min(kRows, M - m0);
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (k_stride == 1) {  // contiguous rows: a pair is one 32-bit word (the last one half-filled when K is odd)
      const int64_t whole = std::min(kc, K / 2 - i0);
      for (int64_t r = 0; r < rows; ++r) {
        const T* row = a + (m0 + r) * m_stride + 2 * i0;
        for (int64_t i = 0; i < whole; ++i) {
          uint32_t word;
          std::memcpy(&word, row + 2 * i, sizeof(word));
          panel[i * kRows + r] = word;
        }
        for (int64_t i = std::max<int64_t>(whole, 0); i < kc; ++i) panel[i * kRows + r] = pair(row[2 * i].x, 0);
      }
      for (int64_t r = rows; r < kRows; ++r) {
        for (int64_t i = 0; i < kc; ++i) panel[i * kRows + r] = 0;
      }
      return;
    }
  }
  for (int64_t i = 0; i < kc; ++i) {
    const int64_t k = 2 * (i0 + i);
    uint32_t* out = panel + i * kRows;
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = a + (m0 + r) * m_stride;
      const uint16_t lo = bits_of(row[k * k_stride]);
      const uint16_t hi = k + 1 < K ? bits_of(row[(k + 1) * k_stride]) : uint16_t{0};
      out[r] = pair(lo, hi);
    }
    for (int64_t r = rows; r < kRows; ++r) out[r] = 0;
  }
}

#if LOGO_BF16_DOT

// C[rows x cols] (+)= panel (12 rows, kc pairs) x B[kc pairs x 32 columns at b, rows ldb words apart]; only the first
// `rows` rows and the columns of the masks are stored.
LOGO_BF16_TARGET void micro_kernel(int64_t kc, const uint32_t* __restrict panel, const uint32_t* __restrict b,
                                   int64_t ldb, float* __restrict c, int64_t ldc, bool accumulate, __mmask16 mask0,
                                   __mmask16 mask1, int64_t rows) {
#define LOGO_ACC(r) __m512 lo##r = _mm512_setzero_ps(), hi##r = _mm512_setzero_ps();
  LOGO_ACC(0) LOGO_ACC(1) LOGO_ACC(2) LOGO_ACC(3) LOGO_ACC(4) LOGO_ACC(5)
  LOGO_ACC(6) LOGO_ACC(7) LOGO_ACC(8) LOGO_ACC(9) LOGO_ACC(10) LOGO_ACC(11)
#undef LOGO_ACC
  for (int64_t i = 0; i < kc; ++i) {
    const __m512bh b0 = (__m512bh)_mm512_maskz_loadu_epi32(mask0, b + i * ldb);
    const __m512bh b1 = (__m512bh)_mm512_maskz_loadu_epi32(mask1, b + i * ldb + 16);
    const uint32_t* a = panel + i * kRows;
#define LOGO_STEP(r)                                                          \
  {                                                                           \
    const __m512bh ar = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r])); \
    lo##r = _mm512_dpbf16_ps(lo##r, ar, b0);                                  \
    hi##r = _mm512_dpbf16_ps(hi##r, ar, b1);                                  \
  }
    LOGO_STEP(0) LOGO_STEP(1) LOGO_STEP(2) LOGO_STEP(3) LOGO_STEP(4) LOGO_STEP(5)
    LOGO_STEP(6) LOGO_STEP(7) LOGO_STEP(8) LOGO_STEP(9) LOGO_STEP(10) LOGO_STEP(11)
#undef LOGO_STEP
  }
#define LOGO_STORE(r)                                                   \
  if (r < rows) {                                                       \
    float* out = c + r * ldc;                                           \
    if (accumulate) {                                                   \
      lo##r = _mm512_add_ps(lo##r, _mm512_maskz_loadu_ps(mask0, out));  \
      hi##r = _mm512_add_ps(hi##r, _mm512_maskz_loadu_ps(mask1, out + 16)); \
    }                                                                   \
    _mm512_mask_storeu_ps(out, mask0, lo##r);                           \
    _mm512_mask_storeu_ps(out + 16, mask1, hi##r);                      \
  }
  LOGO_STORE(0) LOGO_STORE(1) LOGO_STORE(2) LOGO_STORE(3) LOGO_STORE(4) LOGO_STORE(5)
  LOGO_STORE(6) LOGO_STORE(7) LOGO_STORE(8) LOGO_STORE(9) LOGO_STORE(10) LOGO_STORE(11)
#undef LOGO_STORE
}

inline __mmask16 lane_mask(int64_t lanes) {
  return lanes >= 16 ? static_cast<__mmask16>(0xFFFF)
                     : lanes <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << lanes) - 1);
}

template <typename T>
void gemm_impl(int64_t M, const T* a, int64_t m_stride, int64_t k_stride, const PackedB& b, float* c, int64_t ldc,
               bool accumulate) {
  const int64_t N = b.n, K = b.k, pairs = (b.k + 1) / 2;
  if (M <= 0 || N <= 0) return;
  if (pairs == 0) {  // an empty sum
    if (!accumulate) {
      for (int64_t m = 0; m < M; ++m) std::fill(c + m * ldc, c + m * ldc + N, 0.0f);
    }
    return;
  }
  const int64_t panels = (M + kRows - 1) / kRows;
  std::vector<uint32_t> packed(static_cast<size_t>(panels * kRows * std::min(kChunk, pairs)));
  for (int64_t i0 = 0; i0 < pairs; i0 += kChunk) {
    const int64_t kc = std::min(kChunk, pairs - i0);
    const bool add = accumulate || i0 > 0;
    for (int64_t p = 0; p < panels; ++p) {
      pack_a_panel(a, M, K, m_stride, k_stride, p * kRows, i0, kc, packed.data() + p * kRows * kc);
    }
    for (int64_t n0 = 0; n0 < N; n0 += kColumns) {
      const int64_t cols = std::min(kColumns, N - n0);
      const __mmask16 mask0 = lane_mask(cols), mask1 = lane_mask(cols - 16);
      const uint32_t* bp = b.words.data() + i0 * N + n0;
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t m0 = p * kRows;
        micro_kernel(kc, packed.data() + p * kRows * kc, bp, N, c + m0 * ldc + n0, ldc, add, mask0, mask1,
                     std::min(kRows, M - m0));
      }
    }
  }
}

#else

template <typename T>
void gemm_impl(int64_t, const T*, int64_t, int64_t, const PackedB&, float*, int64_t, bool) {
  TORCH_CHECK(false, "logo_kernels: the bf16 dot-product kernels were not compiled for this machine");
}

#endif

}  // namespace

bool enabled() {
#if LOGO_BF16_DOT
  // libgcc / compiler-rt set the AVX-512 features only where the OS saves the zmm state (XCR0)
  static const bool hardware = __builtin_cpu_supports("avx512bf16");
  if (!hardware) return false;
  const char* env = std::getenv("LOGO_KERNELS_BF16_DOT");
  return env == nullptr || std::strcmp(env, "0") != 0;
#else
  return false;
#endif
}

void pack_b(PackedB& out, const at::BFloat16* src, int64_t K, int64_t N, int64_t k_stride, int64_t n_stride) {
  const int64_t pairs = (K + 1) / 2;
  out.k = K;
  out.n = N;
  out.packed = true;
  out.words.resize(static_cast<size_t>(pairs * N));
  uint32_t* w = out.words.data();
  auto at_ = [&](int64_t k, int64_t n) { return k < K ? src[k * k_stride + n * n_stride].x : uint16_t{0}; };
  if (n_stride == 1) {  // rows of B are contiguous: interleave two of them
    for (int64_t i = 0; i < pairs; ++i) {
      for (int64_t n = 0; n < N; ++n) w[i * N + n] = pair(at_(2 * i, n), at_(2 * i + 1, n));
    }
    return;
  }
  constexpr int64_t kBlock = 16;  // columns of B read together (rows of the source when k_stride == 1)
  for (int64_t n0 = 0; n0 < N; n0 += kBlock) {
    const int64_t n1 = std::min(N, n0 + kBlock);
    for (int64_t i = 0; i < pairs; ++i) {
      for (int64_t n = n0; n < n1; ++n) w[i * N + n] = pair(at_(2 * i, n), at_(2 * i + 1, n));
    }
  }
}

void gemm(int64_t M, const float* a, int64_t m_stride, int64_t k_stride, const PackedB& b, float* c, int64_t ldc,
          bool accumulate) {
  gemm_impl(M, a, m_stride, k_stride, b, c, ldc, accumulate);
}

void gemm(int64_t M, const at::BFloat16* a, int64_t m_stride, int64_t k_stride, const PackedB& b, float* c,
          int64_t ldc, bool accumulate) {
  gemm_impl(M, a, m_stride, k_stride, b, c, ldc, accumulate);
}

}  // namespace logo_kernels::bf16_dot
