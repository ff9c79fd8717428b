// Host-side logic of the fused optimizer updates, shared by the CPU and CUDA backends, by the step_ /
// ema_ ops (optim_op.cpp) and by the cached step plan (plan.cpp).
//
// A call is: check the lists (check_lists / checked), decide the storage layout (Precision), advance the
// step counters and read the per-call scalars (begin_call), build the work list (prepare), and hand it to
// the rule's backend function (RuleEntry::run, registered per rule and backend: cpu/optim_*.cpp,
// cuda/optim_*.cu), which instantiates the functor of math.h for the layout and calls the driver.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_sub.h>
#include <c10/util/Exception.h>

#include <array>
#include <cmath>
#include <map>
#include <optional>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "fusedtrain/cuda_arch.h"
#include "fusedtrain/math.h"
#include "fusedtrain/quant.h"
#include "fusedtrain/quant4.h"
#include "fusedtrain/rounding.h"
#include "fusedtrain/rules.h"
#include "fusedtrain/work.h"

namespace fusedtrain {
namespace host {

using OptT = std::optional<at::Tensor>;

// ------------------------------------------------------------------------------------------ layouts
// Note [mixed-precision layouts] (rounding.h), as the ops take them:
// - uniform: params, grads and states of one dtype (optionally bfloat16 params stored with stochastic
//   rounding);
// - master weights: `param_copies` given: params are the float32 masters, grads have the copies' dtype
//   (float16/bfloat16), states are float32 or that dtype, and the copies receive the rounded result;
// - float32 params and grads with bfloat16 states.
struct Precision {
  bool copies = false;  // master weights: a low-precision copy receives the rounded new master
  bool stochastic = false;
  at::ScalarType param = at::kFloat, grad = at::kFloat, state = at::kFloat;
  bool uniform() const { return !copies && state == param; }
};

// ------------------------------------------------------------------------------------------- checks
// Note [dense tuples]:
// The drivers walk the D tensors of one element tuple (param, grad, states) in memory order, which is
// right only when all of them are non-overlapping and dense with the same strides (any contiguous or
// channels-last tensor, a transposed parameter with a grad of the same layout). Tuples that are not
// get contiguous temporaries, and the mutated ones are copied back after the update.
//
// Note [refused calls]:
// Every check that can fail runs before the first write: a refused call changes no parameter, state or
// counter. Mutated tensors must not overlap themselves (an expanded tensor would have one location
// written by several elements, and the copy back of its temporary would fail after the update) and a
// call must not update one tensor twice (a parameter listed twice would race between threads, or see
// only one of its updates land through a temporary).
using Named = std::vector<std::pair<const char*, at::TensorList>>;

inline void check_not_overlapping(const char* op, const char* name, size_t i, const at::Tensor& t) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, "fusedtrain.", op, ": ", name, "[", i,
              "] has internally overlapping memory (e.g. an expanded tensor), so an in-place update would write "
              "one location several times; make it a real tensor first (.clone())");
}

// named[k] holds tensors of dtype[k] (dtype[0]: that of params[0]) and of params' shapes and device.
// mutated[k]: list k is written by the update (every list but the grads).
inline void check_lists(const char* op, const Named& named, const std::vector<at::ScalarType>& dtype,
                        const std::vector<bool>& mutated) {
  const at::TensorList params = named[0].second;
  for (size_t k = 1; k < named.size(); ++k) {
    TORCH_CHECK(named[k].second.size() == params.size(), "fusedtrain.", op, ": ", named[k].first, " has ",
                named[k].second.size(), " tensors but params has ", params.size());
  }
  std::unordered_map<const void*, size_t> seen;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined(), "fusedtrain.", op, ": params[", i, "] is an undefined tensor");
    TORCH_CHECK(at::isFloatingType(p.scalar_type()), "fusedtrain.", op, ": params[", i,
                "] has dtype ", p.scalar_type(), "; only float32, float64, float16 and bfloat16 are supported");
    TORCH_CHECK(p.device() == params[0].device(), "fusedtrain.", op, ": params[", i, "] is on ", p.device(),
                " but params[0] is on ", params[0].device(), "; one call updates tensors of one device");
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type(), "fusedtrain.", op, ": params[", i, "] has dtype ",
                p.scalar_type(), " but params[0] has ", params[0].scalar_type(),
                "; one call updates tensors of one dtype");
    TORCH_CHECK(p.layout() == at::kStrided, "fusedtrain.", op, ": params[", i, "] is not a dense (strided) tensor");
    for (size_t k = 1; k < named.size(); ++k) {
      const at::Tensor& t = named[k].second[i];
      TORCH_CHECK(t.defined(), "fusedtrain.", op, ": ", named[k].first, "[", i, "] is an undefined tensor");
      TORCH_CHECK(t.layout() == at::kStrided && !t.is_sparse(), "fusedtrain.", op, ": ", named[k].first, "[", i,
                  "] is not a dense (strided) tensor; sparse gradients are not supported by the fused kernels");
      TORCH_CHECK(t.device() == p.device() && t.scalar_type() == dtype[k] && t.sizes() == p.sizes(),
                  "fusedtrain.", op, ": ", named[k].first, "[", i, "] (", t.scalar_type(), " ", t.sizes(), " on ",
                  t.device(), ") must be ", dtype[k], " with the shape and device of params[", i, "] (",
                  p.scalar_type(), " ", p.sizes(), " on ", p.device(), ")");
    }
    if (p.numel() == 0) continue;
    for (size_t k = 0; k < named.size(); ++k) {
      if (mutated[k]) check_not_overlapping(op, named[k].first, i, named[k].second[i]);
    }
    const auto [it, fresh] = seen.emplace(p.data_ptr(), i);
    TORCH_CHECK(fresh, "fusedtrain.", op, ": params[", i, "] and params[", it->second,
                "] are the same memory (a tensor listed twice); one call updates each tensor once");
  }
}

// Checks the named lists (params, grads, states; plus the EMA averages and the master weights' copies,
// when given) against the layouts of Precision and decides the layout. Returns the driver lists (without
// EMA and copies) in register order.
inline std::vector<at::TensorList> checked(const char* op, Named named, at::TensorList ema, at::TensorList copies,
                                           Precision& prec) {
  const size_t n_rule = named.size();
  const at::TensorList params = named[0].second;
  std::vector<at::ScalarType> dtype(n_rule, at::kFloat);
  prec.copies = !copies.empty();
  if (!params.empty()) {
    const at::ScalarType p = params[0].scalar_type();
    const bool master = prec.copies;
    at::ScalarType g = p;
    if (master) {
      TORCH_CHECK(copies.size() == params.size(), "fusedtrain.", op, ": param_copies has ", copies.size(),
                  " tensors but params has ", params.size());
      g = copies[0].scalar_type();
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
  std::vector<bool> mutated(n_rule, true);
  if (n_rule > 1) mutated[1] = false;
  if (!ema.empty()) {
    named.emplace_back("ema_params", ema);
    dtype.push_back(dtype[0]);
    mutated.push_back(true);
  }
  if (prec.copies) {
    named.emplace_back("param_copies", copies);
    dtype.push_back(prec.grad);
    mutated.push_back(true);
  }
  check_lists(op, named, dtype, mutated);
  std::vector<at::TensorList> lists;
  for (size_t k = 0; k < n_rule; ++k) lists.push_back(named[k].second);
  return lists;
}

// ------------------------------------------------------------------------------------- work lists
// Whether tuple i of `lists` can be walked in place (Note [dense tuples]).
inline bool dense_tuple(const std::vector<at::TensorList>& lists, size_t i) {
  const at::Tensor& p = lists[0][i];
  if (p.is_contiguous()) {
    for (size_t k = 1; k < lists.size(); ++k) {
      if (!lists[k][i].is_contiguous()) return false;
    }
    return true;
  }
  for (const auto& list : lists) {
    const at::Tensor& t = list[i];
    if (!(t.is_non_overlapping_and_dense() && t.strides() == p.strides())) return false;
  }
  return true;
}

// lists: the element lists in functor register order (0 = params, 1 = grads, then states, EMA averages,
// copies); all but the grads are updated in place. Empty tuples are skipped. steps[i]: the step of tuple i
// (Note [per-tensor binding]); empty when the rule counts no steps. `only`: a subset of the tuples
// (ascending), or empty for all of them.
inline Work prepare(const std::vector<at::TensorList>& lists, const std::vector<Scalar>& steps,
                    const std::vector<size_t>& only = {}, const std::vector<std::array<Scalar, 2>>& aux = {}) {
  Work work;
  const size_t depth = lists.size();
  const size_t n = only.empty() ? lists[0].size() : only.size();
  work.ptr.reserve(n);
  work.numel.reserve(n);
  work.row.reserve(n);
  work.step.reserve(n);
  work.ordinal.reserve(n);
  for (size_t j = 0; j < n; ++j) {
    const size_t i = only.empty() ? j : only[j];
    const at::Tensor& p = lists[0][i];
    const int64_t numel = p.numel();
    if (numel == 0) continue;
    work.device = p.device();
    const bool dense = dense_tuple(lists, i);
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
    work.row.push_back(row_length(p));
    work.step.push_back(steps.empty() ? Scalar{} : steps[i]);
    work.ordinal.push_back(static_cast<uint32_t>(i));
    if (!aux.empty()) work.aux.push_back(aux[i]);
  }
  return work;
}

// --------------------------------------------------------------------------------- step counters
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
  if (!counted) {
    TORCH_CHECK(steps.empty(), "fusedtrain.", op, ": this rule keeps no step counters, but state_steps has ",
                steps.size(), " tensors");
    return plan;
  }
  TORCH_CHECK(steps.size() == params.size(), "fusedtrain.", op, ": state_steps has ", steps.size(),
              " tensors but params has ", params.size());
  if (steps.empty()) return plan;
  const c10::Device device = params[0].device();
  plan.on_device = !device.is_cpu() && steps[0].device() == device;
  std::unordered_map<const void*, size_t> seen;
  for (size_t i = 0; i < steps.size(); ++i) {
    const at::Tensor& s = steps[i];
    TORCH_CHECK(s.defined(), "fusedtrain.", op, ": state_steps[", i, "] is an undefined tensor");
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
    const auto [it, fresh] = seen.emplace(s.data_ptr(), i);
    TORCH_CHECK(fresh, "fusedtrain.", op, ": state_steps[", i, "] and state_steps[", it->second,
                "] are the same tensor; every parameter needs its own counter");
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

// ------------------------------------------------------------------------------ per-call scalars
// The optional scalars every update takes (Note [per-tensor binding] in math.h). A CPU tensor is read
// on the host; one on the parameters' GPU is read by the kernels (converted to a float32 copy if needed).
struct CallScalars {
  double lr = 0.0;
  OptT lr_tensor, grad_scale, found_inf, clip_coef;
  double ema_weight = 0.0;
  OptT ema_weight_tensor;
  OptT sr_seed;  // one-element int64: on the CPU (host value) or the parameters' device (read by the kernels)
};

inline Scalar scalar_arg(const char* op, const char* name, const OptT& t, c10::Device device, double fallback,
                         std::vector<at::Tensor>& keep) {
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
  bool host_found_inf = false;  // found_inf is read on the host
  bool skip = false;
};

// Reads the call's scalars (nothing is written). The host reads found_inf when the step counters live on
// the CPU: whether they advance depends on it (for CUDA parameters this waits for the GPU; keep the
// counters on the device to avoid that).
inline CallPlan call_scalars(const char* op, c10::Device device, bool steps_on_device, bool counted,
                             const CallScalars& cs) {
  CallPlan plan;
  plan.steps.on_device = steps_on_device;
  plan.scalars.lr = scalar_arg(op, "lr_tensor", cs.lr_tensor, device, cs.lr, plan.keep_alive);
  plan.scalars.grad_scale = scalar_arg(op, "grad_scale", cs.grad_scale, device, 1.0, plan.keep_alive);
  plan.scalars.clip_coef = scalar_arg(op, "clip_coef", cs.clip_coef, device, 1.0, plan.keep_alive);
  plan.scalars.ema_weight = scalar_arg(op, "ema_weight_tensor", cs.ema_weight_tensor, device, cs.ema_weight,
                                       plan.keep_alive);
  if (cs.sr_seed.has_value() && cs.sr_seed->defined()) {
    const at::Tensor& s = *cs.sr_seed;
    TORCH_CHECK(s.numel() == 1 && s.scalar_type() == at::kLong, "fusedtrain.", op,
                ": sr_seed must be a one-element int64 tensor (got ", s.scalar_type(), " ", s.sizes(), ")");
    if (s.device().is_cpu()) {
      plan.scalars.sr_seed = static_cast<uint64_t>(s.item<int64_t>());
    } else {
      TORCH_CHECK(s.device() == device, "fusedtrain.", op, ": sr_seed is on ", s.device(),
                  " but the parameters are on ", device, "; pass it on the CPU or on the parameters' device");
      at::Tensor c = s.contiguous();
      plan.keep_alive.push_back(c);
      plan.scalars.sr_seed_ptr = static_cast<const int64_t*>(c.data_ptr());
    }
  }
  if (cs.found_inf.has_value() && cs.found_inf->defined()) {
    const at::Tensor& f = *cs.found_inf;
    TORCH_CHECK(f.numel() == 1 && at::isFloatingType(f.scalar_type()), "fusedtrain.", op,
                ": found_inf must be a one-element floating tensor (got ", f.scalar_type(), " ", f.sizes(), ")");
    if (steps_on_device || (!counted && !device.is_cpu() && f.device() == device)) {
      plan.device_found_inf = f.to(device, at::kFloat).contiguous();
      plan.scalars.found_inf = static_cast<const float*>(plan.device_found_inf.data_ptr());
    } else {
      plan.host_found_inf = true;
      plan.skip = f.item<double>() != 0.0;
    }
  }
  return plan;
}

// After the update: device step counters of a skipped step (found_inf = 1) go back by one.
inline void finish_call(at::TensorList state_steps, const CallPlan& plan) {
  if (plan.steps.on_device && plan.device_found_inf.defined() && !state_steps.empty()) {
    at::_foreach_sub_(state_steps, std::vector<at::Tensor>(state_steps.size(), plan.device_found_inf));
  }
}

// ------------------------------------------------------------------------------- rule registry
// What a rule's backend function gets: the work list (its scalars set), the rule's hyperparameters and
// common values, the layout, and whether the work list carries EMA averages after the rule's lists.
struct RunArgs {
  const Work& work;
  const double* hyper;
  rules::Common common;
  const Precision& prec;
  bool with_ema;
};
using RunFn = void (*)(const RunArgs&);

enum BackendIndex { kCpuBackend = 0, kCudaBackend = 1, kNumBackends = 2 };

inline int backend_index(c10::DeviceType t) {
  return t == c10::kCPU ? kCpuBackend : (t == c10::kCUDA ? kCudaBackend : -1);
}

using AuxFn = void (*)(const AuxArgs&);

struct RuleEntry {
  std::string name;
  std::vector<std::string> hyper;
  std::vector<std::string> aux;  // tensor scalars (Note [tensor scalars] in rules.h)
  bool counts_steps = false;
  bool mixed_precision = false;
  bool fused_ema = false;  // the EMA averages may ride on its pass (fuses_ema)
  rules::Names (*states)(const double*) = nullptr;
  // Rules with quantized states (Note [quantized state lists]) say what each state list holds; null for
  // rules whose states are element-wise tensors like the parameters.
  std::vector<int> (*state_kinds)(const double*) = nullptr;
  std::array<RunFn, kNumBackends> run{};
  std::array<AuxFn, kNumBackends> advance_aux{};
};

// Filled by the static RegisterRule objects of the backend translation units before any op runs, read
// only afterwards. This is a table of code, not of optimizer state.
inline std::map<std::string, RuleEntry, std::less<>>& registry() {
  static std::map<std::string, RuleEntry, std::less<>> table;
  return table;
}

inline const RuleEntry& find_rule(c10::string_view name) {
  const auto& table = registry();
  const auto it = table.find(std::string_view(name.data(), name.size()));
  if (it == table.end()) {
    std::string known;
    for (const auto& [k, v] : table) known += (known.empty() ? "" : ", ") + k;
    TORCH_CHECK(false, "fusedtrain: unknown optimizer rule '", std::string(name.data(), name.size()),
                "'; known rules: ", known);
  }
  return it->second;
}

// The backend function of `rule` for `device`; on a GPU, first the check that this build has code for it
// (Note [CUDA architecture check] in cuda_arch.h), before anything is written.
inline RunFn backend_fn(const RuleEntry& rule, const char* op, c10::Device device) {
#ifdef FUSEDTRAIN_WITH_CUDA
  if (device.is_cuda()) cuda::check_device_arch(device);
#endif
  const int b = backend_index(device.type());
  TORCH_CHECK(b >= 0, "fusedtrain.", op, ": tensors on ", device, " are not supported (CPU and CUDA only)");
  TORCH_CHECK(rule.run[b] != nullptr, "fusedtrain.", op, ": this build of fusedtrain has no ", device.type(),
              " kernels for '", rule.name, "'",
              b == kCudaBackend ? "; rebuild with a CUDA build of torch and nvcc available (unset "
                                  "FUSEDTRAIN_CPU_ONLY): pip install --no-build-isolation -e ."
                                : "");
  return rule.run[b];
}

// Whether a rule's pass may also move the EMA averages (math::WithEma): every rule with the mixed-precision
// layouts, and a rule that declares `static constexpr bool kFusedEma = true` without them (Muon's update).
template <class R, class = void>
struct HasFusedEma : std::false_type {};
template <class R>
struct HasFusedEma<R, std::void_t<decltype(R::kFusedEma)>> : std::bool_constant<R::kFusedEma> {};
template <class R>
constexpr bool fuses_ema() {
  return R::kMixedPrecision || HasFusedEma<R>::value;
}

// Instantiates the rule's functor for the call's storage layout (Note [mixed-precision layouts]) and
// runs the backend's driver. With EMA averages in the work list the functor is wrapped in math::WithEma:
// the same pass also moves each average toward its new parameter (uniform layouts only; checked()).
template <class Backend, class Rule>
void run_rule(const RunArgs& a) {
  const Precision& prec = a.prec;
  const Work& work = a.work;
  if (prec.uniform()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prec.param, "fusedtrain", [&] {
      using T = at::opmath_type<scalar_t>;
      Rule::template make<T>(a.hyper, a.common, [&](const auto& op) {
        using Op = std::decay_t<decltype(op)>;
        auto go = [&](auto layout) {
          using L = decltype(layout);
          if constexpr (fuses_ema<Rule>()) {
            if (a.with_ema) return Backend::template apply<L>(work, math::WithEma<scalar_t, T, Op>{op});
          }
          Backend::template apply<L>(work, op);
        };
        if constexpr (Rule::kMixedPrecision && std::is_same_v<scalar_t, at::BFloat16>) {
          if (prec.stochastic) return go(Uniform<scalar_t, true>{});
        }
        go(Uniform<scalar_t, false>{});
      });
    });
    return;
  }
  if constexpr (Rule::kMixedPrecision) {
    if (prec.copies) {
      AT_DISPATCH_REDUCED_FLOATING_TYPES(prec.grad, "fusedtrain_master", [&] {
        Rule::template make<float>(a.hyper, a.common, [&](const auto& op) {
          if (prec.state == at::kFloat) {
            Backend::template apply<Layout<float, scalar_t, float, scalar_t, true, false>>(work, op);
          } else {
            Backend::template apply<Layout<float, scalar_t, scalar_t, scalar_t, true, false>>(work, op);
          }
        });
      });
    } else {  // float32 params and grads, bfloat16 states
      Rule::template make<float>(a.hyper, a.common, [&](const auto& op) {
        Backend::template apply<Layout<float, float, at::BFloat16, float, false, false>>(work, op);
      });
    }
    return;
  }
  TORCH_CHECK(false, "fusedtrain: the '", Rule::kName, "' rule runs on one dtype only");
}

template <class Rule>
rules::Names rule_states(const double* h) {
  return Rule::states(h);
}

// Whether a rule keeps tensor scalars (declares kAux), and whether it brings its own backend function
// (Note [optimizer rules]); C++17 detection, as torch 2.6 builds extensions with C++17.
template <class R, class = void>
struct HasAux : std::false_type {};
template <class R>
struct HasAux<R, std::void_t<decltype(R::kAux)>> : std::true_type {};
template <class R, class = void>
struct HasStateKinds : std::false_type {};
template <class R>
struct HasStateKinds<R, std::void_t<decltype(&R::state_kinds)>> : std::true_type {};
template <class R, class B, class = void>
struct HasOwnRun : std::false_type {};
template <class R, class B>
struct HasOwnRun<R, B, std::void_t<decltype(&R::template run<B>)>> : std::true_type {};

// A static object of each backend translation unit registers one rule's backend function.
template <class Backend, class Rule>
struct RegisterRule {
  explicit RegisterRule(c10::DeviceType device) {
    RuleEntry& e = registry()[Rule::kName];
    const int b = backend_index(device);
    e.name = Rule::kName;
    e.hyper.assign(Rule::kHyper.begin(), Rule::kHyper.end());
    e.counts_steps = Rule::kCountsSteps;
    e.mixed_precision = Rule::kMixedPrecision;
    e.fused_ema = fuses_ema<Rule>();
    e.states = &rule_states<Rule>;
    if constexpr (HasStateKinds<Rule>::value) {
      static_assert(HasOwnRun<Rule, Backend>::value, "a rule with quantized states brings its own run<Backend>");
      e.state_kinds = &Rule::state_kinds;
    }
    if constexpr (HasOwnRun<Rule, Backend>::value) {
      e.run[b] = &Rule::template run<Backend>;
    } else {
      e.run[b] = &run_rule<Backend, Rule>;
    }
    if constexpr (HasAux<Rule>::value) {
      static_assert(Rule::kAux.size() <= 2 && Rule::kCountsSteps, "up to two tensor scalars, with step counters");
      e.aux.assign(Rule::kAux.begin(), Rule::kAux.end());
      e.advance_aux[b] = &Backend::template advance_aux<Rule>;
    }
  }
};

// Note [quantized state lists]:
// A rule with 8-bit or 4-bit states (Note [8-bit optimizer states] in quant.h, Note [4-bit optimizer
// states] in quant4.h) declares
//   static std::vector<int> state_kinds(const double* hyper)
// beside states(): per state list, quant::kSignedCodes (int8), quant::kUnsignedCodes (uint8), both of the
// parameter's shape, or quant::kScales (float32, one value per block of the parameter's elements in
// row-major order: shape [size(0), blocks per row], or [blocks] for 0 or 1 dims, Note [row blocks]); at 4 bits
// kSignedNibbles (int8) / kUnsignedNibbles (uint8), one-dimensional packed bytes, and kScales4 (one-dimensional);
// quant::kFloatState, a state the rule keeps float (Note [mixed state lists] in rules_quant.h): the dtype and
// shape of params[i] (the float32 masters beside master weights), as the float rule keeps it.
// Such a rule brings its own backend function (the generic run_rule knows element-wise states only), and its
// lists bypass the dtype and shape rules of checked(); they are checked here instead, before anything is
// written. The work list carries them after (params, grads) in the rule's order, like any state list, so the
// step plan and prepare() need no change (they record each tuple's row length, Work::row): codes and scales are
// contiguous as created, and a tuple that is not dense gets contiguous temporaries as usual (Note [dense
// tuples]), which walk the parameter in row-major order, the order the blocks are defined in.
inline void check_quantized(const char* op, const rules::Names& names, const std::vector<int>& kinds,
                            at::TensorList states, at::TensorList params) {
  TORCH_CHECK(kinds.size() == names.size(), "fusedtrain.", op, ": a rule's state_kinds and states disagree");
  const size_t n = params.size();
  for (size_t k = 0; k < names.size(); ++k) {
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& t = states[k * n + i];
      const at::Tensor& p = params[i];
      TORCH_CHECK(t.defined() && t.layout() == at::kStrided && t.device() == p.device(), "fusedtrain.", op, ": ",
                  names[k], "[", i, "] must be a dense tensor on ", p.device());
      if (kinds[k] == quant::kFloatState) {
        TORCH_CHECK(t.scalar_type() == p.scalar_type() && t.sizes() == p.sizes(), "fusedtrain.", op, ": ", names[k],
                    "[", i, "] (", t.scalar_type(), " ", t.sizes(), ") must be a float state of the dtype and shape of "
                    "params[", i, "] (", p.scalar_type(), " ", p.sizes(), ")");
      } else if (kinds[k] == quant::kScales) {
        // Note [row blocks]: [rows, blocks per row] for >= 2 dims, [blocks] for 0 or 1
        std::vector<int64_t> want{quant::num_blocks(row_length(p))};
        if (p.dim() >= 2) want.insert(want.begin(), p.size(0));
        TORCH_CHECK(t.scalar_type() == at::kFloat && t.sizes() == at::IntArrayRef(want), "fusedtrain.", op, ": ",
                    names[k], "[", i, "] (", t.scalar_type(), " ", t.sizes(), ") must be float32 of shape ",
                    at::IntArrayRef(want), ": one absmax per block of up to ", quant::kBlock,
                    " elements of each dim-0 slice of params[", i, "] (", p.sizes(), ")");
      } else if (kinds[k] == quant::kScales4) {
        const int64_t blocks = (p.numel() + quant::kBlock4 - 1) / quant::kBlock4;
        TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.numel() == blocks, "fusedtrain.", op, ": ",
                    names[k], "[", i, "] (", t.scalar_type(), " ", t.sizes(), ") must be float32 of shape [", blocks,
                    "]: one absmax per block of ", quant::kBlock4, " elements of params[", i, "] (", p.numel(),
                    " elements)");
      } else if (kinds[k] == quant::kSignedNibbles || kinds[k] == quant::kUnsignedNibbles) {
        // Note [4-bit optimizer states] (quant4.h): two codes per byte, one-dimensional
        const at::ScalarType want = kinds[k] == quant::kSignedNibbles ? at::kChar : at::kByte;
        const int64_t bytes = quant::num_bytes4(p.numel());
        TORCH_CHECK(t.scalar_type() == want && t.dim() == 1 && t.numel() == bytes, "fusedtrain.", op, ": ",
                    names[k], "[", i, "] (", t.scalar_type(), " ", t.sizes(), ") must hold ", want,
                    " bytes of shape [", bytes, "]: two 4-bit codes per byte for the ", p.numel(),
                    " elements of params[", i, "]");
      } else {
        const at::ScalarType want = kinds[k] == quant::kSignedCodes ? at::kChar : at::kByte;
        TORCH_CHECK(t.scalar_type() == want && t.sizes() == p.sizes(), "fusedtrain.", op, ": ", names[k], "[", i,
                    "] (", t.scalar_type(), " ", t.sizes(), ") must hold ", want, " codes of the shape of params[", i,
                    "] (", p.sizes(), ")");
      }
      if (p.numel() > 0) check_not_overlapping(op, names[k], i, t);
    }
  }
}

// ---------------------------------------------------------------------------------- one call
// The lists of one call, in register order, and the layout they were checked for.
struct CallLists {
  std::vector<at::TensorList> lists;  // params (or masters), grads, states, then EMA averages and copies
  Precision prec;
  bool with_ema = false;
};

// Checks and decides the layout of one call of `rule`. states: n_states lists of params.size() tensors,
// concatenated list by list.
inline CallLists check_call(const RuleEntry& rule, const char* op, at::ArrayRef<double> hyper, at::TensorList params,
                            at::TensorList grads, at::TensorList states, at::TensorList ema, at::TensorList copies,
                            bool stochastic) {
  TORCH_CHECK(hyper.size() == rule.hyper.size(), "fusedtrain.", op, ": rule '", rule.name, "' takes ",
              rule.hyper.size(), " hyperparameters (", c10::Join(", ", rule.hyper), "), got ", hyper.size());
  const rules::Names names = rule.states(hyper.data());
  const size_t n = params.size();
  TORCH_CHECK(states.size() == names.size() * n, "fusedtrain.", op, ": rule '", rule.name, "' with these "
              "hyperparameters keeps ", names.size(), " state lists (", c10::Join(", ", names), ") of ", n,
              " tensors each, concatenated: ", names.size() * n, " tensors, got ", states.size());
  TORCH_CHECK(rule.mixed_precision || (copies.empty() && !stochastic), "fusedtrain.", op, ": rule '", rule.name,
              "' takes no param_copies or stochastic_rounding");
  TORCH_CHECK(rule.fused_ema || ema.empty(), "fusedtrain.", op, ": rule '", rule.name, "' takes no ema_params");
  const bool quantized = rule.state_kinds != nullptr;
  TORCH_CHECK(!quantized || ema.empty(), "fusedtrain.", op, ": ema_params cannot be fused with quantized states; "
              "update the averages in a separate ema_ call");
  Named named{{"params", params}, {"grads", grads}};
  if (!quantized) {
    for (size_t k = 0; k < names.size(); ++k) named.emplace_back(names[k], states.slice(k * n, n));
  }
  CallLists call;
  call.prec.stochastic = stochastic;
  call.lists = checked(op, std::move(named), ema, copies, call.prec);
  if (quantized) {
    const std::vector<int> kinds = rule.state_kinds(hyper.data());
    check_quantized(op, names, kinds, states, params);
    for (size_t k = 0; k < names.size(); ++k) {
      call.lists.insert(call.lists.begin() + 2 + static_cast<std::ptrdiff_t>(k), states.slice(k * n, n));
    }
  }
  call.with_ema = !ema.empty();
  if (call.with_ema) call.lists.push_back(ema);
  if (call.prec.copies) call.lists.push_back(copies);
  return call;
}

// The rule's tensor scalars (Note [tensor scalars] in rules.h): len(rule.aux) lists of params.size()
// one-element float32/float64 tensors, concatenated, where the step counters are (CPU, or the device).
inline void check_aux(const RuleEntry& rule, const char* op, at::TensorList aux, at::TensorList params,
                      bool on_device) {
  const size_t n = params.size();
  TORCH_CHECK(aux.size() == rule.aux.size() * n, "fusedtrain.", op, ": rule '", rule.name, "' keeps ",
              rule.aux.size(), " tensor scalar lists (", c10::Join(", ", rule.aux), ") of ", n,
              " tensors each, concatenated: ", rule.aux.size() * n, " tensors, got ", aux.size());
  for (size_t i = 0; i < aux.size(); ++i) {
    const at::Tensor& t = aux[i];
    const c10::Device want = on_device ? params[0].device() : c10::Device(c10::kCPU);
    TORCH_CHECK(t.defined() && t.numel() == 1 && t.device() == want && t.is_contiguous() &&
                    (t.scalar_type() == at::kFloat || (!on_device && t.scalar_type() == at::kDouble)),
                "fusedtrain.", op, ": aux_states[", i, "] must be a one-element float32", on_device ? "" : "/float64",
                " tensor on ", want, " (where the step counters are), got ", t.scalar_type(), " ", t.sizes(),
                " on ", t.device());
  }
}

// Advances the tensor scalars of a call whose step counters were advanced; returns each tuple's bound values.
// host_lr: the learning rate as the host reads it (for host counters; a device lr tensor is read once).
inline std::vector<std::array<Scalar, 2>> advance_aux(const RuleEntry& rule, c10::Device device,
                                                      at::ArrayRef<double> hyper, at::TensorList aux,
                                                      CallPlan& plan, const OptT& lr_tensor) {
  std::vector<std::array<Scalar, 2>> out;
  if (rule.aux.empty()) return out;
  const size_t n = plan.steps.steps.size();
  out.resize(n);
  AuxArgs a;
  a.hyper = hyper.data();
  a.n = n;
  a.steps = plan.steps.steps.data();
  a.lr = plan.scalars.lr;
  a.found_inf = plan.scalars.found_inf;
  a.aux = aux.data();
  a.k = static_cast<int>(rule.aux.size());
  a.out = out.data();
  a.keep = &plan.keep_alive;
  // Counters on the device: the device's update (lr read there); on the CPU: the host's, where a device lr
  // tensor is read once (as torch's non-capturable step reads it).
  const int b = plan.steps.on_device ? backend_index(device.type()) : kCpuBackend;
  if (!plan.steps.on_device && a.lr.ptr != nullptr) a.lr = Scalar{nullptr, lr_tensor->item<double>()};
  TORCH_CHECK(rule.advance_aux[b] != nullptr, "fusedtrain: no tensor-scalar update for '", rule.name, "' on ",
              plan.steps.on_device ? device : c10::Device(c10::kCPU));
  rule.advance_aux[b](a);
  return out;
}

// Runs a checked call: reads the scalars, advances the counters, updates, copies temporaries back.
// check_only: stop after the checks, before the first write.
inline void run_call(const RuleEntry& rule, const char* op, at::ArrayRef<double> hyper, double l1,
                     const CallLists& call, at::TensorList state_steps, const CallScalars& cs,
                     bool check_only = false, at::TensorList aux = {}) {
  const at::TensorList params = call.lists[0];
  if (params.empty()) return;
  const c10::Device device = params[0].device();
  const RunFn fn = backend_fn(rule, op, device);
  StepPlan steps = check_steps(op, state_steps, params, rule.counts_steps);
  check_aux(rule, op, aux, params, steps.on_device);
  CallPlan plan = call_scalars(op, device, steps.on_device, rule.counts_steps, cs);
  if (plan.skip || check_only) return;
  plan.steps.on_device = steps.on_device;
  advance_steps(state_steps, plan.steps);
  const std::vector<std::array<Scalar, 2>> bound = advance_aux(rule, device, hyper, aux, plan, cs.lr_tensor);
  Work work = prepare(call.lists, plan.steps.steps, {}, bound);
  work.scalars = plan.scalars;
  if (work.size() > 0) fn(RunArgs{work, hyper.data(), rules::Common{l1}, call.prec, call.with_ema});
  for (auto& [original, temp] : work.copy_back) original.copy_(temp);
  finish_call(state_steps, plan);
}

}  // namespace host
}  // namespace fusedtrain

// Registers `Rule` (a struct of rules.h) with the Backend of namespace fusedtrain::backend_ns for device.
#define FUSEDTRAIN_REGISTER_RULE(backend_ns, Rule, device)                                                     \
  static const ::fusedtrain::host::RegisterRule<::fusedtrain::backend_ns::Backend, ::fusedtrain::rules::Rule> \
      fusedtrain_register_rule_##Rule(device);
