// The 'nadam' rule on the CPU driver. One translation unit per rule, so that ninja builds them in parallel.
#include "fusedtrain/cpu_driver.h"
#include "fusedtrain/optim_host.h"

FUSEDTRAIN_REGISTER_RULE(cpu, Nadam, c10::kCPU)
