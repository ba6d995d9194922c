// The decode step's attention: one new query per query head against the KV cache (layers.causal_attention
// for one token, where the kernel choice measured it faster than PyTorch's SDPA; cpu_gemv.py builds this file
// into the same extension as gemv.cpp).
//
// q [B, Hkv, R, D] holds the R query heads that share each kv head; k [B, Hkv, L, D] and v [B, Hkv, L, Dv]
// are views of the cache (any strides, the last dimension contiguous). For each (batch, kv head), split over
// torch's threads: scores = scale * q k^T in fp32 (each key row read once for all R queries), a softmax in
// fp32, then out = p v, accumulated in fp32 and rounded once to q's dtype. Nothing is masked: every cached key
// is visible to the newest token.
//
// Levels: 2 = AVX-512 F (D and Dv multiples of 16, at most 256; exp by a degree-6 polynomial of 2^f scaled by
// vscalefps, within 2e-7 of expf); 1 = AVX2 + FMA (multiples of 8; the same polynomial, 2^n made in the exponent
// bits), also what level 2 runs for widths that are multiples of 8 but not 16; else portable C++ (std::exp).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "ops.h"
#include "simd.h"

namespace {

template <typename T>
inline float value(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

// Portable: one (batch, kv head).
template <typename T>
void head_portable(const T* q, int64_t qs, const T* k, int64_t ks, const T* v, int64_t vs, int64_t R, int64_t L,
                   int64_t D, int64_t Dv, float scale, float* s, float* o) {
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t j = 0; j < L; ++j) {
      float acc = 0.f;
      for (int64_t d = 0; d < D; ++d) acc += value(q, r * qs + d) * value(k, j * ks + d);
      s[r * L + j] = acc * scale;
    }
    float m = -INFINITY, sum = 0.f;
    for (int64_t j = 0; j < L; ++j) m = std::max(m, s[r * L + j]);
    for (int64_t j = 0; j < L; ++j) sum += (s[r * L + j] = std::exp(s[r * L + j] - m));
    for (int64_t e = 0; e < Dv; ++e) {
      float acc = 0.f;
      for (int64_t j = 0; j < L; ++j) acc += s[r * L + j] * value(v, j * vs + e);
      o[r * Dv + e] = acc / sum;
    }
  }
}

#if defined(__x86_64__)
__attribute__((target("avx512f"))) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f"))) inline __m512 load16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// e^x for x <= 0 (scores less their maximum): 2^t with t = x log2(e) split into n + f, |f| <= 1/2.
__attribute__((target("avx512f"))) inline __m512 exp_nonpositive(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(smollchat_simd::kExpFloor)), _mm512_set1_ps(smollchat_simd::kLog2e));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(smollchat_simd::kExp2Poly[0]);
#pragma GCC unroll 6
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(smollchat_simd::kExp2Poly[i]));
  return _mm512_scalef_ps(p, n);
}

constexpr int64_t kMaxD = 256, kMaxR = 16;

// The sums of the 16 lanes of a, b, c and d, in that order.
__attribute__((target("avx512f"))) inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // In each 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, d; then [a, b, c, d] partial sums.
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
                                    _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

template <typename T>
__attribute__((target("avx512f"))) void head_avx512(const T* q, int64_t qs, const T* k, int64_t ks, const T* v,
                                                    int64_t vs, int64_t R, int64_t L, int64_t D, int64_t Dv,
                                                    float scale, float* s, float* o) {
  const int64_t C = D / 16, Cv = Dv / 16;
  __m512 qf[kMaxR][kMaxD / 16];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) qf[r][c] = _mm512_mul_ps(load16(q + r * qs + c * 16), _mm512_set1_ps(scale));
  // Four keys at a time, their four sums reduced together (sum4); then one at a time.
  const int64_t L4 = L / 4 * 4;
  for (int64_t j = 0; j < L4; j += 4) {
    for (int64_t r = 0; r < R; ++r) {
      __m512 a[4];
      for (int i = 0; i < 4; ++i) {
        const T* kr = k + (j + i) * ks;
        a[i] = _mm512_mul_ps(qf[r][0], load16(kr));
        for (int64_t c = 1; c < C; ++c) a[i] = _mm512_fmadd_ps(qf[r][c], load16(kr + c * 16), a[i]);
      }
      _mm_storeu_ps(s + r * L + j, sum4(a[0], a[1], a[2], a[3]));
    }
  }
  for (int64_t j = L4; j < L; ++j) {
    const T* kr = k + j * ks;
    for (int64_t r = 0; r < R; ++r) {
      __m512 acc = _mm512_mul_ps(qf[r][0], load16(kr));
      for (int64_t c = 1; c < C; ++c) acc = _mm512_fmadd_ps(qf[r][c], load16(kr + c * 16), acc);
      s[r * L + j] = _mm512_reduce_add_ps(acc);
    }
  }
  const int64_t L16 = L / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (L - L16)) - 1);
  float inv[kMaxR];
  for (int64_t r = 0; r < R; ++r) {
    float* sr = s + r * L;
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < L16; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(sr + j));
    if (tail) mv = _mm512_mask_max_ps(mv, tail, mv, _mm512_maskz_loadu_ps(tail, sr + L16));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < L16; j += 16) {
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(sr + j), m));
      _mm512_storeu_ps(sr + j, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (tail) {
      const __m512 e = _mm512_maskz_mov_ps(tail, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sr + L16), m)));
      _mm512_mask_storeu_ps(sr + L16, tail, e);
      sum = _mm512_add_ps(sum, e);
    }
    inv[r] = 1.f / _mm512_reduce_add_ps(sum);
  }
  __m512 acc[kMaxR][kMaxD / 16];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < Cv; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < L; ++j) {
    const T* vr = v + j * vs;
    for (int64_t c = 0; c < Cv; ++c) {
      const __m512 vc = load16(vr + c * 16);
      for (int64_t r = 0; r < R; ++r) acc[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(s[r * L + j]), vc, acc[r][c]);
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < Cv; ++c) _mm512_storeu_ps(o + r * Dv + c * 16, _mm512_mul_ps(acc[r][c], _mm512_set1_ps(inv[r])));
}

// AVX2 + FMA (level 1, for the CPUs without AVX-512): head_avx512's steps 8 lanes wide, D and Dv multiples of 8.
// 2^n of the exp is built in the exponent bits (n >= -126 here, so a normal float), and the softmax's tail of L
// is read and written by masked moves. It repeats head_avx512's shape on purpose: a function is compiled for
// one instruction set (its target attribute), and one template for both would be compiled for their union,
// which lets the compiler put AVX-512 instructions into the AVX2 copy (a crash on the CPUs it is for).
__attribute__((target("avx2,fma"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma"))) inline __m256 load8(const at::BFloat16* p) { return smollchat_simd::load8_bf16(p); }

__attribute__((target("avx2,fma"))) inline __m256 exp_nonpositive8(__m256 x) {
  const __m256 t = _mm256_mul_ps(_mm256_max_ps(x, _mm256_set1_ps(smollchat_simd::kExpFloor)), _mm256_set1_ps(smollchat_simd::kLog2e));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(smollchat_simd::kExp2Poly[0]);
#pragma GCC unroll 6
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(smollchat_simd::kExp2Poly[i]));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

// The sums of the 8 lanes of a, b, c and d, in that order.
__attribute__((target("avx2,fma"))) inline __m128 sum4_8(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

using smollchat_simd::hsum8;

__attribute__((target("avx2,fma"))) inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

template <typename T>
__attribute__((target("avx2,fma"))) void head_avx2(const T* q, int64_t qs, const T* k, int64_t ks, const T* v,
                                                   int64_t vs, int64_t R, int64_t L, int64_t D, int64_t Dv,
                                                   float scale, float* s, float* o) {
  const int64_t C = D / 8, Cv = Dv / 8;
  __m256 qf[kMaxR][kMaxD / 8];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) qf[r][c] = _mm256_mul_ps(load8(q + r * qs + c * 8), _mm256_set1_ps(scale));
  const int64_t L4 = L / 4 * 4;
  for (int64_t j = 0; j < L4; j += 4) {
    for (int64_t r = 0; r < R; ++r) {
      __m256 a[4];
      for (int i = 0; i < 4; ++i) {
        const T* kr = k + (j + i) * ks;
        a[i] = _mm256_mul_ps(qf[r][0], load8(kr));
        for (int64_t c = 1; c < C; ++c) a[i] = _mm256_fmadd_ps(qf[r][c], load8(kr + c * 8), a[i]);
      }
      _mm_storeu_ps(s + r * L + j, sum4_8(a[0], a[1], a[2], a[3]));
    }
  }
  for (int64_t j = L4; j < L; ++j) {
    const T* kr = k + j * ks;
    for (int64_t r = 0; r < R; ++r) {
      __m256 acc = _mm256_mul_ps(qf[r][0], load8(kr));
      for (int64_t c = 1; c < C; ++c) acc = _mm256_fmadd_ps(qf[r][c], load8(kr + c * 8), acc);
      s[r * L + j] = hsum8(acc);
    }
  }
  const int64_t L8 = L / 8 * 8;
  // Lanes below L - L8 of the last, partial vector of scores.
  const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(L - L8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  float inv[kMaxR];
  for (int64_t r = 0; r < R; ++r) {
    float* sr = s + r * L;
    __m256 mv = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < L8; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(sr + j));
    float mx = hmax8(mv);
    for (int64_t j = L8; j < L; ++j) mx = std::max(mx, sr[j]);
    const __m256 m = _mm256_set1_ps(mx);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < L8; j += 8) {
      const __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(sr + j), m));
      _mm256_storeu_ps(sr + j, e);
      sum = _mm256_add_ps(sum, e);
    }
    if (L > L8) {
      const __m256 e = _mm256_and_ps(exp_nonpositive8(_mm256_sub_ps(_mm256_maskload_ps(sr + L8, tail), m)),
                                     _mm256_castsi256_ps(tail));
      _mm256_maskstore_ps(sr + L8, tail, e);
      sum = _mm256_add_ps(sum, e);
    }
    inv[r] = 1.f / hsum8(sum);
  }
  __m256 acc[kMaxR][kMaxD / 8];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < Cv; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < L; ++j) {
    const T* vr = v + j * vs;
    for (int64_t c = 0; c < Cv; ++c) {
      const __m256 vc = load8(vr + c * 8);
      for (int64_t r = 0; r < R; ++r) acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(s[r * L + j]), vc, acc[r][c]);
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < Cv; ++c) _mm256_storeu_ps(o + r * Dv + c * 8, _mm256_mul_ps(acc[r][c], _mm256_set1_ps(inv[r])));
}
#endif

int64_t attention_top_level() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return 2;
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
#else
  return 0;
#endif
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, int64_t level, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), D = q.size(3), L = k.size(2), Dv = v.size(3);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const bool fits = D <= kMaxD && Dv <= kMaxD && R <= kMaxR;
  const bool wide = fits && level >= 2 && D % 16 == 0 && Dv % 16 == 0;
  const bool eight = fits && level >= 1 && D % 8 == 0 && Dv % 8 == 0;
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> s(R * L), o(R * Dv);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / H, h = t % H;
      const T* qh = qp + b * q.stride(0) + h * q.stride(1);
      const T* kh = kp + b * k.stride(0) + h * k.stride(1);
      const T* vh = vp + b * v.stride(0) + h * v.stride(1);
#if defined(__x86_64__)
      if (wide)
        head_avx512(qh, q.stride(2), kh, k.stride(2), vh, v.stride(2), R, L, D, Dv, float(scale), s.data(), o.data());
      else if (eight)
        head_avx2(qh, q.stride(2), kh, k.stride(2), vh, v.stride(2), R, L, D, Dv, float(scale), s.data(), o.data());
      else
#endif
        head_portable(qh, q.stride(2), kh, k.stride(2), vh, v.stride(2), R, L, D, Dv, float(scale), s.data(), o.data());
      T* oh = op + t * R * Dv;
      for (int64_t i = 0; i < R * Dv; ++i) oh[i] = static_cast<T>(o[i]);
    }
  });
}

}  // namespace

// softmax(scale * q k^T) v for one query position; q [B, Hkv, R, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv] (one
// dtype, bf16 or fp32; last dims contiguous) -> [B, Hkv, R, Dv] in that dtype, at `level` (clamped to the CPU's).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                            int64_t level) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "decode_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "decode_attention: q, k and v must be 4-D");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "decode_attention: one dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "decode_attention: bf16 or fp32");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == q.size(1) && v.size(1) == q.size(1) &&
              k.size(3) == q.size(3) && v.size(2) == k.size(2) && k.size(2) > 0,
              "decode_attention: q ", q.sizes(), ", k ", k.sizes(), " and v ", v.sizes(), " do not match");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: last dims contiguous");
  level = std::min(level, attention_top_level());
  auto out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  if (q.scalar_type() == at::kFloat) run<float>(q, k, v, scale, level, out);
  else run<at::BFloat16>(q, k, v, scale, level, out);
  return out;
}

int64_t attention_cpu_level() { return attention_top_level(); }

TORCH_LIBRARY_FRAGMENT(smollchat_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, float scale, int level) -> Tensor");
  m.def("attention_cpu_level", &attention_cpu_level);
}

TORCH_LIBRARY_IMPL(smollchat_cpu, CPU, m) { m.impl("decode_attention", decode_attention); }
