// CPU driver of the fused softmax cross-entropy (Note [fused cross-entropy] in cross_entropy.h): the loss and
// the gradient of the logits in one forward pass over each row, and the backward scale.
//
// Note [CPU cross-entropy loop]:
// at::parallel_for hands whole rows to the threads. Each row is read three times while it sits in L1/L2 (one
// row of 8192 float32 logits is 32 KB): (1) the maximum, (2) e = exp(x - m) stored into the gradient row
// itself (float32) or a per-thread scratch row (the other dtypes, so that e is not rounded), with its sum and,
// with label smoothing, the sum of x - m, (3) the gradient from e. One exp per logit (torch's log_softmax +
// nll + log_softmax_backward take two, and four passes over memory). Sums and maxima run in kLanes fixed
// partials combined in a fixed tree, so a row's bits do not depend on the ISA copy (Note [CPU SIMD dispatch]
// in cpu_driver.h; FMA contraction is off in the build) nor on the thread count; the row losses are added in
// row order in double. Targets are checked (and the non-ignored ones counted, for 'mean') before any row is
// computed, so a bad target throws before anything is written.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "fusedtrain/cpu_isa_run.h"
#include "fusedtrain/cross_entropy.h"
#include "fusedtrain/cross_entropy_host.h"

namespace fusedtrain {
namespace cpu {
namespace {

#define FT_AI_XE inline __attribute__((always_inline))

constexpr int kLanes = 16;             // fixed partials per row reduction (two AVX-512 or four AVX2 vectors)
constexpr int64_t kGrainElems = 1 << 15;  // elements per parallel_for grain (whole rows)

template <typename A>
FT_AI_XE A tree_sum(A* v) {
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) v[l] = v[l] + v[l + w];
  return v[0];
}

template <typename A>
FT_AI_XE A tree_max(A* v) {
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) v[l] = v[l + w] > v[l] ? v[l + w] : v[l];
  return v[0];
}

template <typename S>
struct RowsKernel {
  using A = at::opmath_type<S>;

  // Rows [r0, r1): loss[r] and, when grad is not null, grad[r, :]. w: the weight of a non-ignored row.
  static FT_AI_XE void run(const S* x, int64_t stride, const int64_t* target, int64_t C, int64_t r0, int64_t r1,
                           int64_t ignore_index, A eps, A w, S* grad, A* loss, A* scratch) {
    const A classes = static_cast<A>(C);
    const A inv_classes = A(1) / classes;
    const int64_t body = C / kLanes * kLanes;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = target[r];
      S* g = grad != nullptr ? grad + r * C : nullptr;
      if (t == ignore_index) {
        loss[r] = A(0);
        if (g != nullptr) std::fill(g, g + C, S(0));
        continue;
      }
      const S* __restrict__ xr = x + r * stride;
      // (1) the maximum
      A mx[kLanes];
      for (int l = 0; l < kLanes; ++l) mx[l] = -std::numeric_limits<A>::infinity();
      for (int64_t c = 0; c < body; c += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const A v = static_cast<A>(xr[c + l]);
          mx[l] = v > mx[l] ? v : mx[l];
        }
      }
      for (int64_t c = body; c < C; ++c) {
        const A v = static_cast<A>(xr[c]);
        mx[c - body] = v > mx[c - body] ? v : mx[c - body];
      }
      const A m = tree_max(mx);
      // (2) e = exp(x - m), its sum and (smoothing) the sum of x - m
      A* e = std::is_same_v<S, A> && g != nullptr ? reinterpret_cast<A*>(g) : scratch;
      A sum[kLanes], sum_d[kLanes];
      for (int l = 0; l < kLanes; ++l) sum[l] = sum_d[l] = A(0);
      if (eps != A(0)) {
#pragma GCC ivdep
        for (int64_t c = 0; c < body; c += kLanes) {
          for (int l = 0; l < kLanes; ++l) {
            const A d = static_cast<A>(xr[c + l]) - m;
            const A v = xent::exp_shifted(d);
            e[c + l] = v;
            sum[l] += v;
            sum_d[l] += d;
          }
        }
      } else {
#pragma GCC ivdep
        for (int64_t c = 0; c < body; c += kLanes) {
          for (int l = 0; l < kLanes; ++l) {
            const A v = xent::exp_shifted(static_cast<A>(xr[c + l]) - m);
            e[c + l] = v;
            sum[l] += v;
          }
        }
      }
      for (int64_t c = body; c < C; ++c) {
        const A d = static_cast<A>(xr[c]) - m;
        const A v = xent::exp_shifted(d);
        e[c] = v;
        sum[c - body] += v;
        sum_d[c - body] += d;
      }
      const A s = tree_sum(sum);
      const A log_s = std::log(s);
      loss[r] = xent::row_loss(log_s, static_cast<A>(xr[t]) - m, tree_sum(sum_d), eps, classes);
      if (g == nullptr) continue;
      // (3) the gradient; the target's element from its saved e (the loop has overwritten e with g for float32)
      const xent::Coef<A> k = xent::coef(w, s, eps, inv_classes);
      const A et = e[t];
      // e and g are the same memory for float32: element c reads e[c] and then writes g[c], nothing else
#pragma GCC ivdep
      for (int64_t c = 0; c < C; ++c) g[c] = static_cast<S>(xent::grad(e[c], k, A(0)));
      g[t] = static_cast<S>(xent::grad(et, k, k.hit));
    }
  }
};

template <typename S>
struct ScaleKernel {
  using A = at::opmath_type<S>;
  // out[r, :] = grad[r, :] * go[r or 0] for rows [r0, r1).
  static FT_AI_XE void run(const S* grad, const A* go, bool per_row, int64_t C, int64_t r0, int64_t r1, S* out) {
    for (int64_t r = r0; r < r1; ++r) {
      const A f = go[per_row ? r : 0];
      const S* __restrict__ g = grad + r * C;
      S* __restrict__ o = out + r * C;
      for (int64_t c = 0; c < C; ++c) o[c] = static_cast<S>(xent::scale(static_cast<A>(g[c]), f));
    }
  }
};


// The number of non-ignored targets; throws on the first target outside [0, C) that is not ignore_index.
int64_t count_targets(const at::Tensor& target, int64_t classes, int64_t ignore_index) {
  const int64_t* t = target.const_data_ptr<int64_t>();
  int64_t count = 0;
  for (int64_t r = 0; r < target.numel(); ++r) {
    if (t[r] == ignore_index) continue;
    TORCH_CHECK(t[r] >= 0 && t[r] < classes, "fusedtrain.cross_entropy: target ", t[r], " (row ", r,
                ") is out of bounds: targets must lie in [0, ", classes, ") or equal ignore_index (", ignore_index,
                ")");
    ++count;
  }
  return count;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_cpu(const at::Tensor& input, const at::Tensor& target,
                                                     double label_smoothing, int64_t ignore_index,
                                                     c10::string_view reduction, bool compute_grad) {
  const host::CrossEntropyArgs a =
      host::prepare_cross_entropy(input, target, label_smoothing, std::string(reduction));
  const int64_t N = a.n, C = a.classes;
  const int64_t count = count_targets(a.target, C, ignore_index);
  const at::ScalarType acc = host::loss_dtype(input.scalar_type());
  at::Tensor rows = at::empty({N}, input.options().dtype(acc));
  at::Tensor grad = compute_grad ? at::empty({N, C}, input.options().memory_format(at::MemoryFormat::Contiguous))
                                 : at::empty({0}, input.options());
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fusedtrain_cross_entropy_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* xp = a.x.const_data_ptr<scalar_t>();
    const int64_t* tp = a.target.const_data_ptr<int64_t>();
    scalar_t* gp = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    A* lp = rows.data_ptr<A>();
    const A eps = static_cast<A>(label_smoothing);
    const A w = xent::row_weight<A>(a.reduction, count);
    const bool need_scratch = !(std::is_same_v<scalar_t, A> && compute_grad);
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(C, 1));
    at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
      std::vector<A> scratch(need_scratch ? static_cast<size_t>(C) : 0);
      run_on_isa<RowsKernel<scalar_t>>(xp, a.row_stride, tp, C, r0, r1, ignore_index, eps, w, gp, lp, scratch.data());
    });
    if (a.reduction == xent::kNone) {
      loss = rows;
    } else {
      double total = 0.0;  // in row order: independent of the thread count
      for (int64_t r = 0; r < N; ++r) total += static_cast<double>(lp[r]);
      // 'mean' divides by the count of non-ignored rows: 0 / 0 = nan when there are none, as torch
      const double value = a.reduction == xent::kMean ? total / static_cast<double>(count) : total;
      loss = at::full({}, value, rows.options());
    }
  });
  return std::make_tuple(loss, grad);
}

at::Tensor cross_entropy_backward_cpu(const at::Tensor& grad, const at::Tensor& grad_output) {
  host::check_cross_entropy_backward(grad, grad_output);
  const int64_t N = grad.size(0), C = grad.size(1);
  at::Tensor out = at::empty_like(grad, at::MemoryFormat::Contiguous);
  if (grad.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "fusedtrain_xent_backward_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const at::Tensor go = grad_output.to(c10::CppTypeToScalarType<A>::value).contiguous();
    const A* gop = go.const_data_ptr<A>();
    const bool per_row = grad_output.numel() != 1;  // 'none': one value per row
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kGrainElems / C);
    at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
      run_on_isa<ScaleKernel<scalar_t>>(gp, gop, per_row, C, r0, r1, op);
    });
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace fusedtrain

TORCH_LIBRARY_IMPL(fusedtrain, CPU, m) {
  m.impl("cross_entropy", &fusedtrain::cpu::cross_entropy_cpu);
  m.impl("cross_entropy_backward", &fusedtrain::cpu::cross_entropy_backward_cpu);
}
