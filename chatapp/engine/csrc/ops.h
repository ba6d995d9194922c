// The extension's products that other sources of it call directly (dense_step.cpp runs them inside one op),
// declared once; their definitions and contracts are in gemv.cpp and attention.cpp.
#pragma once
#include <ATen/ATen.h>

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, int64_t level);
at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, int64_t level);
at::Tensor gemv_int4(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sz, int64_t group, int64_t level);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, int64_t level);
