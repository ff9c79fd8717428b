// The optimizer rules as the host sees them: name, hyperparameters, state lists and how to build the
// per-element functor of math.h from them.
//
// Note [optimizer rules]:
// A rule is everything a fused update needs beyond what every update shares (the learning rate, the
// gradient's unscale / clip factors, the L1 term, the fused EMA, the storage layouts; see the step_ op in
// ops.cpp). It declares:
//   kName            the name the step_ op and the plan take ("adam", ...);
//   kHyper           its hyperparameters, in the order of the op's `hyper` list (flags as 0/1);
//   kCountsSteps     whether it keeps per-tensor step counters (state_steps);
//   kMixedPrecision  whether the master-weight / low-precision-state layouts and the fused EMA apply;
//   states(hyper)    the state lists, in register order after (param, grad), for the hyperparameters given
//                    (optional states, e.g. amsgrad's max_exp_avg_sqs, appear only when switched on);
//   make<T>(hyper, common, launch)   builds the functor in opmath type T and calls launch(op).
// A new optimizer is one functor in math.h, one rule here, one translation unit per backend that
// registers it (cpu/optim_<rule>.cpp, cuda/optim_<rule>.cu) and a thin Python class: nothing else names
// its hyperparameters, and the Python side reads kHyper (fusedtrain._C.rules()) to build the list.
// Optionally:
//   kAux / advance   tensor scalars (Note [tensor scalars]);
//   template <class Backend> static void run(const host::RunArgs&)   a rule that needs more than one
//                    element-wise pass (per-tensor norms, factored moments) brings its own backend function,
//                    which RegisterRule registers instead of the generic one (optim_host.h).
//
// Note [tensor scalars]:
// Some rules keep one-element state tensors per parameter besides the element-wise states and the step
// counter, updated every step from values that the element-wise pass then uses: NAdam's mu_product (the
// running product of its momentum coefficients, accumulated in the tensor's dtype as torch does), ASGD's
// eta and mu (the step size and averaging weight of the *previous* step, recomputed after each update). A
// rule declares their names in kAux (up to two; torch's state keys, as the op's aux_states lists) and
//   template <class Round> FT_HD static void advance(const double* hyper, double step, double lr,
//                                                    double* stored, double* bound, Round round);
// which, for one parameter at its new step count, updates `stored` (the tensors' values; round(k, x) rounds
// x to tensor k's dtype, float32 or float64, so that a product accumulates as torch's in-place multiply
// does) and sets the two values the functor's bind() receives as Bound::aux0 / aux1. The host runs it per
// tensor (CPU step counters), or a one-thread-per-tensor CUDA kernel does (counters on the device; a skip
// by found_inf leaves the tensors alone), before the element-wise pass.
#pragma once

#include <array>
#include <vector>

#include "fusedtrain/math.h"

namespace fusedtrain {
namespace rules {

// What every rule's functor takes besides its own hyperparameters.
struct Common {
  double l1 = 0.0;  // the L1 coefficient: l1*sign(p) added to the gradient (GradPrescale)
};

using Names = std::vector<const char*>;

// Rounds a tensor scalar's new value to its storage dtype (Note [tensor scalars]).
struct AuxRound {
  bool single[2] = {true, true};  // tensor k is float32 (else float64)
  FT_HD double operator()(int k, double x) const { return single[k] ? static_cast<double>(static_cast<float>(x)) : x; }
};

template <typename T>
FT_HD T flag(double x) {
  return x != 0.0 ? T(1) : T(0);
}

struct Sgd {
  static constexpr const char* kName = "sgd";
  enum { kMomentum, kDampening, kWeightDecay, kNesterov, kMaximize, kFirstStep };
  static constexpr std::array<const char*, 6> kHyper{"momentum", "dampening", "weight_decay", "nesterov",
                                                     "maximize", "first_step"};
  static constexpr bool kCountsSteps = false;
  static constexpr bool kMixedPrecision = true;
  static Names states(const double* h) { return h[kMomentum] != 0.0 ? Names{"momentum_buffers"} : Names{}; }

  template <typename T, typename Launch>
  static void make(const double* h, const Common& c, Launch&& launch) {
    auto go = [&](auto op) {
      op.momentum = T(h[kMomentum]);
      op.one_minus_dampening = T(1.0 - h[kDampening]);
      op.weight_decay = T(h[kWeightDecay]);
      op.nesterov = flag<T>(h[kNesterov]);
      op.maximize = flag<T>(h[kMaximize]);
      op.first_step = flag<T>(h[kFirstStep]);
      op.l1 = T(c.l1);
      launch(op);
    };
    if (h[kMomentum] != 0.0) go(math::SgdOp<T, true>{});
    else go(math::SgdOp<T, false>{});
  }
};

struct Adagrad {
  static constexpr const char* kName = "adagrad";
  enum { kLrDecay, kWeightDecay, kEps, kMaximize };
  static constexpr std::array<const char*, 4> kHyper{"lr_decay", "weight_decay", "eps", "maximize"};
  static constexpr bool kCountsSteps = true;
  static constexpr bool kMixedPrecision = true;
  static Names states(const double*) { return {"state_sums"}; }

  template <typename T, typename Launch>
  static void make(const double* h, const Common& c, Launch&& launch) {
    math::AdagradOp<T> op{};
    op.lr_decay = h[kLrDecay];
    op.weight_decay = T(h[kWeightDecay]);
    op.eps = T(h[kEps]);
    op.maximize = flag<T>(h[kMaximize]);
    op.l1 = T(c.l1);
    launch(op);
  }
};

struct Rmsprop {
  static constexpr const char* kName = "rmsprop";
  enum { kAlpha, kEps, kWeightDecay, kMomentum, kCentered, kMaximize };
  static constexpr std::array<const char*, 6> kHyper{"alpha", "eps", "weight_decay", "momentum", "centered",
                                                     "maximize"};
  static constexpr bool kCountsSteps = true;  // torch keeps the count; the rule does not use it
  static constexpr bool kMixedPrecision = true;
  static Names states(const double* h) {
    Names s{"square_avgs"};
    if (h[kCentered] != 0.0) s.push_back("grad_avgs");
    if (h[kMomentum] > 0.0) s.push_back("momentum_buffers");
    return s;
  }

  template <typename T, typename Launch>
  static void make(const double* h, const Common& c, Launch&& launch) {
    auto go = [&](auto op) {
      op.alpha = T(h[kAlpha]);
      op.one_minus_alpha = T(1.0 - h[kAlpha]);
      op.eps = T(h[kEps]);
      op.weight_decay = T(h[kWeightDecay]);
      op.momentum = T(h[kMomentum]);
      op.maximize = flag<T>(h[kMaximize]);
      op.l1 = T(c.l1);
      launch(op);
    };
    const bool centered = h[kCentered] != 0.0, momentum = h[kMomentum] > 0.0;
    if (centered && momentum) go(math::RmspropOp<T, true, true>{});
    else if (centered) go(math::RmspropOp<T, true, false>{});
    else if (momentum) go(math::RmspropOp<T, false, true>{});
    else go(math::RmspropOp<T, false, false>{});
  }
};

struct Adam {
  static constexpr const char* kName = "adam";
  enum { kBeta1, kBeta2, kEps, kWeightDecay, kAmsgrad, kMaximize, kDecoupled };
  static constexpr std::array<const char*, 7> kHyper{"beta1", "beta2", "eps", "weight_decay", "amsgrad", "maximize",
                                                     "decoupled_weight_decay"};
  static constexpr bool kCountsSteps = true;
  static constexpr bool kMixedPrecision = true;
  static Names states(const double* h) {
    return h[kAmsgrad] != 0.0 ? Names{"exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"} : Names{"exp_avgs", "exp_avg_sqs"};
  }

  template <typename T, typename Launch>
  static void make(const double* h, const Common& c, Launch&& launch) {
    const bool decoupled = h[kDecoupled] != 0.0;
    auto go = [&](auto op) {
      op.beta1_d = h[kBeta1];
      op.beta2_d = h[kBeta2];
      op.decoupled_wd = decoupled ? h[kWeightDecay] : 0.0;
      op.beta2 = T(h[kBeta2]);
      op.one_minus_beta1 = T(1.0 - h[kBeta1]);
      op.one_minus_beta2 = T(1.0 - h[kBeta2]);
      op.eps = T(h[kEps]);
      op.coupled_wd = T(decoupled ? 0.0 : h[kWeightDecay]);
      op.maximize = flag<T>(h[kMaximize]);
      op.l1 = T(c.l1);
      launch(op);
    };
    if (h[kAmsgrad] != 0.0) go(math::AdamOp<T, true>{});
    else go(math::AdamOp<T, false>{});
  }
};

struct Nadam {
  static constexpr const char* kName = "nadam";
  enum { kBeta1, kBeta2, kEps, kWeightDecay, kMomentumDecay, kMaximize, kDecoupled };
  static constexpr std::array<const char*, 7> kHyper{"beta1", "beta2", "eps", "weight_decay", "momentum_decay",
                                                     "maximize", "decoupled_weight_decay"};
  static constexpr std::array<const char*, 1> kAux{"mu_product"};
  static constexpr bool kCountsSteps = true;
  static constexpr bool kMixedPrecision = true;
  static Names states(const double*) { return {"exp_avgs", "exp_avg_sqs"}; }

  // mu_product *= mu_t, in the tensor's dtype (torch multiplies a float32 tensor by mu rounded to float32)
  template <class Round>
  FT_HD static void advance(const double* h, double step, double, double* stored, double* bound, Round round) {
    const double mu = h[kBeta1] * (1.0 - 0.5 * ::pow(0.96, step * h[kMomentumDecay]));
    stored[0] = round(0, stored[0] * round(0, mu));
    bound[0] = stored[0];
  }

  template <typename T, typename Launch>
  static void make(const double* h, const Common& c, Launch&& launch) {
    const bool decoupled = h[kDecoupled] != 0.0;
    math::NadamOp<T> op{};
    op.beta1_d = h[kBeta1];
    op.beta2_d = h[kBeta2];
    op.momentum_decay = h[kMomentumDecay];
    op.decoupled_wd = decoupled ? h[kWeightDecay] : 0.0;
    op.beta2 = T(h[kBeta2]);
    op.one_minus_beta1 = T(1.0 - h[kBeta1]);
    op.one_minus_beta2 = T(1.0 - h[kBeta2]);
    op.eps = T(h[kEps]);
    op.coupled_wd = T(decoupled ? 0.0 : h[kWeightDecay]);
    op.maximize = flag<T>(h[kMaximize]);
    op.l1 = T(c.l1);
    launch(op);
  }
};

// Moving average of weights: "params" are the averages, "grads" the model's parameters (read only), and
// the weight comes with the call's ema_weight (a host value or, captured, device memory).
struct Ema {
  static constexpr const char* kName = "ema";
  static constexpr std::array<const char*, 0> kHyper{};
  static constexpr bool kCountsSteps = false;
  static constexpr bool kMixedPrecision = false;
  static Names states(const double*) { return {}; }

  template <typename T, typename Launch>
  static void make(const double*, const Common&, Launch&& launch) {
    launch(math::EmaOp<T>{});
  }
};

}  // namespace rules
}  // namespace fusedtrain
