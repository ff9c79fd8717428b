// The 'muon_momentum8bit' rule (Note [Muon's 8-bit momentum] in rules_muon_quant.h) on the CPU block driver.
#include "fusedtrain/quant_cpu.h"
#include "fusedtrain/rules_muon_quant.h"

FUSEDTRAIN_REGISTER_RULE(cpu, MuonMomentum8bit, c10::kCPU)
