// Host-side argument checks of the cross_entropy ops, shared by the CPU and CUDA registrations
// (cpu/cross_entropy.cpp, cuda/cross_entropy.cu). The formulas are in cross_entropy.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "fusedtrain/cross_entropy.h"
#include "fusedtrain/dropout_host.h"  // check_float_tensor

namespace fusedtrain {
namespace host {

struct CrossEntropyArgs {
  at::Tensor x;       // [N, C], unit stride along the classes (rows at any stride)
  at::Tensor target;  // [N] int64, contiguous
  int64_t n = 0, classes = 0, row_stride = 0;
  int reduction = xent::kMean;
};

inline int parse_reduction(const std::string& reduction) {
  if (reduction == "none") return xent::kNone;
  if (reduction == "mean") return xent::kMean;
  if (reduction == "sum") return xent::kSum;
  TORCH_CHECK(false, "fusedtrain.cross_entropy: reduction must be 'none', 'mean' or 'sum', got '", reduction, "'");
}

inline CrossEntropyArgs prepare_cross_entropy(const at::Tensor& input, const at::Tensor& target,
                                              double label_smoothing, const std::string& reduction) {
  check_float_tensor("cross_entropy", "input", input);
  TORCH_CHECK(input.dim() == 2, "fusedtrain.cross_entropy: the op takes input of shape [N, C], got ", input.sizes(),
              " (fusedtrain.nn.functional.cross_entropy reshapes [C] and [N, C, d1, ...] inputs)");
  TORCH_CHECK(target.layout() == at::kStrided && target.scalar_type() == at::kLong && target.dim() == 1 &&
                  target.size(0) == input.size(0),
              "fusedtrain.cross_entropy: target must be an int64 tensor of shape [", input.size(0),
              "] (one class index per row of input), got ", target.scalar_type(), " of shape ", target.sizes());
  TORCH_CHECK(target.device() == input.device(), "fusedtrain.cross_entropy: target is on ", target.device(),
              " but input is on ", input.device(), "; move target to the input's device");
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
              "fusedtrain.cross_entropy: label_smoothing must be between 0.0 and 1.0. Got: ", label_smoothing);
  CrossEntropyArgs a;
  a.reduction = parse_reduction(reduction);
  a.n = input.size(0);
  a.classes = input.size(1);
  // Rows are read in place at any row stride (a slice of wider logits, an expanded row) as long as the classes
  // are consecutive; anything else is copied once.
  a.x = input.stride(1) == 1 || a.classes <= 1 ? input : input.contiguous();
  a.row_stride = a.x.stride(0);
  a.target = target.contiguous();
  return a;
}

// The dtype of the loss: float64 for float64 input, float32 otherwise (the opmath type).
inline at::ScalarType loss_dtype(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_cross_entropy_backward(const at::Tensor& grad, const at::Tensor& grad_output) {
  check_float_tensor("cross_entropy_backward", "grad", grad);
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous(),
              "fusedtrain.cross_entropy_backward: grad must be the contiguous [N, C] gradient that cross_entropy "
              "returned (called with compute_grad=True), got shape ", grad.sizes());
  TORCH_CHECK(grad_output.device() == grad.device(), "fusedtrain.cross_entropy_backward: grad_output is on ",
              grad_output.device(), " but grad is on ", grad.device());
  TORCH_CHECK(grad_output.numel() == 1 || (grad_output.dim() == 1 && grad_output.size(0) == grad.size(0)),
              "fusedtrain.cross_entropy_backward: grad_output must have one element (reduction 'mean' or 'sum') or "
              "one per row (reduction 'none', shape [", grad.size(0), "]), got shape ", grad_output.sizes());
}

}  // namespace host
}  // namespace fusedtrain
