// Adam / AdamW with 4-bit blockwise-quantized states (Note [4-bit optimizer states] in quant4.h): the
// float rule's functor and hyperparameters (rules.h) on the 4-bit block drivers (quant4_cpu.h,
// quant4_cuda.cuh), as the 8-bit rules run on theirs (Note [quantized rules] in rules_quant.h).
#pragma once

#include <string_view>
#include <vector>

#include "fusedtrain/quant4.h"
#include "fusedtrain/rules_quant.h"

namespace fusedtrain {
namespace quant {

// The 4-bit block driver of a backend (specialized in quant4_cpu.h and quant4_cuda.cuh), with Driver's
// signature: template <class L, typename Op> static void apply(const Work&, const Op&, const Forms&).
template <class Backend>
struct Driver4;

}  // namespace quant

namespace rules {

// exp_avg signed; exp_avg_sq (and amsgrad's max_exp_avg_sq) through their square roots, unsigned.
struct Adam4bit : Adam {
  using Float = Adam;
  static constexpr const char* kName = "adam4bit";
  static quant::Signs signed_states(const double*) { return {true, false, false}; }
  static Names states(const double* h) {
    Names out;
    for (const char* name : Adam::states(h)) {
      const std::string_view s(name);
      out.push_back(name);
      out.push_back(s == "exp_avgs" ? "exp_avgs_absmax4" : (s == "exp_avg_sqs" ? "exp_avg_sqs_absmax4"
                                                                                 : "max_exp_avg_sqs_absmax4"));
    }
    return out;
  }
  static std::vector<int> state_kinds(const double* h) {
    const quant::Signs s = signed_states(h);
    std::vector<int> out;
    for (size_t k = 0; k < Adam::states(h).size(); ++k) {
      out.push_back(s[k] ? quant::kSignedNibbles : quant::kUnsignedNibbles);
      out.push_back(quant::kScales4);
    }
    return out;
  }
  template <class Backend>
  static void run(const host::RunArgs& a) {
    quant::run_quantized<Backend, Adam4bit, quant::Driver4>(a);
  }
};

}  // namespace rules
}  // namespace fusedtrain
