// 8-bit variants (Note [quantized rules] in rules_quant.h) of the element-wise rules added after Adam, SGD,
// Adagrad and RMSprop: NAdam (rules.h), RAdam, Adamax, Adadelta (rules_torch_rest.h) and Lion
// (rules_beyond.h). Each derives from its float rule (same hyperparameters, functor and tensor scalars:
// NAdam's mu_product stays a float32 one-element state) and only says which of its states are signed.
// Non-negative states go through their square root like Adam's exp_avg_sq (Note [square-root states]):
// Adadelta's two running averages of squares are second moments; Adamax's exp_inf (a running max of |g|)
// is not, but stored the same way it keeps one format for every uint8 state (Python's quantize and
// dequantize read the map from the dtype alone), at a relative error no larger than its exp_avg's.
#pragma once

#include "fusedtrain/rules_beyond.h"
#include "fusedtrain/rules_quant.h"
#include "fusedtrain/rules_torch_rest.h"

namespace fusedtrain {
namespace rules {

#define FUSEDTRAIN_QUANTIZED_RULE(Name, FloatRule, name, ...)                   \
  struct Name : Quantized<Name, FloatRule> {                                   \
    static constexpr const char* kName = name;                                 \
    static quant::Signs signed_states(const double*) { return {__VA_ARGS__}; } \
  };

// exp_avg signed, exp_avg_sq unsigned
FUSEDTRAIN_QUANTIZED_RULE(Nadam8bit, Nadam, "nadam8bit", true, false, false)
FUSEDTRAIN_QUANTIZED_RULE(Radam8bit, Radam, "radam8bit", true, false, false)
// exp_avg signed, exp_inf unsigned
FUSEDTRAIN_QUANTIZED_RULE(Adamax8bit, Adamax, "adamax8bit", true, false, false)
// square_avg and acc_delta unsigned
FUSEDTRAIN_QUANTIZED_RULE(Adadelta8bit, Adadelta, "adadelta8bit", false, false, false)
// exp_avg signed
FUSEDTRAIN_QUANTIZED_RULE(Lion8bit, Lion, "lion8bit", true, false, false)

#undef FUSEDTRAIN_QUANTIZED_RULE

}  // namespace rules
}  // namespace fusedtrain
