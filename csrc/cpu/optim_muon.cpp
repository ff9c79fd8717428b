// Muon's element-wise rules (rules_muon.h) on the CPU driver.
#include "fusedtrain/cpu_driver.h"
#include "fusedtrain/optim_host.h"
#include "fusedtrain/rules_muon.h"

FUSEDTRAIN_REGISTER_RULE(cpu, MuonMomentum, c10::kCPU)
FUSEDTRAIN_REGISTER_RULE(cpu, MuonUpdate, c10::kCPU)
