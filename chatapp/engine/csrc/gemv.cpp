// One-row products y = W x for row-major bf16, fp32 and int8 (scaled by row) weights, the decode step's GEMVs (engine/cpu_gemv.py
// builds this file once per machine and measures it against PyTorch's products in kernels.py).
//
// Each output is the dot product of one contiguous weight row with x, so the weight is streamed once, in
// the order it lies in memory (one row after another, left to the hardware prefetcher), split over torch's
// intra-op threads by blocks of rows. Accumulation is fp32; a bf16 result is rounded once at the end (as F.linear's is).
//
// Levels (picked by the caller, never above what the CPU has): 3 = AVX512-VNNI for int8 weights (x quantized
// to int8 in blocks of 32: int8 x int8 products, rows_int8_vnni), and 4 the same products on AVX2 alone
// (rows_int8_avx2); 2 = AVX512-BF16 for bf16 weights (vdpbf16ps:
// pairs of bf16 products summed in fp32), AVX-512 F for fp32 and int8 ones; 1 = AVX2 + FMA (bf16 widened to
// fp32 by a shift); 0 = portable C++. Every level but 3 and 4 multiplies by x as given.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "simd.h"

namespace {

inline float bf16_to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
inline float to_float(T v);
template <>
inline float to_float<uint16_t>(uint16_t v) { return bf16_to_float(v); }
template <>
inline float to_float<float>(float v) { return v; }
template <>
inline float to_float<int8_t>(int8_t v) { return static_cast<float>(v); }

// Portable: any CPU, any dtype.
template <typename T>
void rows_portable(const T* w, int64_t K, const float* xf, float* out, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const T* row = w + n * K;
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k) acc += to_float(row[k]) * xf[k];
    out[n - n0] = acc;
  }
}

#if defined(__x86_64__)
using smollchat_simd::hsum8;

__attribute__((target("avx2,fma"))) inline __m256 load8(const uint16_t* p) { return smollchat_simd::load8_bf16(p); }
__attribute__((target("avx2,fma"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma"))) inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

// AVX2: bf16, fp32 or int8 weights (one scale a row, applied by the caller) widened to fp32, x already fp32 (xf);
// one row at a time, 32 products an iteration in four accumulators.
template <typename T>
__attribute__((target("avx2,fma"))) void rows_avx2(const T* w, int64_t K, const float* xf, float* out, int64_t n0,
                                                   int64_t n1) {
  const int64_t K32 = K / 32 * 32;
  for (int64_t n = n0; n < n1; ++n) {
    const T* r = w + n * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K32; k += 32) {
      a0 = _mm256_fmadd_ps(load8(r + k), _mm256_loadu_ps(xf + k), a0);
      a1 = _mm256_fmadd_ps(load8(r + k + 8), _mm256_loadu_ps(xf + k + 8), a1);
      a2 = _mm256_fmadd_ps(load8(r + k + 16), _mm256_loadu_ps(xf + k + 16), a2);
      a3 = _mm256_fmadd_ps(load8(r + k + 24), _mm256_loadu_ps(xf + k + 24), a3);
    }
    float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (int64_t k = K32; k < K; ++k) s += to_float(r[k]) * xf[k];
    out[n - n0] = s;
  }
}

// AVX512-BF16: x kept in bf16; one row at a time, 64 products (128 bytes of the row) an iteration in two
// accumulators, then the tail of K by masked loads (zeros). 128 bytes an iteration and no software prefetch:
// streaming Axiom's 736 MiB on a Zen 4 this read 25 GB/s on one core and 30-43 on two (medians of three runs)
// where the same loop at 256 bytes an iteration read 18-20 and 23-29. A software prefetch 512 bytes ahead made
// no loop here faster (int8: the same; bf16: 3-18 % slower): the hardware prefetcher follows one row's stream.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void rows_avx512bf16(const uint16_t* w, int64_t K,
                                                                            const uint16_t* x, float* out,
                                                                            int64_t n0, int64_t n1) {
  const int64_t K64 = K / 64 * 64, K32 = K / 32 * 32;
  const __mmask32 tail = K > K32 ? static_cast<__mmask32>((1ull << (K - K32)) - 1) : 0;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* r = w + n * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    for (int64_t k = 0; k < K64; k += 64) {
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(r + k), (__m512bh)_mm512_loadu_si512(x + k));
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(r + k + 32), (__m512bh)_mm512_loadu_si512(x + k + 32));
    }
    if (K32 > K64)
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(r + K64), (__m512bh)_mm512_loadu_si512(x + K64));
    if (tail)
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(tail, r + K32),
                            (__m512bh)_mm512_maskz_loadu_epi16(tail, x + K32));
    out[n - n0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  }
}

__attribute__((target("avx512f"))) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f"))) inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

// AVX-512 F: fp32 or int8 weights (one scale a row, applied by the caller) widened to fp32, x in fp32; 16 x V
// products an iteration, one accumulator each: at most 128 bytes of the row an iteration (fp32 weights at 256
// bytes an iteration read 36 GB/s on a Zen 4 where the AVX2 loop read 43; see rows_avx512bf16).
template <typename T>
__attribute__((target("avx512f"))) void rows_avx512(const T* w, int64_t K, const float* xf, float* out, int64_t n0,
                                                    int64_t n1) {
  constexpr int V = sizeof(T) == 1 ? 4 : 2;
  const int64_t KV = K / (16 * V) * (16 * V);
  for (int64_t n = n0; n < n1; ++n) {
    const T* r = w + n * K;
    __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t k = 0; k < KV; k += 16 * V) {
#pragma GCC unroll 4
      for (int u = 0; u < V; ++u) a[u] = _mm512_fmadd_ps(load16(r + k + 16 * u), _mm512_loadu_ps(xf + k + 16 * u), a[u]);
    }
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
    for (int64_t k = KV; k < K; ++k) s += to_float(r[k]) * xf[k];
    out[n - n0] = s;
  }
}

// int8 x int8, AVX512-VNNI (level 3 of gemv_int8): x is quantized to int8 in blocks of 32, one fp32 scale a block
// (round to nearest, as llama.cpp's Q8_0 does its activations), by quantize_x below. vpdpbusd multiplies
// unsigned by signed bytes, so each weight byte is read as q + 128 (q XOR 0x80) and the 128 * sum(xq) that adds
// is taken off once a row (`corr`, the same for every row). Each 64-byte step gives 16 int32 sums of four
// products; lane j's are scaled by its block's scale (s4[j]) into fp32 accumulators. A row's tail is read by
// masked loads: the zero bytes read as 128 and meet the zero padding of xq.
struct QuantizedX {
  std::vector<int8_t> q;   // [K rounded up to 64], zero past K
  std::vector<float> s4;   // one scale per 4 values (lane), [K64 / 4]
  float corr = 0.f;        // 128 * sum_k scale(k) * xq[k]
};

QuantizedX quantize_x(const float* x, int64_t K) {
  const int64_t K64 = (K + 63) / 64 * 64;
  QuantizedX out;
  out.q.assign(K64, 0);
  out.s4.assign(K64 / 4, 0.f);
  double corr = 0.0;
  for (int64_t k0 = 0; k0 < K; k0 += 32) {
    const int64_t k1 = std::min<int64_t>(k0 + 32, K);
    float amax = 0.f;
    for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(x[k]));
    const float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    for (int64_t k = k0; k < k1; ++k) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(x[k] * inv));
      out.q[k] = static_cast<int8_t>(std::max(-127, std::min(127, v)));
      sum += out.q[k];
    }
    for (int64_t j = k0 / 4; j < (k0 + 32) / 4; ++j) out.s4[j] = s;
    corr += 128.0 * s * sum;
  }
  out.corr = static_cast<float>(corr);
  return out;
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) inline __m512 vnni_step(const int8_t* r, const int8_t* xq,
                                                                             const float* s4, __m512 acc,
                                                                             __mmask64 m) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i w = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, r), flip);
  const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(xq));
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(s4), acc);
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) void rows_int8_vnni(const int8_t* w, int64_t K,
                                                                          const QuantizedX& xq, float* out,
                                                                          int64_t n0, int64_t n1) {
  const int64_t K256 = K / 256 * 256, K64 = K / 64 * 64;
  const __mmask64 all = ~0ull, tail = K > K64 ? (~0ull >> (64 - (K - K64))) : 0;
  const int8_t* x = xq.q.data();
  const float* s4 = xq.s4.data();
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* r = w + n * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K256; k += 256) {
      a0 = vnni_step(r + k, x + k, s4 + k / 4, a0, all);
      a1 = vnni_step(r + k + 64, x + k + 64, s4 + k / 4 + 16, a1, all);
      a2 = vnni_step(r + k + 128, x + k + 128, s4 + k / 4 + 32, a2, all);
      a3 = vnni_step(r + k + 192, x + k + 192, s4 + k / 4 + 48, a3, all);
    }
    for (int64_t k = K256; k < K64; k += 64) a0 = vnni_step(r + k, x + k, s4 + k / 4, a0, all);
    if (tail) a1 = vnni_step(r + K64, x + K64, s4 + K64 / 4, a1, tail);
    out[n - n0] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) - xq.corr;
  }
}

// int8 x int8 on AVX2 (level 4 of gemv_int8, any CPU with AVX2): the same int8 blocks of x as level 3, multiplied
// 32 weights at a time by vpmaddubsw, which takes unsigned by signed bytes. As llama.cpp's AVX2 Q8_0 product
// does, the weight's magnitude is the unsigned side (|q|: -128 reads 128) and x takes the weight's sign
// (vpsignb), so |q| * sign(q) * x = q * x and a pair sums to at most 2 x 128 x 127 < 2^15: no saturation, and no
// correction term. vpmaddwd by ones then sums each four products into an int32 lane; a block's eight lanes
// share its scale (s4). A row's tail (K not a multiple of 32) is copied into a zeroed block first.
__attribute__((target("avx2,fma"))) inline __m256 q8_block(__m256i w, const int8_t* xq, const float* s4, __m256 acc) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
  const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  const __m256i d = _mm256_madd_epi16(p, _mm256_set1_epi16(1));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_loadu_ps(s4), acc);
}

__attribute__((target("avx2,fma"))) void rows_int8_avx2(const int8_t* w, int64_t K, const QuantizedX& xq, float* out,
                                                       int64_t n0, int64_t n1) {
  const int64_t K64 = K / 64 * 64, K32 = K / 32 * 32;
  const int8_t* x = xq.q.data();
  const float* s4 = xq.s4.data();
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* r = w + n * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    for (int64_t k = 0; k < K64; k += 64) {
      a0 = q8_block(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + k)), x + k, s4 + k / 4, a0);
      a1 = q8_block(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + k + 32)), x + k + 32, s4 + k / 4 + 8, a1);
    }
    if (K32 > K64) a0 = q8_block(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + K64)), x + K64, s4 + K64 / 4, a0);
    if (K > K32) {
      alignas(32) int8_t tail[32] = {0};
      std::memcpy(tail, r + K32, K - K32);
      a1 = q8_block(_mm256_load_si256(reinterpret_cast<const __m256i*>(tail)), x + K32, s4 + K32 / 4, a1);
    }
    out[n - n0] = hsum8(_mm256_add_ps(a0, a1));
  }
}
#endif

// Rows per task: a block of rows is a few hundred KB of weight, so threads stream long runs.
constexpr int64_t kGrain = 64;

// The highest level this CPU runs for `t` weights: 1 with AVX2 + FMA; 2 with what that dtype's AVX-512 loop
// needs on top (bf16: AVX512-BF16 and BW; fp32: F; int8: F and BW); int8 3 with AVX512-VNNI too; else 0.
int64_t top_level(at::ScalarType t) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return 0;
  const bool f = __builtin_cpu_supports("avx512f"), bw = __builtin_cpu_supports("avx512bw");
  const bool two = t == at::kBFloat16 ? __builtin_cpu_supports("avx512bf16") && bw : t == at::kFloat ? f : f && bw;
  if (t == at::kChar && two && __builtin_cpu_supports("avx512vnni")) return 3;
  return two ? 2 : 1;
#else
  return 0;
#endif
}

// x's shape with its last size replaced by N: the product's shape.
std::vector<int64_t> with_last(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

// x (bf16 or fp32, contiguous) as fp32 values: x's own memory where it is fp32, else `buf` filled.
const float* as_float(const at::Tensor& x, std::vector<float>& buf) {
  if (x.scalar_type() == at::kFloat) return x.data_ptr<float>();
  const auto* b = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  buf.resize(x.numel());
  for (int64_t k = 0; k < x.numel(); ++k) buf[k] = bf16_to_float(b[k]);
  return buf.data();
}

// The product in x's dtype: `rows(acc, n0, n1)` fills acc[0, n1 - n0) with the fp32 sums of rows n0..n1, then scaled
// (`scales`: bf16, one a row, or null) and stored, rounded once where the output is bf16. The conversions
// happen here, in each thread's block, not as separate tensor operations around the call (those cost ~1 ms of
// a 15-25 ms decode step: ~100 calls, two or three casts each).
template <typename Rows>
at::Tensor product(const at::Tensor& x, int64_t N, const at::BFloat16* scales, Rows rows) {
  auto out = at::empty(with_last(x, N), x.options());
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  auto* ob = bf16 ? out.data_ptr<at::BFloat16>() : nullptr;
  auto* of = bf16 ? nullptr : out.data_ptr<float>();
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    float acc[kGrain];  // a thread's rows, kGrain at a time
    for (int64_t m0 = n0; m0 < n1; m0 += kGrain) {
      const int64_t m1 = std::min(n1, m0 + kGrain);
      rows(acc, m0, m1);
      for (int64_t n = m0; n < m1; ++n) {
        const float v = scales ? acc[n - m0] * static_cast<float>(scales[n]) : acc[n - m0];
        if (bf16) ob[n] = at::BFloat16(v);
        else of[n] = v;
      }
    }
  });
  return out;
}

void check_x(const char* op, const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1 && w.stride(0) == w.size(1), op, ": the weight must be a contiguous [N, K] matrix");
  TORCH_CHECK(x.numel() == w.size(1), op, ": x must hold one row of K = ", w.size(1), " values, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, op, ": x must be bf16 or fp32");
}

}  // namespace

// The highest level this CPU runs for bf16, fp32 and int8 weights, in that order (top_level).
std::vector<int64_t> gemv_cpu_levels() {
  return {top_level(at::kBFloat16), top_level(at::kFloat), top_level(at::kChar)};
}

// y [1, N] = x [1, K] @ w[N, K]^T in w's dtype (bf16 or fp32), at `level` (clamped to the CPU's).
at::Tensor gemv(const at::Tensor& x_, const at::Tensor& w, int64_t level) {
  check_x("gemv", x_, w);
  TORCH_CHECK(x_.scalar_type() == w.scalar_type(), "gemv: x and w dtypes differ");
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  level = std::min(level, top_level(w.scalar_type()));
  const int64_t K = w.size(1);
  const auto x = x_.contiguous();
  std::vector<float> buf;
  // bf16 weights at level 2 multiply by x's bf16 values as they are; every other loop reads x in fp32.
  const float* xf = bf16 && level >= 2 ? nullptr : as_float(x, buf);
  const uint16_t* wb = bf16 ? reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()) : nullptr;
  const float* wf = bf16 ? nullptr : w.data_ptr<float>();
  const uint16_t* xb = bf16 ? reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) : nullptr;
  return product(x, w.size(0), nullptr, [&](float* o, int64_t n0, int64_t n1) {
#if defined(__x86_64__)
    if (bf16 && level >= 2) return rows_avx512bf16(wb, K, xb, o, n0, n1);
    if (!bf16 && level >= 2) return rows_avx512(wf, K, xf, o, n0, n1);
    if (level >= 1) return bf16 ? rows_avx2(wb, K, xf, o, n0, n1) : rows_avx2(wf, K, xf, o, n0, n1);
#endif
    if (bf16) rows_portable(wb, K, xf, o, n0, n1);
    else rows_portable(wf, K, xf, o, n0, n1);
  });
}

// y [1, N] = (x [1, K] @ q[N, K]^T) * scales[N] for int8 rows q (quant.py's int8 layout, the one
// aten._weight_int8pack_mm reads) and bf16 scales, in x's dtype (bf16 or fp32); level 2 here needs AVX-512
// (F, BW) only, level 3 VNNI too. Level 4 is the AVX2 int8 x int8 loop (rows_int8_avx2): it needs only what
// level 1 needs, so it is no step above 3 but a kernel of its own, run wherever level 1 runs (else portable).
at::Tensor gemv_int8(const at::Tensor& x_, const at::Tensor& q, const at::Tensor& scales, int64_t level) {
  check_x("gemv_int8", x_, q);
  TORCH_CHECK(q.scalar_type() == at::kChar, "gemv_int8: q must be int8");
  TORCH_CHECK(scales.numel() == q.size(0) && scales.scalar_type() == at::kBFloat16 && scales.is_contiguous(),
              "gemv_int8: one bf16 scale a row");
  const int64_t K = q.size(1);
  const int64_t top = top_level(at::kChar);
  level = level == 4 ? (top >= 1 ? 4 : 0) : std::min(level, top);
  const auto x = x_.contiguous();
  std::vector<float> buf;
  const float* xf = as_float(x, buf);
  const int8_t* qp = q.data_ptr<int8_t>();
#if defined(__x86_64__)
  const QuantizedX xq = level >= 3 ? quantize_x(xf, K) : QuantizedX();
#endif
  return product(x, q.size(0), scales.data_ptr<at::BFloat16>(), [&](float* o, int64_t n0, int64_t n1) {
#if defined(__x86_64__)
    if (level == 4) return rows_int8_avx2(qp, K, xq, o, n0, n1);
    if (level == 3) return rows_int8_vnni(qp, K, xq, o, n0, n1);
    if (level >= 2) return rows_avx512(qp, K, xf, o, n0, n1);
    if (level >= 1) return rows_avx2(qp, K, xf, o, n0, n1);
#endif
    rows_portable(qp, K, xf, o, n0, n1);
  });
}

TORCH_LIBRARY(smollchat_cpu, m) {
  m.def("gemv(Tensor x, Tensor w, int level) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor q, Tensor scales, int level) -> Tensor");
  m.def("gemv_cpu_levels", &gemv_cpu_levels);
}

TORCH_LIBRARY_IMPL(smollchat_cpu, CPU, m) {
  m.impl("gemv", gemv);
  m.impl("gemv_int8", gemv_int8);
}
