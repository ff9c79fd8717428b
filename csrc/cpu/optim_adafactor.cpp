// CPU driver of fusedtrain::adafactor_ (Note [Adafactor passes] in csrc/include/fusedtrain/adafactor.h):
// three sweeps over one parameter, split into fixed row ranges, one per thread; every partial sum is a
// double per range, combined in range order.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "fusedtrain/adafactor.h"

namespace fusedtrain {
namespace cpu {
namespace {

using adafactor::Scalars;

// [0, n) in k nearly equal ranges; range r is [lo(r), lo(r + 1)).
struct Ranges {
  int64_t n, k;
  int64_t lo(int64_t r) const { return n * r / k; }
};

Ranges ranges_for(int64_t n, int64_t work_per_item) {
  constexpr int64_t kMinWork = 1 << 15;  // elements per range below which threads cost more than they give
  const int64_t by_work = std::max<int64_t>(1, n * work_per_item / kMinWork);
  return Ranges{n, std::max<int64_t>(1, std::min<int64_t>({n, static_cast<int64_t>(at::get_num_threads()), by_work}))};
}

template <typename F>
void for_ranges(const Ranges& r, F&& f) {
  if (r.k == 1) return f(int64_t(0));
  at::parallel_for(0, r.k, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) f(i);
  });
}

double sum(const std::vector<double>& v) {
  double acc = 0.0;
  for (double x : v) acc += x;
  return acc;
}

// alpha / denom of torch's step: alpha = max(eps2, ||p|| / sqrt(numel)) * rho, denom = max(1, ||u|| /
// (sqrt(numel) d)), the norms rounded to S as torch's .norm() returns them, the rest in double (Python).
// Python's max(a, b) keeps a unless b > a (a NaN b gives a).
template <typename S>
double step_size(double p_sq, double u_sq, int64_t numel, double eps2, double rho, double d) {
  using T = at::opmath_type<S>;
  const double root = std::sqrt(static_cast<double>(numel));
  const double p_rms = static_cast<double>(adafactor::rnd<S>(static_cast<T>(std::sqrt(p_sq)))) / root;
  const double alpha = (p_rms > eps2 ? p_rms : eps2) * rho;
  const double ratio = static_cast<double>(adafactor::rnd<S>(static_cast<T>(std::sqrt(u_sq)))) / (root * d);
  const double denom = ratio > 1.0 ? ratio : 1.0;
  return -alpha / denom;
}

template <typename S>
void factored(S* p, const S* g, S* row_var, S* col_var, int64_t batches, int64_t m, int64_t n, const Scalars& s,
              double eps2, double rho, double d) {
  using T = at::opmath_type<S>;
  using adafactor::rnd;
  const T inv = T(s.inv_scale), coef = T(s.clip_coef), sign = T(s.sign);
  const int64_t rows = batches * m;
  const Ranges rr = ranges_for(rows, n);
  // Pass 1: squared row sums, per-range squared column sums, squared norm of p.
  std::vector<double> row_sq(rows), p_sq(rr.k, 0.0);
  std::vector<std::vector<double>> col_sq(rr.k);
  for_ranges(rr, [&](int64_t k) {
    const int64_t r0 = rr.lo(k), r1 = rr.lo(k + 1);
    if (r0 == r1) return;
    const int64_t b0 = r0 / m, b1 = (r1 - 1) / m;
    std::vector<double>& col = col_sq[k];
    col.assign((b1 - b0 + 1) * n, 0.0);
    double pk = 0.0;
    for (int64_t r = r0; r < r1; ++r) {
      const S* gr = g + r * n;
      const S* pr = p + r * n;
      double* cb = col.data() + (r / m - b0) * n;
      double acc = 0.0, pacc = 0.0;
      // (omp simd: the sums may be split into SIMD lanes, a fixed order: deterministic, and vectorized;
      // without it GCC keeps an in-order floating-point reduction scalar)
#pragma omp simd reduction(+ : acc, pacc)
      for (int64_t j = 0; j < n; ++j) {
        const double x = static_cast<double>(adafactor::grad<S, T>(gr[j], inv, coef, sign));
        acc += x * x;
        cb[j] += x * x;
        const double y = static_cast<double>(static_cast<T>(pr[j]));
        pacc += y * y;
      }
      row_sq[r] = acc;
      pk += pacc;
    }
    p_sq[k] = pk;
  });
  // The factors (small): torch's vector_norm -> square_ -> div_, lerp_, then R = clamp(mean(row_var), eps1).
  std::vector<double> col_total(batches * n, 0.0);
  for (int64_t k = 0; k < rr.k; ++k) {
    const int64_t r0 = rr.lo(k), r1 = rr.lo(k + 1);
    if (r0 == r1) continue;
    const int64_t b0 = r0 / m;
    for (size_t i = 0; i < col_sq[k].size(); ++i) col_total[b0 * n + static_cast<int64_t>(i)] += col_sq[k][i];
  }
  const T w = T(s.one_minus_beta2);
  auto mean_sq = [&](double sq, int64_t count) {
    const T norm = rnd<S>(static_cast<T>(std::sqrt(sq)));
    return rnd<S>(rnd<S>(norm * norm) / T(count));
  };
  for (int64_t r = 0; r < rows; ++r) {
    row_var[r] = static_cast<S>(math::lerp(static_cast<T>(row_var[r]), mean_sq(row_sq[r], n), w));
  }
  for (int64_t c = 0; c < batches * n; ++c) {
    col_var[c] = static_cast<S>(math::lerp(static_cast<T>(col_var[c]), mean_sq(col_total[c], m), w));
  }
  std::vector<T> row_mean(batches);
  for (int64_t b = 0; b < batches; ++b) {
    double acc = 0.0;
    for (int64_t i = 0; i < m; ++i) acc += static_cast<double>(static_cast<T>(row_var[b * m + i]));
    row_mean[b] = rnd<S>(adafactor::clamp_min(rnd<S>(static_cast<T>(acc / static_cast<double>(m))), T(s.eps1)));
  }
  const T eps1_sq = T(s.eps1_sq);
  // Pass 2: the squared norm of the update.
  std::vector<double> u_sq(rr.k, 0.0);
  for_ranges(rr, [&](int64_t k) {
    double acc = 0.0;
    const int64_t r0 = rr.lo(k), r1 = rr.lo(k + 1);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / m;
      const T rv = static_cast<T>(row_var[r]), rm = row_mean[b];
      const S* gr = g + r * n;
      const S* cv = col_var + b * n;
      double racc = 0.0;
#pragma omp simd reduction(+ : racc)
      for (int64_t j = 0; j < n; ++j) {
        const T v = adafactor::factored_estimate<S>(rv, static_cast<T>(cv[j]), rm);
        const T u = adafactor::update<S>(v, adafactor::grad<S, T>(gr[j], inv, coef, sign), eps1_sq);
        racc += static_cast<double>(u) * static_cast<double>(u);
      }
      acc += racc;
    }
    u_sq[k] = acc;
  });
  const T step = T(step_size<S>(sum(p_sq), sum(u_sq), rows * n, eps2, rho, d));
  const T decay = T(s.decay);
  // Pass 3: the update.
  for_ranges(rr, [&](int64_t k) {
    const int64_t r0 = rr.lo(k), r1 = rr.lo(k + 1);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / m;
      const T rv = static_cast<T>(row_var[r]), rm = row_mean[b];
      const S* gr = g + r * n;
      const S* cv = col_var + b * n;
      S* pr = p + r * n;
      for (int64_t j = 0; j < n; ++j) {
        const T v = adafactor::factored_estimate<S>(rv, static_cast<T>(cv[j]), rm);
        const T u = adafactor::update<S>(v, adafactor::grad<S, T>(gr[j], inv, coef, sign), eps1_sq);
        pr[j] = static_cast<S>(adafactor::apply<S>(static_cast<T>(pr[j]), u, decay, step));
      }
    }
  });
}

template <typename S>
void unfactored(S* p, const S* g, S* variance, int64_t numel, const Scalars& s, double eps2, double rho, double d) {
  using T = at::opmath_type<S>;
  using adafactor::rnd;
  const T inv = T(s.inv_scale), coef = T(s.clip_coef), sign = T(s.sign), w = T(s.one_minus_beta2);
  const T eps1_sq = T(s.eps1_sq);
  const Ranges rr = ranges_for(numel, 1);
  std::vector<double> p_sq(rr.k, 0.0), u_sq(rr.k, 0.0);
  // Pass 1 (p's norm, before the decay) and pass 2 (variance.lerp_(g*g), the update's norm) in one sweep:
  // the variance does not depend on p.
  for_ranges(rr, [&](int64_t k) {
    double pacc = 0.0, uacc = 0.0;
    const int64_t i0 = rr.lo(k), i1 = rr.lo(k + 1);  // (hoisted: the stores could alias rr)
#pragma omp simd reduction(+ : pacc, uacc)
    for (int64_t i = i0; i < i1; ++i) {
      const double y = static_cast<double>(static_cast<T>(p[i]));
      pacc += y * y;
      const T x = adafactor::grad<S, T>(g[i], inv, coef, sign);
      const T v = rnd<S>(math::lerp(static_cast<T>(variance[i]), rnd<S>(x * x), w));
      variance[i] = static_cast<S>(v);
      const T u = adafactor::update<S>(v, x, eps1_sq);
      uacc += static_cast<double>(u) * static_cast<double>(u);
    }
    p_sq[k] = pacc;
    u_sq[k] = uacc;
  });
  const T step = T(step_size<S>(sum(p_sq), sum(u_sq), numel, eps2, rho, d));
  const T decay = T(s.decay);
  for_ranges(rr, [&](int64_t k) {
    const int64_t i0 = rr.lo(k), i1 = rr.lo(k + 1);  // (hoisted: the stores could alias rr)
    for (int64_t i = i0; i < i1; ++i) {
      const T x = adafactor::grad<S, T>(g[i], inv, coef, sign);
      const T u = adafactor::update<S>(static_cast<T>(variance[i]), x, eps1_sq);
      p[i] = static_cast<S>(adafactor::apply<S>(static_cast<T>(p[i]), u, decay, step));
    }
  });
}

// A contiguous tensor to work on, and the original to copy it back into afterwards when they differ.
struct Dense {
  at::Tensor original, work;
  explicit Dense(const at::Tensor& t) : original(t), work(t.contiguous()) {}
  void finish() {
    if (!work.is_same(original)) original.copy_(work);
  }
};

void adafactor_cpu(const at::Tensor& param, const at::Tensor& grad, const std::optional<at::Tensor>& row_var,
                   const std::optional<at::Tensor>& col_var, const std::optional<at::Tensor>& variance,
                   double one_minus_beta2, double eps1, double eps2, double rho, double decay, bool apply_decay,
                   double d, bool maximize, double inv_scale, double clip_coef) {
  TORCH_CHECK(param.device().is_cpu() && grad.device().is_cpu(), "fusedtrain.adafactor_: CPU tensors expected");
  TORCH_CHECK(at::isFloatingType(param.scalar_type()) && grad.scalar_type() == param.scalar_type() &&
                  grad.sizes() == param.sizes(),
              "fusedtrain.adafactor_: param and grad must be floating tensors of one dtype and shape (got ",
              param.scalar_type(), " ", param.sizes(), " and ", grad.scalar_type(), " ", grad.sizes(), ")");
  TORCH_CHECK(param.numel() > 0, "fusedtrain.adafactor_: an empty parameter has no RMS (torch.optim.Adafactor "
              "divides by zero on it too)");
  const bool is_factored = param.dim() > 1;
  auto check_state = [&](const std::optional<at::Tensor>& t, const char* name, std::vector<int64_t> shape) {
    TORCH_CHECK(t.has_value() && t->defined() && t->scalar_type() == param.scalar_type() && t->device().is_cpu() &&
                    t->sizes() == c10::IntArrayRef(shape),
                "fusedtrain.adafactor_: ", name, " must be a ", param.scalar_type(), " tensor of shape ", shape);
  };
  // without weight decay torch skips the multiplication; by exactly 1 it changes nothing either
  const Scalars s{one_minus_beta2, eps1, eps1 * eps1, apply_decay ? decay : 1.0, inv_scale, clip_coef,
                  maximize ? -1.0 : 1.0};
  Dense p(param);
  const at::Tensor g = grad.contiguous();
  if (is_factored) {
    std::vector<int64_t> row_shape = param.sizes().vec(), col_shape = param.sizes().vec();
    row_shape.back() = 1;
    col_shape[col_shape.size() - 2] = 1;
    check_state(row_var, "row_var", row_shape);
    check_state(col_var, "col_var", col_shape);
    const int64_t n = param.size(-1), m = param.size(-2);
    const int64_t batches = param.numel() / (m * n);
    Dense r(*row_var), c(*col_var);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "adafactor_cpu", [&] {
      factored<scalar_t>(p.work.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), r.work.data_ptr<scalar_t>(),
                         c.work.data_ptr<scalar_t>(), batches, m, n, s, eps2, rho, d);
    });
    r.finish();
    c.finish();
  } else {
    check_state(variance, "variance", param.sizes().vec());
    Dense v(*variance);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "adafactor_cpu", [&] {
      unfactored<scalar_t>(p.work.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), v.work.data_ptr<scalar_t>(),
                           param.numel(), s, eps2, rho, d);
    });
    v.finish();
  }
  p.finish();
}

}  // namespace
}  // namespace cpu
}  // namespace fusedtrain

TORCH_LIBRARY_IMPL(fusedtrain, CPU, m) { m.impl("adafactor_", &fusedtrain::cpu::adafactor_cpu); }
