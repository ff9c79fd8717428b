// The 'sgd8bit', 'adagrad8bit' and 'rmsprop8bit' rules (8-bit states, Note [quantized rules] in
// rules_quant.h) on the CPU block driver.
#include "fusedtrain/quant_cpu.h"

FUSEDTRAIN_REGISTER_RULE(cpu, Sgd8bit, c10::kCPU)
FUSEDTRAIN_REGISTER_RULE(cpu, Adagrad8bit, c10::kCPU)
FUSEDTRAIN_REGISTER_RULE(cpu, Rmsprop8bit, c10::kCPU)
