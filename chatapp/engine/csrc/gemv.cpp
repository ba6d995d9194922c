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

#include "ops.h"
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
  std::vector<int8_t> q;       // [K rounded up to `round` (64 or 128)], zero past K
  std::vector<float> s4;       // one scale per 4 values (lane), [that length / 4]
  std::vector<int32_t> sum32;  // the sum of q over each 32 values, [that length / 32]
  float corr = 0.f;            // 128 * sum_k scale(k) * xq[k]
};

// x rounded to int8 in blocks of `block` (32 or 128) values, one scale amax / 127 a block, to nearest (ties to
// even, as std::nearbyint in the default rounding mode): 16 values at a time in SSE2 (every x86-64 CPU has it; a
// scalar loop calling nearbyint took 10-20 us of a 25-100 us product), any tail of K one at a time.
QuantizedX quantize_x(const float* x, int64_t K, int64_t round = 64, int64_t block = 32) {
  const int64_t K64 = (K + round - 1) / round * round;
  QuantizedX out;
  out.q.assign(K64, 0);
  out.s4.assign(K64 / 4, 0.f);
  out.sum32.assign(K64 / 32, 0);
  const __m128 sign = _mm_set1_ps(-0.f);
  double corr = 0.0;
  for (int64_t k0 = 0; k0 < K; k0 += block) {
    const int64_t k1 = std::min<int64_t>(k0 + block, K), k16 = k0 + (k1 - k0) / 16 * 16;
    __m128 m = _mm_setzero_ps();
    for (int64_t k = k0; k < k16; k += 4) m = _mm_max_ps(m, _mm_andnot_ps(sign, _mm_loadu_ps(x + k)));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    float amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
    for (int64_t k = k16; k < k1; ++k) amax = std::max(amax, std::fabs(x[k]));
    const float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    const __m128 vinv = _mm_set1_ps(inv);
    for (int64_t k = k0; k < k16; k += 16) {
      const __m128i a = _mm_cvtps_epi32(_mm_mul_ps(_mm_loadu_ps(x + k), vinv));
      const __m128i b = _mm_cvtps_epi32(_mm_mul_ps(_mm_loadu_ps(x + k + 4), vinv));
      const __m128i c = _mm_cvtps_epi32(_mm_mul_ps(_mm_loadu_ps(x + k + 8), vinv));
      const __m128i d = _mm_cvtps_epi32(_mm_mul_ps(_mm_loadu_ps(x + k + 12), vinv));
      _mm_storeu_si128((__m128i*)(out.q.data() + k), _mm_packs_epi16(_mm_packs_epi32(a, b), _mm_packs_epi32(c, d)));
    }
    for (int64_t k = k16; k < k1; ++k) out.q[k] = static_cast<int8_t>(_mm_cvtss_si32(_mm_set_ss(x[k] * inv)));
    int32_t sum = 0;
    for (int64_t k = k0; k < k1; ++k) {
      out.sum32[k / 32] += out.q[k];
      sum += out.q[k];
    }
    for (int64_t j = k0 / 4; j < std::min(k0 + block, K64) / 4; ++j) out.s4[j] = s;
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

// int4 weights, quant.py's "nibbles" layout (level 3: AVX512-VNNI, level 4: AVX2; gemv_int4 below). Each row holds
// K128 = K rounded up to 128 weights in K128 / 2 bytes: in every 64 bytes, byte j carries weight j of that span of
// 128 in its low nibble and weight 64 + j in its high one, as q in [0, 15]; the row's groups of G weights (32, 64
// or 128) have a bf16 (scale, zero) pair each, [K128 / G, 2], and w = (q - 8) * scale + zero (the grid of aten's
// int4 kernel, so both layouts hold the same weights). Padding weights and groups are zeros.
//
// x is rounded to int8 with one scale a span of 128 (quantize_x; llama.cpp's K-quant products round theirs by
// 256), so a group's sum is
//   sum w x = scale * xscale * sum q xq + (zero - 8 scale) * sum x,
// sum q xq from unsigned-by-signed byte products of the nibbles with xq (vpdpbusd, or vpmaddubsw: 15 x 127 x 2
// < 2^15, and four such pairs still fit int16), kept in int32 over the whole group; the second term from the
// group sums of the same rounded x (`xs`), once a row. (Sums of x as given there would leave
// scale * sum q (xq - x) as the error, q in [0, 15] far from centred, where the rounding of x alone leaves
// sum w (xq - x): 10x more on random weights.) A row starts by converting its (scale, zero) pairs: scale *
// xscale in fp32 for the loop (`ws`), and the offset term. 128 weights then cost one 64-byte load, a shift, two
// masks, two byte products, one conversion and one multiply-add (G = 128): the nibbles are never widened.

inline float bf16_bits(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }

// Portable: every weight dequantized in fp32, x as given (no rounding of x).
void rows_int4_portable(const uint8_t* w, const uint16_t* sz, int64_t K, int64_t G, const float* xf, float* out,
                        int64_t n0, int64_t n1) {
  const int64_t K128 = (K + 127) / 128 * 128, groups = K128 / G;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* r = w + n * (K128 / 2);
    const uint16_t* s = sz + n * groups * 2;
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const uint8_t b = r[k / 128 * 64 + k % 64];
      const int q = k % 128 < 64 ? (b & 15) : (b >> 4);
      acc += ((q - 8) * bf16_bits(s, 2 * (k / G)) + bf16_bits(s, 2 * (k / G) + 1)) * xf[k];
    }
    out[n - n0] = acc;
  }
}

#if defined(__x86_64__)
// Per call: the group sums of x as rounded (`sums`, zero for padding groups) and each group's x scale (`scales`,
// that of the span of 128 it lies in), [K128 / G] each.
struct GroupX {
  std::vector<float> sums, scales;
};

GroupX group_x(const QuantizedX& xq, int64_t K128, int64_t G) {
  GroupX out{std::vector<float>(K128 / G, 0.f), std::vector<float>(K128 / G, 0.f)};
  for (int64_t b = 0; b < K128 / 32; ++b) out.sums[b * 32 / G] += xq.s4[b * 8] * xq.sum32[b];
  for (int64_t g = 0; g < K128 / G; ++g) out.scales[g] = xq.s4[g * G / 4];
  return out;
}

// A row's preamble: ws[g] = scale_g * xscale_g, and the offset term sum_g (zero_g - 8 scale_g) * xsum_g, returned.
// A (scale, zero) pair of bf16 is one 32-bit lane, the scale in its low half; 16 groups (AVX-512) or 8 at a time.
__attribute__((target("avx512f"))) inline __m512 row_scales16(const uint16_t* s, const GroupX& gx, int64_t groups,
                                                              float* ws) {
  __m512 off = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t g = 0; g < groups; g += 16) {
    const __mmask16 m = groups - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (groups - g)) - 1);
    const __m512i pair = _mm512_maskz_loadu_epi32(m, s + 2 * g);
    const __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
    const __m512 zr = _mm512_castsi512_ps(_mm512_and_si512(pair, high));
    _mm512_storeu_ps(ws + g, _mm512_mul_ps(sc, _mm512_maskz_loadu_ps(m, gx.scales.data() + g)));  // (ws has slack)
    off = _mm512_fmadd_ps(_mm512_fnmadd_ps(_mm512_set1_ps(8.f), sc, zr), _mm512_maskz_loadu_ps(m, gx.sums.data() + g), off);
  }
  return off;  // in lanes, summed with the row's products
}

__attribute__((target("avx2,fma"))) inline float row_scales8(const uint16_t* s, const GroupX& gx, int64_t groups,
                                                            float* ws) {
  __m256 off = _mm256_setzero_ps();
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  const int64_t G8 = groups / 8 * 8;
  for (int64_t g = 0; g < G8; g += 8) {
    const __m256i pair = _mm256_loadu_si256((const __m256i*)(s + 2 * g));
    const __m256 sc = _mm256_castsi256_ps(_mm256_slli_epi32(pair, 16));
    const __m256 zr = _mm256_castsi256_ps(_mm256_and_si256(pair, high));
    _mm256_storeu_ps(ws + g, _mm256_mul_ps(sc, _mm256_loadu_ps(gx.scales.data() + g)));
    off = _mm256_fmadd_ps(_mm256_fnmadd_ps(_mm256_set1_ps(8.f), sc, zr), _mm256_loadu_ps(gx.sums.data() + g), off);
  }
  float t = hsum8(off);
  for (int64_t g = G8; g < groups; ++g) {
    ws[g] = bf16_bits(s, 2 * g) * gx.scales[g];
    t += (bf16_bits(s, 2 * g + 1) - 8.f * bf16_bits(s, 2 * g)) * gx.sums[g];
  }
  return t;
}

// The rows of x one call of an int4 row loop multiplies (up to kTile: each span of weights is loaded and split
// into nibbles once for all of them), each rounded to int8 (quantize_x) with its group sums and scales.
constexpr int kTile = 4;
struct XTile {
  const int8_t* q[kTile];
  const GroupX* g[kTile];
};

// AVX512-VNNI: 128 weights an iteration. The low nibbles meet xq[k, k + 64), the high ones xq[k + 64, k + 128): two
// vpdpbusd into one int32 sum (G = 128; lane j sums weights 4j..4j+3 and 64+4j..), or into one each (G = 64:
// the halves are two groups), or lanes 0-7 and 8-15 of each in two groups (G = 32: the scales by vpermps).
// T rows of x at once; out[t * stride + n - n0].
template <int G, int T>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void rows_int4_vnni(
    const uint8_t* w, const uint16_t* sz, int64_t K128, const XTile& xt, float* out, int64_t stride, int64_t n0,
    int64_t n1) {
  const __m512i mask = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
  const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const int64_t groups = K128 / G, wstride = groups + 16;
  std::vector<float> wsv(T * wstride);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* r = w + n * (K128 / 2);
    __m512 a0[T], a1[T];
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      a0[t] = row_scales16(sz + n * groups * 2, *xt.g[t], groups, wsv.data() + t * wstride);
      a1[t] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < K128; k += 128) {
      const __m512i b = _mm512_loadu_si512(r + k / 2);
      const __m512i lo = _mm512_and_si512(b, mask), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), mask);
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) {
        const int8_t* x = xt.q[t];
        const float* ws = wsv.data() + t * wstride;
        if constexpr (G == 128) {
          const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, _mm512_loadu_si512(x + k)), hi,
                                                _mm512_loadu_si512(x + k + 64));
          a0[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(ws[k / 128]), a0[t]);
        } else if constexpr (G == 64) {
          a0[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, lo, _mm512_loadu_si512(x + k))),
                                  _mm512_set1_ps(ws[k / 64]), a0[t]);
          a1[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, hi, _mm512_loadu_si512(x + k + 64))),
                                  _mm512_set1_ps(ws[k / 64 + 1]), a1[t]);
        } else {
          const __m512 s01 = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double*)(ws + k / 32)))));
          const __m512 s23 = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double*)(ws + k / 32 + 2)))));
          a0[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, lo, _mm512_loadu_si512(x + k))), s01, a0[t]);
          a1[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, hi, _mm512_loadu_si512(x + k + 64))), s23, a1[t]);
        }
      }
    }
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) out[t * stride + n - n0] = _mm512_reduce_add_ps(_mm512_add_ps(a0[t], a1[t]));
  }
}

// AVX2: the same layout 32 bytes at a time. The first 32 bytes of a span of 128 hold weights [0, 32) and [64, 96),
// the next [32, 64) and [96, 128): four vpmaddubsw (nibbles unsigned, xq signed) whose int16 pair sums are added
// within a group (four at most: 4 x 3,810 < 2^15), then summed by fours into int32 lanes by vpmaddwd.
__attribute__((target("avx2,fma"))) inline __m256i nibble_pairs(__m256i nib, const int8_t* x) {
  return _mm256_maddubs_epi16(nib, _mm256_loadu_si256((const __m256i*)x));
}
__attribute__((target("avx2,fma"))) inline __m256 group_sum8(__m256i pairs, float ws, __m256 acc) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1))), _mm256_set1_ps(ws), acc);
}

template <int G, int T>
__attribute__((target("avx2,fma"))) void rows_int4_avx2(const uint8_t* w, const uint16_t* sz, int64_t K128,
                                                       const XTile& xt, float* out, int64_t stride, int64_t n0,
                                                       int64_t n1) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const int64_t groups = K128 / G, wstride = groups + 8;
  std::vector<float> wsv(T * wstride);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* r = w + n * (K128 / 2);
    float offset[T];
    __m256 a0[T], a1[T];
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      offset[t] = row_scales8(sz + n * groups * 2, *xt.g[t], groups, wsv.data() + t * wstride);
      a0[t] = a1[t] = _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < K128; k += 128) {
      const __m256i b0 = _mm256_loadu_si256((const __m256i*)(r + k / 2));
      const __m256i b1 = _mm256_loadu_si256((const __m256i*)(r + k / 2 + 32));
      // Blocks 0..3 of the span: weights [0, 32), [32, 64), [64, 96), [96, 128).
      const __m256i n0_ = _mm256_and_si256(b0, mask), n1_ = _mm256_and_si256(b1, mask);
      const __m256i n2_ = _mm256_and_si256(_mm256_srli_epi16(b0, 4), mask), n3_ = _mm256_and_si256(_mm256_srli_epi16(b1, 4), mask);
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) {
        const int8_t* x = xt.q[t];
        const float* ws = wsv.data() + t * wstride;
        const __m256i p0 = nibble_pairs(n0_, x + k), p1 = nibble_pairs(n1_, x + k + 32);
        const __m256i p2 = nibble_pairs(n2_, x + k + 64), p3 = nibble_pairs(n3_, x + k + 96);
        if constexpr (G == 128) {
          a0[t] = group_sum8(_mm256_add_epi16(_mm256_add_epi16(p0, p1), _mm256_add_epi16(p2, p3)), ws[k / 128], a0[t]);
        } else if constexpr (G == 64) {
          a0[t] = group_sum8(_mm256_add_epi16(p0, p1), ws[k / 64], a0[t]);
          a1[t] = group_sum8(_mm256_add_epi16(p2, p3), ws[k / 64 + 1], a1[t]);
        } else {
          a0[t] = group_sum8(p0, ws[k / 32], a0[t]);
          a1[t] = group_sum8(p1, ws[k / 32 + 1], a1[t]);
          a0[t] = group_sum8(p2, ws[k / 32 + 2], a0[t]);
          a1[t] = group_sum8(p3, ws[k / 32 + 3], a1[t]);
        }
      }
    }
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) out[t * stride + n - n0] = hsum8(_mm256_add_ps(a0[t], a1[t])) + offset[t];
  }
}

// The level's int4 row loop for a tile of T (1..kTile) rows of x.
template <int G, int T>
void int4_tile(int64_t level, const uint8_t* w, const uint16_t* sz, int64_t K128, const XTile& xt, float* out,
               int64_t stride, int64_t n0, int64_t n1) {
  if (level == 3) rows_int4_vnni<G, T>(w, sz, K128, xt, out, stride, n0, n1);
  else rows_int4_avx2<G, T>(w, sz, K128, xt, out, stride, n0, n1);
}

template <int G>
void int4_rows(int64_t level, int T, const uint8_t* w, const uint16_t* sz, int64_t K128, const XTile& xt, float* out,
               int64_t stride, int64_t n0, int64_t n1) {
  switch (T) {
    case 1: return int4_tile<G, 1>(level, w, sz, K128, xt, out, stride, n0, n1);
    case 2: return int4_tile<G, 2>(level, w, sz, K128, xt, out, stride, n0, n1);
    case 3: return int4_tile<G, 3>(level, w, sz, K128, xt, out, stride, n0, n1);
    default: return int4_tile<G, 4>(level, w, sz, K128, xt, out, stride, n0, n1);
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

void check_int4(const char* op, const at::Tensor& packed, const at::Tensor& sz, int64_t group, int64_t K) {
  TORCH_CHECK(packed.device().is_cpu() && sz.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(group == 32 || group == 64 || group == 128, op, ": the group size must be 32, 64 or 128, got ", group);
  TORCH_CHECK(K > 0 && K % group == 0, op, ": K = ", K, " is not a multiple of the group size ", group);
  const int64_t K128 = (K + 127) / 128 * 128;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous() &&
              packed.size(1) == K128 / 2, op, ": the nibbles must be a contiguous uint8 [N, ", K128 / 2, "], got ",
              packed.sizes());
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == 3 && sz.size(0) == packed.size(0) &&
              sz.size(1) == K128 / group && sz.size(2) == 2, op, ": the scales must be a contiguous bf16 [N, ", K128 / group,
              ", 2], got ", sz.sizes());
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

// y [..., N] = x [..., K] @ W^T for int4 weights in the nibbles layout (packed uint8 [N, K128 / 2], sz bf16
// [N, K128 / G, 2]; see rows_int4_vnni), in x's dtype, for any number M of rows of x. Level 3 runs the
// AVX512-VNNI loop, 4 (or 1, 2) the AVX2 one, each with x rounded to int8 spans of 128; 0 (or a CPU without AVX2)
// dequantizes each weight in fp32. Threads take blocks of kGrain weight rows; within a block the rows of x go
// kTile at a time, so the block's weights are read from memory once (then from cache) for all M rows.
at::Tensor gemv_int4(const at::Tensor& x_, const at::Tensor& packed, const at::Tensor& sz, int64_t group, int64_t level) {
  const int64_t K = x_.size(-1);
  check_int4("gemv_int4", packed, sz, group, K);
  TORCH_CHECK(x_.device().is_cpu() && x_.dim() >= 1, "gemv_int4: x must be a CPU tensor [..., K]");
  TORCH_CHECK(x_.scalar_type() == at::kBFloat16 || x_.scalar_type() == at::kFloat, "gemv_int4: x must be bf16 or fp32");
  const int64_t top = top_level(at::kChar);
  level = level <= 0 || top < 1 ? 0 : level == 3 && top >= 3 ? 3 : 4;  // (top is 0 off x86-64)
  const auto x = x_.contiguous();
  const int64_t M = K ? x.numel() / K : 0, N = packed.size(0), K128 = (K + 127) / 128 * 128;
  std::vector<float> buf;
  const float* xf = as_float(x, buf);
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const auto* s = reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>());
#if defined(__x86_64__)
  std::vector<QuantizedX> xq(level > 0 ? M : 0);
  std::vector<GroupX> gx(xq.size());
  for (size_t m = 0; m < xq.size(); ++m) {
    xq[m] = quantize_x(xf + m * K, K, 128, 128);
    gx[m] = group_x(xq[m], K128, group);
  }
#endif
  auto out = at::empty(with_last(x, N), x.options());
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  auto* ob = bf16 ? out.data_ptr<at::BFloat16>() : nullptr;
  auto* of = bf16 ? nullptr : out.data_ptr<float>();
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    float acc[kTile * kGrain];
    for (int64_t b0 = n0; b0 < n1; b0 += kGrain) {
      const int64_t b1 = std::min(n1, b0 + kGrain);
      for (int64_t m0 = 0; m0 < M; m0 += kTile) {
        const int T = static_cast<int>(std::min<int64_t>(kTile, M - m0));
#if defined(__x86_64__)
        if (level > 0) {
          XTile xt{};
          for (int t = 0; t < T; ++t) xt.q[t] = xq[m0 + t].q.data(), xt.g[t] = &gx[m0 + t];
          if (group == 128) int4_rows<128>(level, T, w, s, K128, xt, acc, kGrain, b0, b1);
          else if (group == 64) int4_rows<64>(level, T, w, s, K128, xt, acc, kGrain, b0, b1);
          else int4_rows<32>(level, T, w, s, K128, xt, acc, kGrain, b0, b1);
        } else
#endif
        {
          for (int t = 0; t < T; ++t) rows_int4_portable(w, s, K, group, xf + (m0 + t) * K, acc + t * kGrain, b0, b1);
        }
        for (int t = 0; t < T; ++t)
          for (int64_t n = b0; n < b1; ++n) {
            const float v = acc[t * kGrain + n - b0];
            if (bf16) ob[(m0 + t) * N + n] = at::BFloat16(v);
            else of[(m0 + t) * N + n] = v;
          }
      }
    }
  });
  return out;
}

// Unpacking int4 nibbles to bf16 (int4_unpack), one block of 32 weights at a time: block b of a row is the low
// (b % 4 < 2) or high nibbles of 32 bytes at (b / 4) * 64 + (b % 2) * 32. A group has only 16 values, so each
// group's are computed once, as at::BFloat16((q - 8) * scale + zero), into a table its nibbles index (vpermw on
// AVX-512 BW, two vpshufb for the low and high bytes on AVX2, a load otherwise): every level gives the same bits.
struct UnpackTable {
  alignas(64) uint16_t bits[32] = {0};
  int64_t group = -1;
  bool fill(const uint16_t* sr, int64_t g) {  // false if it already holds group g
    if (g == group) return false;
    const float scale = bf16_bits(sr, 2 * g), zero = bf16_bits(sr, 2 * g + 1);
    for (int q = 0; q < 16; ++q) {
      const at::BFloat16 v((q - 8) * scale + zero);
      std::memcpy(&bits[q], &v, 2);
    }
    group = g;
    return true;
  }
};

void unpack_row_portable(const uint8_t* r, const uint16_t* sr, int64_t K, int64_t G, uint16_t* o) {
  UnpackTable t;
  for (int64_t b = 0; b < K / 32; ++b) {
    t.fill(sr, b * 32 / G);
    const uint8_t* bytes = r + b / 4 * 64 + (b % 2) * 32;
    const int shift = b % 4 < 2 ? 0 : 4;
    for (int j = 0; j < 32; ++j) o[b * 32 + j] = t.bits[(bytes[j] >> shift) & 15];
  }
}

#if defined(__x86_64__)
__attribute__((target("avx512f,avx512bw"))) void unpack_row_avx512(const uint8_t* r, const uint16_t* sr, int64_t K,
                                                                   int64_t G, uint16_t* o) {
  UnpackTable t;
  __m512i table = _mm512_setzero_si512();
  const __m256i mask = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < K / 32; ++b) {
    if (t.fill(sr, b * 32 / G)) table = _mm512_load_si512(t.bits);
    const __m256i bytes = _mm256_loadu_si256((const __m256i*)(r + b / 4 * 64 + (b % 2) * 32));
    const __m256i nib = _mm256_and_si256(b % 4 < 2 ? bytes : _mm256_srli_epi16(bytes, 4), mask);
    _mm512_storeu_si512(o + b * 32, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(nib), table));
  }
}

__attribute__((target("avx2,fma"))) void unpack_row_avx2(const uint8_t* r, const uint16_t* sr, int64_t K, int64_t G,
                                                        uint16_t* o) {
  UnpackTable t;
  __m256i low = _mm256_setzero_si256(), high = low;
  const __m256i mask = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < K / 32; ++b) {
    if (t.fill(sr, b * 32 / G)) {  // the 16 values' low bytes and high bytes, in both 128-bit lanes
      alignas(16) uint8_t lo[16], hi[16];
      for (int q = 0; q < 16; ++q) lo[q] = t.bits[q] & 0xFF, hi[q] = t.bits[q] >> 8;
      low = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i*)lo));
      high = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i*)hi));
    }
    const __m256i bytes = _mm256_loadu_si256((const __m256i*)(r + b / 4 * 64 + (b % 2) * 32));
    const __m256i nib = _mm256_and_si256(b % 4 < 2 ? bytes : _mm256_srli_epi16(bytes, 4), mask);
    const __m256i l = _mm256_shuffle_epi8(low, nib), h = _mm256_shuffle_epi8(high, nib);
    // unpack works within 128-bit lanes: values 0-7 | 16-23 and 8-15 | 24-31; put them back in order.
    const __m256i a = _mm256_unpacklo_epi8(l, h), c = _mm256_unpackhi_epi8(l, h);
    _mm256_storeu_si256((__m256i*)(o + b * 32), _mm256_permute2x128_si256(a, c, 0x20));
    _mm256_storeu_si256((__m256i*)(o + b * 32 + 16), _mm256_permute2x128_si256(a, c, 0x31));
  }
}
#endif

// The bf16 weights [N, K] that int4 nibbles hold (prefill multiplies them block by block with F.linear), at
// `level`: 3 (what the VNNI product needs, so AVX-512 BW) by vpermw, 4 (or 1, 2) by vpshufb, else portable.
at::Tensor int4_unpack(const at::Tensor& packed, const at::Tensor& sz, int64_t group, int64_t K, int64_t level) {
  check_int4("int4_unpack", packed, sz, group, K);
  const int64_t N = packed.size(0), K128 = (K + 127) / 128 * 128, groups = K128 / group;
  const int64_t top = top_level(at::kChar);
  level = level <= 0 || top < 1 ? 0 : level == 3 && top >= 3 ? 3 : 4;
  auto out = at::empty({N, K}, packed.options().dtype(at::kBFloat16));
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const auto* s = reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>());
  auto* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* r = w + n * (K128 / 2);
      const uint16_t* sr = s + n * groups * 2;
#if defined(__x86_64__)
      if (level == 3) { unpack_row_avx512(r, sr, K, group, o + n * K); continue; }
      if (level == 4) { unpack_row_avx2(r, sr, K, group, o + n * K); continue; }
#endif
      unpack_row_portable(r, sr, K, group, o + n * K);
    }
  });
  return out;
}

// The bf16 weights [N, K] that int8 rows and their bf16 scales hold, q * scale rounded once to bf16 (to nearest,
// ties to even, as at::BFloat16 rounds): prefill past a few rows multiplies them block by block with F.linear,
// where aten's int8 product ran at half the bf16 GEMM's speed. 16 values at a time on AVX2 (the rounding in
// integer lanes), one at a time otherwise.
#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) void unpack_int8_row_avx2(const int8_t* q, float scale, int64_t K, uint16_t* o) {
  const __m256 s = _mm256_set1_ps(scale);
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF);
  const int64_t K16 = K / 16 * 16;
  for (int64_t k = 0; k < K16; k += 16) {
    __m256i half[2];
    for (int h = 0; h < 2; ++h) {
      const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(q + k + 8 * h)))), s);
      const __m256i bits = _mm256_castps_si256(v);
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), one);
      half[h] = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(bias, odd)), 16);
    }
    // 32-bit lanes to 16-bit (packus works within 128-bit lanes: put the quarters back in order).
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(half[0], half[1]), 0xD8);
    _mm256_storeu_si256((__m256i*)(o + k), packed);
  }
  for (int64_t k = K16; k < K; ++k) {
    const at::BFloat16 v(q[k] * scale);
    std::memcpy(o + k, &v, 2);
  }
}
#endif

at::Tensor int8_unpack(const at::Tensor& q, const at::Tensor& scales, int64_t level) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kChar && q.dim() == 2 && q.is_contiguous(),
              "int8_unpack: the rows must be a contiguous int8 [N, K] matrix");
  TORCH_CHECK(scales.numel() == q.size(0) && scales.scalar_type() == at::kBFloat16 && scales.is_contiguous(),
              "int8_unpack: one bf16 scale a row");
  const int64_t N = q.size(0), K = q.size(1);
  const bool simd = level > 0 && top_level(at::kChar) >= 1;
  auto out = at::empty({N, K}, q.options().dtype(at::kBFloat16));
  const int8_t* qp = q.data_ptr<int8_t>();
  const auto* s = scales.data_ptr<at::BFloat16>();
  auto* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float scale = static_cast<float>(s[n]);
#if defined(__x86_64__)
      if (simd) { unpack_int8_row_avx2(qp + n * K, scale, K, o + n * K); continue; }
#endif
      for (int64_t k = 0; k < K; ++k) {
        const at::BFloat16 v(qp[n * K + k] * scale);
        std::memcpy(o + n * K + k, &v, 2);
      }
    }
  });
  return out;
}

TORCH_LIBRARY(smollchat_cpu, m) {
  m.def("gemv(Tensor x, Tensor w, int level) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor q, Tensor scales, int level) -> Tensor");
  m.def("gemv_int4(Tensor x, Tensor packed, Tensor sz, int group, int level) -> Tensor");
  m.def("int4_unpack(Tensor packed, Tensor sz, int group, int k, int level) -> Tensor");
  m.def("int8_unpack(Tensor q, Tensor scales, int level) -> Tensor");
  m.def("gemv_cpu_levels", &gemv_cpu_levels);
}

TORCH_LIBRARY_IMPL(smollchat_cpu, CPU, m) {
  m.impl("gemv", gemv);
  m.impl("gemv_int8", gemv_int8);
  m.impl("gemv_int4", gemv_int4);
  m.impl("int4_unpack", int4_unpack);
  m.impl("int8_unpack", int8_unpack);
}
