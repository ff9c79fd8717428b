// CUDA driver of fusedtrain::adafactor_ (Note [Adafactor passes] in csrc/include/fusedtrain/adafactor.h,
// whose per-element formulas it shares with the CPU driver; the checks, step counters and working copies
// are adafactor_host.h's).
//
// Note [Adafactor on CUDA]:
// The step counters are CPU tensors (torch.optim.Adafactor keeps them there), so beta2_t and rho_t are
// host values; everything else stays on the device: no host synchronisation inside the op. Per tensor, in
// stream order:
//   factored (batches slices of m x n):
//     1. rows:   one warp per row: sum(g^2) and sum(p^2) of the row (double, lanes strided, a shuffle
//                tree); row_var updated, the row's sum(p^2) kept;
//     2. cols:   one thread per column of a slice, down its m rows (the warp reads adjacent columns, so the
//                loads coalesce); col_var updated;
//     3. slices: one block per slice: R = mean(row_var) (clamped at eps1), from the updated row_var;
//     4. unorm:  one warp per row: sum(u^2) of the row, u recomputed from the factors;
//     5. finish: one block: the per-row sums added in a fixed order, then the step size -alpha/denom;
//     6. apply:  element-wise, reading the step size from the device.
//   unfactored (0-D / 1-D): one pass over a fixed grid updates the variance and makes per-block partial
//   sums of p^2 and u^2; then 5. and 6.
// Every sum has an order fixed by the shape (no atomics): results are deterministic, and equal to the CPU
// driver's up to the order of the double sums (ulps of the parameter's dtype after rounding).
// Pass 2 reads g a second time; a tensor with few, very long columns (m >> n) has little parallelism in
// it (batches * n threads). One set of launches per tensor: the host cost grows with the tensor count
// (torch's for-loop makes ~19 launches per tensor).
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "fusedtrain/adafactor.h"
#include "fusedtrain/adafactor_host.h"

namespace fusedtrain {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGrid = 1 << 16;    // blocks per launch at most (grid-stride loops cover the rest)
constexpr int64_t kVectorGrid = 1024;    // blocks of the unfactored pass (and its partial sums)

// One tensor of the call: its data, its workspace and the step's scalars.
template <typename S>
struct Slot {
  using T = at::opmath_type<S>;
  S* p;
  const S* g;
  S* row;  // factored: row_var (rows), col_var (batches * n)
  S* col;
  S* var;  // unfactored: variance (numel)
  double* p_terms;  // factored: per row; unfactored: per block
  double* u_terms;
  double* rmean;  // factored: R per slice (a value of T)
  double* step;   // the step size -alpha/denom, written by finish
  int64_t numel, rows, m, n;  // factored: rows = batches * m; unfactored: m = n = 0
  T w, inv, coef, sign, eps1, eps1_sq, decay;
  double rho, eps2, d;
};

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;  // complete in lane 0
}

// The block's sum of v in a fixed order (complete in every thread); `shared` holds kThreads doubles and may
// be reused after a __syncthreads().
__device__ __forceinline__ double block_sum(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  return shared[0];
}

template <typename S>
__device__ __forceinline__ at::opmath_type<S> grad_of(const Slot<S>& a, S g) {
  return adafactor::grad<S, at::opmath_type<S>>(g, a.inv, a.coef, a.sign);
}

// 1. row sums (one warp per row).
template <typename S>
__global__ void __launch_bounds__(kThreads) factored_rows(const Slot<S> a) {
  using T = at::opmath_type<S>;
  const int lane = threadIdx.x & 31;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; r < a.rows;
       r += static_cast<int64_t>(gridDim.x) * kWarps) {
    const S* gr = a.g + r * a.n;
    const S* pr = a.p + r * a.n;
    double gx = 0.0, px = 0.0;
    for (int64_t j = lane; j < a.n; j += 32) {
      const double x = static_cast<double>(grad_of(a, gr[j]));
      const double y = static_cast<double>(static_cast<T>(pr[j]));
      gx += x * x;
      px += y * y;
    }
    gx = warp_sum(gx);
    px = warp_sum(px);
    if (lane == 0) {
      a.row[r] = static_cast<S>(math::lerp(static_cast<T>(a.row[r]), adafactor::mean_square<S, T>(gx, a.n), a.w));
      a.p_terms[r] = px;
    }
  }
}

// 2. column sums (one thread per column of a slice).
template <typename S>
__global__ void __launch_bounds__(kThreads) factored_cols(const Slot<S> a) {
  using T = at::opmath_type<S>;
  const int64_t columns = (a.rows / a.m) * a.n;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; k < columns;
       k += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t b = k / a.n, j = k - b * a.n;
    const S* gc = a.g + b * a.m * a.n + j;
    double gx = 0.0;
    for (int64_t i = 0; i < a.m; ++i) {
      const double x = static_cast<double>(grad_of(a, gc[i * a.n]));
      gx += x * x;
    }
    a.col[k] = static_cast<S>(math::lerp(static_cast<T>(a.col[k]), adafactor::mean_square<S, T>(gx, a.m), a.w));
  }
}

// 3. R of every slice (one block per slice).
template <typename S>
__global__ void __launch_bounds__(kThreads) slice_means(const Slot<S> a) {
  using T = at::opmath_type<S>;
  __shared__ double shared[kThreads];
  const int64_t batches = a.rows / a.m;
  for (int64_t b = blockIdx.x; b < batches; b += gridDim.x) {
    double acc = 0.0;
    const S* rv = a.row + b * a.m;
    for (int64_t i = threadIdx.x; i < a.m; i += kThreads) acc += static_cast<double>(static_cast<T>(rv[i]));
    acc = block_sum(acc, shared);
    if (threadIdx.x == 0) a.rmean[b] = static_cast<double>(adafactor::row_mean<S, T>(acc, a.m, a.eps1));
    __syncthreads();  // every thread has read shared[0] before the next slice writes it
  }
}

// 4. the update's squared norm per row (one warp per row).
template <typename S>
__global__ void __launch_bounds__(kThreads) factored_update_norm(const Slot<S> a) {
  using T = at::opmath_type<S>;
  const int lane = threadIdx.x & 31;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; r < a.rows;
       r += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t b = r / a.m;
    const T rv = static_cast<T>(a.row[r]), rm = static_cast<T>(a.rmean[b]);
    const S* gr = a.g + r * a.n;
    const S* cv = a.col + b * a.n;
    double ux = 0.0;
    for (int64_t j = lane; j < a.n; j += 32) {
      const T v = adafactor::factored_estimate<S>(rv, static_cast<T>(cv[j]), rm);
      const double u = static_cast<double>(adafactor::update<S>(v, grad_of(a, gr[j]), a.eps1_sq));
      ux += u * u;
    }
    ux = warp_sum(ux);
    if (lane == 0) a.u_terms[r] = ux;
  }
}

// 1. (unfactored) variance update and the partial sums of p^2 and u^2 of each block.
template <typename S>
__global__ void __launch_bounds__(kThreads) vector_sums(const Slot<S> a) {
  using T = at::opmath_type<S>;
  __shared__ double shared[kThreads];
  double px = 0.0, ux = 0.0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < a.numel;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const double y = static_cast<double>(static_cast<T>(a.p[i]));
    px += y * y;
    const T x = grad_of(a, a.g[i]);
    const T v = adafactor::rnd<S>(math::lerp(static_cast<T>(a.var[i]), adafactor::rnd<S>(x * x), a.w));
    a.var[i] = static_cast<S>(v);
    const double u = static_cast<double>(adafactor::update<S>(v, x, a.eps1_sq));
    ux += u * u;
  }
  const double p_block = block_sum(px, shared);
  __syncthreads();
  const double u_block = block_sum(ux, shared);
  if (threadIdx.x == 0) {
    a.p_terms[blockIdx.x] = p_block;
    a.u_terms[blockIdx.x] = u_block;
  }
}

// 5. the tensor's squared norms from its `count` terms, and the step size.
template <typename S>
__global__ void __launch_bounds__(kThreads) finish(const Slot<S> a, int64_t count) {
  using T = at::opmath_type<S>;
  __shared__ double shared[kThreads];
  double px = 0.0, ux = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) {
    px += a.p_terms[i];
    ux += a.u_terms[i];
  }
  const double p_sq = block_sum(px, shared);
  __syncthreads();
  const double u_sq = block_sum(ux, shared);
  if (threadIdx.x == 0) *a.step = adafactor::step_size<S, T>(p_sq, u_sq, a.numel, a.eps2, a.rho, a.d);
}

// 6. p <- p * decay + step * u.
template <typename S, bool kFactored>
__global__ void __launch_bounds__(kThreads) apply(const Slot<S> a) {
  using T = at::opmath_type<S>;
  const T step = static_cast<T>(*a.step);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < a.numel;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    T v;
    if constexpr (kFactored) {
      const int64_t r = i / a.n, j = i - r * a.n, b = r / a.m;
      v = adafactor::factored_estimate<S>(static_cast<T>(a.row[r]), static_cast<T>(a.col[b * a.n + j]),
                                          static_cast<T>(a.rmean[b]));
    } else {
      v = static_cast<T>(a.var[i]);
    }
    const T u = adafactor::update<S>(v, grad_of(a, a.g[i]), a.eps1_sq);
    a.p[i] = static_cast<S>(adafactor::apply<S>(static_cast<T>(a.p[i]), u, a.decay, step));
  }
}

unsigned grid_for(int64_t units, int64_t per_block) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(kMaxGrid, (units + per_block - 1) / per_block)));
}

template <typename S>
struct Driver {
  static void run(adafactor::Lists& l, const adafactor::Scalars& s);
};

template <typename S>
void Driver<S>::run(adafactor::Lists& l, const adafactor::Scalars& s) {
  using T = at::opmath_type<S>;
  const size_t np = l.params.size();
  // The workspace (doubles): factored: p and u terms per row, R per slice, the step; unfactored: p and u
  // terms per block of the fixed grid, the step.
  std::vector<int64_t> offset(np + 1, 0);
  for (size_t i = 0; i < np; ++i) {
    const at::Tensor& p = l.params[i].work;
    int64_t need = 1;
    if (p.dim() > 1) {
      const int64_t rows = p.numel() / p.size(-1);
      need += 2 * rows + rows / p.size(-2);
    } else {
      need += 2 * kVectorGrid;
    }
    offset[i + 1] = offset[i] + need;
  }
  at::Tensor workspace = at::empty({offset[np]}, l.params[0].work.options().dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  size_t fi = 0, ui = 0;
  for (size_t i = 0; i < np; ++i) {
    const at::Tensor& p = l.params[i].work;
    Slot<S> a{};
    a.p = p.data_ptr<S>();
    a.g = l.grads[i].data_ptr<S>();
    a.numel = p.numel();
    a.w = T(adafactor::one_minus_beta2(s.steps[i], s.beta2_decay));
    a.rho = adafactor::rho(s.steps[i], s.lr);
    a.inv = T(s.inv_scale);
    a.coef = T(s.clip_coef);
    a.sign = T(s.sign);
    a.eps1 = T(s.eps1);
    a.eps1_sq = T(s.eps1 * s.eps1);
    a.decay = T(s.decay);
    a.eps2 = s.eps2;
    a.d = s.d;
    double* ws = workspace.data_ptr<double>() + offset[i];
    a.step = ws;
    if (p.dim() > 1) {
      a.row = l.rows[fi].work.data_ptr<S>();
      a.col = l.cols[fi].work.data_ptr<S>();
      ++fi;
      a.n = p.size(-1);
      a.m = p.size(-2);
      a.rows = a.numel / a.n;
      a.p_terms = ws + 1;
      a.u_terms = a.p_terms + a.rows;
      a.rmean = a.u_terms + a.rows;
      const int64_t batches = a.rows / a.m;
      factored_rows<S><<<grid_for(a.rows, kWarps), kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      factored_cols<S><<<grid_for(batches * a.n, kThreads), kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      slice_means<S><<<grid_for(batches, 1), kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      factored_update_norm<S><<<grid_for(a.rows, kWarps), kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      finish<S><<<1, kThreads, 0, stream>>>(a, a.rows);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      apply<S, true><<<grid_for(a.numel, kThreads), kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      a.var = l.vars[ui++].work.data_ptr<S>();
      a.p_terms = ws + 1;
      a.u_terms = a.p_terms + kVectorGrid;
      // a fixed grid (not one sized by the device), so the partial sums do not depend on the card
      const unsigned grid = static_cast<unsigned>(std::min<int64_t>(kVectorGrid, (a.numel + kThreads - 1) / kThreads));
      vector_sums<S><<<grid, kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      finish<S><<<1, kThreads, 0, stream>>>(a, grid);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      apply<S, false><<<grid_for(a.numel, kThreads), kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

void adafactor_cuda(at::TensorList params, at::TensorList grads, at::TensorList row_vars, at::TensorList col_vars,
                    at::TensorList variances, at::TensorList state_steps, double beta2_decay, double eps1,
                    double eps2, double lr, double decay, bool apply_decay, double d, bool maximize,
                    double inv_scale, double clip_coef, bool check_only) {
  adafactor::op<Driver>(params, grads, row_vars, col_vars, variances, state_steps, beta2_decay, eps1, eps2, lr, decay,
                        apply_decay, d, maximize, inv_scale, clip_coef, check_only, c10::DeviceType::CUDA);
}

}  // namespace
}  // namespace cuda
}  // namespace fusedtrain

TORCH_LIBRARY_IMPL(fusedtrain, CUDA, m) { m.impl("adafactor_", &fusedtrain::cuda::adafactor_cuda); }
