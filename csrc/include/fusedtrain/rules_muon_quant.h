// Muon's momentum pass with an 8-bit momentum buffer (Muon(state_bits=8)).
//
// Note [Muon's 8-bit momentum]:
// The float pass "muon_momentum" (rules_muon.h) updates the buffer in the parameter's slot and writes the
// Newton-Schulz input U as a state. The block drivers of quantized states (Note [quantized rules] in
// rules_quant.h) keep the states of a block in registers and the float tensor in slot 0, so the 8-bit pass
// "muon_momentum8bit" swaps the two: slot 0 is U (written, never read: the functor MuonMomentumOutOp assigns it
// without reading it), the state is the buffer, as int8 codes on the signed map with one absmax per row block
// (Note [row blocks] in quant.h; the buffer has the parameter's shape, so its blocks are the parameter's). U
// is written in the gradient's dtype (a uniform layout: slot 0 and the gradient share a dtype); Muon converts it
// to the Newton-Schulz dtype after, which rounds as the float pass's direct bfloat16 store does. The element
// arithmetic is the float pass's (MuonMomentumMath::momentum_step), with the buffer dequantized first.
#pragma once

#include "fusedtrain/rules_muon.h"
#include "fusedtrain/rules_quant.h"

namespace fusedtrain {
namespace rules {

// The float rule the quantized one derives from: muon_momentum's hyperparameters, the buffer as its one
// state (register 2), U in slot 0. Not registered: it only gives the quantized rule its functor and names.
struct MuonMomentumOut : MuonMomentum {
  static constexpr bool kMixedPrecision = false;
  static Names states(const double*) { return {"momentum_buffers"}; }

  template <typename T, typename Launch>
  static void make(const double* h, const Common&, Launch&& launch) {
    launch(MuonMomentum::op<math::MuonMomentumOutOp<T>>(h));
  }
};

struct MuonMomentum8bit : Quantized<MuonMomentum8bit, MuonMomentumOut> {
  static constexpr const char* kName = "muon_momentum8bit";
  static quant::Signs signed_states(const double*) { return {true, false, false}; }
};

}  // namespace rules
}  // namespace fusedtrain
