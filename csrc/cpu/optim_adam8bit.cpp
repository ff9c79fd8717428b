// The 'adam8bit' rule (8-bit states, Note [quantized rules] in rules_quant.h) on the CPU block driver.
#include "fusedtrain/quant_cpu.h"

FUSEDTRAIN_REGISTER_RULE(cpu, Adam8bit, c10::kCPU)
