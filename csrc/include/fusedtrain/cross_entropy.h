// Per-row and per-element formulas of the fused softmax cross-entropy (label smoothing, ignore_index),
// shared by the CPU driver (cpu/cross_entropy.cpp) and the CUDA driver (cuda/cross_entropy.cu).
//
// Note [fused cross-entropy]:
// For a row x of C logits with target t and smoothing eps, torch's F.cross_entropy (class indices, no weight) is
//     nll    = -log_softmax(x)[t]                 = log(s) - (x[t] - m)
//     smooth = -sum_c log_softmax(x)[c]           = C * log(s) - sum_c (x[c] - m)
//     loss   = (1 - eps) * nll + (eps / C) * smooth      (just nll when eps == 0, as torch takes that branch)
// with m = max_c x[c] and s = sum_c exp(x[c] - m); rows whose target is ignore_index contribute 0. The
// reduction sums the rows ('sum'), divides the sum by the number of non-ignored rows ('mean': 0 / 0 = nan when
// every target is ignored, as torch), or returns them ('none'). The gradient of the reduced loss is
//     d loss / d x[c] = w * (softmax(x)[c] - eps / C - (1 - eps) [c == t])
// with w = 1 / count ('mean'), 1 ('sum', 'none'), 0 (an ignored row). The forward pass computes it in the same
// pass over the row (max, then exp / sum, then the gradient), for a grad_output of 1, and keeps it instead of
// log_softmax (the same memory); the backward pass is grad * grad_output (per row for 'none'). Every value is
// computed in the opmath type A (float for float32 / float16 / bfloat16 inputs, double for float64) and the
// gradient rounded once to the input's dtype.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "fusedtrain/math.h"  // FT_HD

namespace fusedtrain {
namespace xent {

enum Reduction : int { kNone = 0, kMean = 1, kSum = 2 };

// exp(d) for d = x - max <= 0 (or NaN). float on the host: Cephes' expf (range reduction by ln 2 in two parts,
// degree-6 polynomial, 2^n by exponent bits), ~1 ulp, written as straight-line arithmetic and selects so that the
// CPU loops vectorize (libm's expf is a call per element). d < ln(FLT_MIN) returns 0 (the true value is a
// denormal, < 1.2e-38, and d = -inf, a masked logit, must give exactly 0). On the device: expf.
FT_HD float exp_shifted(float d) {
#if defined(__CUDA_ARCH__)
  return ::expf(d);
#else
  constexpr float kMin = -87.33654475f;  // log(FLT_MIN)
  const float x = d < kMin ? kMin : d;   // NaN passes through (the comparison is false)
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (exact for |x / ln 2| < 2^22; no rounding-mode call)
  const float fx = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - fx * 0.693359375f) - fx * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;  // 2^n, n in [-126, 0]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return d < kMin ? 0.0f : y * scale;
#endif
}

FT_HD double exp_shifted(double d) { return ::exp(d); }

// The row's gradient coefficients: g[c] = grad(e[c], k, hit), e = exp(x[c] - m), hit = (1 - eps) * w at the
// target and 0 elsewhere.
template <typename A>
struct Coef {
  A p_scale;  // w / s: softmax times w
  A smooth;   // w * eps / C
  A hit;      // w * (1 - eps)
};

template <typename A>
FT_HD Coef<A> coef(A w, A s, A eps, A inv_classes) {
  return Coef<A>{w / s, w * (eps * inv_classes), w * (A(1) - eps)};
}

template <typename A>
FT_HD A grad(A e, const Coef<A>& k, A hit) {
  return e * k.p_scale - k.smooth - hit;
}

// The row's loss from its log-sum-exp parts (Note [fused cross-entropy]): log_s = log(s), xt = x[t] - m,
// sum_d = sum_c (x[c] - m) (read only when eps != 0), classes = C.
template <typename A>
FT_HD A row_loss(A log_s, A xt, A sum_d, A eps, A classes) {
  const A nll = log_s - xt;
  if (eps == A(0)) return nll;
  const A smooth = classes * log_s - sum_d;
  return (A(1) - eps) * nll + (eps / classes) * smooth;
}

// The weight w of a non-ignored row: 1 / count for 'mean', 1 otherwise.
template <typename A>
FT_HD A row_weight(int reduction, int64_t count) {
  return reduction == kMean ? A(1) / static_cast<A>(count) : A(1);
}

// The backward pass: the kept gradient times grad_output (Note [fused cross-entropy]).
template <typename A>
FT_HD A scale(A g, A grad_output) {
  return g * grad_output;
}

}  // namespace xent
}  // namespace fusedtrain
