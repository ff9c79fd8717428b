// The one CPU multi-tensor driver: every optimizer (and later EMA) runs through cpu_multi_tensor_apply.
//
// Note [CPU work split]:
// All tensors of a call are laid end to end as one flat index space [0, total). One at::parallel_for
// region splits that space into equal ranges, so two threads get the same number of elements whether
// the group holds one huge tensor or two thousand small ones (torch's fused CPU kernels instead run one
// parallel region per tensor). Each thread walks the tensors overlapping its range and runs the inner
// loop on each piece.
//
// Note [CPU SIMD dispatch]:
// The inner loop is written once (loop_body) as plain scalar C++ calling the functor of math.h. It is
// compiled three times through GCC/Clang `target` attributes (AVX-512, AVX2+FMA, baseline x86-64 or
// whatever the host compiler targets), and the auto-vectorizer turns each copy into SIMD code for that
// ISA. The copy is picked at run time from what the processor reports (cpu_isa.cpp), so one build runs
// everywhere and no -march=native is needed.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fusedtrain/cpu_isa.h"
#include "fusedtrain/rounding.h"
#include "fusedtrain/rules.h"
#include "fusedtrain/work.h"

namespace fusedtrain {
namespace cpu {

// ptr: the lists of one piece in register order, then (L::kCopy) the low-precision parameter copy;
// index0: the piece's first element index within its tensor; key: the tensor's stochastic-rounding key.
template <class L, typename Op>
inline __attribute__((always_inline)) void loop_body(void* const* ptr, int64_t n, const Op& op_in, int64_t index0,
                                                     uint32_t key) {
  using T = at::opmath_type<typename L::P>;
  using St = typename L::St;
  constexpr int D = Op::depth;
  static_assert(D <= 6, "loop_body handles up to six lists plus the parameter copy");
  const Op op = op_in;  // a local copy: stores through the pointers cannot alias the hyperparameters
  typename L::P* __restrict__ p0 = static_cast<typename L::P*>(ptr[0]);
  const typename L::G* __restrict__ p1 = static_cast<const typename L::G*>(ptr[1]);
  St* __restrict__ p2 = D > 2 ? static_cast<St*>(ptr[2]) : nullptr;
  St* __restrict__ p3 = D > 3 ? static_cast<St*>(ptr[3]) : nullptr;
  St* __restrict__ p4 = D > 4 ? static_cast<St*>(ptr[4]) : nullptr;
  St* __restrict__ p5 = D > 5 ? static_cast<St*>(ptr[5]) : nullptr;
  typename L::O* __restrict__ out = L::kCopy ? static_cast<typename L::O*>(ptr[D]) : nullptr;
  // The lists of a tuple are distinct tensors and element i touches only index i, so there is no
  // loop-carried dependence. Said explicitly: GCC drops the __restrict__ of these locals when the body
  // is inlined into the target-specific copies and would otherwise version the loop with run-time alias
  // checks, which it gives up on (scalar code, 5x slower) beyond five lists.
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    T r[D];
    r[0] = static_cast<T>(p0[i]);
    r[1] = static_cast<T>(p1[i]);
    if constexpr (D > 2) r[2] = static_cast<T>(p2[i]);
    if constexpr (D > 3) r[3] = static_cast<T>(p3[i]);
    if constexpr (D > 4) r[4] = static_cast<T>(p4[i]);
    if constexpr (D > 5) r[5] = static_cast<T>(p5[i]);
    op(r);
    p0[i] = rounding::store_param<L>(r[0], key, index0 + i);
    if constexpr (D > 2) p2[i] = static_cast<St>(r[2]);
    if constexpr (D > 3) p3[i] = static_cast<St>(r[3]);
    if constexpr (D > 4) p4[i] = static_cast<St>(r[4]);
    if constexpr (D > 5) p5[i] = static_cast<St>(r[5]);
    if constexpr (L::kCopy) out[i] = static_cast<typename L::O>(r[0]);
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FT_HAVE_X86_DISPATCH 1
template <class L, typename Op>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"))) void loop_avx512(
    void* const* ptr, int64_t n, const Op& op, int64_t index0, uint32_t key) {
  loop_body<L, Op>(ptr, n, op, index0, key);
}
template <class L, typename Op>
__attribute__((target("avx2,fma,f16c"))) void loop_avx2(void* const* ptr, int64_t n, const Op& op, int64_t index0,
                                                        uint32_t key) {
  loop_body<L, Op>(ptr, n, op, index0, key);
}
#endif
template <class L, typename Op>
void loop_baseline(void* const* ptr, int64_t n, const Op& op, int64_t index0, uint32_t key) {
  loop_body<L, Op>(ptr, n, op, index0, key);
}

template <typename Op>
using LoopFn = void (*)(void* const*, int64_t, const Op&, int64_t, uint32_t);

template <class L, typename Op>
LoopFn<Op> select_loop() {
#ifdef FT_HAVE_X86_DISPATCH
  switch (active_isa()) {
    case Isa::kAvx512:
      return &loop_avx512<L, Op>;
    case Isa::kAvx2:
      return &loop_avx2<L, Op>;
    default:
      break;
  }
#endif
  return &loop_baseline<L, Op>;
}

// Elements per parallel_for grain: large enough to amortize the per-range tensor search, small enough
// to split a 100 KB tensor between two cores.
constexpr int64_t kGrain = 16384;

// The functor of one tensor: `op` bound to the tensor's values (Note [per-tensor binding] in math.h), rebound
// only when they differ from the last tensor's. bind() costs two pow() for Adam, and consecutive tensors are
// usually at the same step: 2004 small tensors bind once per range, not 2004 times. Used by every CPU driver.
template <typename Op>
class Rebound {
 public:
  explicit Rebound(const Op& op) : op_(op), bound_(op) {}
  const Op& for_tensor(const Work& work, size_t i) {
    const math::Bound b = bound_for(work.scalars, work.step[i], work.aux.empty() ? nullptr : work.aux[i].data());
    if (!math::same(b, last_)) {
      last_ = b;
      bound_ = op_;
      bound_.bind(b);
    }
    return bound_;
  }

 private:
  const Op& op_;
  Op bound_;
  math::Bound last_{-1.0, 0.0, 0.0, 0.0, 0.0};
};

// offset[i]: the units (elements, blocks) of the tuples before tuple i, offset[n]: all of them.
template <typename Units>
std::vector<int64_t> cumulative(const Work& work, Units units) {
  std::vector<int64_t> offset(work.size() + 1, 0);
  for (size_t i = 0; i < work.size(); ++i) offset[i + 1] = offset[i] + units(work.numel[i]);
  return offset;
}

// fn(i, lo, hi) for each tuple i with units in [begin, end), lo and hi counted in tuple i's own units.
template <typename Fn>
inline void for_each_piece(const std::vector<int64_t>& offset, int64_t begin, int64_t end, Fn&& fn) {
  const size_t n = offset.size() - 1;
  size_t i = std::upper_bound(offset.begin(), offset.end(), begin) - offset.begin() - 1;
  for (; i < n && offset[i] < end; ++i) {
    const int64_t lo = std::max(begin, offset[i]) - offset[i];
    const int64_t hi = std::min(end, offset[i + 1]) - offset[i];
    if (hi > lo) fn(i, lo, hi);
  }
}

// Note [small tuples prefetch]:
// A piece of a few elements is over in a few dozen instructions, but its lists' first lines are usually in
// DRAM (after a forward and backward pass, nothing of a thousand small tensors' data is cached) and sit at
// unrelated addresses the hardware prefetchers cannot guess. The work list holds every address, so the loop
// asks for tuple i + kPieceAhead's first lines while it runs tuple i: ~0.1 us per small tensor of a cold step
// (benchmarks/NOTES.md, "Cold step, fourth pass"). A large tensor's first line is one line of many.
constexpr size_t kPieceAhead = 8;
template <int N>
inline void prefetch_ahead(const Work& work, size_t i) {
  if (i + kPieceAhead >= work.size()) return;
  const auto& ptr = work.ptr[i + kPieceAhead];
  for (int k = 0; k < N; ++k) __builtin_prefetch(ptr[k], 1);
}

// Every tuple of `work` is non-overlapping-and-dense with equal strides (optim_host.h guarantees it),
// so memory order is a valid element order for all lists of the tuple. Each piece's functor is
// bound to its tensor's step and the call's scalars first (Note [per-tensor binding]). found_inf is
// resolved by the host on the CPU (optim_host.h), so work.scalars.found_inf is never set here.
template <class L, typename Op>
void multi_tensor_apply(const Work& work, const Op& op) {
  constexpr int N = Op::depth + (L::kCopy ? 1 : 0);
  const std::vector<int64_t> offset = cumulative(work, [](int64_t numel) { return numel; });
  const int64_t total = offset.back();
  if (total == 0) return;
  const LoopFn<Op> loop = select_loop<L, Op>();
  const uint64_t seed = L::kStochastic ? read_seed(work.scalars) : 0;
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    Rebound<Op> rebound(op);
    for_each_piece(offset, begin, end, [&](size_t i, int64_t lo, int64_t hi) {
      prefetch_ahead<N>(work, i);
      void* piece[N];
      piece[0] = static_cast<typename L::P*>(work.ptr[i][0]) + lo;
      piece[1] = static_cast<typename L::G*>(work.ptr[i][1]) + lo;
      for (int k = 2; k < Op::depth; ++k) piece[k] = static_cast<typename L::St*>(work.ptr[i][k]) + lo;
      if constexpr (L::kCopy) piece[Op::depth] = static_cast<typename L::O*>(work.ptr[i][Op::depth]) + lo;
      const uint32_t key = L::kStochastic ? rounding::tensor_key(seed, work.ordinal[i]) : 0u;
      loop(piece, hi - lo, rebound.for_tensor(work, i), lo, key);
    });
  });
}

struct Backend {
  template <class L, typename Op>
  static void apply(const Work& work, const Op& op) {
    multi_tensor_apply<L, Op>(work, op);
  }

  // Note [tensor scalars] (rules.h), on the host: the tensors live on the CPU, next to the step counters.
  template <class Rule>
  static void advance_aux(const AuxArgs& a) {
    for (size_t i = 0; i < a.n; ++i) {
      double stored[2] = {0.0, 0.0}, bound[2] = {0.0, 0.0};
      rules::AuxRound round;
      for (int j = 0; j < a.k; ++j) {
        const at::Tensor& t = a.aux[j * a.n + i];
        round.single[j] = t.scalar_type() != at::kDouble;
        stored[j] = round.single[j] ? static_cast<double>(*static_cast<const float*>(t.const_data_ptr()))
                                    : *static_cast<const double*>(t.const_data_ptr());
      }
      Rule::advance(a.hyper, read(a.steps[i]), read(a.lr), stored, bound, round);
      for (int j = 0; j < a.k; ++j) {
        const at::Tensor& t = a.aux[j * a.n + i];
        if (round.single[j]) *static_cast<float*>(t.data_ptr()) = static_cast<float>(stored[j]);
        else *static_cast<double*>(t.data_ptr()) = stored[j];
      }
      a.out[i] = {Scalar{nullptr, bound[0]}, Scalar{nullptr, bound[1]}};
    }
  }
};

}  // namespace cpu
}  // namespace fusedtrain
