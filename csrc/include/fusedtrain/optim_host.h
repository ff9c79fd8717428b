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
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <map>
#include <type_traits>
#include <string>
#include <utility>
#include <vector>

#include "fusedtrain/math.h"
#include "fusedtrain/work.h"

namespace fusedtrain {
namespace host {

// Note [dense tuples]:
// The drivers walk the D tensors of one element tuple (param, grad, states) in memory order, which is
// right only when all of them are non-overlapping and dense with the same strides (any contiguous or
// channels-last tensor, a transposed parameter with a grad of the same layout). Tuples that are not
// get contiguous temporaries, and the mutated ones are copied back after the update.
inline void check_lists(const char* op, const std::vector<std::pair<const char*, at::TensorList>>& named) {
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
      TORCH_CHECK(t.device() == p.device() && t.scalar_type() == p.scalar_type() && t.sizes() == p.sizes(),
                  "fusedtrain.", op, ": ", named[k].first, "[", i, "] (", t.scalar_type(), " ", t.sizes(), " on ",
                  t.device(), ") must match params[", i, "] (", p.scalar_type(), " ", p.sizes(), " on ", p.device(),
                  ")");
      TORCH_CHECK(t.layout() == at::kStrided && !t.is_sparse(), "fusedtrain.", op, ": ", named[k].first, "[", i,
                  "] is not a dense (strided) tensor; sparse gradients are not supported");
    }
  }
}

// lists: the element lists in functor register order (0 = params, 1 = grads, then states); all but
// the grads are updated in place. Only the tuples named by `index` are taken; empty ones are skipped.
inline Work prepare(const std::vector<at::TensorList>& lists, const std::vector<int64_t>& index) {
  Work work;
  const size_t depth = lists.size();
  work.ptr.reserve(index.size());
  work.numel.reserve(index.size());
  for (int64_t i : index) {
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
  }
  return work;
}

inline std::vector<int64_t> all_indices(size_t n) {
  std::vector<int64_t> index(n);
  for (size_t i = 0; i < n; ++i) index[i] = static_cast<int64_t>(i);
  return index;
}

// Note [step counters]:
// Like torch.optim with capturable=False and fused=False, `step` is a float scalar tensor on the CPU,
// one per parameter. The op adds one to each (after every check has passed, so a refused call changes
// nothing) and groups the tensors by their new step value: one launch per distinct value, which is one
// launch in the usual case where every parameter was updated equally often.
inline void check_steps(const char* op, at::TensorList steps, size_t n) {
  TORCH_CHECK(steps.size() == n, "fusedtrain.", op, ": state_steps has ", steps.size(),
              " tensors but params has ", n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& s = steps[i];
    TORCH_CHECK(s.device().is_cpu() && s.numel() == 1 && at::isFloatingType(s.scalar_type()), "fusedtrain.", op,
                ": state_steps[", i, "] must be a one-element floating tensor on the CPU (got ", s.scalar_type(), " ",
                s.sizes(), " on ", s.device(), ")");
  }
}

inline std::map<double, std::vector<int64_t>> advance_steps(at::TensorList steps) {
  std::map<double, std::vector<int64_t>> by_step;
  std::vector<int64_t>* last = nullptr;
  double last_value = -1.0;
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
    if (last == nullptr || value != last_value) {
      last = &by_step[value];
      last_value = value;
    }
    last->push_back(static_cast<int64_t>(i));
  }
  return by_step;
}

// Runs the functor `make` builds on the tuples named by `index`. With a non-empty `ema` list the
// functor is wrapped in math::WithEma: the same pass also moves each average toward its new parameter.
template <class Backend, typename Make>
void run(std::vector<at::TensorList> lists, const std::vector<int64_t>& index, at::TensorList ema,
         double ema_weight, Make&& make) {
  const bool with_ema = !ema.empty();
  if (with_ema) lists.push_back(ema);
  Work work = prepare(lists, index);
  if (work.size() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lists[0][0].scalar_type(), "fusedtrain", [&] {
    using T = at::opmath_type<scalar_t>;
    make(T{}, [&](const auto& op) {
      if (with_ema) {
        using Op = std::decay_t<decltype(op)>;
        Backend::template apply<scalar_t>(work, math::WithEma<scalar_t, T, Op>{op, static_cast<T>(ema_weight)});
      } else {
        Backend::template apply<scalar_t>(work, op);
      }
    });
  });
  for (auto& [original, temp] : work.copy_back) original.copy_(temp);
}

using Named = std::vector<std::pair<const char*, at::TensorList>>;

// Checks the named lists (plus the EMA averages, when given) and returns them as driver lists.
inline std::vector<at::TensorList> checked(const char* op, Named named, at::TensorList ema) {
  if (!ema.empty()) named.emplace_back("ema_params", ema);
  check_lists(op, named);
  std::vector<at::TensorList> lists;
  for (size_t k = 0; k + (ema.empty() ? 0 : 1) < named.size(); ++k) lists.push_back(named[k].second);
  return lists;
}

template <class Backend>
void sgd_impl(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
              double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
              bool first_step, at::TensorList ema_params, double ema_weight) {
  const bool has_momentum = momentum != 0.0;
  Named named{{"params", params}, {"grads", grads}};
  if (has_momentum) named.emplace_back("momentum_buffers", momentum_buffers);
  const auto lists = checked("sgd_", named, ema_params);
  run<Backend>(lists, all_indices(params.size()), ema_params, ema_weight, [&](auto zero, auto&& launch) {
    using T = decltype(zero);
    if (has_momentum) {
      launch(math::SgdOp<T, true>{T(lr), T(momentum), T(1.0 - dampening), T(weight_decay), T(nesterov), T(maximize),
                                  T(first_step)});
    } else {
      launch(math::SgdOp<T, false>{T(lr), T(0), T(1), T(weight_decay), T(0), T(maximize), T(0)});
    }
  });
}

template <class Backend>
void adagrad_impl(at::TensorList params, at::TensorList grads, at::TensorList state_sums, at::TensorList state_steps,
                  double lr, double lr_decay, double weight_decay, double eps, bool maximize, at::TensorList ema_params,
                  double ema_weight) {
  const auto lists =
      checked("adagrad_", {{"params", params}, {"grads", grads}, {"state_sums", state_sums}}, ema_params);
  check_steps("adagrad_", state_steps, params.size());
  for (auto& [step, index] : advance_steps(state_steps)) {
    const double clr = lr / (1.0 + (step - 1.0) * lr_decay);
    run<Backend>(lists, index, ema_params, ema_weight, [&](auto zero, auto&& launch) {
      using T = decltype(zero);
      launch(math::AdagradOp<T>{T(clr), T(weight_decay), T(eps), T(maximize)});
    });
  }
}

template <class Backend>
void rmsprop_impl(at::TensorList params, at::TensorList grads, at::TensorList square_avgs, at::TensorList grad_avgs,
                  at::TensorList momentum_buffers, at::TensorList state_steps, double lr, double alpha, double eps,
                  double weight_decay, double momentum, bool centered, bool maximize, at::TensorList ema_params,
                  double ema_weight) {
  const bool has_momentum = momentum > 0.0;
  Named named{{"params", params}, {"grads", grads}, {"square_avgs", square_avgs}};
  if (centered) named.emplace_back("grad_avgs", grad_avgs);
  if (has_momentum) named.emplace_back("momentum_buffers", momentum_buffers);
  const auto lists = checked("rmsprop_", named, ema_params);
  check_steps("rmsprop_", state_steps, params.size());
  advance_steps(state_steps);  // RMSprop keeps the count for torch compatibility; the rule does not use it
  run<Backend>(lists, all_indices(params.size()), ema_params, ema_weight, [&](auto zero, auto&& launch) {
    using T = decltype(zero);
    auto go = [&](auto op) {
      op.lr = T(lr);
      op.alpha = T(alpha);
      op.one_minus_alpha = T(1.0 - alpha);
      op.eps = T(eps);
      op.weight_decay = T(weight_decay);
      op.momentum = T(momentum);
      op.maximize = T(maximize);
      launch(op);
    };
    if (centered && has_momentum) go(math::RmspropOp<T, true, true>{});
    else if (centered) go(math::RmspropOp<T, true, false>{});
    else if (has_momentum) go(math::RmspropOp<T, false, true>{});
    else go(math::RmspropOp<T, false, false>{});
  });
}

template <class Backend>
void adam_impl(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, at::TensorList state_steps, double lr, double beta1, double beta2,
               double eps, double weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay,
               at::TensorList ema_params, double ema_weight) {
  Named named{{"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}};
  if (amsgrad) named.emplace_back("max_exp_avg_sqs", max_exp_avg_sqs);
  const auto lists = checked("adam_", named, ema_params);
  check_steps("adam_", state_steps, params.size());
  for (auto& [step, index] : advance_steps(state_steps)) {
    const double step_size = lr / (1.0 - std::pow(beta1, step));
    const double bc2_sqrt = std::sqrt(1.0 - std::pow(beta2, step));
    run<Backend>(lists, index, ema_params, ema_weight, [&](auto zero, auto&& launch) {
      using T = decltype(zero);
      auto go = [&](auto op) {
        op.beta2 = T(beta2);
        op.one_minus_beta1 = T(1.0 - beta1);
        op.one_minus_beta2 = T(1.0 - beta2);
        op.eps = T(eps);
        op.coupled_wd = T(decoupled_weight_decay ? 0.0 : weight_decay);
        op.decay_factor = T(decoupled_weight_decay && weight_decay != 0.0 ? 1.0 - lr * weight_decay : 1.0);
        op.step_size = T(step_size);
        op.bc2_sqrt = T(bc2_sqrt);
        op.maximize = T(maximize);
        launch(op);
      };
      if (amsgrad) go(math::AdamOp<T, true>{});
      else go(math::AdamOp<T, false>{});
    });
  }
}

// EMA / SWA averaging: averages <- lerp(averages, params, weight).
template <class Backend>
void ema_impl(at::TensorList averages, at::TensorList params, double weight) {
  const auto lists = checked("ema_", {{"averages", averages}, {"params", params}}, {});
  run<Backend>(lists, all_indices(averages.size()), {}, 0.0, [&](auto zero, auto&& launch) {
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
