// Small SIMD pieces that gemv.cpp and attention.cpp share (cpu_gemv.build_dir hashes this header with the
// sources, so a change here rebuilds the extension).
#pragma once
#include <immintrin.h>
#include <cstdint>

namespace smollchat_simd {

// 2^f for |f| <= 1/2 by a degree-6 polynomial (highest degree first), within 2e-7 of exp2f: the exps of the
// decode attention's softmax, 16 and 8 lanes wide, evaluate it by Horner's rule.
constexpr float kExp2Poly[7] = {1.535336188e-4f, 1.339887440e-3f, 9.618437357e-3f, 5.550332471e-2f,
                                2.402264791e-1f, 6.931472028e-1f, 1.f};
constexpr float kLog2e = 1.44269504f;
// Below this the softmax's e^x is 0 in fp32 (and 2^n stays a normal float).
constexpr float kExpFloor = -87.f;

#if defined(__x86_64__)
// The sum of v's 8 lanes.
__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// 8 bf16 values (their raw bits) widened to fp32: a bf16 is the top half of the fp32 it stands for.
__attribute__((target("avx2,fma"))) inline __m256 load8_bf16(const void* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
#endif

}  // namespace smollchat_simd
