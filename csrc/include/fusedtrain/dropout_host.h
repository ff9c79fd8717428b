// Host-side argument checks of the dropout-family and penalty ops, shared by the CPU and CUDA
// registrations (cpu/dropout.cpp, cuda/dropout.cu, cpu/regularization.cpp, cuda/regularization.cu).
//
// Note [dropout layouts]:
// The keep decision of an element is a function of its logical row-major index (philox.h), so the
// drivers walk contiguous memory: a non-contiguous input (a transposed or channels-last tensor, a
// strided view) goes through .contiguous() first and gives exactly the mask of its contiguous copy.
// Outputs are contiguous.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "fusedtrain/dropout.h"
#include "fusedtrain/philox.h"

namespace fusedtrain {
namespace host {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_float_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.layout() == at::kStrided, "fusedtrain.", op, ": ", name, " must be a dense (strided) tensor");
  TORCH_CHECK(is_supported_float(t.scalar_type()), "fusedtrain.", op, ": ", name, " has dtype ", t.scalar_type(),
              "; only float32, float64, float16 and bfloat16 are supported");
}

// The seed travels as a one-element int64 tensor (so that torch.compile does not specialize on its value),
// on the CPU, read here on the host (no device synchronization), or on the input's device, read by the
// kernels (Note [device seed] in philox.h: what CUDA graph capture needs). Anything else is refused.
inline philox::StreamArg read_stream(const char* op, const at::Tensor& seed, int64_t offset,
                                     const at::Device& device) {
  TORCH_CHECK(seed.layout() == at::kStrided && seed.scalar_type() == at::kLong && seed.numel() == 1 &&
                  (seed.device().is_cpu() || seed.device() == device),
              "fusedtrain.", op, ": seed must be a one-element int64 tensor on the CPU (read by the host) or on the "
              "input's device ", device, " (read by the kernels), got ", seed.scalar_type(), " ", seed.sizes(),
              " on ", seed.device());
  if (seed.device().is_cpu()) {
    const int64_t value = *seed.const_data_ptr<int64_t>();
    return philox::StreamArg{philox::Stream::make(static_cast<uint64_t>(value), static_cast<uint64_t>(offset)),
                             nullptr};
  }
  return philox::StreamArg{philox::Stream::make(0, static_cast<uint64_t>(offset)), seed.const_data_ptr<int64_t>()};
}

// The stream of a CPU driver: a seed "on the input's device" is a CPU seed there, read by read_stream.
inline philox::Stream host_stream(const philox::StreamArg& arg) {
  TORCH_INTERNAL_ASSERT(arg.seed == nullptr, "fusedtrain: a CPU kernel got a device seed");
  return arg.stream;
}

inline void check_group(const char* op, const at::Tensor& input, int64_t group) {
  TORCH_CHECK(group >= 1, "fusedtrain.", op, ": group must be >= 1 (got ", group, ")");
  TORCH_CHECK(input.numel() % group == 0, "fusedtrain.", op, ": group (", group,
              ") must divide the number of elements (", input.numel(), ")");
}

inline void check_bias_dropout_add(const at::Tensor& input, const at::Tensor& bias, const at::Tensor& residual) {
  const char* op = "bias_dropout_add";
  check_float_tensor(op, "input", input);
  TORCH_CHECK(input.dim() >= 1, "fusedtrain.bias_dropout_add: input must have at least one dimension");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == input.size(-1), "fusedtrain.bias_dropout_add: bias must have shape [",
              input.size(-1), "] (the last dimension of input), got ", bias.sizes());
  TORCH_CHECK(residual.sizes() == input.sizes(), "fusedtrain.bias_dropout_add: residual must have the shape of input (",
              input.sizes(), "), got ", residual.sizes());
  TORCH_CHECK(bias.scalar_type() == input.scalar_type() && residual.scalar_type() == input.scalar_type(),
              "fusedtrain.bias_dropout_add: input, bias and residual must have one dtype (got ", input.scalar_type(),
              ", ", bias.scalar_type(), ", ", residual.scalar_type(), ")");
  TORCH_CHECK(bias.device() == input.device() && residual.device() == input.device(),
              "fusedtrain.bias_dropout_add: input, bias and residual must be on one device (got ", input.device(), ", ",
              bias.device(), ", ", residual.device(), ")");
}

inline void check_penalty_params(const char* op, at::TensorList params) {
  TORCH_CHECK(!params.empty(), "fusedtrain.", op, ": params is empty");
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.layout() == at::kStrided, "fusedtrain.", op, ": params[", i, "] is not a dense (strided) tensor");
    TORCH_CHECK(is_supported_float(p.scalar_type()), "fusedtrain.", op, ": params[", i, "] has dtype ", p.scalar_type(),
                "; only float32, float64, float16 and bfloat16 are supported");
    TORCH_CHECK(p.device() == params[0].device() && p.scalar_type() == params[0].scalar_type(), "fusedtrain.", op,
                ": params[", i, "] (", p.scalar_type(), " on ", p.device(), ") differs from params[0] (",
                params[0].scalar_type(), " on ", params[0].device(), "); one call takes one device and one dtype");
  }
}

// bias_dropout_add_backward's checks, shared by both backends. bias_numel may be 0: the forward pass admits
// a last dimension of 0 (and a bias of shape [0]), and autograd still calls the backward pass then.
inline philox::StreamArg check_bias_dropout_add_backward(const at::Tensor& grad, const at::Tensor& seed,
                                                         int64_t offset, double p, int64_t bias_numel) {
  check_float_tensor("bias_dropout_add_backward", "grad", grad);
  dropout::check_p("bias_dropout_add_backward", p);
  TORCH_CHECK(bias_numel >= 0 && grad.dim() >= 1 && grad.size(-1) == bias_numel,
              "fusedtrain.bias_dropout_add_backward: bias_numel (", bias_numel,
              ") must equal the last dimension of grad (", grad.sizes(), ")");
  return read_stream("bias_dropout_add_backward", seed, offset, grad.device());
}

// The checked inputs of bias_dropout_add, shared by both backends: contiguous input and residual, the
// stream, the (uninitialized) output, and the bias width H = input.size(-1) (0 elements: nothing to do).
struct BiasDropoutAdd {
  philox::StreamArg s;
  at::Tensor x, r, out;
  int64_t n = 0, H = 0;
};

inline BiasDropoutAdd prepare_bias_dropout_add(const at::Tensor& input, const at::Tensor& bias,
                                               const at::Tensor& residual, const at::Tensor& seed, int64_t offset,
                                               double p) {
  check_bias_dropout_add(input, bias, residual);
  dropout::check_p("bias_dropout_add", p);
  BiasDropoutAdd a;
  a.s = read_stream("bias_dropout_add", seed, offset, input.device());
  a.x = input.contiguous();
  a.r = residual.contiguous();
  a.out = at::empty(a.x.sizes(), a.x.options());
  a.n = a.x.numel();
  a.H = a.n == 0 ? 0 : a.x.size(-1);
  return a;
}

// dropout / dropout_ for one backend: checks, the stream, a contiguous view, then Backend::run(x, y, ...)
// (the kernel launch). Registered by cpu/dropout.cpp and cuda/dropout.cu.
template <class Backend>
at::Tensor dropout_impl(const at::Tensor& input, const at::Tensor& seed, int64_t offset, double p, int64_t group,
                        bool rescale) {
  check_float_tensor("dropout", "input", input);
  dropout::check_p("dropout", p);
  check_group("dropout", input, group);
  const philox::StreamArg s = read_stream("dropout", seed, offset, input.device());
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  Backend::run(x, y, group, s, p, rescale);
  return y;
}

template <class Backend>
void dropout_inplace_impl(const at::Tensor& input, const at::Tensor& seed, int64_t offset, double p, int64_t group,
                          bool rescale) {
  check_float_tensor("dropout_", "input", input);
  dropout::check_p("dropout_", p);
  check_group("dropout_", input, group);
  const philox::StreamArg s = read_stream("dropout_", seed, offset, input.device());
  const at::Tensor x = input.contiguous();
  Backend::run(x, x, group, s, p, rescale);
  if (!x.is_same(input)) input.copy_(x);
}

}  // namespace host
}  // namespace fusedtrain
