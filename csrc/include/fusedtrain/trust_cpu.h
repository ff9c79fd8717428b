// CPU driver of the trust-ratio passes (Note [trust-ratio passes] in rules_trust.h): the work split of
// cpu_driver.h with per-tensor sums, and load / store masks so that a pass moves only the lists it needs.
//
// Note [deterministic per-tensor sums on the CPU]:
// The flat element space of the call is cut into fixed blocks of kBlock elements, independent of the
// thread count; each (block, tensor) piece gets its own partial sums, and a tensor's sums add its pieces'
// partials in block order. Within a piece the loop may reassociate (SIMD lanes), always the same way for
// one build and processor, so the result does not change from run to run or with the number of threads.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fusedtrain/cpu_driver.h"
#include "fusedtrain/rules_trust.h"

namespace fusedtrain {
namespace trust_cpu {

constexpr int64_t kBlock = 1 << 15;

template <class L, typename Op>
inline __attribute__((always_inline)) void body(void* const* ptr, int64_t n, const Op& op_in, int64_t index0,
                                                uint32_t key, double* sums) {
  using T = at::opmath_type<typename L::P>;
  using St = typename L::St;
  constexpr int D = Op::depth;
  constexpr unsigned LD = Op::kLoad, ST = Op::kStore;
  static_assert(D <= 5, "trust passes take up to five lists plus the parameter copy");
  const Op op = op_in;
  typename L::P* __restrict__ p0 = static_cast<typename L::P*>(ptr[0]);
  const typename L::G* __restrict__ p1 = static_cast<const typename L::G*>(ptr[1]);
  St* __restrict__ p2 = D > 2 ? static_cast<St*>(ptr[2]) : nullptr;
  St* __restrict__ p3 = D > 3 ? static_cast<St*>(ptr[3]) : nullptr;
  St* __restrict__ p4 = D > 4 ? static_cast<St*>(ptr[4]) : nullptr;
  typename L::O* __restrict__ out = (L::kCopy && (ST & 1u)) ? static_cast<typename L::O*>(ptr[D]) : nullptr;
  // Note: `#pragma omp simd` over this body makes GCC keep r[] and t[] as per-lane arrays, which it then
  // fails to vectorize (2x slower); the element loop is the ivdep loop of cpu_driver.h, and its terms go
  // through a small buffer that a separate `omp simd` reduction sums (same split every time: deterministic).
  auto element = [&](int64_t i, double* t) __attribute__((always_inline)) {
    T r[D];
    if constexpr ((LD & 1u) != 0) r[0] = static_cast<T>(p0[i]);
    if constexpr ((LD & 2u) != 0) r[1] = static_cast<T>(p1[i]);
    if constexpr (D > 2 && (LD & 4u) != 0) r[2] = static_cast<T>(p2[i]);
    if constexpr (D > 3 && (LD & 8u) != 0) r[3] = static_cast<T>(p3[i]);
    if constexpr (D > 4 && (LD & 16u) != 0) r[4] = static_cast<T>(p4[i]);
    op(r, t);
    if constexpr ((ST & 1u) != 0) {
      p0[i] = rounding::store_param<L>(r[0], key, index0 + i);
      if constexpr (L::kCopy) out[i] = static_cast<typename L::O>(r[0]);
    }
    if constexpr (D > 2 && (ST & 4u) != 0) p2[i] = static_cast<St>(r[2]);
    if constexpr (D > 3 && (ST & 8u) != 0) p3[i] = static_cast<St>(r[3]);
    if constexpr (D > 4 && (ST & 16u) != 0) p4[i] = static_cast<St>(r[4]);
  };
  double s0 = 0.0, s1 = 0.0;
  if constexpr (Op::kSums == 0) {
#pragma GCC ivdep
    for (int64_t i = 0; i < n; ++i) {
      double t[2];
      element(i, t);
    }
  } else {
    constexpr int64_t kTile = 256;
    double b0[kTile], b1[kTile];
    for (int64_t base = 0; base < n; base += kTile) {
      const int64_t m = n - base < kTile ? n - base : kTile;
#pragma GCC ivdep
      for (int64_t j = 0; j < m; ++j) {
        double t[2] = {0.0, 0.0};
        element(base + j, t);
        b0[j] = t[0];
        b1[j] = t[1];
      }
      double a0 = 0.0, a1 = 0.0;
#pragma omp simd reduction(+ : a0, a1)
      for (int64_t j = 0; j < m; ++j) {
        a0 += b0[j];
        a1 += b1[j];
      }
      s0 += a0;
      s1 += a1;
    }
  }
  sums[0] = s0;
  sums[1] = s1;
}

template <typename Op>
using BodyFn = void (*)(void* const*, int64_t, const Op&, int64_t, uint32_t, double*);

#ifdef FT_HAVE_X86_DISPATCH
template <class L, typename Op>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"))) void body_avx512(
    void* const* ptr, int64_t n, const Op& op, int64_t index0, uint32_t key, double* sums) {
  body<L, Op>(ptr, n, op, index0, key, sums);
}
template <class L, typename Op>
__attribute__((target("avx2,fma,f16c"))) void body_avx2(void* const* ptr, int64_t n, const Op& op, int64_t index0,
                                                        uint32_t key, double* sums) {
  body<L, Op>(ptr, n, op, index0, key, sums);
}
#endif
template <class L, typename Op>
void body_baseline(void* const* ptr, int64_t n, const Op& op, int64_t index0, uint32_t key, double* sums) {
  body<L, Op>(ptr, n, op, index0, key, sums);
}

template <class L, typename Op>
BodyFn<Op> select_body() {
#ifdef FT_HAVE_X86_DISPATCH
  switch (cpu::active_isa()) {
    case cpu::Isa::kAvx512:
      return &body_avx512<L, Op>;
    case cpu::Isa::kAvx2:
      return &body_avx2<L, Op>;
    default:
      break;
  }
#endif
  return &body_baseline<L, Op>;
}

// One pass of Op over every element of `work`; returns each tensor's Op::kSums sums (2 per tensor) when
// Op::kSums > 0 (Note [deterministic per-tensor sums on the CPU]).
template <class L, typename Op>
std::vector<double> pass(const Work& work, const Op& op) {
  constexpr int N = Op::depth + 1;
  const size_t n = work.size();
  const std::vector<int64_t> offset = cpu::cumulative(work, [](int64_t numel) { return numel; });
  const int64_t total = offset[n];
  std::vector<double> sums(2 * n, 0.0);
  if (total == 0) return sums;
  // The pieces of every block, in order: (tensor, lo, hi).
  struct Piece {
    size_t tensor;
    int64_t lo, hi;
  };
  const int64_t blocks = (total + kBlock - 1) / kBlock;
  std::vector<Piece> pieces;
  std::vector<size_t> first(static_cast<size_t>(blocks) + 1, 0);
  {
    size_t i = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      first[b] = pieces.size();
      const int64_t begin = b * kBlock, end = std::min(total, begin + kBlock);
      while (offset[i + 1] <= begin) ++i;
      for (size_t j = i; j < n && offset[j] < end; ++j) {
        const int64_t lo = std::max(begin, offset[j]) - offset[j], hi = std::min(end, offset[j + 1]) - offset[j];
        if (hi > lo) pieces.push_back({j, lo, hi});
      }
    }
    first[blocks] = pieces.size();
  }
  std::vector<double> partial(Op::kSums > 0 ? 2 * pieces.size() : 0, 0.0);
  const BodyFn<Op> loop = select_body<L, Op>();
  const uint64_t seed = L::kStochastic ? read_seed(work.scalars) : 0;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    cpu::Rebound<Op> rebound(op);
    for (size_t k = first[b0]; k < first[b1]; ++k) {
      const Piece& pc = pieces[k];
      const size_t i = pc.tensor;
      void* piece[N];
      piece[0] = static_cast<typename L::P*>(work.ptr[i][0]) + pc.lo;
      piece[1] = static_cast<typename L::G*>(work.ptr[i][1]) + pc.lo;
      for (int j = 2; j < Op::depth; ++j) piece[j] = static_cast<typename L::St*>(work.ptr[i][j]) + pc.lo;
      piece[Op::depth] = L::kCopy ? static_cast<typename L::O*>(work.ptr[i][Op::depth]) + pc.lo : nullptr;
      const uint32_t key = L::kStochastic ? rounding::tensor_key(seed, work.ordinal[i]) : 0u;
      double s[2];
      loop(piece, pc.hi - pc.lo, rebound.for_tensor(work, i), pc.lo, key, s);
      if constexpr (Op::kSums > 0) {
        partial[2 * k] = s[0];
        partial[2 * k + 1] = s[1];
      }
    }
  });
  if constexpr (Op::kSums > 0) {
    for (size_t k = 0; k < pieces.size(); ++k) {
      sums[2 * pieces[k].tensor] += partial[2 * k];
      sums[2 * pieces[k].tensor + 1] += partial[2 * k + 1];
    }
  }
  return sums;
}

struct Backend : cpu::Backend {
  using Generic = cpu::Backend;  // the element-wise driver (host::run_rule), whose apply this one hides

  template <class L, typename Op, typename Fin>
  static void reduce(const Work& work, const Op& op, const Fin& fin, Work& out) {
    finish(work, pass<L>(work, op), fin, out);
  }

  // Each tensor's two sums (added across shards first, when the work list says so) through the finisher into
  // out.aux; also for the 8-bit block walks' sums (trust_quant_cpu.h).
  template <typename Fin>
  static void finish(const Work& work, std::vector<double> sums, const Fin& fin, Work& out) {
    std::vector<int64_t> numel = work.numel;
    if (work.reduce_across) {  // Note [sums across shards] (work.h): the whole tensors' sums and sizes
      const int64_t n = static_cast<int64_t>(work.size());
      at::Tensor rows = at::empty({n, 3}, at::TensorOptions().dtype(at::kDouble));
      double* r = rows.data_ptr<double>();
      for (int64_t i = 0; i < n; ++i) {
        r[3 * i] = sums[2 * i];
        r[3 * i + 1] = sums[2 * i + 1];
        r[3 * i + 2] = static_cast<double>(numel[i]);
      }
      work.reduce_across(rows, work.ordinal);
      r = rows.data_ptr<double>();
      for (int64_t i = 0; i < n; ++i) {
        sums[2 * i] = r[3 * i];
        sums[2 * i + 1] = r[3 * i + 1];
        numel[i] = static_cast<int64_t>(r[3 * i + 2]);
      }
    }
    // the values as float64 scalars in memory, as on CUDA (Note [wide device scalars] in work.h)
    at::Tensor values = at::zeros({static_cast<int64_t>(2 * work.size())}, at::TensorOptions().dtype(at::kDouble));
    double* v = values.data_ptr<double>();
    out.keep_alive.push_back(values);
    out.aux.resize(work.size());
    for (size_t i = 0; i < work.size(); ++i) {
      const math::Bound b = bound_for(work.scalars, work.step[i], work.aux.empty() ? nullptr : work.aux[i].data());
      fin(&sums[2 * i], numel[i], b, v + 2 * i);
      out.aux[i] = {Scalar::wide(v + 2 * i), Scalar::wide(v + 2 * i + 1)};
    }
  }

  template <class L, typename Op>
  static void apply(const Work& work, const Op& op) {
    pass<L>(work, op);
  }
};

}  // namespace trust_cpu
}  // namespace fusedtrain
