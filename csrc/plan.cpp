// The cached step plan of a fusedtrain optimizer (Note [step plan]).
//
// Note [step plan]:
// A torch.optim step does per-tensor host work on every call: it walks the param groups, reads each
// .grad, looks up each state dict, groups tensors by device and dtype, and converts every list into the
// op's arguments (about 1 us per tensor in Python, 0.1 us per tensor and list in the op's argument
// conversion). The plan does that walk once, when the optimizer's parameters, gradients' presence or state
// change, and keeps the result here: per segment (one rule, one group, one device and dtype, one storage
// layout, one update pass) the tuples and the drivers' work list. Each step then:
//   1. validates cheaply, in C++, that nothing the plan relies on changed: every group's params list holds
//      the same objects with the same tensors, data pointers, sizes and strides; the optimizer's state dict
//      holds the same per-parameter dicts holding the same objects, whose storages are the ones the work
//      list points into; every parameter that had a gradient has a dense one of its dtype, shape and device
//      (its data pointer is read here: zero_grad(set_to_none=True) costs nothing more), and every parameter
//      that had none still has none. A change reports "stale" before anything is written; Python rebuilds
//      the plan and calls again. A gradient of the wrong dtype or shape is an error naming its group and
//      parameter, raised before the first write;
//   2. computes the gradients' norm for max_grad_norm (one fused reduction per device and dtype, float32
//      or wider: the norm of float16 gradients scaled by GradScaler never narrows) and the clip
//      coefficient, on the device;
//   3. runs every segment: advances the step counters, binds the group's hyperparameters and learning
//      rate, launches the rule's kernel (found_inf decided on the device, or once on the host).
// Python's share of a step is O(1) per param group.
//
// References: the plan holds strong references to the Python objects it compares by identity (so an
// address is never reused under it) and to the optimizer's own state tensors, but never an owning
// reference to a parameter's or an EMA average's tensor: torch.utils.swap_tensors (Module.to() of tensor
// subclasses, load_state_dict(assign=True)) refuses tensors with extra references, and a model moved off
// a GPU must free its memory. Those tensors are reached through their Python objects each step, and their
// identity (TensorImpl) and data pointer are compared with what the plan recorded before any is used.
// The plan lives on the optimizer object (no global state) and is never pickled.
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

// The data pointer of a tensor whose TensorImpl is the one the plan recorded (whose data pointer was read
// when the plan was built): TensorImpl::data() without its virtual has_storage() and its dtype check, which
// were a tenth of a warm step's validation. nullptr for an empty tensor, as data() gives, and for one that has
// lost its storage: a non-empty tensor's recorded pointer is never null, so that compares unequal.
inline const void* recorded_data(const c10::TensorImpl* impl) {
  if (impl->numel() == 0) return nullptr;
  const c10::StorageImpl* storage = impl->unsafe_storage().unsafeGetStorageImpl();
  if (storage == nullptr) return nullptr;
  return static_cast<const char*>(storage->data()) + impl->dtype().itemsize() * impl->storage_offset();
}

// A parameter's gradient, read from its autograd metadata (Tensor::grad() also asks whether the tensor is a
// leaf, through the autograd hooks, before returning the same reference).
inline const at::Tensor& grad_of(PyObject* obj) {
  return THPVariable_Unpack(obj).unsafeGetTensorImpl()->grad();
}

const at::Tensor& unpack(PyObject* obj, const char* what) {
  TORCH_CHECK(THPVariable_Check(obj), "fusedtrain step plan: ", what, " is not a tensor");
  return THPVariable_Unpack(obj);
}

// The state dict's (key, value) pairs and those of every per-parameter dict, by identity, in one flat
// array each (sequential reads: with 20000 parameters, a vector per dict cost a cache miss per dict).
//
// Note [dict version tags]:
// Walking every per-parameter dict costs about three cache lines per parameter (the dict, its keys table,
// the entries), the largest share of a cold step's validation. CPython before 3.14 stamps every dict
// modification with a fresh, interpreter-wide version tag (PEP 509; ma_version_tag, deprecated from 3.12
// and removed in 3.14): a dict whose tag is the one recorded has not been modified since, so its items are
// the recorded ones without reading them. The plan records the outer dict's tag and each per-parameter
// dict's tag; a step compares those (one line per parameter) and walks the items only when some tag moved
// (then a successful walk records the new tags). Builds without the tag walk every step.
#if PY_VERSION_HEX < 0x030E0000 && !defined(Py_GIL_DISABLED)
#define FUSEDTRAIN_DICT_TAGS 1
inline uint64_t dict_tag(PyObject* d) {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  return reinterpret_cast<PyDictObject*>(d)->ma_version_tag;
#pragma GCC diagnostic pop
}
#endif

struct StateSnapshot {
  PyObject* state = nullptr;
  std::vector<std::pair<PyObject*, PyObject*>> outer;
  std::vector<std::pair<PyObject*, PyObject*>> inner;  // the items of every outer value that is a dict, in order
  std::vector<uint32_t> inner_size;                     // per outer value: its item count (0 if not a dict)
  std::vector<py::object> holds;                        // keeps every pointer above alive
#ifdef FUSEDTRAIN_DICT_TAGS
  uint64_t outer_tag = 0;
  std::vector<std::pair<PyObject*, uint64_t>> inner_tags;  // every outer value that is a dict, and its tag
#endif

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
    record_tags();
  }

  bool unchanged(PyObject* state_dict) {
    if (state_dict != state) return false;
#ifdef FUSEDTRAIN_DICT_TAGS
    if (dict_tag(state) == outer_tag) {  // Note [dict version tags]
      bool same = true;
      for (const auto& [d, tag] : inner_tags) same = same && dict_tag(d) == tag;
      if (same) return true;
    }
#endif
    if (!walk()) return false;
    record_tags();  // unchanged items under new tags (a value set to itself): compare tags again next step
    return true;
  }

 private:
  void record_tags() {
#ifdef FUSEDTRAIN_DICT_TAGS
    outer_tag = dict_tag(state);
    inner_tags.clear();
    for (const auto& [k, v] : outer) {
      if (PyDict_Check(v)) inner_tags.emplace_back(v, dict_tag(v));
    }
#endif
  }

  bool walk() const {
    if (PyDict_Size(state) != static_cast<Py_ssize_t>(outer.size())) return false;
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

// One position of a group's params list.
struct Entry {
  py::object obj;
  const c10::TensorImpl* impl = nullptr;  // compared, never dereferenced (detects torch.utils.swap_tensors)
  Role role = kAbsent;
};

// One fused parameter of a segment.
struct Tuple {
  int position = 0;  // in its group's params list
  uint8_t kind = 0;  // kComplex | kDTensor
  // The tensor its gradient must match and its kernel walks (the parameter, or a DTensor's local shard),
  // as recorded: identity, data pointer, and sizes / strides at Seg::dims[dim...].
  const c10::TensorImpl* local_impl = nullptr;
  const void* local_ptr = nullptr;
  uint32_t dim = 0, ndim = 0;
  bool contiguous = true;
  // The EMA average fused into its update (an object of the EMA's model), when there is one.
  py::object avg_obj;
  const c10::TensorImpl* avg_impl = nullptr;
  const void* avg_ptr = nullptr;
  int work = -1;  // index in Seg::work, -1 for an empty tuple
};

// The optimizer-owned tensors behind a cached pointer, and where they point (Note [step plan]).
struct Memory {
  c10::Storage storage;
  int64_t offset = 0;
};

struct Seg {
  const host::RuleEntry* rule = nullptr;
  host::RunFn fn = nullptr;
  std::string op;
  int group = 0;
  std::vector<std::pair<int, double>> overrides;
  std::vector<Tuple> tuples;
  std::vector<int64_t> dims;  // Tuple::dim: sizes (ndim) then strides (ndim)
  // optimizer-owned tensors: the masters (master weights), the states (n_states lists, concatenated), the
  // step counters
  std::vector<at::Tensor> masters, states, steps, aux;  // aux: the rule's tensor scalars, concatenated
  std::vector<Memory> memory;  // per tuple with a work index: masters (if any), then its states
  // Note [cached step counters]: float32 counters on the host, advanced through these pointers
  std::vector<float*> step_ptr;
  std::vector<Memory> step_memory;
  size_t n_states = 0;
  host::Precision prec;
  bool with_ema = false;
  c10::Device device{c10::kCPU};
  bool steps_on_device = false;
  bool static_general = false;  // some tuple is never dense: the work list is built every step
  Work work;                    // the cached work list (gradients filled every step)
  py::object reduce_across;     // Note [sums across shards] (work.h): a Python callable, or None
  // per step
  std::vector<const void*> grads, last_grads;  // this step's gradient pointers, and those of the last update
  bool general_now = false;
  std::vector<at::Tensor> locals_now, grads_now, avgs_now;  // only for a step that builds its work list
  std::vector<py::object> keep_now;                         // DTensor local shards read this step

  size_t memory_per_tuple() const { return (prec.copies ? 1 : 0) + n_states; }

  // The lists of a call in register order: targets, grads, the states, then the averages and copies.
  std::vector<at::TensorList> lists(at::TensorList targets, at::TensorList grads, at::TensorList avgs,
                                    at::TensorList copies) const {
    const size_t n = targets.size();
    std::vector<at::TensorList> out{targets, grads};
    for (size_t k = 0; k < n_states; ++k) out.push_back(at::TensorList(states).slice(k * n, n));
    if (with_ema) out.push_back(avgs);
    if (prec.copies) out.push_back(copies);
    return out;
  }
};

std::vector<at::Tensor> tensor_list(py::handle seq, const char* what) {
  std::vector<at::Tensor> out;
  for (py::handle h : seq) out.push_back(unpack(h.ptr(), what));
  return out;
}

// Work::reduce_across calling the segment's Python callable (held by the segment, so the function keeps a
// borrowed pointer: Work copies made without the GIL must not touch reference counts).
std::function<void(at::Tensor&, const std::vector<uint32_t>&)> across_shards(const py::object& reducer) {
  if (reducer.is_none()) return nullptr;
  PyObject* callable = reducer.ptr();
  return [callable](at::Tensor& rows, const std::vector<uint32_t>& ordinal) {
    py::gil_scoped_acquire gil;
    const py::handle fn(callable);
    fn(rows, py::cast(ordinal));
  };
}

// The tensor of `obj` the kernels see: a DTensor's local shard (its Python object is appended to `keep`,
// which keeps it alive), or the tensor itself.
const at::Tensor& local_of(PyObject* obj, bool dtensor, std::vector<py::object>& keep) {
  if (!dtensor) return THPVariable_Unpack(obj);
  keep.push_back(py::reinterpret_borrow<py::object>(obj).attr("_local_tensor"));
  return unpack(keep.back().ptr(), "a DTensor's local shard");
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

  // For a captured step (python/fusedtrain/optim/captured.py), which replays kernels whose pointers were
  // recorded: 0 the plan is stale, 1 it is valid and every gradient sits where it sat at the last update,
  // 2 it is valid but a gradient moved (zero_grad(set_to_none=True) gives new gradient tensors).
  int check(py::list group_params, py::handle state) {
    if (!validate(group_params, state)) return 0;
    for (const Seg& s : segs_) {
      if (s.grads != s.last_grads) return 2;
    }
    return 1;
  }

  bool has_stochastic() const {
    return std::any_of(segs_.begin(), segs_.end(), [](const Seg& s) { return s.prec.stochastic; });
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
      for (size_t k = 0; k < segs_.size(); ++k) {
        const Seg& s = segs_[k];
        run(segs_[k], hyper[s.group], l1[s.group], plans[k], per_group[s.group].lr_tensor);
      }
    }
    for (Seg& s : segs_) {  // drop this step's references (tensors a user may want to swap or free)
      s.locals_now.clear();
      s.grads_now.clear();
      s.avgs_now.clear();
      s.keep_now.clear();
    }
    return py::make_tuple(static_cast<int>(kUpdated), norm_out, device_found_inf);
  }

 private:
  // segment dict (built by python/fusedtrain/optim/_base.py): rule, group, hyper, overrides, positions,
  // kinds, averages (EMA objects or []), masters, states, steps, stochastic; optionally reduce_across (Note
  // [sums across shards] in work.h).
  void add_segment(const py::dict& d) {
    Seg s;
    const std::string rule = d["rule"].cast<std::string>();
    s.rule = &host::find_rule(rule);
    s.op = "optim." + name_ + " (" + rule + ")";
    s.group = d["group"].cast<int>();
    TORCH_CHECK(s.group >= 0 && static_cast<size_t>(s.group) < groups_.size(), "fusedtrain step plan: bad group");
    for (py::handle o : d["overrides"]) s.overrides.push_back(o.cast<std::pair<int, double>>());
    const py::list positions = d["positions"];
    const py::list kinds = d["kinds"];
    const py::list averages = d["averages"];
    s.masters = tensor_list(d["masters"], "a master weight");
    s.states = tensor_list(d["states"], "a state");
    s.steps = tensor_list(d["steps"], "a step counter");
    s.aux = tensor_list(d["aux"], "a tensor scalar");
    s.reduce_across = d.contains("reduce_across") ? py::object(d["reduce_across"]) : py::none();
    const size_t n = py::len(positions);
    TORCH_CHECK(py::len(kinds) == n && (averages.empty() || py::len(averages) == n) &&
                    (s.masters.empty() || s.masters.size() == n),
                "fusedtrain step plan: one kind, average and master per parameter");
    std::vector<double> h = d["hyper"].cast<std::vector<double>>();
    for (const auto& [i, v] : s.overrides) h[i] = v;
    // The build's view of the lists (held only here): the kernels' targets, the gradients' stand-ins (the
    // parameters: same shape and dtype), the averages and the low-precision copies.
    std::vector<py::object> keep;
    std::vector<at::Tensor> locals, targets, avgs, copies;
    const auto& entries = groups_[s.group];
    for (size_t i = 0; i < n; ++i) {
      const int pos = positions[i].cast<int>();
      TORCH_CHECK(pos >= 0 && static_cast<size_t>(pos) < entries.size() && entries[pos].role == kFused,
                  "fusedtrain step plan: a segment names a parameter that is not fused");
      const uint8_t kind = static_cast<uint8_t>(kinds[i].cast<int>());
      const at::Tensor local = local_of(entries[pos].obj.ptr(), kind & kDTensor, keep);
      locals.push_back(local);
      targets.push_back(!s.masters.empty() ? s.masters[i] : ((kind & kComplex) ? at::view_as_real(local) : local));
      if (!averages.empty()) {
        const at::Tensor a = local_of(py::handle(averages[i]).ptr(), kind & kDTensor, keep);
        avgs.push_back((kind & kComplex) ? at::view_as_real(a) : a);
      }
    }
    if (!s.masters.empty()) copies = locals;
    const std::vector<at::Tensor>& stand_in = copies.empty() ? targets : copies;
    const host::CallLists call = host::check_call(*s.rule, s.op.c_str(), h, targets, stand_in, s.states, avgs,
                                                  copies, d["stochastic"].cast<bool>());
    s.prec = call.prec;
    s.with_ema = call.with_ema;
    s.n_states = s.rule->states(h.data()).size();
    if (n > 0) s.device = targets[0].device();
    s.work.device = s.device;  // (also for a work list without tuples: Note [sums across shards])
    s.work.reduce_across = across_shards(s.reduce_across);
    s.fn = host::backend_fn(*s.rule, s.op.c_str(), s.device);
    s.steps_on_device = host::check_steps(s.op.c_str(), s.steps, targets, s.rule->counts_steps).on_device;
    if (!s.steps_on_device && std::all_of(s.steps.begin(), s.steps.end(), [](const at::Tensor& t) {
          return t.scalar_type() == at::kFloat;
        })) {
      for (const at::Tensor& t : s.steps) {
        s.step_ptr.push_back(t.data_ptr<float>());
        s.step_memory.push_back(Memory{t.storage(), t.storage_offset()});
      }
    }
    host::check_aux(*s.rule, s.op.c_str(), s.aux, targets, s.steps_on_device);
    const std::vector<at::TensorList> lists = s.lists(targets, stand_in, avgs, copies);
    for (size_t i = 0; i < n; ++i) {
      Tuple t;
      t.position = positions[i].cast<int>();
      t.kind = static_cast<uint8_t>(kinds[i].cast<int>());
      const at::Tensor& local = locals[i];
      t.local_impl = local.unsafeGetTensorImpl();
      t.local_ptr = local.numel() > 0 ? local.const_data_ptr() : nullptr;
      t.dim = static_cast<uint32_t>(s.dims.size());
      t.ndim = static_cast<uint32_t>(local.dim());
      for (int64_t v : local.sizes()) s.dims.push_back(v);
      for (int64_t v : local.strides()) s.dims.push_back(v);
      t.contiguous = local.is_contiguous();
      if (!averages.empty()) {
        t.avg_obj = averages[i];
        const at::Tensor& a = avgs[i];
        t.avg_impl = local_of(t.avg_obj.ptr(), t.kind & kDTensor, keep).unsafeGetTensorImpl();
        t.avg_ptr = a.numel() > 0 ? a.const_data_ptr() : nullptr;
      }
      if (local.numel() > 0) {
        if (!host::dense_tuple(lists, i)) s.static_general = true;
        t.work = static_cast<int>(s.work.size());
        std::array<void*, kMaxDepth> ptr{};
        for (size_t k = 0; k < lists.size(); ++k) ptr[k] = lists[k][i].data_ptr();
        s.work.ptr.push_back(ptr);
        s.work.numel.push_back(targets[i].numel());
        s.work.row.push_back(row_length(targets[i]));
        s.work.step.push_back(Scalar{});
        s.work.ordinal.push_back(static_cast<uint32_t>(i));
        s.work.device = s.device;
        if (!s.masters.empty()) s.memory.push_back(Memory{s.masters[i].storage(), s.masters[i].storage_offset()});
        for (size_t k = 0; k < s.n_states; ++k) {
          const at::Tensor& st = s.states[k * n + i];
          s.memory.push_back(Memory{st.storage(), st.storage_offset()});
        }
      }
      s.tuples.push_back(std::move(t));
    }
    segs_.push_back(std::move(s));
  }

  [[noreturn]] void refuse(const Seg& s, const Tuple& t, const std::string& what) const {
    TORCH_CHECK(false, "fusedtrain.optim.", name_, ": param_groups[", s.group, "]['params'][", t.position, "]: ",
                what);
  }

  // The optimizer-owned tensors behind the cached work list still hold the memory it points to. A state
  // tensor whose .data is replaced (a common "move the optimizer to another device" recipe does that), or
  // set_, gets a new storage: the plan compares each tensor's StorageImpl and offset with the ones it
  // recorded, reading only the TensorImpl (a full data_ptr() read per state tensor doubled the step's host
  // time). The plan keeps those storages alive, so a stale pointer can never reach freed memory; only
  // resizing a state tensor's storage in place (no optimizer or checkpoint tool does) would go unnoticed.
  static bool same(const at::Tensor& x, const Memory& r) {
    const c10::TensorImpl* impl = x.unsafeGetTensorImpl();
    return impl->unsafe_storage().unsafeGetStorageImpl() == r.storage.unsafeGetStorageImpl() &&
           impl->storage_offset() == r.offset;
  }
  static bool memory_unchanged(const Seg& s, const Tuple& t) {
    const size_t i = &t - s.tuples.data(), n = s.tuples.size();
    const Memory* m = s.memory.data() + static_cast<size_t>(t.work) * s.memory_per_tuple();
    if (!s.masters.empty() && !same(s.masters[i], *m++)) return false;
    for (size_t j = 0; j < s.n_states; ++j) {
      if (!same(s.states[j * n + i], m[j])) return false;
    }
    return true;
  }

  // Note [cold walk prefetch]:
  // A step that follows a forward and backward pass finds the objects validate() reads in DRAM: per fused
  // parameter its TensorImpl, StorageImpl and autograd metadata, the gradient's TensorImpl and StorageImpl,
  // and the TensorImpls of its states and counter. The gradient's are reached through a chain of four
  // dependent loads, and a tuple's checks are too many instructions for the core to run the next tuple's
  // loads meanwhile, so the misses are paid one after another (~0.3 us per parameter on the 2-core VM). The
  // walk therefore prefetches tuple i + kAhead's chain one level per distance: the TensorImpls (whose
  // addresses the plan holds) 12 tuples ahead, the storage and autograd metadata those point to 8 ahead, the
  // gradient's TensorImpl 4 ahead, its storage 2 ahead. The loads that follow the chain read only objects
  // that are alive (the parameter's object, which the plan holds, and what it points to now) and decide
  // nothing: validation proper reads everything again.
  static constexpr size_t kAhead = 12;
  static void prefetch_impl(const c10::TensorImpl* impl) {
    const char* p = reinterpret_cast<const char*>(impl);
    __builtin_prefetch(p);
    __builtin_prefetch(p + 64);
    __builtin_prefetch(p + 128);
    __builtin_prefetch(p + 192);
  }
  void prefetch(const Seg& s, size_t i) const {
    const size_t n = s.tuples.size();
    if (i + kAhead < n) {
      const size_t j = i + kAhead;
      prefetch_impl(s.tuples[j].local_impl);
      for (size_t k = 0; k < s.n_states; ++k) prefetch_impl(s.states[k * n + j].unsafeGetTensorImpl());
      if (!s.step_ptr.empty()) prefetch_impl(s.steps[j].unsafeGetTensorImpl());
    }
    const auto param_impl = [&](size_t j) -> const c10::TensorImpl* {
      const Tuple& t = s.tuples[j];
      if (t.kind & kDTensor) return nullptr;
      return THPVariable_Unpack(groups_[s.group][t.position].obj.ptr()).unsafeGetTensorImpl();
    };
    const auto grad_impl = [&](size_t j) -> const c10::TensorImpl* {
      const c10::TensorImpl* impl = param_impl(j);
      const auto* meta = impl ? static_cast<const torch::autograd::AutogradMeta*>(impl->autograd_meta()) : nullptr;
      return meta && meta->grad_.defined() ? meta->grad_.unsafeGetTensorImpl() : nullptr;
    };
    if (i + 8 < n) {
      if (const c10::TensorImpl* impl = param_impl(i + 8)) {
        __builtin_prefetch(impl->unsafe_storage().unsafeGetStorageImpl());
        const auto* meta = static_cast<const torch::autograd::AutogradMeta*>(impl->autograd_meta());
        if (meta) __builtin_prefetch(&meta->grad_);
      }
    }
    if (i + 4 < n) {
      if (const c10::TensorImpl* g = grad_impl(i + 4)) prefetch_impl(g);
    }
    if (i + 2 < n) {
      if (const c10::TensorImpl* g = grad_impl(i + 2)) __builtin_prefetch(g->unsafe_storage().unsafeGetStorageImpl());
    }
  }

  bool validate(py::list group_params, py::handle state) {
    for (Seg& s : segs_) s.keep_now.clear();
    if (py::len(group_params) != groups_.size()) return false;
    for (size_t g = 0; g < groups_.size(); ++g) {
      PyObject* lst = group_params[g].ptr();
      const auto& entries = groups_[g];
      if (lst != lists_[g].ptr() || !PyList_Check(lst) ||
          PyList_GET_SIZE(lst) != static_cast<Py_ssize_t>(entries.size())) {
        return false;
      }
      for (size_t i = 0; i < entries.size(); ++i) {
        PyObject* obj = PyList_GET_ITEM(lst, i);
        const Entry& e = entries[i];
        if (obj != e.obj.ptr() || THPVariable_Unpack(obj).unsafeGetTensorImpl() != e.impl) return false;
        // A parameter that had no gradient must still have none; its presence is read without Python, from
        // the tensor's autograd metadata.
        if (e.role == kAbsent && grad_of(obj).defined()) return false;
      }
    }
    if (!snapshot_.unchanged(state.ptr())) return false;
    for (Seg& s : segs_) {
      s.general_now = s.static_general;
      s.grads.clear();
      for (const Tuple& t : s.tuples) {
        prefetch(s, &t - s.tuples.data());  // Note [cold walk prefetch]
        PyObject* obj = groups_[s.group][t.position].obj.ptr();
        const bool dtensor = t.kind & kDTensor;
        const at::Tensor& local = local_of(obj, dtensor, s.keep_now);
        // the parameter's memory and geometry as the plan recorded them (p.data = ..., resize_, set_)
        const int64_t* dims = s.dims.data() + t.dim;
        if (local.unsafeGetTensorImpl() != t.local_impl ||
            recorded_data(t.local_impl) != t.local_ptr ||
            !same_dims(local.sizes(), {dims, t.ndim}) || !same_dims(local.strides(), {dims + t.ndim, t.ndim})) {
          return false;
        }
        at::Tensor owned;  // a DTensor's local gradient; plain gradients are read in place
        if (dtensor) {
          py::object g = py::reinterpret_borrow<py::object>(obj).attr("grad");
          if (!g.is_none()) {
            if (!py::hasattr(g, "_local_tensor")) refuse(s, t, "a DTensor parameter has a plain-tensor gradient");
            owned = unpack(g.attr("_local_tensor").ptr(), "a gradient");
          }
        }
        const at::Tensor& g = dtensor ? owned : grad_of(obj);
        if (!g.defined()) return false;                 // its gradient vanished
        if (g.layout() != at::kStrided) return false;   // now a sparse gradient
        if (g.scalar_type() != local.scalar_type() || !same_dims(g.sizes(), local.sizes()) ||
            g.device() != local.device()) {
          refuse(s, t, "its gradient (" + std::string(c10::toString(g.scalar_type())) + " " + c10::str(g.sizes()) +
                           " on " + g.device().str() + ") must match the parameter (" +
                           c10::toString(local.scalar_type()) + " " + c10::str(local.sizes()) + " on " +
                           local.device().str() + "); nothing was updated");
        }
        const void* grad_ptr = g.numel() > 0 ? g.const_data_ptr() : nullptr;
        s.grads.push_back(grad_ptr);
        if (t.avg_obj) {
          const at::Tensor& a = local_of(t.avg_obj.ptr(), dtensor, s.keep_now);
          if (a.unsafeGetTensorImpl() != t.avg_impl || recorded_data(t.avg_impl) != t.avg_ptr) {
            return false;
          }
        }
        const size_t k = &t - s.tuples.data();
        if (!s.step_ptr.empty() && !same(s.steps[k], s.step_memory[k])) {
          return false;  // a counter's .data replaced (Note [cached step counters])
        }
        if (t.work < 0) continue;
        if (!s.static_general && !memory_unchanged(s, t)) return false;
        // Walked in place when the gradient has the parameter's layout (Note [dense tuples]); a complex
        // gradient has the layout of its real view exactly when it has the complex parameter's.
        const bool direct = t.contiguous ? g.is_contiguous()
                                         : (g.is_non_overlapping_and_dense() && same_dims(g.strides(), local.strides()));
        if (!direct) s.general_now = true;
        s.work.ptr[t.work][1] = const_cast<void*>(grad_ptr);
      }
      if (s.general_now) collect_lists(s);
    }
    return true;
  }

  // For a step that builds its work list (temporaries for a tuple that is not dense): this step's tensors.
  void collect_lists(Seg& s) {
    s.locals_now.clear();
    s.grads_now.clear();
    s.avgs_now.clear();
    for (const Tuple& t : s.tuples) {
      PyObject* obj = groups_[s.group][t.position].obj.ptr();
      const bool dtensor = t.kind & kDTensor, cplx = t.kind & kComplex;
      at::Tensor local = local_of(obj, dtensor, s.keep_now);
      at::Tensor g = dtensor ? unpack(py::reinterpret_borrow<py::object>(obj).attr("grad").attr("_local_tensor").ptr(),
                                      "a gradient")
                             : grad_of(obj);
      s.locals_now.push_back(cplx ? at::view_as_real(local) : local);
      s.grads_now.push_back(cplx ? at::view_as_real(g) : g);
      if (t.avg_obj) {
        const at::Tensor& a = local_of(t.avg_obj.ptr(), dtensor, s.keep_now);
        s.avgs_now.push_back(cplx ? at::view_as_real(a) : a);
      }
    }
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
        at::Tensor g = grad_of(groups_[s.group][t.position].obj.ptr());
        if (t.kind & kComplex) g = at::view_as_real(g);
        any_double = any_double || g.scalar_type() == at::kDouble;
        by[{g.device().str(), static_cast<int>(g.scalar_type())}].push_back(std::move(g));
      }
    }
    const auto acc = any_double ? at::kDouble : at::kFloat;
    std::vector<at::Tensor> norms;
    const c10::Device first = segs_[0].device;
    for (auto& [key, grads] : by) norms.push_back(total_norm.call(grads, 2.0).to(first, acc));
    if (norms.size() == 1) return norms[0];
    return at::linalg_vector_norm(at::stack(norms), 2.0);
  }

  void run(Seg& s, std::vector<double> hyper, double l1, host::CallPlan& plan, const OptT& lr_tensor) {
    if (s.tuples.empty()) return;
    for (const auto& [i, v] : s.overrides) hyper[i] = v;
    if (!s.step_ptr.empty()) {
      // Note [cached step counters]:
      // host::advance_steps reads each counter's TensorImpl, StorageImpl and data (three cache misses per
      // parameter on a cold step). For float32 counters on the host (torch's default), the plan records
      // where each lives when it is built, validates each step that the counter still owns that storage
      // (the TensorImpl only, as for the states: Note [step plan]), and writes through the recorded
      // pointer. Counters on the device, or of another dtype, take advance_steps.
      plan.steps.steps.resize(s.step_ptr.size());
      for (size_t i = 0; i < s.step_ptr.size(); ++i) {
        float* p = s.step_ptr[i];
        *p = *p + 1.0f;
        plan.steps.steps[i] = Scalar{nullptr, static_cast<double>(*p)};
      }
    } else {
      host::advance_steps(s.steps, plan.steps);
    }
    const std::vector<std::array<Scalar, 2>> bound = host::advance_aux(*s.rule, s.device, hyper, s.aux, plan, lr_tensor);
    if (s.general_now) {
      const std::vector<at::Tensor> targets = s.masters.empty() ? s.locals_now : s.masters;
      const std::vector<at::Tensor> copies = s.masters.empty() ? std::vector<at::Tensor>() : s.locals_now;
      Work work = host::prepare(s.lists(targets, s.grads_now, s.avgs_now, copies), plan.steps.steps, {}, bound);
      work.scalars = plan.scalars;
      work.device = s.device;
      work.reduce_across = s.work.reduce_across;
      if (work.size() > 0 || work.reduce_across) {
        s.fn(host::RunArgs{work, hyper.data(), rules::Common{l1}, s.prec, s.with_ema});
      }
      for (auto& [original, temp] : work.copy_back) original.copy_(temp);
    } else {
      if (!plan.steps.steps.empty()) {
        for (size_t i = 0; i < s.tuples.size(); ++i) {
          if (s.tuples[i].work >= 0) s.work.step[s.tuples[i].work] = plan.steps.steps[i];
        }
      }
      if (!bound.empty()) {
        s.work.aux.resize(s.work.size());
        for (size_t i = 0; i < s.tuples.size(); ++i) {
          if (s.tuples[i].work >= 0) s.work.aux[s.tuples[i].work] = bound[i];
        }
      }
      s.work.scalars = plan.scalars;
      if (s.work.size() > 0 || s.work.reduce_across) {
        s.fn(host::RunArgs{s.work, hyper.data(), rules::Common{l1}, s.prec, s.with_ema});
      }
    }
    host::finish_call(s.steps, plan);
    s.last_grads = s.grads;
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
      .def("check", &StepPlanImpl::check, py::arg("group_params"), py::arg("state"))
      .def_property_readonly("has_stochastic", &StepPlanImpl::has_stochastic)
      .def_property_readonly("devices", &StepPlanImpl::devices);
  m.def(
      "rules",
      [] {
        py::dict out;
        for (const auto& [name, e] : host::registry()) {
          py::dict d;
          d["hyper"] = e.hyper;
          d["aux"] = e.aux;
          d["counts_steps"] = e.counts_steps;
          d["mixed_precision"] = e.mixed_precision;
          out[py::str(name)] = d;
        }
        return out;
      },
      "The optimizer rules of this build: {name: {hyper, counts_steps, mixed_precision}} (Note [optimizer rules])");
  // Note [8-bit optimizer states] (quant.h): the tables Python quantizes and dequantizes with, so that a
  // state converted there (a torch.optim checkpoint loaded into an 8-bit optimizer) gets the kernels' codes.
  m.def(
      "quant_maps",
      [] {
        const quant::Maps& q = quant::kMaps;
        py::dict d;
        d["block"] = quant::kBlock;
        d["unsigned_value"] = std::vector<float>(q.unsigned_value, q.unsigned_value + 256);
        d["unsigned_mid"] = std::vector<float>(q.unsigned_mid, q.unsigned_mid + 255);
        d["signed_value"] = std::vector<float>(q.signed_value, q.signed_value + 128);
        d["signed_mid"] = std::vector<float>(q.signed_mid, q.signed_mid + 127);
        return d;
      },
      "The 8-bit state code maps: block size, values and midpoints (Note [8-bit optimizer states] in quant.h)");
  m.def(
      "quant4_maps",
      [] {
        const quant::Maps4& q = quant::kMaps4;
        py::dict d;
        d["block"] = quant::kBlock4;
        d["signed_value"] = std::vector<float>(q.signed_value, q.signed_value + 16);
        d["signed_mid"] = std::vector<float>(q.signed_mid, q.signed_mid + 15);
        d["unsigned_value"] = std::vector<float>(q.unsigned_value, q.unsigned_value + 16);
        d["unsigned_mid"] = std::vector<float>(q.unsigned_mid, q.unsigned_mid + 15);
        return d;
      },
      "The 4-bit state code maps: block size, values and midpoints (Note [4-bit optimizer states] in quant4.h)");
}

}  // namespace plan
}  // namespace fusedtrain
