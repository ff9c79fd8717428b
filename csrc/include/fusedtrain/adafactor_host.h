// Host side of fusedtrain::adafactor_ shared by its CPU and CUDA drivers (cpu/optim_adafactor.cpp,
// cuda/optim_adafactor.cu): the op's checks, all made before anything is written, the step counters
// (CPU one-element tensors on both devices, as torch.optim.Adafactor keeps them), and the contiguous
// working copies of the tensors the kernels read and write.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace fusedtrain {
namespace adafactor {

// The value of a one-element step counter (float32 or float64, CPU), checked by check_call.
inline double read_step(const at::Tensor& s) {
  return s.scalar_type() == at::kDouble ? *s.data_ptr<double>() : static_cast<double>(*s.data_ptr<float>());
}

inline void write_step(const at::Tensor& s, double v) {
  if (s.scalar_type() == at::kDouble) {
    *s.data_ptr<double>() = v;
  } else {
    *s.data_ptr<float>() = static_cast<float>(v);
  }
}

// Every check of one call: the list lengths, the dtype (one per call), every tensor on `device`'s type and
// (CUDA) the same device as params[0], shapes, no empty or self-overlapping parameter, CPU step counters.
inline void check_call(at::TensorList params, at::TensorList grads, at::TensorList row_vars,
                       at::TensorList col_vars, at::TensorList variances, at::TensorList state_steps,
                       c10::DeviceType device) {
  const size_t np = params.size();
  TORCH_CHECK(grads.size() == np && state_steps.size() == np, "fusedtrain.adafactor_: grads (", grads.size(),
              ") and state_steps (", state_steps.size(), ") must have one entry per param (", np, ")");
  size_t nf = 0;
  for (const at::Tensor& p : params) nf += p.dim() > 1 ? 1 : 0;
  TORCH_CHECK(row_vars.size() == nf && col_vars.size() == nf && variances.size() == np - nf,
              "fusedtrain.adafactor_: row_vars and col_vars must have one entry per >= 2-D param (", nf,
              "), variances one per 0-D / 1-D param (", np - nf, "); got ", row_vars.size(), ", ",
              col_vars.size(), ", ", variances.size());
  if (np == 0) return;
  const at::ScalarType dtype = params[0].scalar_type();
  const c10::Device where = params[0].device();
  const std::string dev = c10::DeviceTypeName(device);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "fusedtrain.adafactor_: params must be float32, float64, float16 or bfloat16, got ", dtype);
  auto on_device = [&](const at::Tensor& t) { return t.device() == where && where.type() == device; };
  size_t fi = 0, ui = 0;
  auto check_state = [&](const at::Tensor& t, const char* name, size_t index, c10::IntArrayRef shape) {
    TORCH_CHECK(t.defined() && t.scalar_type() == dtype && on_device(t) && t.sizes() == shape,
                "fusedtrain.adafactor_: ", name, "[", index, "] must be a ", dev, " ", dtype, " tensor of shape ",
                shape, " (on ", where, " like params[0]), got ",
                t.defined() ? c10::str(t.scalar_type(), " ", t.sizes(), " on ", t.device())
                            : std::string("an undefined tensor"));
  };
  for (size_t i = 0; i < np; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(on_device(p) && p.scalar_type() == dtype, "fusedtrain.adafactor_: params[", i, "] must be a ", dev,
                " ", dtype, " tensor like params[0] (on ", where, "), got ", p.scalar_type(), " on ", p.device());
    TORCH_CHECK(on_device(g) && g.scalar_type() == dtype && g.sizes() == p.sizes(), "fusedtrain.adafactor_: grads[",
                i, "] must match params[", i, "] (", dtype, " ", p.sizes(), " on ", where, "), got ", g.scalar_type(),
                " ", g.sizes(), " on ", g.device());
    TORCH_CHECK(p.numel() > 0, "fusedtrain.adafactor_: params[", i, "] is empty; Adafactor divides by a "
                "parameter's size (torch.optim.Adafactor raises ZeroDivisionError on it)");
    TORCH_CHECK(at::has_internal_overlap(p) != at::MemOverlap::Yes, "fusedtrain.adafactor_: params[", i,
                "] has internally overlapping memory (e.g. an expanded tensor); make it a real tensor (.clone())");
    const at::Tensor& s = state_steps[i];
    TORCH_CHECK(s.device().is_cpu() && s.numel() == 1 &&
                    (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
                "fusedtrain.adafactor_: state_steps[", i, "] must be a one-element float32 or float64 CPU tensor");
    if (p.dim() > 1) {
      std::vector<int64_t> row_shape = p.sizes().vec(), col_shape = p.sizes().vec();
      row_shape.back() = 1;
      col_shape[col_shape.size() - 2] = 1;
      check_state(row_vars[fi], "row_vars", fi, row_shape);
      check_state(col_vars[fi], "col_vars", fi, col_shape);
      ++fi;
    } else {
      check_state(variances[ui], "variances", ui, p.sizes());
      ++ui;
    }
  }
}

// Advances every counter by one (torch: step_t += 1 before anything else) and returns the new values as
// the counters hold them (float32 counters round).
inline std::vector<double> advance_steps(at::TensorList state_steps) {
  std::vector<double> steps(state_steps.size());
  for (size_t i = 0; i < state_steps.size(); ++i) {
    write_step(state_steps[i], read_step(state_steps[i]) + 1.0);
    steps[i] = read_step(state_steps[i]);
  }
  return steps;
}

// A contiguous tensor to work on, and the original to copy it back into afterwards when they differ.
struct Dense {
  at::Tensor original, work;
  explicit Dense(const at::Tensor& t) : original(t), work(t.contiguous()) {}
  void finish() const {
    if (!work.is_same(original)) original.copy_(work);
  }
};

// The working copies of one call's lists (contiguous gradients; the others copied back by finish()).
struct Lists {
  std::vector<Dense> params, rows, cols, vars;
  std::vector<at::Tensor> grads;
  Lists(at::TensorList ps, at::TensorList gs, at::TensorList row_vars, at::TensorList col_vars,
        at::TensorList variances) {
    for (const at::Tensor& t : ps) params.emplace_back(t);
    for (const at::Tensor& t : gs) grads.push_back(t.contiguous());
    for (const at::Tensor& t : row_vars) rows.emplace_back(t);
    for (const at::Tensor& t : col_vars) cols.emplace_back(t);
    for (const at::Tensor& t : variances) vars.emplace_back(t);
  }
  void finish() const {
    for (const auto* list : {&params, &rows, &cols, &vars}) {
      for (const Dense& t : *list) t.finish();
    }
  }
};

// The call's scalars as the drivers use them: the step counts after the increment, maximize as a sign, the
// decay factor 1 where torch skips the multiplication (weight_decay == 0; by exactly 1 it changes nothing).
struct Scalars {
  std::vector<double> steps;
  double beta2_decay, eps1, eps2, lr, decay, d, sign, inv_scale, clip_coef;
};

// The op for one device: every check, then the counters, the working copies, Driver<S>::run(lists, scalars)
// for the call's dtype S, and the copies written back.
template <template <typename> class Driver>
void op(at::TensorList params, at::TensorList grads, at::TensorList row_vars, at::TensorList col_vars,
        at::TensorList variances, at::TensorList state_steps, double beta2_decay, double eps1, double eps2,
        double lr, double decay, bool apply_decay, double d, bool maximize, double inv_scale, double clip_coef,
        bool check_only, c10::DeviceType device) {
  check_call(params, grads, row_vars, col_vars, variances, state_steps, device);
  if (check_only || params.empty()) return;
  const c10::OptionalDeviceGuard guard(params[0].device());
  const Scalars s{advance_steps(state_steps), beta2_decay, eps1, eps2, lr, apply_decay ? decay : 1.0, d,
                  maximize ? -1.0 : 1.0, inv_scale, clip_coef};
  Lists lists(params, grads, row_vars, col_vars, variances);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adafactor_",
                                  [&] { Driver<scalar_t>::run(lists, s); });
  lists.finish();
}

}  // namespace adafactor
}  // namespace fusedtrain
