// One decode step of a pre-norm GQA transformer (Axiom's: RMSNorm, fused q|k|v, interleaved RoPE, SwiGLU with
// fused gate|up, a residual stream, a final norm and a head) as one op: engine/dense_step.py builds a DenseStep
// from a loaded model's modules once and calls `step` for each token.
//
// Why: the compiled step of Axiom-380M spent ~3 ms of its ~15.5 ms per token outside the products (a Python
// wrapper that calls ~100 ops and kernels, dynamo's guards, a dozen small inductor kernels a layer, each op's
// dispatch); here the layer loop, the norms, RoPE, the cache writes, SiLU and the residual adds are a few
// loops over 1-3 thousand floats each, between the same products the module calls (gemv.cpp's, aten's for
// the layouts ours do not read) and the same attention (attention.cpp's, or SDPA).
//
// Numerics follow the eager modules': the stream is kept in the model's dtype (bf16 or fp32), each value
// rounded to it where the eager op returns a tensor of that dtype (`round_to`); norms, RoPE and SiLU compute in
// fp32 as theirs do. Sums are taken in another order than ATen's reductions, so results equal the eager
// step's within the dtype's tolerance, not bit for bit (tests/engine/test_dense_step.py).
#include <torch/extension.h>
#include <torch/custom_class.h>
#include <cmath>
#include <cstring>
#include <vector>

#include "ops.h"

namespace {

// How a Linear multiplies (dense_step.py: describe): our one-row products, or aten's where the kernel choice
// kept them.
enum Kind : int64_t { kGemv = 0, kLinear = 1, kInt8 = 2, kInt8Aten = 3, kInt4 = 4, kInt4Aten = 5 };

struct Product {
  int64_t kind, level, group, out;
  at::Tensor a, b;  // the weight (or the packed int8 / int4 weight) and, for quantized kinds, its scales

  // y [1, N] in x's dtype for x [1, K]. Quantized kinds multiply a bf16 x and cast back, as QuantLinear does.
  at::Tensor operator()(const at::Tensor& x) const {
    if (kind == kGemv) return gemv(x, a, level);
    if (kind == kLinear) return at::linear(x, a);
    const at::Tensor xb = x.scalar_type() == at::kBFloat16 ? x : x.to(at::kBFloat16);
    at::Tensor y;
    if (kind == kInt8) y = gemv_int8(xb, a, b, level);
    else if (kind == kInt8Aten) y = at::_weight_int8pack_mm(xb, a, b);
    else if (kind == kInt4) y = gemv_int4(xb, a, b, group, level);
    else y = at::_weight_int4pack_mm_for_cpu(xb, a, group, b).narrow(1, 0, out);
    return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
  }
};

// A value as the model's dtype stores it: rounded to bf16 (to nearest even, as ATen's casts round) or kept.
inline float round_to(float v, bool bf16) { return bf16 ? static_cast<float>(at::BFloat16(v)) : v; }

// A contiguous bf16 or fp32 tensor's values as fp32.
void read(const at::Tensor& t, float* dst) {
  const int64_t n = t.numel();
  if (t.scalar_type() == at::kFloat) {
    std::memcpy(dst, t.data_ptr<float>(), n * sizeof(float));
  } else {
    const auto* p = t.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(p[i]);
  }
}

// n values (already rounded to the dtype) stored into a bf16 or fp32 buffer.
void write(const float* src, int64_t n, const at::Tensor& t, int64_t offset = 0) {
  if (t.scalar_type() == at::kFloat) {
    std::memcpy(t.data_ptr<float>() + offset, src, n * sizeof(float));
  } else {
    auto* p = t.data_ptr<at::BFloat16>() + offset;
    for (int64_t i = 0; i < n; ++i) p[i] = at::BFloat16(src[i]);
  }
}

}  // namespace

class DenseStep : public torch::CustomClassHolder {
 public:
  // norms: attn_norm, ffn_norm of each layer, then the final norm. weights, scales, meta: the products in the
  // order wqkv, wo, w13, w2 of each layer, then the head; meta holds (kind, level, group, out) for each.
  DenseStep(int64_t n_heads, int64_t n_kv, int64_t head_dim, int64_t ffn_dim, double eps, int64_t attention,
            std::vector<at::Tensor> norms, std::vector<at::Tensor> weights, std::vector<at::Tensor> scales,
            std::vector<int64_t> meta)
      : H_(n_heads), Hkv_(n_kv), hd_(head_dim), F_(ffn_dim), eps_(eps), attention_(attention) {
    const int64_t n = static_cast<int64_t>(weights.size());
    TORCH_CHECK(n >= 5 && (n - 1) % 4 == 0 && static_cast<int64_t>(scales.size()) == n &&
                    static_cast<int64_t>(meta.size()) == 4 * n,
                "DenseStep: four products a layer and a head, each with its scales and (kind, level, group, out)");
    layers_ = (n - 1) / 4;
    TORCH_CHECK(static_cast<int64_t>(norms.size()) == 2 * layers_ + 1, "DenseStep: two norms a layer and a final one");
    TORCH_CHECK(n_kv > 0 && n_heads % n_kv == 0 && head_dim % 2 == 0, "DenseStep: query heads a multiple of kv heads, even head width");
    for (int64_t i = 0; i < n; ++i)
      products_.push_back(Product{meta[4 * i], meta[4 * i + 1], meta[4 * i + 2], meta[4 * i + 3], weights[i], scales[i]});
    dim_ = norms[0].numel();
    for (const auto& w : norms) {  // their values, once, in fp32
      TORCH_CHECK(w.numel() == dim_ && w.is_contiguous(), "DenseStep: every norm weight has the model's width");
      std::vector<float> f(dim_);
      read(w, f.data());
      norm_values_.push_back(std::move(f));
    }
  }

  // The KV caches a step writes and reads: one [1, Hkv, max_len, head_dim] k and v buffer a layer (state.KVState).
  void bind(std::vector<at::Tensor> ks, std::vector<at::Tensor> vs) {
    TORCH_CHECK(static_cast<int64_t>(ks.size()) == layers_ && vs.size() == ks.size(), "DenseStep.bind: one k and v a layer");
    for (size_t i = 0; i < ks.size(); ++i)
      TORCH_CHECK(ks[i].dim() == 4 && ks[i].size(0) == 1 && ks[i].size(1) == Hkv_ && ks[i].size(3) == hd_ &&
                      ks[i].is_contiguous() && vs[i].sizes() == ks[i].sizes() && vs[i].is_contiguous() &&
                      ks[i].scalar_type() == vs[i].scalar_type(),
                  "DenseStep.bind: layer ", i, "'s cache is not a contiguous [1, ", Hkv_, ", L, ", hd_, "] pair");
    ks_ = std::move(ks);
    vs_ = std::move(vs);
  }

  // The logits [1, 1, V] (fp32) of the token whose embedding is x [1, 1, D] at position `pos` (the number of
  // tokens cached before it); cos, sin [1, head_dim / 2] fp32 are that position's RoPE angles. Writes the
  // token's k and v at `pos` of every layer's cache; the caller advances the state's length.
  at::Tensor step(at::Tensor x, at::Tensor cos, at::Tensor sin, int64_t pos) {
    TORCH_CHECK(!ks_.empty(), "DenseStep.step: no cache bound");
    TORCH_CHECK(pos >= 0 && pos < ks_[0].size(2), "DenseStep.step: position ", pos, " is outside the cache");
    TORCH_CHECK(x.numel() == dim_ && x.is_contiguous() && x.scalar_type() == ks_[0].scalar_type(),
                "DenseStep.step: x must be one contiguous embedding row in the cache's dtype");
    TORCH_CHECK(cos.numel() == hd_ / 2 && sin.numel() == hd_ / 2 && cos.scalar_type() == at::kFloat &&
                    sin.scalar_type() == at::kFloat, "DenseStep.step: cos and sin must hold head_dim / 2 fp32 values");
    const auto dtype = x.scalar_type();
    const bool bf16 = dtype == at::kBFloat16;
    const int64_t D = dim_, R = H_ / Hkv_, L = pos + 1, half = hd_ / 2;
    const auto opts = x.options();
    const float* c = cos.contiguous().data_ptr<float>();
    const float* s = sin.contiguous().data_ptr<float>();
    std::vector<float> h(D), f(std::max<int64_t>(D, 2 * F_)), q(H_ * hd_), kv(hd_);
    read(x, h.data());
    at::Tensor in = at::empty({1, D}, opts), mid = at::empty({1, F_}, opts), qt = at::empty({1, Hkv_, R, hd_}, opts);
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd_));
    for (int64_t i = 0; i < layers_; ++i) {
      const Product* p = &products_[4 * i];
      norm(h.data(), norm_values_[2 * i], bf16, in);
      read(p[0](in), f.data());  // q | k | v, [H + 2 Hkv] x head_dim
      // RoPE on q and k, pairs (2j, 2j + 1), in fp32 and rounded, as apply_rope_interleaved.
      for (int64_t head = 0; head < H_ + Hkv_; ++head) {
        const float* src = f.data() + head * hd_;
        float* dst = head < H_ ? q.data() + head * hd_ : kv.data();
        for (int64_t j = 0; j < half; ++j) {
          const float x0 = src[2 * j], x1 = src[2 * j + 1];
          const float a = x0 * c[j], b = x1 * s[j], e = x0 * s[j], g = x1 * c[j];
          dst[2 * j] = round_to(a - b, bf16);
          dst[2 * j + 1] = round_to(e + g, bf16);
        }
        if (head >= H_) write(kv.data(), hd_, ks_[i], ((head - H_) * ks_[i].size(2) + pos) * hd_);
      }
      for (int64_t head = 0; head < Hkv_; ++head)
        write(f.data() + (H_ + Hkv_ + head) * hd_, hd_, vs_[i], (head * vs_[i].size(2) + pos) * hd_);
      write(q.data(), H_ * hd_, qt);  // [1, Hkv, R, hd]: query head h shares kv head h / R
      const at::Tensor k = ks_[i].narrow(2, 0, L), v = vs_[i].narrow(2, 0, L);
      const at::Tensor o = attention_ > 0 ? decode_attention(qt, k, v, scale, attention_)
                                          : at::scaled_dot_product_attention(qt, k, v, {}, 0.0, false, scale);
      read(p[1](o.reshape({1, H_ * hd_})), f.data());
      for (int64_t d = 0; d < D; ++d) h[d] = round_to(h[d] + f[d], bf16);
      norm(h.data(), norm_values_[2 * i + 1], bf16, in);
      read(p[2](in), f.data());  // gate | up
      for (int64_t j = 0; j < F_; ++j) {
        const float gate = f[j];
        f[j] = round_to(round_to(gate / (1.0f + std::exp(-gate)), bf16) * f[F_ + j], bf16);
      }
      write(f.data(), F_, mid);
      read(p[3](mid), f.data());
      for (int64_t d = 0; d < D; ++d) h[d] = round_to(h[d] + f[d], bf16);
    }
    norm(h.data(), norm_values_[2 * layers_], bf16, in);
    const at::Tensor logits = products_.back()(in);
    return logits.to(at::kFloat).view({1, 1, -1});
  }

 private:
  // out = round(round(x * rsqrt(mean(x^2) + eps)) * w), as layers.rms_norm (the weight after the cast back).
  void norm(const float* x, const std::vector<float>& w, bool bf16, at::Tensor& out) const {
    double ss = 0.0;
    for (int64_t d = 0; d < dim_; ++d) ss += static_cast<double>(x[d]) * x[d];
    const float r = 1.0f / std::sqrt(static_cast<float>(ss / dim_) + static_cast<float>(eps_));
    std::vector<float> y(dim_);
    for (int64_t d = 0; d < dim_; ++d) y[d] = round_to(round_to(x[d] * r, bf16) * w[d], bf16);
    write(y.data(), dim_, out);
  }

  int64_t H_, Hkv_, hd_, F_;
  double eps_;
  int64_t attention_;
  int64_t layers_ = 0, dim_ = 0;
  std::vector<std::vector<float>> norm_values_;
  std::vector<Product> products_;
  std::vector<at::Tensor> ks_, vs_;
};

TORCH_LIBRARY_FRAGMENT(smollchat_cpu, m) {
  m.class_<DenseStep>("DenseStep")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, double, int64_t, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>>())
      .def("bind", &DenseStep::bind)
      .def("step", &DenseStep::step);
}
