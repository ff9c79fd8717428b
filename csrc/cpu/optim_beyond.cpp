// The 'lion', 'sf_adamw' and 'sf_sgd' rules (rules_beyond.h) on the CPU driver.
#include "fusedtrain/cpu_driver.h"
#include "fusedtrain/optim_host.h"
#include "fusedtrain/rules_beyond.h"

FUSEDTRAIN_REGISTER_RULE(cpu, Lion, c10::kCPU)
FUSEDTRAIN_REGISTER_RULE(cpu, SfAdamw, c10::kCPU)
FUSEDTRAIN_REGISTER_RULE(cpu, SfSgd, c10::kCPU)
