// CPU driver of fusedtrain::total_norm: fixed blocks of the flat element space of all tensors, one
// partial per block in double (Note [norm accumulation]), combined in block order.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "fusedtrain/norm_host.h"

namespace fusedtrain {
namespace cpu {
namespace {

constexpr int64_t kBlock = 1 << 16;

template <typename S, norm::Kind K>
double partial(const S* x, int64_t n, double p) {
  using A = at::opmath_type<S>;
  double acc = 0.0;
  if constexpr (K == norm::kInf) {
    for (int64_t i = 0; i < n; ++i) acc = norm::combine(acc, static_cast<double>(norm::term(A(x[i]), K, p)), K);
  } else {
    // Runs of kRun elements summed in A by SIMD lanes (reassociation is allowed here: the split is fixed,
    // so the result is still deterministic), each run's sum added in double (Note [norm accumulation]).
    for (int64_t r = 0; r < n; r += norm::kRun) {
      const int64_t end = std::min(n, r + norm::kRun);
      A run = A(0);
#pragma omp simd reduction(+ : run)
      for (int64_t i = r; i < end; ++i) run += norm::term(A(x[i]), K, p);
      acc += static_cast<double>(run);
    }
  }
  return acc;
}

template <typename S, norm::Kind K>
double reduce(const host::NormWork& work, double p) {
  const size_t n = work.numel.size();
  std::vector<int64_t> offset(n + 1, 0);
  for (size_t i = 0; i < n; ++i) offset[i + 1] = offset[i] + work.numel[i];
  const int64_t total = offset[n];
  const int64_t blocks = (total + kBlock - 1) / kBlock;
  std::vector<double> partials(static_cast<size_t>(blocks), 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * kBlock, end = std::min(total, begin + kBlock);
      double acc = 0.0;
      size_t i = std::upper_bound(offset.begin(), offset.end(), begin) - offset.begin() - 1;
      for (; i < n && offset[i] < end; ++i) {
        const int64_t lo = std::max(begin, offset[i]) - offset[i];
        const int64_t hi = std::min(end, offset[i + 1]) - offset[i];
        if (hi > lo) acc = norm::combine(acc, partial<S, K>(static_cast<const S*>(work.ptr[i]) + lo, hi - lo, p), K);
      }
      partials[b] = acc;
    }
  });
  double acc = 0.0;
  for (double v : partials) acc = norm::combine(acc, v, K);
  return norm::finish(acc, K, p);
}

at::Tensor total_norm_cpu(at::TensorList tensors, double norm_type) {
  const host::NormWork work = host::prepare_norm(tensors, norm_type);
  at::Tensor out = host::norm_output(tensors[0]);
  double value = 0.0;
  if (!work.numel.empty()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "fusedtrain_norm", [&] {
      switch (norm::kind_of(norm_type)) {
        case norm::kL1: value = reduce<scalar_t, norm::kL1>(work, norm_type); break;
        case norm::kL2: value = reduce<scalar_t, norm::kL2>(work, norm_type); break;
        case norm::kInf: value = reduce<scalar_t, norm::kInf>(work, norm_type); break;
        default: value = reduce<scalar_t, norm::kP>(work, norm_type); break;
      }
    });
  }
  out.fill_(value);
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace fusedtrain

TORCH_LIBRARY_IMPL(fusedtrain, CPU, m) { m.impl("total_norm", &fusedtrain::cpu::total_norm_cpu); }
