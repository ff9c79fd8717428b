// Schedule-Free AdamW with an 8-bit second moment (Note [quantized rules] in rules_quant.h): the float rule's
// functor and hyperparameters (rules_beyond.h: SfAdamwOp, the group scalars computed on the host, Note [group
// scalars on the host]) on the 8-bit block drivers, with z float and exp_avg_sq as uint8 codes of its square root
// (Note [square-root states]) in row blocks. z stays as the float rule keeps it (Note [mixed state lists]): it is
// the optimization iterate itself, y is an interpolation toward it and x (what is evaluated and saved) its
// running average, so a requantization error in z would move the model by up to half a code step of the block's
// largest |z| every step, where a second moment's error only perturbs the step size. Included only by
// cpu/optim_sf8bit.cpp and cuda/optim_sf8bit.cu.
#pragma once

#include "fusedtrain/rules_beyond.h"
#include "fusedtrain/rules_quant.h"

namespace fusedtrain {
namespace rules {

struct SfAdamw8bit : Quantized<SfAdamw8bit, SfAdamw> {
  static constexpr const char* kName = "sf_adamw8bit";
  // z float, exp_avg_sq unsigned codes
  static quant::Forms state_forms(const double*) {
    return quant::Forms({quant::Form::kFloat, quant::Form::kUnsigned, quant::Form::kUnsigned});
  }
};

}  // namespace rules
}  // namespace fusedtrain
