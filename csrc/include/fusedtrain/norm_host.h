// Host side of fusedtrain::total_norm, shared by the CPU and CUDA registrations: checks, the flat list of
// dense pieces, and the output tensor. The backends only reduce (Note [norm accumulation], norm.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <utility>
#include <vector>

#include "fusedtrain/norm.h"

namespace fusedtrain {
namespace host {

struct NormWork {
  std::vector<const void*> ptr;
  std::vector<int64_t> numel;
  std::vector<at::Tensor> keep_alive;
};

inline NormWork prepare_norm(at::TensorList tensors, double norm_type) {
  TORCH_CHECK(!tensors.empty(), "fusedtrain.total_norm: tensors is empty; pass at least one tensor");
  TORCH_CHECK(norm_type > 0 && !std::isnan(norm_type), "fusedtrain.total_norm: norm_type must be positive (a p > 0 "
              "or inf), got ", norm_type, "; use torch.linalg.vector_norm for other orders");
  NormWork work;
  const at::Tensor& t0 = tensors[0];
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fusedtrain.total_norm: tensors[", i, "] has dtype ",
                t.scalar_type(), "; only float32, float64, float16 and bfloat16 are supported");
    TORCH_CHECK(t.device() == t0.device() && t.scalar_type() == t0.scalar_type(), "fusedtrain.total_norm: tensors[",
                i, "] (", t.scalar_type(), " on ", t.device(), ") differs from tensors[0] (", t0.scalar_type(), " on ",
                t0.device(), "); one call reduces tensors of one device and dtype");
    TORCH_CHECK(t.layout() == at::kStrided, "fusedtrain.total_norm: tensors[", i, "] is not a dense tensor");
    if (t.numel() == 0) continue;
    // The norm ignores element order: any non-overlapping dense layout is read in memory order.
    at::Tensor d = t.is_non_overlapping_and_dense() ? t : t.contiguous();
    work.ptr.push_back(d.data_ptr());
    work.numel.push_back(d.numel());
    work.keep_alive.push_back(std::move(d));
  }
  return work;
}

inline at::Tensor norm_output(const at::Tensor& like) {
  const auto dtype = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::empty({}, like.options().dtype(dtype));
}

}  // namespace host
}  // namespace fusedtrain
