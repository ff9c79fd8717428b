// The 'adamax' rule on the CPU driver. One translation unit per rule, so that ninja builds them in parallel.
#include "fusedtrain/cpu_driver.h"
#include "fusedtrain/optim_host.h"
#include "fusedtrain/rules_torch_rest.h"

FUSEDTRAIN_REGISTER_RULE(cpu, Adamax, c10::kCPU)
