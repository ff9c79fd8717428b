// Muon's element-wise rules (rules_muon.h) on the CUDA launcher.
#include "fusedtrain/cuda_launcher.cuh"
#include "fusedtrain/optim_host.h"
#include "fusedtrain/rules_muon.h"

FUSEDTRAIN_REGISTER_RULE(cuda, MuonMomentum, c10::kCUDA)
FUSEDTRAIN_REGISTER_RULE(cuda, MuonUpdate, c10::kCUDA)
