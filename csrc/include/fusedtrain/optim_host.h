// Host-side logic of the optimizer ops, shared by the CPU and CUDA registrations.
//
// Each `<op>_impl<Backend>` checks its tensor lists, advances the step counters, computes the
// per-step scalars (bias corrections, decayed learning rates), builds the functor of math.h and hands
// it to Backend::apply<scalar_t>(lists, functor). cpu/optim.cpp instantiates these with the CPU
// driver, cuda/optim.cu with the CUDA launcher: the schemas (ops.cpp) and this file are the only
// places that know the argument lists.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_sub.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <type_traits>
#include <string>
#include <utility>
#include <vector>

#include "fusedtrain/math.h"
#include "fusedtrain/rounding.h"
#include "fusedtrain/work.h"

namespace fusedtrain {
namespace host {

// Note [dense tuples]:
// The drivers walk the D tensors of one element tuple (param, grad, states) in memory order, which is
// right only when all of them are non-overlapping and dense with the same strides (any contiguous or
// channels-last tensor, a transposed parameter with a grad of the same layout). Tuples that are not
// get contiguous temporaries, and the mutated ones are copied back after the update.
// named[k] holds tensors of dtype[k] (dtype[0]: that of params[0]) and of params' shapes and device.
inline void check_lists(const char* op, const std::vector<std::pair<const char*, at::TensorList>>& named,
                        const std::vector<at::ScalarType>& dtype) {
  const at::TensorList params = named[0].second;
  for (size_t k = 1; k < named.size(); ++k) {
    TORCH_CHECK(named[k].second.size() == params.size(), "fusedtrain.", op, ": ", named[k].first, " has ",
                named[k].second.size(), " tensors but params has ", params.size());
  }
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(at::isFloatingType(p.scalar_type()), "fusedtrain.", op, ": params[", i,
                "] has dtype ", p.scalar_type(), "; only float32, float64, float16 and bfloat16 are supported");
    TORCH_CHECK(p.device() == params[0].device(), "fusedtrain.", op, ": params[", i, "] is on ", p.device(),
                " but params[0] is on ", params[0].device(), "; one call updates tensors of one device");
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type(), "fusedtrain.", op, ": params[", i, "] has dtype ",
                p.scalar_type(), " but params[0] has ", params[0].scalar_type(),
                "; one call updates tensors of one dtype");
    for (size_t k = 1; k < named.size(); ++k) {
      const at::Tensor& t = named[k].second[i];
      TORCH_CHECK(t.device() == p.device() && t.scalar_type() == dtype[k] && t.sizes() == p.sizes(),
                  "fusedtrain.", op, ": ", named[k].first, "[", i, "] (", t.scalar_type(), " ", t.sizes(), " on ",
                  t.device(), ") must be ", dtype[k], " with the shape and device of params[", i, "] (",
                  p.scalar_type(), " ", p.sizes(), " on ", p.device(), ")");
      TORCH_CHECK(t.layout() == at::kStrided && !t.is_sparse(), "fusedtrain.", op, ": ", named[k].first, "[", i,
                  "] is not a dense (strided) tensor; sparse gradients are not supported");
    }
  }
}

// Note [mixed-precision layouts] (rounding.h), as the ops take them:
// - uniform: params, grads and states of one dtype (optionally bfloat16 params stored with stochastic
//   rounding);
// - master weights: `param_copies` given: params are the float32 masters, grads have the copies' dtype
//   (float16/bfloat16), states are float32 or that dtype, and the copies receive the rounded result;
// - float32 params and grads with bfloat16 states.
struct Precision {
  at::TensorList copies;  // low-precision parameters that receive the rounded masters (may be empty)
  bool stochastic = false;
  int64_t seed = 0;
  // decided by checked():
  at::ScalarType param = at::kFloat, grad = at::kFloat, state = at::kFloat;
  bool uniform() const { return copies.empty() && state == param; }
};

// lists: the element lists in functor register order (0 = params, 1 = grads, then states); all but
// the grads are updated in place. Empty tuples are skipped. steps[i]: the step of tuple i (Note
// [per-tensor binding]); empty when the rule counts no steps.
inline Work prepare(const std::vector<at::TensorList>& lists, const std::vector<Scalar>& steps) {
  Work work;
  const size_t depth = lists.size();
  const size_t n = lists[0].size();
  work.ptr.reserve(n);
  work.numel.reserve(n);
  work.step.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = lists[0][i];
    const int64_t numel = p.numel();
    if (numel == 0) continue;
    work.device = p.device();
    bool dense = true;
    if (!p.is_contiguous()) {
      for (const auto& list : lists) {
        const at::Tensor& t = list[i];
        dense = dense && t.is_non_overlapping_and_dense() && t.strides() == p.strides();
      }
    } else {
      for (size_t k = 1; k < depth; ++k) dense = dense && lists[k][i].is_contiguous();
    }
    std::array<void*, kMaxDepth> ptr{};
    for (size_t k = 0; k < depth; ++k) {
      const at::Tensor& t = lists[k][i];
      if (dense) {
        ptr[k] = t.data_ptr();
      } else {
        at::Tensor temp = t.contiguous();
        ptr[k] = temp.data_ptr();
        if (k != 1 && !temp.is_same(t)) work.copy_back.emplace_back(t, temp);
        work.keep_alive.push_back(std::move(temp));
      }
    }
    work.ptr.push_back(ptr);
    work.numel.push_back(numel);
    work.step.push_back(steps.empty() ? Scalar{} : steps[i]);
  }
  return work;
}

// Note [step counters]:
// Like torch.optim, `step` is a one-element float tensor per parameter, advanced by the op after every
// check has passed (a refused call changes nothing). Two homes:
// - on the CPU (torch's default, capturable=False and fused=False): the host adds one and hands each
//   tensor's new value to its kernel (per tensor, so one launch serves parameters at different counts);
// - on the parameters' GPU (capturable=True or fused=True, as torch keeps them): one _foreach_add_
//   launch, and the kernels read the counters from device memory, so the host never waits on the GPU
//   and the step can be captured in a CUDA graph. With GradScaler's found_inf the counters are moved
//   back by found_inf afterwards, on the device, as torch's fused optimizers do.
struct StepPlan {
  bool on_device = false;
  std::vector<Scalar> steps;  // per tensor, after the increment
};

// counted: whether the op's rule counts steps (SGD and EMA take no state_steps).
inline StepPlan check_steps(const char* op, at::TensorList steps, at::TensorList params, bool counted) {
  StepPlan plan;
  if (!counted) return plan;
  TORCH_CHECK(steps.size() == params.size(), "fusedtrain.", op, ": state_steps has ", steps.size(),
              " tensors but params has ", params.size());
  if (steps.empty()) return plan;
  const c10::Device device = params[0].device();
  plan.on_device = !device.is_cpu() && steps[0].device() == device;
  for (size_t i = 0; i < steps.size(); ++i) {
    const at::Tensor& s = steps[i];
    if (plan.on_device) {
      TORCH_CHECK(s.device() == device && s.numel() == 1 && s.scalar_type() == at::kFloat && s.is_contiguous(),
                  "fusedtrain.", op, ": state_steps[", i, "] must be a one-element float32 tensor on ", device,
                  " like state_steps[0] (got ", s.scalar_type(), " ", s.sizes(), " on ", s.device(),
                  "); keep every step counter on the CPU, or every one on the parameters' device");
    } else {
      TORCH_CHECK(s.device().is_cpu() && s.numel() == 1 && at::isFloatingType(s.scalar_type()), "fusedtrain.", op,
                  ": state_steps[", i, "] must be a one-element floating tensor on the CPU, or (capturable) a "
                  "float32 one on the parameters' device (got ", s.scalar_type(), " ", s.sizes(), " on ",
                  s.device(), ")");
    }
  }
  return plan;
}

// Adds one to every counter (Note [step counters]) and records where the kernels find the new values.
inline void advance_steps(at::TensorList steps, StepPlan& plan) {
  plan.steps.resize(steps.size());
  if (plan.on_device) {
    at::_foreach_add_(steps, 1.0);
    for (size_t i = 0; i < steps.size(); ++i) {
      plan.steps[i].ptr = static_cast<const float*>(steps[i].data_ptr());
    }
    return;
  }
  for (size_t i = 0; i < steps.size(); ++i) {
    const at::Tensor& s = steps[i];
    double value = 0.0;
    // Written through the pointer: a dispatcher call per counter would cost more than a small update.
    if (s.scalar_type() == at::kFloat) {
      float* ptr = static_cast<float*>(s.data_ptr());
      value = *ptr = *ptr + 1.0f;
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "fusedtrain_step", [&] {
        scalar_t* ptr = s.data_ptr<scalar_t>();
        *ptr = static_cast<scalar_t>(static_cast<double>(*ptr) + 1.0);
        value = static_cast<double>(*ptr);
      });
    }
    plan.steps[i].value = value;
  }
}

// The optional scalars every optimizer op takes (Note [per-tensor binding]). A CPU tensor is read on
// the host; one on the parameters' GPU is read by the kernels (converted to a float32 copy if needed).
struct OptionalScalars {
  const std::optional<at::Tensor>& lr_tensor;
  const std::optional<at::Tensor>& grad_scale;
  const std::optional<at::Tensor>& found_inf;
  const std::optional<at::Tensor>& clip_coef;
};

inline Scalar scalar_arg(const char* op, const char* name, const std::optional<at::Tensor>& t, c10::Device device,
                         double fallback, std::vector<at::Tensor>& keep) {
  if (!t.has_value() || !t->defined()) return Scalar{nullptr, fallback};
  TORCH_CHECK(t->numel() == 1 && at::isFloatingType(t->scalar_type()), "fusedtrain.", op, ": ", name,
              " must be a one-element floating tensor (got ", t->scalar_type(), " ", t->sizes(), ")");
  if (t->device().is_cpu() || device.is_cpu()) return Scalar{nullptr, t->item<double>()};
  TORCH_CHECK(t->device() == device, "fusedtrain.", op, ": ", name, " is on ", t->device(),
              " but the parameters are on ", device, "; pass it on the CPU or on the parameters' device");
  at::Tensor f = t->to(at::kFloat).contiguous();
  keep.push_back(f);
  return Scalar{static_cast<const float*>(f.data_ptr()), 0.0};
}

// Everything a call needs besides its lists; `skip` when GradScaler found an inf on the host path.
struct CallPlan {
  Scalars scalars;
  StepPlan steps;
  std::vector<at::Tensor> keep_alive;
  at::Tensor device_found_inf;  // device-side found_inf, to move device step counters back
  bool skip = false;
};

inline CallPlan plan_call(const char* op, at::TensorList params, std::optional<at::TensorList> state_steps,
                          double lr, const OptionalScalars& opt) {
  CallPlan plan;
  const c10::Device device = params.empty() ? c10::Device(c10::kCPU) : params[0].device();
  const at::TensorList steps = state_steps.value_or(at::TensorList());
  plan.steps = check_steps(op, steps, params, state_steps.has_value());
  plan.scalars.lr = scalar_arg(op, "lr_tensor", opt.lr_tensor, device, lr, plan.keep_alive);
  plan.scalars.grad_scale = scalar_arg(op, "grad_scale", opt.grad_scale, device, 1.0, plan.keep_alive);
  plan.scalars.clip_coef = scalar_arg(op, "clip_coef", opt.clip_coef, device, 1.0, plan.keep_alive);
  if (opt.found_inf.has_value() && opt.found_inf->defined()) {
    const at::Tensor& f = *opt.found_inf;
    TORCH_CHECK(f.numel() == 1 && at::isFloatingType(f.scalar_type()), "fusedtrain.", op,
                ": found_inf must be a one-element floating tensor (got ", f.scalar_type(), " ", f.sizes(), ")");
    if (plan.steps.on_device || (!state_steps.has_value() && !device.is_cpu() && f.device() == device)) {
      plan.device_found_inf = f.to(device, at::kFloat).contiguous();
      plan.scalars.found_inf = static_cast<const float*>(plan.device_found_inf.data_ptr());
    } else {
      // CPU step counters: whether they advance depends on found_inf, so the host reads it (for CUDA
      // parameters this waits for the GPU; keep the counters on the device to avoid that).
      plan.skip = f.item<double>() != 0.0;
    }
  }
  if (!plan.skip) advance_steps(steps, plan.steps);
  return plan;
}

// Runs the functor `make` builds over all tuples, with the storage layout `prec` describes (Note
// [mixed-precision layouts]). With a non-empty `ema` list the functor is wrapped in math::WithEma: the
// same pass also moves each average toward its new parameter (uniform layouts only; checked()).
template <class Backend, typename Make>
void run(std::vector<at::TensorList> lists, const CallPlan& plan, at::TensorList ema, double ema_weight,
         const Precision& prec, Make&& make) {
  const bool with_ema = !ema.empty();
  if (with_ema) lists.push_back(ema);
  if (!prec.copies.empty()) lists.push_back(prec.copies);
  Work work = prepare(lists, plan.steps.steps);
  work.scalars = plan.scalars;
  work.sr_seed = static_cast<uint64_t>(prec.seed);
  if (work.size() == 0) return;
  if (prec.uniform()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prec.param, "fusedtrain", [&] {
      using T = at::opmath_type<scalar_t>;
      make(T{}, [&](const auto& op) {
        using Op = std::decay_t<decltype(op)>;
        auto go = [&](auto layout) {
          using L = decltype(layout);
          if (with_ema) {
            Backend::template apply<L>(work, math::WithEma<scalar_t, T, Op>{op, static_cast<T>(ema_weight)});
          } else {
            Backend::template apply<L>(work, op);
          }
        };
        if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
          if (prec.stochastic) return go(Uniform<scalar_t, true>{});
        }
        go(Uniform<scalar_t, false>{});
      });
    });
  } else if (!prec.copies.empty()) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(prec.grad, "fusedtrain_master", [&] {
      make(float{}, [&](const auto& op) {
        if (prec.state == at::kFloat) {
          Backend::template apply<Layout<float, scalar_t, float, scalar_t, true, false>>(work, op);
        } else {
          Backend::template apply<Layout<float, scalar_t, scalar_t, scalar_t, true, false>>(work, op);
        }
      });
    });
  } else {  // float32 params and grads, bfloat16 states
    make(float{}, [&](const auto& op) {
      Backend::template apply<Layout<float, float, at::BFloat16, float, false, false>>(work, op);
    });
  }
  for (auto& [original, temp] : work.copy_back) original.copy_(temp);
}

// After the update: device step counters of a skipped step (found_inf = 1) go back by one.
inline void finish_call(at::TensorList state_steps, const CallPlan& plan) {
  if (plan.steps.on_device && plan.device_found_inf.defined() && !state_steps.empty()) {
    at::_foreach_sub_(state_steps, std::vector<at::Tensor>(state_steps.size(), plan.device_found_inf));
  }
}

using Named = std::vector<std::pair<const char*, at::TensorList>>;

// Checks the named lists (params, grads, states; plus the EMA averages and the master weights' copies,
// when given) against the layouts of Precision and returns the driver lists (without EMA and copies).
inline std::vector<at::TensorList> checked(const char* op, Named named, at::TensorList ema, Precision& prec) {
  const size_t n_rule = named.size();
  const at::TensorList params = named[0].second;
  std::vector<at::ScalarType> dtype(n_rule);
  if (!params.empty()) {
    const at::ScalarType p = params[0].scalar_type();
    const bool master = !prec.copies.empty();
    at::ScalarType g = p;
    if (master) {
      TORCH_CHECK(prec.copies.size() == params.size(), "fusedtrain.", op, ": param_copies has ", prec.copies.size(),
                  " tensors but params has ", params.size());
      g = prec.copies[0].scalar_type();
      TORCH_CHECK(p == at::kFloat && (g == at::kHalf || g == at::kBFloat16), "fusedtrain.", op,
                  ": with param_copies (master weights), params must be the float32 masters and param_copies "
                  "float16 or bfloat16 (got ", p, " and ", g, ")");
      TORCH_CHECK(ema.empty(), "fusedtrain.", op, ": ema_params cannot be fused with master weights; update "
                  "the averages in a separate ema_ call");
    }
    at::ScalarType st = master ? at::kFloat : p;
    if (n_rule > 2 && !named[2].second.empty()) st = named[2].second[0].scalar_type();
    const bool st_ok = master ? (st == at::kFloat || st == g) : (st == p || (p == at::kFloat && st == at::kBFloat16));
    TORCH_CHECK(st_ok, "fusedtrain.", op, ": optimizer states of dtype ", st, " are not supported with ", p,
                " params", master ? " and master weights" : "", "; use ", master ? "float32 or the copies' dtype"
                : "the params' dtype (or bfloat16 for float32 params)");
    TORCH_CHECK(st == p || master || ema.empty(), "fusedtrain.", op,
                ": ema_params cannot be fused with low-precision states; update the averages in a separate ema_ call");
    TORCH_CHECK(!prec.stochastic || (p == at::kBFloat16 && !master), "fusedtrain.", op,
                ": stochastic_rounding applies to bfloat16 params without master weights (got ", p, " params",
                master ? " with param_copies" : "", ")");
    dtype[0] = p;
    if (n_rule > 1) dtype[1] = g;
    for (size_t k = 2; k < n_rule; ++k) dtype[k] = st;
    prec.param = p;
    prec.grad = g;
    prec.state = st;
  }
  if (!ema.empty()) {
    named.emplace_back("ema_params", ema);
    dtype.push_back(dtype[0]);
  }
  if (!prec.copies.empty()) {
    named.emplace_back("param_copies", prec.copies);
    dtype.push_back(prec.grad);
  }
  check_lists(op, named, dtype);
  std::vector<at::TensorList> lists;
  for (size_t k = 0; k < n_rule; ++k) lists.push_back(named[k].second);
  return lists;
}

using OptT = std::optional<at::Tensor>;
using OptList = std::optional<at::TensorList>;

template <class Backend>
void sgd_impl(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
              double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
              bool first_step, at::TensorList ema_params, double ema_weight, const OptT& lr_tensor,
              const OptT& grad_scale, const OptT& found_inf, const OptT& clip_coef, double l1,
              const OptList& param_copies, bool stochastic_rounding, int64_t sr_seed) {
  const bool has_momentum = momentum != 0.0;
  Named named{{"params", params}, {"grads", grads}};
  if (has_momentum) named.emplace_back("momentum_buffers", momentum_buffers);
  Precision prec{param_copies.value_or(at::TensorList()), stochastic_rounding, sr_seed};
  const auto lists = checked("sgd_", named, ema_params, prec);
  const CallPlan plan = plan_call("sgd_", params, std::nullopt, lr, {lr_tensor, grad_scale, found_inf, clip_coef});
  if (plan.skip) return;
  run<Backend>(lists, plan, ema_params, ema_weight, prec, [&](auto zero, auto&& launch) {
    using T = decltype(zero);
    auto go = [&](auto op) {
      op.momentum = T(momentum);
      op.one_minus_dampening = T(1.0 - dampening);
      op.weight_decay = T(weight_decay);
      op.nesterov = T(nesterov);
      op.maximize = T(maximize);
      op.first_step = T(first_step);
      op.l1 = T(l1);
      launch(op);
    };
    if (has_momentum) go(math::SgdOp<T, true>{});
    else go(math::SgdOp<T, false>{});
  });
}

template <class Backend>
void adagrad_impl(at::TensorList params, at::TensorList grads, at::TensorList state_sums, at::TensorList state_steps,
                  double lr, double lr_decay, double weight_decay, double eps, bool maximize, at::TensorList ema_params,
                  double ema_weight, const OptT& lr_tensor, const OptT& grad_scale, const OptT& found_inf,
                  const OptT& clip_coef, double l1, const OptList& param_copies,
              bool stochastic_rounding, int64_t sr_seed) {
  Precision prec{param_copies.value_or(at::TensorList()), stochastic_rounding, sr_seed};
  const auto lists =
      checked("adagrad_", {{"params", params}, {"grads", grads}, {"state_sums", state_sums}}, ema_params, prec);
  const CallPlan plan =
      plan_call("adagrad_", params, state_steps, lr, {lr_tensor, grad_scale, found_inf, clip_coef});
  if (plan.skip) return;
  run<Backend>(lists, plan, ema_params, ema_weight, prec, [&](auto zero, auto&& launch) {
    using T = decltype(zero);
    math::AdagradOp<T> op{};
    op.lr_decay = lr_decay;
    op.weight_decay = T(weight_decay);
    op.eps = T(eps);
    op.maximize = T(maximize);
    op.l1 = T(l1);
    launch(op);
  });
  finish_call(state_steps, plan);
}

template <class Backend>
void rmsprop_impl(at::TensorList params, at::TensorList grads, at::TensorList square_avgs, at::TensorList grad_avgs,
                  at::TensorList momentum_buffers, at::TensorList state_steps, double lr, double alpha, double eps,
                  double weight_decay, double momentum, bool centered, bool maximize, at::TensorList ema_params,
                  double ema_weight, const OptT& lr_tensor, const OptT& grad_scale, const OptT& found_inf,
                  const OptT& clip_coef, double l1, const OptList& param_copies,
              bool stochastic_rounding, int64_t sr_seed) {
  const bool has_momentum = momentum > 0.0;
  Named named{{"params", params}, {"grads", grads}, {"square_avgs", square_avgs}};
  if (centered) named.emplace_back("grad_avgs", grad_avgs);
  if (has_momentum) named.emplace_back("momentum_buffers", momentum_buffers);
  Precision prec{param_copies.value_or(at::TensorList()), stochastic_rounding, sr_seed};
  const auto lists = checked("rmsprop_", named, ema_params, prec);
  // RMSprop keeps the count for torch compatibility; the rule does not use it.
  const CallPlan plan =
      plan_call("rmsprop_", params, state_steps, lr, {lr_tensor, grad_scale, found_inf, clip_coef});
  if (plan.skip) return;
  run<Backend>(lists, plan, ema_params, ema_weight, prec, [&](auto zero, auto&& launch) {
    using T = decltype(zero);
    auto go = [&](auto op) {
      op.alpha = T(alpha);
      op.one_minus_alpha = T(1.0 - alpha);
      op.eps = T(eps);
      op.weight_decay = T(weight_decay);
      op.momentum = T(momentum);
      op.maximize = T(maximize);
      op.l1 = T(l1);
      launch(op);
    };
    if (centered && has_momentum) go(math::RmspropOp<T, true, true>{});
    else if (centered) go(math::RmspropOp<T, true, false>{});
    else if (has_momentum) go(math::RmspropOp<T, false, true>{});
    else go(math::RmspropOp<T, false, false>{});
  });
  finish_call(state_steps, plan);
}

template <class Backend>
void adam_impl(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, at::TensorList state_steps, double lr, double beta1, double beta2,
               double eps, double weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay,
               at::TensorList ema_params, double ema_weight, const OptT& lr_tensor, const OptT& grad_scale,
               const OptT& found_inf, const OptT& clip_coef, double l1, const OptList& param_copies,
              bool stochastic_rounding, int64_t sr_seed) {
  Named named{{"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}};
  if (amsgrad) named.emplace_back("max_exp_avg_sqs", max_exp_avg_sqs);
  Precision prec{param_copies.value_or(at::TensorList()), stochastic_rounding, sr_seed};
  const auto lists = checked("adam_", named, ema_params, prec);
  const CallPlan plan = plan_call("adam_", params, state_steps, lr, {lr_tensor, grad_scale, found_inf, clip_coef});
  if (plan.skip) return;
  run<Backend>(lists, plan, ema_params, ema_weight, prec, [&](auto zero, auto&& launch) {
    using T = decltype(zero);
    auto go = [&](auto op) {
      op.beta1_d = beta1;
      op.beta2_d = beta2;
      op.decoupled_wd = decoupled_weight_decay ? weight_decay : 0.0;
      op.beta2 = T(beta2);
      op.one_minus_beta1 = T(1.0 - beta1);
      op.one_minus_beta2 = T(1.0 - beta2);
      op.eps = T(eps);
      op.coupled_wd = T(decoupled_weight_decay ? 0.0 : weight_decay);
      op.maximize = T(maximize);
      op.l1 = T(l1);
      launch(op);
    };
    if (amsgrad) go(math::AdamOp<T, true>{});
    else go(math::AdamOp<T, false>{});
  });
  finish_call(state_steps, plan);
}

// EMA / SWA averaging: averages <- lerp(averages, params, weight).
template <class Backend>
void ema_impl(at::TensorList averages, at::TensorList params, double weight) {
  Precision prec;
  const auto lists = checked("ema_", {{"averages", averages}, {"params", params}}, {}, prec);
  const OptT none;
  const CallPlan plan = plan_call("ema_", averages, std::nullopt, 0.0, {none, none, none, none});
  run<Backend>(lists, plan, {}, 0.0, prec, [&](auto zero, auto&& launch) {
    using T = decltype(zero);
    launch(math::EmaOp<T>{T(weight)});
  });
}

// The implementations of every op for one backend (called from TORCH_LIBRARY_IMPL in cpu/ and cuda/).
template <class Backend>
void register_ops(torch::Library& m) {
  m.impl("sgd_", &sgd_impl<Backend>);
  m.impl("adagrad_", &adagrad_impl<Backend>);
  m.impl("rmsprop_", &rmsprop_impl<Backend>);
  m.impl("adam_", &adam_impl<Backend>);
  m.impl("ema_", &ema_impl<Backend>);
}

}  // namespace host
}  // namespace fusedtrain
