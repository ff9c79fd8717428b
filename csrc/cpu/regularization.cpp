// CPU driver of the regularization penalty (Note [penalty convention] in regularization.h).
//
// Note [CPU penalty reduction]:
// All tensors of the call are cut into fixed pieces of kPiece elements (a piece never crosses two
// tensors); each piece is summed with kLanes independent accumulators per sum (so the loop vectorizes
// without reassociation flags), the pieces run in one at::parallel_for region, and their partial sums
// are added in piece order at the end. The split does not depend on the thread count, so the value is
// reproducible. The backward pass is the shared multi-tensor driver (cpu_driver.h) with PenaltyGradOp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fusedtrain/cpu_driver.h"
#include "fusedtrain/cpu_isa.h"
#include "fusedtrain/dropout_host.h"
#include "fusedtrain/optim_host.h"
#include "fusedtrain/regularization.h"

namespace fusedtrain {
namespace cpu {
namespace {

#define FT_AI_REG inline __attribute__((always_inline))

// 64 accumulators per sum: with 16, GCC unrolls the lane loop completely and then vectorizes the outer
// loop with 16-way permutes (12x slower, NOTES.md); 64 keeps the lane loop a vectorizable loop.
constexpr int kLanes = 64;
constexpr int64_t kPiece = 1 << 15;

// out[0] = sum |x|, out[1] = sum x^2 over x[0, n), in the opmath type T.
template <typename S, typename T>
FT_AI_REG void penalty_sums_body(const S* x, int64_t n, T* out) {
  T a[kLanes], q[kLanes];
  for (int l = 0; l < kLanes; ++l) a[l] = q[l] = T(0);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const T v = static_cast<T>(x[i + l]);
      a[l] += regularization::abs_term(v);
      q[l] += regularization::square_term(v);
    }
  }
  for (int l = 0; i + l < n; ++l) {
    const T v = static_cast<T>(x[i + l]);
    a[l] += regularization::abs_term(v);
    q[l] += regularization::square_term(v);
  }
  for (int w = kLanes / 2; w > 0; w /= 2) {  // pairwise, fixed order
    for (int l = 0; l < w; ++l) {
      a[l] += a[l + w];
      q[l] += q[l + w];
    }
  }
  out[0] = a[0];
  out[1] = q[0];
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FT_PENALTY_X86 1
template <typename S, typename T>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"))) void penalty_sums_avx512(const S* x,
                                                                                                    int64_t n, T* out) {
  penalty_sums_body<S, T>(x, n, out);
}
template <typename S, typename T>
__attribute__((target("avx2,fma,f16c"))) void penalty_sums_avx2(const S* x, int64_t n, T* out) {
  penalty_sums_body<S, T>(x, n, out);
}
#endif
template <typename S, typename T>
void penalty_sums_baseline(const S* x, int64_t n, T* out) {
  penalty_sums_body<S, T>(x, n, out);
}

template <typename S, typename T>
void penalty_sums(const S* x, int64_t n, T* out) {
#ifdef FT_PENALTY_X86
  switch (active_isa()) {
    case Isa::kAvx512:
      return penalty_sums_avx512<S, T>(x, n, out);
    case Isa::kAvx2:
      return penalty_sums_avx2<S, T>(x, n, out);
    default:
      break;
  }
#endif
  penalty_sums_baseline<S, T>(x, n, out);
}

at::Tensor penalty_cpu(at::TensorList params, double l1, double l2) {
  host::check_penalty_params("penalty", params);
  const at::ScalarType dtype = params[0].scalar_type();
  const at::ScalarType acc_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<at::Tensor> dense;
  struct Piece {
    size_t tensor;
    int64_t start, len;
  };
  std::vector<Piece> pieces;
  for (const at::Tensor& p : params) {
    if (p.numel() == 0) continue;
    dense.push_back(p.contiguous());
    for (int64_t s = 0; s < p.numel(); s += kPiece) {
      pieces.push_back({dense.size() - 1, s, std::min(kPiece, p.numel() - s)});
    }
  }
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusedtrain_penalty_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    std::vector<T> partial(2 * pieces.size());
    at::parallel_for(0, static_cast<int64_t>(pieces.size()), 4, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        const Piece& pc = pieces[k];
        penalty_sums<scalar_t, T>(dense[pc.tensor].const_data_ptr<scalar_t>() + pc.start, pc.len, &partial[2 * k]);
      }
    });
    T sum_abs = T(0), sum_sq = T(0);
    for (size_t k = 0; k < pieces.size(); ++k) {
      sum_abs += partial[2 * k];
      sum_sq += partial[2 * k + 1];
    }
    // A zero coefficient drops its term (so l1 = 0 with an infinite parameter gives inf, not NaN).
    T value = T(0);
    if (l1 != 0.0) value = value + static_cast<T>(l1) * sum_abs;
    if (l2 != 0.0) value = value + static_cast<T>(l2) * sum_sq;
    result = at::scalar_tensor(static_cast<double>(value), params[0].options().dtype(acc_dtype));
  });
  return result;
}

std::vector<at::Tensor> penalty_backward_cpu(at::TensorList params, const at::Tensor& grad, double l1, double l2) {
  host::check_penalty_params("penalty_backward", params);
  TORCH_CHECK(grad.numel() == 1, "fusedtrain.penalty_backward: grad must have one element (got ", grad.sizes(), ")");
  std::vector<at::Tensor> outs;
  outs.reserve(params.size());
  for (const at::Tensor& p : params) outs.push_back(at::empty(p.sizes(), p.options()));
  Work work = host::prepare({outs, params}, {});
  if (work.size() > 0) {
    const double scale = grad.item<double>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "fusedtrain_penalty_bwd_cpu",
                                    [&] {
                                      using T = at::opmath_type<scalar_t>;
                                      multi_tensor_apply<Uniform<scalar_t>>(
                                          work, regularization::PenaltyGradOp<T>{static_cast<T>(l1),
                                                                                 static_cast<T>(2.0 * l2),
                                                                                 static_cast<T>(scale)});
                                    });
    for (auto& [original, temp] : work.copy_back) original.copy_(temp);
  }
  return outs;
}

}  // namespace
}  // namespace cpu
}  // namespace fusedtrain

TORCH_LIBRARY_IMPL(fusedtrain, CPU, m) {
  m.impl("penalty", &fusedtrain::cpu::penalty_cpu);
  m.impl("penalty_backward", &fusedtrain::cpu::penalty_backward_cpu);
}
