// The step_ and ema_ ops (schemas in ops.cpp): one checked call of a registered rule (optim_host.h).
// One implementation serves both dispatch keys; the rule registry picks the backend by device.
#include <torch/library.h>

#include <string>

#include "fusedtrain/optim_host.h"

namespace fusedtrain {
namespace host {
namespace {

void step_op(c10::string_view rule_name, at::ArrayRef<double> hyper, at::TensorList params, at::TensorList grads,
             at::TensorList states, at::TensorList state_steps, at::TensorList ema_params,
             at::TensorList param_copies, at::TensorList aux_states, double lr, double l1, double ema_weight,
             const OptT& lr_tensor,
             const OptT& grad_scale, const OptT& found_inf, const OptT& clip_coef, const OptT& ema_weight_tensor,
             bool stochastic_rounding, const OptT& sr_seed, bool check_only) {
  const RuleEntry& rule = find_rule(rule_name);
  const std::string op = "step_(" + rule.name + ")";
  const CallLists call = check_call(rule, op.c_str(), hyper, params, grads, states, ema_params, param_copies,
                                    stochastic_rounding);
  CallScalars cs;
  cs.lr = lr;
  cs.lr_tensor = lr_tensor;
  cs.grad_scale = grad_scale;
  cs.found_inf = found_inf;
  cs.clip_coef = clip_coef;
  cs.ema_weight = ema_weight;
  cs.ema_weight_tensor = ema_weight_tensor;
  cs.sr_seed = sr_seed;
  run_call(rule, op.c_str(), hyper, l1, call, state_steps, cs, check_only, aux_states);
}

// averages <- lerp(averages, params, weight): the "ema" rule, whose "grads" are the parameters.
void ema_op(at::TensorList averages, at::TensorList params, double weight, const OptT& weight_tensor,
            const OptT& found_inf) {
  const RuleEntry& rule = find_rule("ema");
  const CallLists call = check_call(rule, "ema_", {}, averages, params, {}, {}, {}, false);
  CallScalars cs;
  cs.ema_weight = weight;
  cs.ema_weight_tensor = weight_tensor;
  cs.found_inf = found_inf;
  run_call(rule, "ema_", {}, 0.0, call, {}, cs);
}

}  // namespace
}  // namespace host
}  // namespace fusedtrain

TORCH_LIBRARY_IMPL(fusedtrain, CPU, m) {
  m.impl("step_", &fusedtrain::host::step_op);
  m.impl("ema_", &fusedtrain::host::ema_op);
}

TORCH_LIBRARY_IMPL(fusedtrain, CUDA, m) {
  m.impl("step_", &fusedtrain::host::step_op);
  m.impl("ema_", &fusedtrain::host::ema_op);
}
