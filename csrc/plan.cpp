// The cached step plan of a fusedtrain optimizer (Note [step plan]).
//
// Note [step plan]:
// A torch.optim step does per-tensor host work on every call: it walks the param groups, reads each
// .grad, looks up each state dict, groups tensors by device and dtype, and converts every list into the
// op's arguments (about 1 us per tensor in Python, 0.1 us per tensor and list in the op's argument
// conversion). The plan does that walk once, when the optimizer's parameters, gradients' presence or state
// change, and keeps the result here: per segment (one rule, one group, one device and dtype, one storage
// layout) the tensors, the checked layout and the drivers' work list. Each step then:
//   1. validates cheaply, in C++, that nothing the plan relies on changed: every group's params list holds
//      the same objects with the same tensors, data pointers, sizes and strides; the optimizer's state dict
//      holds the same per-parameter dicts holding the same objects; every parameter that had a gradient
//      has a dense one of its dtype, shape and device (the new data pointers are read here:
//      zero_grad(set_to_none=True) costs nothing more), and every parameter that had none still has none.
//      A change reports "stale" before anything is written; Python rebuilds the plan and calls again. A
//      gradient of the wrong dtype or shape is an error naming its group and parameter;
//   2. computes the gradients' norm for max_grad_norm (one fused reduction per device and dtype, float32
//      or wider: the norm of float16 gradients scaled by GradScaler never narrows) and the clip
//      coefficient, on the device;
//   3. runs every segment: advances the step counters, binds the group's hyperparameters and learning
//      rate, launches the rule's kernel (found_inf decided on the device, or once on the host).
// Python's share of a step is O(1) per param group. The plan holds strong references to the objects it
// compares by identity, so an address is never reused under it. It lives on the optimizer object (no
// global state) and is never pickled.
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/clamp_max.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/view_as_real.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "fusedtrain/optim_host.h"

namespace py = pybind11;

namespace fusedtrain {
namespace plan {
namespace {

using host::OptT;

enum Role : uint8_t { kAbsent = 0, kFused = 1, kExternal = 2 };
enum Kind : uint8_t { kComplex = 1, kDTensor = 2 };
enum Status : int { kStale = 0, kUpdated = 1, kSkipped = 2 };

// Small-array equality without a call to memcmp (which dominated a 20000-tensor step's validation).
inline bool same_dims(c10::IntArrayRef a, c10::IntArrayRef b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) return false;
  }
  return true;
}

const at::Tensor& unpack(PyObject* obj, const char* what) {
  TORCH_CHECK(THPVariable_Check(obj), "fusedtrain step plan: ", what, " is not a tensor");
  return THPVariable_Unpack(obj);
}

// The state dict's (key, value) pairs and those of every per-parameter dict, by identity, in one flat
// array each (sequential reads: with 20000 parameters, a vector per dict cost a cache miss per dict).
struct StateSnapshot {
  PyObject* state = nullptr;
  std::vector<std::pair<PyObject*, PyObject*>> outer;
  std::vector<std::pair<PyObject*, PyObject*>> inner;  // the items of every outer value that is a dict, in order
  std::vector<uint32_t> inner_size;                     // per outer value: its item count (0 if not a dict)
  std::vector<py::object> holds;                        // keeps every pointer above alive

  void take(py::handle state_dict) {
    state = state_dict.ptr();
    holds.push_back(py::reinterpret_borrow<py::object>(state_dict));
    TORCH_CHECK(PyDict_Check(state), "fusedtrain step plan: the optimizer's state is not a dict");
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(state, &pos, &k, &v)) {
      outer.emplace_back(k, v);
      holds.push_back(py::reinterpret_borrow<py::object>(k));
      holds.push_back(py::reinterpret_borrow<py::object>(v));
      uint32_t count = 0;
      if (PyDict_Check(v)) {
        Py_ssize_t p2 = 0;
        PyObject *k2, *v2;
        while (PyDict_Next(v, &p2, &k2, &v2)) {
          inner.emplace_back(k2, v2);
          holds.push_back(py::reinterpret_borrow<py::object>(k2));
          holds.push_back(py::reinterpret_borrow<py::object>(v2));
          ++count;
        }
      }
      inner_size.push_back(count);
    }
  }

  bool unchanged(PyObject* state_dict) const {
    if (state_dict != state || PyDict_Size(state) != static_cast<Py_ssize_t>(outer.size())) return false;
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    size_t i = 0, j = 0;
    while (PyDict_Next(state, &pos, &k, &v)) {
      if (i >= outer.size() || outer[i].first != k || outer[i].second != v) return false;
      const uint32_t count = inner_size[i++];
      if (!PyDict_Check(v)) continue;
      if (PyDict_Size(v) != static_cast<Py_ssize_t>(count)) return false;
      Py_ssize_t p2 = 0;
      PyObject *k2, *v2;
      while (PyDict_Next(v, &p2, &k2, &v2)) {
        if (inner[j].first != k2 || inner[j].second != v2) return false;
        ++j;
      }
    }
    return i == outer.size();
  }
};

// Where a cached pointer's memory comes from (Seg::memory).
struct Memory {
  c10::Storage storage;
  int64_t offset = 0;
};

// One position of a group's params list.
struct Entry {
  py::object obj;
  c10::TensorImpl* impl = nullptr;
  Role role = kAbsent;
};

// The tensor a parameter's kernel walks and the one its gradient must match (its local shard for a
// DTensor), as recorded when the plan was built.
struct Tuple {
  int position = 0;
  uint8_t kind = 0;
  at::Tensor pair;        // the gradient's dtype, shape and device (the param, or its local shard)
  const void* pair_ptr = nullptr;
  // pair's sizes and strides, and the strides of the kernel's list-0 tensor (a real view), recorded at
  // build: offsets into Seg::dims (one flat pool, read sequentially)
  uint32_t dim = 0, ndim = 0, ref_ndim = 0;
  bool ref_contiguous = true;
  int work = -1;                     // index in Seg::work, -1 for an empty tuple
  uint32_t memory = 0;               // first of its Memory records in Seg::memory (target, states, ema, copy)
};

struct Seg {
  const host::RuleEntry* rule = nullptr;
  host::RunFn fn = nullptr;
  std::string op;
  int group = 0;
  std::vector<std::pair<int, double>> overrides;
  std::vector<Tuple> tuples;
  std::vector<int64_t> dims;  // Tuple::dim: sizes (ndim), strides (ndim), list-0 strides (ref_ndim)
  std::vector<Memory> memory;  // Tuple::memory: the storages behind the cached work list
  std::vector<at::Tensor> targets, states, steps, ema, copies;
  size_t n_states = 0;
  host::Precision prec;
  bool with_ema = false;
  c10::Device device{c10::kCPU};
  bool steps_on_device = false;
  bool static_general = false;  // some tuple is never dense: the work list is built every step
  Work work;                    // the cached work list (grads filled per step)
  // per step
  bool general_now = false;
  std::vector<at::Tensor> grads_now;

  std::vector<at::TensorList> lists(at::TensorList grads) const {
    const size_t n = targets.size();
    std::vector<at::TensorList> out{targets, grads};
    for (size_t k = 0; k < n_states; ++k) out.push_back(at::TensorList(states).slice(k * n, n));
    if (with_ema) out.push_back(ema);
    if (prec.copies) out.push_back(copies);
    return out;
  }
};

std::vector<at::Tensor> tensor_list(py::handle seq, const char* what) {
  std::vector<at::Tensor> out;
  for (py::handle h : seq) out.push_back(unpack(h.ptr(), what));
  return out;
}

class StepPlanImpl {
 public:
  StepPlanImpl(std::string name, py::list group_params, py::list roles, py::list segments, py::handle state)
      : name_(std::move(name)) {
    TORCH_CHECK(py::len(roles) == py::len(group_params), "fusedtrain step plan: one roles list per group");
    for (size_t g = 0; g < py::len(group_params); ++g) {
      py::list params = group_params[g];
      py::list role = roles[g];
      TORCH_CHECK(py::len(params) == py::len(role), "fusedtrain step plan: one role per parameter");
      lists_.push_back(params);
      std::vector<Entry> entries;
      for (size_t i = 0; i < py::len(params); ++i) {
        Entry e;
        e.obj = params[i];
        e.impl = unpack(e.obj.ptr(), "a parameter").unsafeGetTensorImpl();
        e.role = static_cast<Role>(role[i].cast<int>());
        entries.push_back(std::move(e));
      }
      groups_.push_back(std::move(entries));
    }
    for (py::handle h : segments) add_segment(py::reinterpret_borrow<py::dict>(h));
    snapshot_.take(state);
  }

  bool has_stochastic() const {
    for (const Seg& s : segs_) {
      if (s.prec.stochastic) return true;
    }
    return false;
  }

  std::vector<c10::Device> devices() const {
    std::vector<c10::Device> out;
    for (const Seg& s : segs_) {
      if (std::find(out.begin(), out.end(), s.device) == out.end()) out.push_back(s.device);
    }
    return out;
  }

  // Returns (status, norm, device_found_inf): status kStale (nothing written: rebuild), kUpdated, or
  // kSkipped (GradScaler's found_inf, read on the host, was set: nothing written); norm: the gradients'
  // joint 2-norm (unscaled) when max_norm is given, else None; device_found_inf: found_inf was left to the
  // kernels (the host does not know whether the step was skipped).
  py::tuple step(py::list group_params, py::handle state, py::list hypers, py::list lrs, py::list l1s,
                 const OptT& grad_scale, const OptT& found_inf, std::optional<double> max_norm,
                 const OptT& clip_coef, double ema_weight, const OptT& ema_weight_tensor, const OptT& sr_seed) {
    if (!validate(group_params, state)) return py::make_tuple(static_cast<int>(kStale), py::none(), false);
    TORCH_CHECK(py::len(hypers) == groups_.size() && py::len(lrs) == groups_.size() &&
                    py::len(l1s) == groups_.size(),
                "fusedtrain step plan: one hyperparameter list, lr and l1 per group");
    // Everything below reads; the first write is advance_steps of the first segment.
    host::CallScalars cs;
    cs.grad_scale = grad_scale;
    cs.ema_weight = ema_weight;
    cs.ema_weight_tensor = ema_weight_tensor;
    cs.sr_seed = sr_seed;
    cs.clip_coef = clip_coef;
    py::object norm_out = py::none();
    if (max_norm.has_value() && !segs_.empty()) {
      at::Tensor norm = grad_norm();
      if (grad_scale.has_value() && grad_scale->defined()) norm = norm / grad_scale->to(norm.device());
      // min(1, max_norm / (norm + 1e-6)) as torch.nn.utils.clip_grad_norm_ computes it: Python's
      // `float / tensor` is reciprocal() * float, which rounds differently from a true division
      cs.clip_coef = at::clamp_max((norm + 1e-6).reciprocal() * *max_norm, 1.0);
      norm_out = py::cast(norm);
    }
    // found_inf: one host read for the whole step when any segment keeps its counters on the host (or
    // runs on the CPU), so that every segment skips or none does; else each kernel reads it.
    bool host_found_inf = false;
    if (found_inf.has_value() && found_inf->defined()) {
      for (const Seg& s : segs_) {
        host_found_inf = host_found_inf || s.device.is_cpu() || (s.rule->counts_steps && !s.steps_on_device) ||
                         found_inf->device() != s.device;
      }
      if (host_found_inf && found_inf->item<double>() != 0.0) {
        return py::make_tuple(static_cast<int>(kSkipped), norm_out, false);
      }
      cs.found_inf = host_found_inf ? OptT() : found_inf;
    }
    const bool device_found_inf = cs.found_inf.has_value();
    std::vector<std::vector<double>> hyper(groups_.size());
    std::vector<host::CallScalars> per_group(groups_.size(), cs);
    std::vector<double> l1(groups_.size());
    for (size_t g = 0; g < groups_.size(); ++g) {
      hyper[g] = hypers[g].cast<std::vector<double>>();
      py::handle lr = lrs[g];
      if (THPVariable_Check(lr.ptr())) per_group[g].lr_tensor = THPVariable_Unpack(lr.ptr());
      else per_group[g].lr = lr.cast<double>();
      l1[g] = l1s[g].cast<double>();
    }
    for (Seg& s : segs_) {
      TORCH_CHECK(hyper[s.group].size() == s.rule->hyper.size(), "fusedtrain step plan: rule '", s.rule->name,
                  "' takes ", s.rule->hyper.size(), " hyperparameters, got ", hyper[s.group].size());
    }
    // Scalars per segment device, read before the first write (a refused scalar changes nothing).
    std::vector<host::CallPlan> plans;
    for (Seg& s : segs_) {
      plans.push_back(host::call_scalars(s.op.c_str(), s.device, s.steps_on_device, s.rule->counts_steps,
                                         per_group[s.group]));
    }
    {
      // The kernels and the ATen calls around them need no Python: let other threads (a pin-memory
      // thread, a data loader) run meanwhile, as torch's own ops do.
      py::gil_scoped_release no_gil;
      for (size_t k = 0; k < segs_.size(); ++k) run(segs_[k], hyper[segs_[k].group], l1[segs_[k].group], plans[k]);
    }
    return py::make_tuple(static_cast<int>(kUpdated), norm_out, device_found_inf);
  }

 private:
  void add_segment(const py::dict& d) {
    Seg s;
    const std::string rule = d["rule"].cast<std::string>();
    s.rule = &host::find_rule(rule);
    s.op = "optim." + name_ + " (" + rule + ")";
    s.group = d["group"].cast<int>();
    TORCH_CHECK(s.group >= 0 && static_cast<size_t>(s.group) < groups_.size(), "fusedtrain step plan: bad group");
    for (py::handle o : d["overrides"]) {
      auto pair = o.cast<std::pair<int, double>>();
      s.overrides.push_back(pair);
    }
    const py::list positions = d["positions"];
    const py::list kinds = d["kinds"];
    const py::list pairs = d["pairs"];
    s.targets = tensor_list(d["targets"], "a target");
    s.states = tensor_list(d["states"], "a state");
    s.steps = tensor_list(d["steps"], "a step counter");
    s.ema = tensor_list(d["ema"], "an EMA average");
    s.copies = tensor_list(d["copies"], "a parameter copy");
    const size_t n = s.targets.size();
    TORCH_CHECK(py::len(positions) == n && py::len(kinds) == n && py::len(pairs) == n,
                "fusedtrain step plan: one position, kind and pair per tensor");
    const std::vector<double> hyper = d["hyper"].cast<std::vector<double>>();
    std::vector<double> h = hyper;
    for (const auto& [i, v] : s.overrides) h[i] = v;
    // The lists are checked now, with the parameters standing in for the gradients (same shape and
    // dtype, except for master weights, whose copies stand in), as the step_ op checks them.
    const std::vector<at::Tensor>& stand_in = s.copies.empty() ? s.targets : s.copies;
    const host::CallLists call =
        host::check_call(*s.rule, s.op.c_str(), h, s.targets, stand_in, s.states, s.ema, s.copies,
                         d["stochastic"].cast<bool>());
    s.prec = call.prec;
    s.with_ema = call.with_ema;
    s.n_states = s.rule->states(h.data()).size();
    if (n > 0) s.device = s.targets[0].device();
    s.fn = host::backend_fn(*s.rule, s.op.c_str(), s.device);
    const host::StepPlan steps = host::check_steps(s.op.c_str(), s.steps, s.targets, s.rule->counts_steps);
    s.steps_on_device = steps.on_device;
    std::vector<at::TensorList> lists = s.lists(stand_in);
    for (size_t i = 0; i < n; ++i) {
      Tuple t;
      t.position = positions[i].cast<int>();
      t.kind = static_cast<uint8_t>(kinds[i].cast<int>());
      t.pair = unpack(py::handle(pairs[i]).ptr(), "a gradient pair");
      t.pair_ptr = t.pair.numel() > 0 ? t.pair.const_data_ptr() : nullptr;
      const at::Tensor& ref = s.targets[i];
      t.dim = static_cast<uint32_t>(s.dims.size());
      t.ndim = static_cast<uint32_t>(t.pair.dim());
      t.ref_ndim = static_cast<uint32_t>(ref.dim());
      for (int64_t v : t.pair.sizes()) s.dims.push_back(v);
      for (int64_t v : t.pair.strides()) s.dims.push_back(v);
      for (int64_t v : ref.strides()) s.dims.push_back(v);
      t.ref_contiguous = ref.is_contiguous();
      if (ref.numel() > 0) {
        if (!host::dense_tuple(lists, i)) s.static_general = true;
        t.work = static_cast<int>(s.work.size());
        std::array<void*, kMaxDepth> ptr{};
        for (size_t k = 0; k < lists.size(); ++k) ptr[k] = lists[k][i].data_ptr();
        t.memory = static_cast<uint32_t>(s.memory.size());
        for (size_t k = 0; k < lists.size(); ++k) {
          if (k == 1) continue;  // the gradient is read afresh every step
          const at::Tensor& x = lists[k][i];
          s.memory.push_back(Memory{x.storage(), x.storage_offset()});
        }
        s.work.ptr.push_back(ptr);
        s.work.numel.push_back(ref.numel());
        s.work.step.push_back(Scalar{});
        s.work.ordinal.push_back(static_cast<uint32_t>(i));
        s.work.device = ref.device();
      }
      const auto& entries = groups_[s.group];
      TORCH_CHECK(t.position >= 0 && static_cast<size_t>(t.position) < entries.size() &&
                      entries[t.position].role == kFused,
                  "fusedtrain step plan: a segment names a parameter that is not fused");
      s.tuples.push_back(std::move(t));
    }
    segs_.push_back(std::move(s));
  }

  [[noreturn]] void refuse(const Seg& s, const Tuple& t, const std::string& what) const {
    TORCH_CHECK(false, "fusedtrain.optim.", name_, ": param_groups[", s.group, "]['params'][", t.position, "]: ",
                what);
  }

  // The gradient the kernel reads for tuple t (its local shard for a DTensor), or an undefined tensor.
  at::Tensor grad_of(const Seg& s, const Tuple& t) const {
    const Entry& e = groups_[s.group][t.position];
    if (t.kind & kDTensor) {
      py::object g = e.obj.attr("grad");
      if (g.is_none()) return at::Tensor();
      if (!py::hasattr(g, "_local_tensor")) refuse(s, t, "a DTensor parameter has a plain-tensor gradient");
      return unpack(g.attr("_local_tensor").ptr(), "a gradient");
    }
    return THPVariable_Unpack(e.obj.ptr()).grad();
  }

  // The tensors behind the cached work list still hold the memory it points to. A state tensor whose
  // .data is replaced (a common "move the optimizer to another device" recipe does that), or set_, gets a
  // new storage: the plan compares each tensor's StorageImpl and offset with the ones it recorded, reading
  // only the TensorImpl (a full data_ptr() read per state tensor doubled the step's host time). The plan
  // also keeps those storages alive, so a stale pointer can never reach freed memory; only resizing a state
  // tensor's storage in place (no optimizer or checkpoint tool does) would go unnoticed.
  static bool cached_pointers_valid(const Seg& s, const Tuple& t) {
    const size_t i = &t - s.tuples.data(), n = s.tuples.size();
    const Memory* m = s.memory.data() + t.memory;
    auto same = [](const at::Tensor& x, const Memory& r) {
      const c10::TensorImpl* impl = x.unsafeGetTensorImpl();
      return impl->storage().unsafeGetStorageImpl() == r.storage.unsafeGetStorageImpl() &&
             impl->storage_offset() == r.offset;
    };
    if (!same(s.targets[i], m[0])) return false;
    size_t k = 1;
    for (size_t j = 0; j < s.n_states; ++j, ++k) {
      if (!same(s.states[j * n + i], m[k])) return false;
    }
    if (s.with_ema && !same(s.ema[i], m[k++])) return false;
    if (s.prec.copies && !same(s.copies[i], m[k])) return false;
    return true;
  }

  bool validate(py::list group_params, py::handle state) {
    if (py::len(group_params) != groups_.size()) return false;
    for (size_t g = 0; g < groups_.size(); ++g) {
      PyObject* lst = PyList_Check(group_params[g].ptr()) ? group_params[g].ptr() : nullptr;
      const auto& entries = groups_[g];
      if (lst == nullptr || lst != lists_[g].ptr() ||
          PyList_GET_SIZE(lst) != static_cast<Py_ssize_t>(entries.size())) {
        return false;
      }
      for (size_t i = 0; i < entries.size(); ++i) {
        PyObject* obj = PyList_GET_ITEM(lst, i);
        const Entry& e = entries[i];
        if (obj != e.obj.ptr() || THPVariable_Unpack(obj).unsafeGetTensorImpl() != e.impl) return false;
        // A parameter that had no gradient (or an external one: sparse, meta) must still have none;
        // its presence is read without Python, from the tensor's autograd metadata.
        if (e.role == kAbsent && THPVariable_Unpack(obj).grad().defined()) return false;
      }
    }
    if (!snapshot_.unchanged(state.ptr())) return false;
    for (Seg& s : segs_) {
      s.general_now = s.static_general;
      for (const Tuple& t : s.tuples) {
        if (t.kind & kDTensor) {
          const Entry& e = groups_[s.group][t.position];
          py::object local = e.obj.attr("_local_tensor");
          if (unpack(local.ptr(), "a local shard").unsafeGetTensorImpl() != t.pair.unsafeGetTensorImpl()) {
            return false;
          }
        }
        // the parameter's data and geometry as the plan recorded them (p.data = ..., resize_, set_)
        const int64_t* dims = s.dims.data() + t.dim;
        if ((t.pair.numel() > 0 ? t.pair.const_data_ptr() : nullptr) != t.pair_ptr ||
            !same_dims(t.pair.sizes(), {dims, t.ndim}) || !same_dims(t.pair.strides(), {dims + t.ndim, t.ndim})) {
          return false;
        }
        const c10::IntArrayRef ref_strides(dims + 2 * t.ndim, t.ref_ndim);
        at::Tensor owned;  // a DTensor's local gradient; plain gradients are read in place
        const at::Tensor& g = (t.kind & kDTensor) ? (owned = grad_of(s, t))
                                                  : THPVariable_Unpack(groups_[s.group][t.position].obj.ptr()).grad();
        if (!g.defined()) return false;                                  // its gradient vanished
        if (g.layout() != at::kStrided || g.is_sparse()) return false;   // now a sparse gradient
        if (g.scalar_type() != t.pair.scalar_type() || !same_dims(g.sizes(), t.pair.sizes()) ||
            g.device() != t.pair.device()) {
          refuse(s, t, "its gradient (" + std::string(c10::toString(g.scalar_type())) + " " +
                           c10::str(g.sizes()) + " on " + g.device().str() + ") must match the parameter (" +
                           c10::toString(t.pair.scalar_type()) + " " + c10::str(t.pair.sizes()) + " on " +
                           t.pair.device().str() + "); nothing was updated");
        }
        if (t.work < 0) continue;
        if (!s.static_general && !cached_pointers_valid(s, t)) return false;
        if (t.kind & kComplex) {
          const at::Tensor gr = at::view_as_real(g);
          const bool direct = t.ref_contiguous ? gr.is_contiguous()
                                               : (gr.is_non_overlapping_and_dense() &&
                                                  same_dims(gr.strides(), ref_strides));
          if (!direct) s.general_now = true;
          s.work.ptr[t.work][1] = const_cast<void*>(gr.const_data_ptr());
          continue;
        }
        const bool direct = t.ref_contiguous ? g.is_contiguous()
                                             : (g.is_non_overlapping_and_dense() && same_dims(g.strides(), ref_strides));
        if (!direct) s.general_now = true;
        s.work.ptr[t.work][1] = const_cast<void*>(g.const_data_ptr());
      }
      if (s.general_now) {
        s.grads_now.clear();
        for (const Tuple& t : s.tuples) {
          const at::Tensor g = grad_of(s, t);
          s.grads_now.push_back((t.kind & kComplex) ? at::view_as_real(g) : g);
        }
      }
    }
    return true;
  }

  // The joint 2-norm of every gradient of the plan, in float32 (float64 if any gradient is float64):
  // one fused reduction per (device, dtype), combined without narrowing.
  at::Tensor grad_norm() {
    static const auto total_norm = c10::Dispatcher::singleton()
                                       .findSchemaOrThrow("fusedtrain::total_norm", "")
                                       .typed<at::Tensor(at::TensorList, double)>();
    std::map<std::pair<std::string, int>, std::vector<at::Tensor>> by;
    bool any_double = false;
    for (Seg& s : segs_) {
      for (const Tuple& t : s.tuples) {
        at::Tensor g = grad_of(s, t);
        if (t.kind & kComplex) g = at::view_as_real(g);
        any_double = any_double || g.scalar_type() == at::kDouble;
        by[{g.device().str(), static_cast<int>(g.scalar_type())}].push_back(std::move(g));
      }
    }
    const auto acc = any_double ? at::kDouble : at::kFloat;
    std::vector<at::Tensor> norms;
    c10::Device first = segs_[0].device;
    for (auto& [key, grads] : by) norms.push_back(total_norm.call(grads, 2.0).to(first, acc));
    if (norms.size() == 1) return norms[0];
    return at::linalg_vector_norm(at::stack(norms), 2.0);
  }

  void run(Seg& s, std::vector<double> hyper, double l1, host::CallPlan& plan) {
    if (s.tuples.empty()) return;
    for (const auto& [i, v] : s.overrides) hyper[i] = v;
    host::advance_steps(s.steps, plan.steps);
    if (s.general_now) {
      const std::vector<at::TensorList> lists = s.lists(s.grads_now);
      Work work = host::prepare(lists, plan.steps.steps);
      work.scalars = plan.scalars;
      if (work.size() > 0) s.fn(host::RunArgs{work, hyper.data(), rules::Common{l1}, s.prec, s.with_ema});
      for (auto& [original, temp] : work.copy_back) original.copy_(temp);
    } else {
      if (!plan.steps.steps.empty()) {
        for (const Tuple& t : s.tuples) {
          if (t.work >= 0) s.work.step[t.work] = plan.steps.steps[&t - s.tuples.data()];
        }
      }
      s.work.scalars = plan.scalars;
      if (s.work.size() > 0) s.fn(host::RunArgs{s.work, hyper.data(), rules::Common{l1}, s.prec, s.with_ema});
    }
    host::finish_call(s.steps, plan);
  }

  std::string name_;
  std::vector<py::object> lists_;
  std::vector<std::vector<Entry>> groups_;
  std::vector<Seg> segs_;
  StateSnapshot snapshot_;
};

}  // namespace

void bind(py::module& m) {
  py::class_<StepPlanImpl>(m, "StepPlan", "The cached step plan of a fusedtrain optimizer (Note [step plan]).")
      .def(py::init<std::string, py::list, py::list, py::list, py::handle>(), py::arg("name"),
           py::arg("group_params"), py::arg("roles"), py::arg("segments"), py::arg("state"))
      .def("step", &StepPlanImpl::step, py::arg("group_params"), py::arg("state"), py::arg("hypers"), py::arg("lrs"),
           py::arg("l1s"), py::arg("grad_scale"), py::arg("found_inf"), py::arg("max_norm"), py::arg("clip_coef"),
           py::arg("ema_weight"), py::arg("ema_weight_tensor"), py::arg("sr_seed"))
      .def_property_readonly("has_stochastic", &StepPlanImpl::has_stochastic)
      .def_property_readonly("devices", &StepPlanImpl::devices);
  m.def("rules", [] {
    py::dict out;
    for (const auto& [name, e] : host::registry()) {
      py::dict d;
      d["hyper"] = e.hyper;
      d["counts_steps"] = e.counts_steps;
      d["mixed_precision"] = e.mixed_precision;
      out[py::str(name)] = d;
    }
    return out;
  }, "The optimizer rules of this build: {name: {hyper, counts_steps, mixed_precision}} (Note [optimizer rules])");
}

}  // namespace plan
}  // namespace fusedtrain
