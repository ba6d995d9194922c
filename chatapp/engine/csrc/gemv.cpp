// One-row products y = W x for row-major bf16, fp32 and int8 (scaled by row) weights, the decode step's GEMVs (engine/cpu_gemv.py
// builds this file once per machine and measures it against PyTorch's products in kernels.py).
//
// Each output is the dot product of one contiguous weight row with x, so the weight is streamed once, in
// the order it lies in memory (one row after another, prefetched ahead), split over torch's intra-op threads by
// blocks of rows. Accumulation is fp32; a bf16 result is rounded once at the end (as F.linear's is).
//
// Levels (picked by the caller, never above what the CPU has): 2 = AVX512-BF16 for bf16 weights (vdpbf16ps:
// pairs of bf16 products summed in fp32), AVX-512 F for fp32 and int8 ones; 1 = AVX2 + FMA (bf16 widened to
// fp32 by a shift); 0 = portable C++.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>

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
    out[n] = acc;
  }
}

#if defined(__x86_64__)
// Bytes ahead of the loads that each row's stream is prefetched: one row at a time with a software prefetch
// this far ahead read 23 GB/s on one Zen 4 core where four interleaved rows without it read 11.
constexpr int kAhead = 512;

// Prefetch the `bytes` that lie kAhead bytes past `row` (the iteration's loads, that far ahead).
inline void prefetch_ahead(const void* row, size_t bytes) {
  const char* p = static_cast<const char*>(row) + kAhead;
  for (size_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) inline __m256 load8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
__attribute__((target("avx2,fma"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// AVX2: x already widened to fp32 (xf); one row at a time, 32 products an iteration in four accumulators.
template <typename T>
__attribute__((target("avx2,fma"))) void rows_avx2(const T* w, int64_t K, const float* xf, float* out, int64_t n0,
                                                   int64_t n1) {
  const int64_t K32 = K / 32 * 32;
  for (int64_t n = n0; n < n1; ++n) {
    const T* r = w + n * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K32; k += 32) {
      prefetch_ahead(r + k, 32 * sizeof(T));
      a0 = _mm256_fmadd_ps(load8(r + k), _mm256_loadu_ps(xf + k), a0);
      a1 = _mm256_fmadd_ps(load8(r + k + 8), _mm256_loadu_ps(xf + k + 8), a1);
      a2 = _mm256_fmadd_ps(load8(r + k + 16), _mm256_loadu_ps(xf + k + 16), a2);
      a3 = _mm256_fmadd_ps(load8(r + k + 24), _mm256_loadu_ps(xf + k + 24), a3);
    }
    float s = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (int64_t k = K32; k < K; ++k) s += to_float(r[k]) * xf[k];
    out[n] = s;
  }
}

// AVX512-BF16: x kept in bf16; one row at a time, 128 products an iteration in four accumulators; then
// 32 at a time, then the tail of K by masked loads (zeros).
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void rows_avx512bf16(const uint16_t* w, int64_t K,
                                                                            const uint16_t* x, float* out,
                                                                            int64_t n0, int64_t n1) {
  const int64_t K128 = K / 128 * 128, K32 = K / 32 * 32;
  const __mmask32 tail = K > K32 ? static_cast<__mmask32>((1ull << (K - K32)) - 1) : 0;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* r = w + n * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K128; k += 128) {
      prefetch_ahead(r + k, 256);
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(r + k), (__m512bh)_mm512_loadu_si512(x + k));
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(r + k + 32), (__m512bh)_mm512_loadu_si512(x + k + 32));
      a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(r + k + 64), (__m512bh)_mm512_loadu_si512(x + k + 64));
      a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(r + k + 96), (__m512bh)_mm512_loadu_si512(x + k + 96));
    }
    for (int64_t k = K128; k < K32; k += 32)
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(r + k), (__m512bh)_mm512_loadu_si512(x + k));
    if (tail)
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(tail, r + K32),
                            (__m512bh)_mm512_maskz_loadu_epi16(tail, x + K32));
    out[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
}

// fp32 rows, AVX-512: 64 products an iteration in four accumulators.
__attribute__((target("avx512f"))) void rows_f32_avx512(const float* w, int64_t K, const float* xf, float* out,
                                                       int64_t n0, int64_t n1) {
  const int64_t K64 = K / 64 * 64;
  for (int64_t n = n0; n < n1; ++n) {
    const float* r = w + n * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K64; k += 64) {
      prefetch_ahead(r + k, 256);
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(r + k), _mm512_loadu_ps(xf + k), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(r + k + 16), _mm512_loadu_ps(xf + k + 16), a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(r + k + 32), _mm512_loadu_ps(xf + k + 32), a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(r + k + 48), _mm512_loadu_ps(xf + k + 48), a3);
    }
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (int64_t k = K64; k < K; ++k) s += r[k] * xf[k];
    out[n] = s;
  }
}

// int8 rows (one scale a row, applied by the caller): AVX2 widens 16 bytes at a time to fp32.
__attribute__((target("avx2,fma"))) void rows_int8_avx2(const int8_t* w, int64_t K, const float* xf, float* out,
                                                        int64_t n0, int64_t n1) {
  const int64_t K32 = K / 32 * 32;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* r = w + n * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K32; k += 32) {
      prefetch_ahead(r + k, 64);
      __m128i lo = _mm_loadu_si128((const __m128i*)(r + k)), hi = _mm_loadu_si128((const __m128i*)(r + k + 16));
      a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), _mm256_loadu_ps(xf + k), a0);
      a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), _mm256_loadu_ps(xf + k + 8), a1);
      a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), _mm256_loadu_ps(xf + k + 16), a2);
      a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), _mm256_loadu_ps(xf + k + 24), a3);
    }
    float s = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (int64_t k = K32; k < K; ++k) s += to_float(r[k]) * xf[k];
    out[n] = s;
  }
}

// int8 rows, AVX-512: 64 bytes an iteration, widened 16 at a time.
__attribute__((target("avx512f,avx512bw"))) void rows_int8_avx512(const int8_t* w, int64_t K, const float* xf,
                                                                  float* out, int64_t n0, int64_t n1) {
  const int64_t K64 = K / 64 * 64;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* r = w + n * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K64; k += 64) {
      prefetch_ahead(r + k, 64);
      a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(r + k)))),
                           _mm512_loadu_ps(xf + k), a0);
      a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(r + k + 16)))),
                           _mm512_loadu_ps(xf + k + 16), a1);
      a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(r + k + 32)))),
                           _mm512_loadu_ps(xf + k + 32), a2);
      a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(r + k + 48)))),
                           _mm512_loadu_ps(xf + k + 48), a3);
    }
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (int64_t k = K64; k < K; ++k) s += to_float(r[k]) * xf[k];
    out[n] = s;
  }
}
#endif

// Rows per task: a block of rows is a few hundred KB of weight, so threads stream long runs.
constexpr int64_t kGrain = 64;

// The highest level this CPU runs for `t` weights: 1 with AVX2 + FMA; 2 with what that dtype's AVX-512 loop
// needs on top (bf16: AVX512-BF16 and BW; fp32: F; int8: F and BW); else 0.
int64_t top_level(at::ScalarType t) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return 0;
  const bool f = __builtin_cpu_supports("avx512f"), bw = __builtin_cpu_supports("avx512bw");
  const bool two = t == at::kBFloat16 ? __builtin_cpu_supports("avx512bf16") && bw : t == at::kFloat ? f : f && bw;
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

}  // namespace

// The highest level this CPU runs for bf16 weights: 2 (avx512_bf16), 1 (avx2 + fma) or 0.
int64_t gemv_cpu_level() { return top_level(at::kBFloat16); }

// y [1, N] = x [1, K] @ w[N, K]^T in w's dtype (bf16 or fp32), at `level` (clamped to the CPU's).
at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, int64_t level) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "gemv: CPU tensors only");
  TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1 && w.stride(0) == w.size(1), "gemv: w must be a contiguous [N, K] matrix");
  TORCH_CHECK(x.numel() == w.size(1), "gemv: x must hold one row of K = ", w.size(1), " values, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "gemv: x and w dtypes differ");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kFloat, "gemv: bf16 or fp32 weights");
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  level = std::min(level, top_level(w.scalar_type()));
  const int64_t N = w.size(0), K = w.size(1);
  auto xc = x.contiguous();
  auto xf = xc.to(at::kFloat).contiguous();
  auto out = at::empty({N}, x.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const float* xfp = xf.data_ptr<float>();
  const uint16_t* wb = bf16 ? reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()) : nullptr;
  const float* wf = bf16 ? nullptr : w.data_ptr<float>();
  const uint16_t* xb = bf16 ? reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()) : nullptr;
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
#if defined(__x86_64__)
    if (bf16 && level >= 2) return rows_avx512bf16(wb, K, xb, o, n0, n1);
    if (!bf16 && level >= 2) return rows_f32_avx512(wf, K, xfp, o, n0, n1);
    if (level >= 1) return bf16 ? rows_avx2(wb, K, xfp, o, n0, n1) : rows_avx2(wf, K, xfp, o, n0, n1);
#endif
    if (bf16) rows_portable(wb, K, xfp, o, n0, n1);
    else rows_portable(wf, K, xfp, o, n0, n1);
  });
  return (bf16 ? out.to(at::kBFloat16) : out).view(with_last(x, N));
}

// y [1, N] = (x [1, K] @ q[N, K]^T) * scales[N] for int8 rows q (quant.py's int8 layout, the one
// aten._weight_int8pack_mm reads), in x's dtype; level 2 here needs AVX-512 (F, BW) only.
at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, int64_t level) {
  TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu(), "gemv_int8: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.stride(1) == 1 && q.stride(0) == q.size(1),
              "gemv_int8: q must be a contiguous int8 [N, K] matrix");
  TORCH_CHECK(x.numel() == q.size(1), "gemv_int8: x must hold one row of K = ", q.size(1), " values, got ", x.sizes());
  TORCH_CHECK(scales.numel() == q.size(0), "gemv_int8: one scale a row");
  const int64_t N = q.size(0), K = q.size(1);
  level = std::min(level, top_level(at::kChar));
  auto xf = x.to(at::kFloat).contiguous();
  auto out = at::empty({N}, x.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const float* xfp = xf.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
#if defined(__x86_64__)
    if (level >= 2) return rows_int8_avx512(qp, K, xfp, o, n0, n1);
    if (level >= 1) return rows_int8_avx2(qp, K, xfp, o, n0, n1);
#endif
    rows_portable(qp, K, xfp, o, n0, n1);
  });
  out.mul_(scales.to(at::kFloat).reshape({N}));
  return out.to(x.scalar_type()).view(with_last(x, N));
}

TORCH_LIBRARY(smollchat_cpu, m) {
  m.def("gemv(Tensor x, Tensor w, int level) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor q, Tensor scales, int level) -> Tensor");
  m.def("gemv_cpu_level", &gemv_cpu_level);
}

TORCH_LIBRARY_IMPL(smollchat_cpu, CPU, m) {
  m.impl("gemv", gemv);
  m.impl("gemv_int8", gemv_int8);
}
