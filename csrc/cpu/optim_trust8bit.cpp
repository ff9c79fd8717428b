// The 'lars8bit' and 'lamb8bit' rules (8-bit states, Note [quantized trust passes] in rules_trust_quant.h) on
// the CPU trust-ratio and block drivers.
#include "fusedtrain/trust_quant_cpu.h"

FUSEDTRAIN_REGISTER_RULE(trust_quant_cpu, Lars8bit, c10::kCPU)
FUSEDTRAIN_REGISTER_RULE(trust_quant_cpu, Lamb8bit, c10::kCPU)
