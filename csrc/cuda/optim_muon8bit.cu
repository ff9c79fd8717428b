// The 'muon_momentum8bit' rule (Note [Muon's 8-bit momentum] in rules_muon_quant.h) on the CUDA block driver.
#include "fusedtrain/quant_cuda.cuh"
#include "fusedtrain/rules_muon_quant.h"

FUSEDTRAIN_REGISTER_RULE(cuda, MuonMomentum8bit, c10::kCUDA)
