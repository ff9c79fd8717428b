// The work list both multi-tensor drivers consume: for each tensor tuple (param, grad, states...),
// its base addresses and element count. Built by optim_host.h, which checks the tensors first.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "fusedtrain/math.h"

namespace fusedtrain {

// param, grad, up to three states, an EMA average, and the low-precision copy of a master weight (7);
// quantized rules (Note [quantized state lists] in optim_host.h): param, grad, up to three (codes, absmax)
// pairs and the copy (9)
constexpr int kMaxDepth = 9;

// A scalar the kernels read either as a host value or from device memory (capturable mode, a tensor
// lr, GradScaler's scale on the GPU, a clip coefficient computed on the GPU). `ptr` wins when set.
//
// Note [wide device scalars]:
// Device scalars are float32, except the per-tensor values a reduction pass hands to the next pass (the
// trust ratios and caution scales of rules_trust.h), which are float64 so that a float64 update gets them
// exactly as the CPU does. Such a scalar is made by Scalar::wide: its pointer carries the tag bit 0 (a
// float or double is never at an odd address) and read() loads a double from it. Only read() dereferences
// `ptr`; the struct keeps its 16 bytes (the CUDA tables hold two per tensor).
struct Scalar {
  const float* ptr = nullptr;
  double value = 0.0;
  static Scalar wide(const double* p) {
    return Scalar{reinterpret_cast<const float*>(reinterpret_cast<uintptr_t>(p) | uintptr_t{1}), 0.0};
  }
};

// Per-launch scalars of Note [per-tensor binding] (math.h); the step is per tuple (Work::step).
struct Scalars {
  Scalar lr{nullptr, 0.0};
  Scalar grad_scale{nullptr, 1.0};  // GradScaler's scale: gradients are multiplied by 1 / scale
  Scalar clip_coef{nullptr, 1.0};   // max_grad_norm's clip coefficient
  Scalar ema_weight{nullptr, 0.0};  // weight of the fused moving average (WithEma) or of the ema_ rule
  const float* found_inf = nullptr; // device flag: a non-zero value skips the whole update (CUDA only)
  // Seed of stochastic rounding (rounding.h): a host value, or (under CUDA-graph capture) a device
  // int64 drawn by torch's CUDA generator, read by the kernels, so every replay rounds with fresh bits.
  const int64_t* sr_seed_ptr = nullptr;
  uint64_t sr_seed = 0;
};

FT_HD double read(const Scalar& s) {
  if (s.ptr == nullptr) return s.value;
  const uintptr_t address = reinterpret_cast<uintptr_t>(s.ptr);
  if (address & uintptr_t{1}) return *reinterpret_cast<const double*>(address - 1);  // Note [wide device scalars]
  return static_cast<double>(*s.ptr);
}

FT_HD uint64_t read_seed(const Scalars& s) {
  return s.sr_seed_ptr != nullptr ? static_cast<uint64_t>(*s.sr_seed_ptr) : s.sr_seed;
}

// The values one tensor's bind() gets; runs on the host (CPU driver) or the device (per CUDA chunk).
// aux: the tensor's two bound scalar states (Note [tensor scalars] in rules.h), or null.
FT_HD math::Bound bound_for(const Scalars& s, const Scalar& step, const Scalar* aux = nullptr) {
  math::Bound b{read(step), read(s.lr), 1.0 / read(s.grad_scale), read(s.clip_coef), read(s.ema_weight)};
  if (aux != nullptr) {
    b.aux0 = read(aux[0]);
    b.aux1 = read(aux[1]);
  }
  return b;
}

// One call of a rule's tensor-scalar update (Note [tensor scalars] in rules.h), for Backend::advance_aux.
struct AuxArgs {
  const double* hyper = nullptr;
  size_t n = 0;                  // tuples
  const Scalar* steps = nullptr;  // the n new step counts (host values, or device counters)
  Scalar lr;
  const float* found_inf = nullptr;     // device flag: set, nothing advances (the update is skipped)
  const at::Tensor* aux = nullptr;      // k lists of n one-element tensors, concatenated
  int k = 0;
  std::array<Scalar, 2>* out = nullptr;  // the n tuples' bound values (Bound::aux0, aux1)
  std::vector<at::Tensor>* keep = nullptr;  // device buffers the out scalars point into
};

// Elements per dim-0 slice of t: the product of sizes[1:] for >= 2 dims, numel for 0 or 1 dims (one row).
inline int64_t row_length(const at::Tensor& t) {
  int64_t row = 1;
  for (int64_t d = t.dim() >= 2 ? 1 : 0; d < t.dim(); ++d) row *= t.size(d);
  return row;
}

struct Work {
  c10::Device device{c10::kCPU};
  std::vector<std::array<void*, kMaxDepth>> ptr;  // ptr[i][k]: list k of tuple i
  std::vector<int64_t> numel;                     // elements of tuple i (> 0)
  // Elements per dim-0 slice of tuple i's parameter (row_length): the block rows of the quantized rules
  // (Note [row blocks] in quant.h); the element-wise drivers do not read it.
  std::vector<int64_t> row;
  std::vector<Scalar> step;                       // step count of tuple i (host value or device counter)
  std::vector<std::array<Scalar, 2>> aux;          // tuple i's bound scalar states; empty for most rules
  // Tuple i's position in its call (empty tuples included): keys its stochastic-rounding bits, so they
  // do not depend on how a call's tuples are split into launches or work lists.
  std::vector<uint32_t> ordinal;
  Scalars scalars;
  std::vector<at::Tensor> keep_alive;             // contiguous temporaries (Note [dense tuples])
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;  // (original, temporary)
  // Note [sums across shards]: a rule that reduces per tensor before it updates (the trust ratios and the
  // caution mask of rules_trust.h) sees only the local shard of a DTensor parameter. When this is set (the
  // step plan sets it for sharded segments, from Python), the rule hands it, before finishing its sums, a
  // float64 tensor of size() rows (sum0, sum1, numel) on `device` and the tuples' ordinals; it adds each
  // sharded tensor's row across its shards, in place. It is a collective: the plan runs such a rule also
  // on an empty work list (a rank whose shards are all empty), so every rank calls it equally often.
  std::function<void(at::Tensor&, const std::vector<uint32_t>&)> reduce_across;

  size_t size() const { return numel.size(); }
};

}  // namespace fusedtrain
