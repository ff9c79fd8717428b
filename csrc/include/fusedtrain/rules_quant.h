// Rules with 8-bit blockwise-quantized states (Note [8-bit optimizer states] in quant.h): the same
// per-element functors and hyperparameters as their float rules (rules.h), with each state list replaced
// by a pair (codes, absmax) (Note [quantized state lists] in optim_host.h).
//
// Note [quantized rules]:
// A quantized rule Self derives from rules::Quantized<Self, FloatRule>, which inherits the float rule (kHyper,
// kCountsSteps, make<T>: the update is the same functor), and declares
//   kName                 "<rule>8bit";
//   signed_states(hyper)  per element-wise state of the float rule, whether it can be negative (int8 codes,
//                         the signed map) or is a second moment (uint8 codes of its square root on the
//                         unsigned map, Note [square-root states]); or state_forms(hyper), which may also
//                         keep a state float (Note [mixed state lists]).
// Quantized derives the rest from those:
//   states / state_kinds  from the float rule's states: "<name>" (codes) then "<name>_absmax" (a float state:
//                         "<name>" alone);
//   run<Backend>          run_quantized: instantiates the functor for the layout, as run_rule does, and
//                         hands it to the backend's block driver, quant::Driver<Backend> (quant_cpu.h,
//                         quant_cuda.cuh), which processes whole blocks: dequantize, update, requantize.
// Note [square-root states]:
// The unsigned states of these rules are second moments (Adam's exp_avg_sq and max_exp_avg_sq, Adagrad's
// sum, RMSprop's square_avg), which the updates use as sqrt(state) next to a first moment or gradient of
// about the same relative size: a value v relative to its block's max is about the square of its first
// moment's. Quantized directly, v would reach the map's floor (1e-7 relative, code 0) while its first moment
// is still representable (down to 1e-6), and m / (sqrt(0) + eps) throws the parameter far (seen on a digits
// MLP: weights of rarely active input pixels moved by 8 where float32 states moved them by 0.02). So
// unsigned codes hold sqrt(state): absmax is the block's max of sqrt(state), and the state reads as
// (map[code] * absmax)^2 (float32). sqrt(v) then spans the decades of the first moment, and 8 bits give it
// the relative precision the update's denominator needs.
//
// Layouts: uniform parameters of any floating dtype (opmath registers, bfloat16 optionally with
// stochastic rounding) and master weights (float32 masters, float16/bfloat16 copies). EMA averages are
// not fused (the optimizer leaves them to the EMA's own pass).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <array>
#include <string>
#include <type_traits>
#include <vector>

#include "fusedtrain/optim_host.h"
#include "fusedtrain/quant.h"
#include "fusedtrain/rounding.h"
#include "fusedtrain/rules.h"

namespace fusedtrain {
namespace quant {

// Up to three states per rule; lists of one tuple: param, grad, the states' lists (Note [mixed state lists]),
// then the master weights' copy.
constexpr int kMaxStates = 3;
using Signs = std::array<bool, kMaxStates>;

// Note [mixed state lists]:
// What each state of a quantized rule is in the block drivers: int8 codes on the signed map, uint8 codes of its
// square root on the unsigned map (Note [square-root states]), or a float state the rule keeps as its float rule
// keeps it (a rule's state_forms(hyper); Schedule-Free AdamW's z, the optimization iterate itself, whose every
// update must survive: rules_sf_quant.h). A float state is of the layout's state type St (the parameter's dtype;
// float32 beside master weights), of the parameter's shape, as in the float rule. The lists of a tuple are
// param, grad, then per state in the rule's order: one list for a float state (its values), two for a quantized
// one (codes, absmax), then the master weights' copy; so state s starts at list 2 + s + (quantized states
// before s) (Forms::list), the copy at Forms::list(S). Rules whose states are all quantized declare
// signed_states() (a Signs converts to these Forms) and keep the layout (codes, absmax) per state. In a block,
// the drivers copy a float state into the block buffer (opmath type), run the functor with the quantized
// states, and store it back (plain rounding to St, as the float drivers store states; no absmax, no codes),
// in the same pass. Row blocks of 8 bits only: the 4-bit drivers refuse float states.
enum class Form : uint8_t { kUnsigned, kSigned, kFloat };

struct Forms {
  std::array<Form, kMaxStates> form{};  // (all unsigned codes by default)
  Forms() = default;
  // Every state quantized: signed codes where s[k], else unsigned (the rules of signed_states()).
  Forms(const Signs& s) {  // NOLINT(google-explicit-constructor): the all-quantized rules pass their Signs
    for (int k = 0; k < kMaxStates; ++k) form[k] = s[k] ? Form::kSigned : Form::kUnsigned;
  }
  explicit Forms(const std::array<Form, kMaxStates>& f) : form(f) {}
  bool is_float(int s) const { return form[s] == Form::kFloat; }
  bool is_signed(int s) const { return form[s] == Form::kSigned; }
  // The first list of state s in a tuple (for s = the number of states: the master weights' copy).
  int list(int s) const {
    int l = 2;
    for (int k = 0; k < s; ++k) l += is_float(k) ? 1 : 2;
    return l;
  }
  // For the CUDA kernels: bit s set = state s signed, bit 8 + s set = state s float (of S states).
  unsigned bits(int states) const {
    unsigned b = 0;
    for (int k = 0; k < states; ++k) b |= (is_signed(k) ? 1u << k : 0u) | (is_float(k) ? 1u << (8 + k) : 0u);
    return b;
  }
};

// The block driver of a backend (specialized in quant_cpu.h and quant_cuda.cuh):
//   template <class L, typename Op> static void apply(const Work&, const Op&, const Forms&);
template <class Backend>
struct Driver;

// A rule's Forms: its state_forms(hyper), or its signed_states(hyper) (every state quantized).
template <class R, class = void>
struct HasStateForms : std::false_type {};
template <class R>
struct HasStateForms<R, std::void_t<decltype(&R::state_forms)>> : std::true_type {};
template <class Rule>
Forms forms_of(const double* h) {
  if constexpr (HasStateForms<Rule>::value) {
    return Rule::state_forms(h);
  } else {
    return Forms(Rule::signed_states(h));
  }
}

// The state list names: per state of the float rule "<name>", then "<name>_absmax" unless it is float (fm).
template <class Float>
rules::Names quantized_names(const double* h, const Forms& fm = Forms()) {
  rules::Names out;
  // (Names hold string literals: every state list name of a quantized rule has its "_absmax" here.)
  static const char* const kAbsmax[] = {"exp_avgs_absmax",   "exp_avg_sqs_absmax", "max_exp_avg_sqs_absmax",
                                       "momentum_buffers_absmax", "state_sums_absmax", "square_avgs_absmax",
                                       "grad_avgs_absmax", "exp_infs_absmax", "acc_deltas_absmax"};
  int s = 0;
  for (const char* name : Float::states(h)) {
    out.push_back(name);
    if (fm.is_float(s++)) continue;
    const std::string want = std::string(name) + "_absmax";
    const char* found = nullptr;
    for (const char* a : kAbsmax) {
      if (want == a) found = a;
    }
    TORCH_CHECK(found != nullptr, "fusedtrain: no absmax list name for the quantized state '", name, "'");
    out.push_back(found);
  }
  return out;
}

template <class Rule>
std::vector<int> kinds_of(const double* h) {
  const int n = static_cast<int>(Rule::Float::states(h).size());
  const Forms fm = forms_of<Rule>(h);
  std::vector<int> out;
  for (int k = 0; k < n; ++k) {
    if (fm.is_float(k)) {
      out.push_back(kFloatState);
      continue;
    }
    out.push_back(fm.is_signed(k) ? kSignedCodes : kUnsignedCodes);
    out.push_back(kScales);
  }
  return out;
}

// Calls f(L{}) for the storage layout of a quantized call: uniform parameters of any floating dtype (bfloat16
// optionally with stochastic rounding), or float32 master weights with float16/bfloat16 copies.
template <class F>
void for_layout(const host::Precision& prec, F&& f) {
  if (prec.copies) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(prec.grad, "fusedtrain_quant_master", [&] {
      f(Layout<float, scalar_t, float, scalar_t, true, false>{});
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prec.param, "fusedtrain_quant", [&] {
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (prec.stochastic) return f(Uniform<scalar_t, true>{});
    }
    f(Uniform<scalar_t, false>{});
  });
}

// Note [quantized rules]: the functor of the float rule, for the call's layout, on the block driver
// (Drv: Driver for 8-bit states, Driver4 of rules_quant4.h for 4-bit ones).
template <class Backend, class Rule, template <class> class Drv = Driver>
void run_quantized(const host::RunArgs& a) {
  using Float = typename Rule::Float;
  const Forms fm = forms_of<Rule>(a.hyper);
  for_layout(a.prec, [&](auto layout) {
    using L = decltype(layout);
    using T = at::opmath_type<typename L::P>;
    Float::template make<T>(a.hyper, a.common,
                            [&](const auto& op) { Drv<Backend>::template apply<L>(a.work, op, fm); });
  });
}

}  // namespace quant

namespace rules {

// Note [quantized rules]: what a quantized rule Self takes from its float rule (hyperparameters, functor, tensor
// scalars, by inheritance) and what it derives from its own signed_states() / state_forms(): the state list names,
// their kinds and the backend function on the block driver. Self declares kName and its states' forms, and may
// bring its own run (the trust-ratio rules' two passes) or states (a refusal first).
template <class Self, class FloatRule>
struct Quantized : FloatRule {
  using Float = FloatRule;
  static Names states(const double* h) { return quant::quantized_names<FloatRule>(h, quant::forms_of<Self>(h)); }
  static std::vector<int> state_kinds(const double* h) { return quant::kinds_of<Self>(h); }
  template <class Backend>
  static void run(const host::RunArgs& a) {
    quant::run_quantized<Backend, Self>(a);
  }
};

// Adam / AdamW with 8-bit states: exp_avg signed, exp_avg_sq (and amsgrad's max_exp_avg_sq) unsigned.
struct Adam8bit : Quantized<Adam8bit, Adam> {
  static constexpr const char* kName = "adam8bit";
  static quant::Signs signed_states(const double*) { return {true, false, false}; }
};

// SGD with an 8-bit momentum buffer (signed); without momentum there is no state to quantize.
struct Sgd8bit : Quantized<Sgd8bit, Sgd> {
  static constexpr const char* kName = "sgd8bit";
  static quant::Signs signed_states(const double*) { return {true, false, false}; }
};

// Adagrad with an 8-bit sum of squares (unsigned).
struct Adagrad8bit : Quantized<Adagrad8bit, Adagrad> {
  static constexpr const char* kName = "adagrad8bit";
  static quant::Signs signed_states(const double*) { return {false, false, false}; }
};

// RMSprop with 8-bit states: square_avg unsigned; grad_avg (centered) and the momentum buffer signed.
struct Rmsprop8bit : Quantized<Rmsprop8bit, Rmsprop> {
  static constexpr const char* kName = "rmsprop8bit";
  static quant::Signs signed_states(const double* h) {
    quant::Signs s{false, false, false};
    int k = 1;
    if (h[kCentered] != 0.0) s[k++] = true;
    if (h[kMomentum] > 0.0) s[k++] = true;
    return s;
  }
};

}  // namespace rules
}  // namespace fusedtrain
