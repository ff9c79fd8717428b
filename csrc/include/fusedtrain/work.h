// The work list both multi-tensor drivers consume: for each tensor tuple (param, grad, states...),
// its base addresses and element count. Built by optim_host.h, which checks the tensors first.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <utility>
#include <vector>

namespace fusedtrain {

constexpr int kMaxDepth = 6;  // param, grad, up to three states and an EMA average per element

struct Work {
  c10::Device device{c10::kCPU};
  std::vector<std::array<void*, kMaxDepth>> ptr;  // ptr[i][k]: list k of tuple i
  std::vector<int64_t> numel;                     // elements of tuple i (> 0)
  std::vector<at::Tensor> keep_alive;             // contiguous temporaries (Note [dense tuples])
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;  // (original, temporary)

  size_t size() const { return numel.size(); }
};

}  // namespace fusedtrain
