// The CPU block format of the 4-bit rules (Note [4-bit optimizer states] in quant4.h): flat blocks of kBlock4
// elements and packed codes, run by quant_cpu.h's block walk (Note [quantized block formats]: the functor
// pass, the block scale, the per-ISA functions and the parallel split are the 8-bit driver's).
//
// Note [4-bit block loops]:
// Per block, every loop vectorizes (check with -fopt-info-vec-optimized on optim_adam4bit.cpp):
//  - unpack: the bytes' low and high nibbles into an int32 code per element (a strided store);
//  - decode: value = map[code] * absmax through the 16-entry table held in two vector registers (a
//    two-register shuffle: vpermps on AVX2; with a table gather, emulated by GCC, the step took 19.7 cycles
//    per element on one thread instead of 16.6, benchmarks/NOTES.md "4-bit optimizer states");
//  - the rule's functor and the block's absmax: quant_cpu.h's update_block and state_absmax;
//  - encode: the count of the 15 midpoints below x (quant4.h's encode4: compares against constants held in
//    registers, no gather), then pack pairs of codes into bytes (an odd tail's last high nibble is 0).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "fusedtrain/cpu_driver.h"
#include "fusedtrain/quant4.h"
#include "fusedtrain/quant_cpu.h"
#include "fusedtrain/rounding.h"
#include "fusedtrain/rules_quant4.h"
#include "fusedtrain/work.h"

namespace fusedtrain {
namespace quant {
namespace cpu4_impl {

// Eight float32 lanes and their int32 indices (GCC vector extensions: one AVX2 register each).
typedef float F8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));

struct Packed4 {
  static constexpr int kBlock = kBlock4;
  static int64_t blocks(int64_t numel, int64_t) { return num_blocks4(numel); }
  static void locate(int64_t b, int64_t numel, int64_t, int64_t* e0, int64_t* n) {
    *e0 = b * kBlock4;  // even: the block owns whole bytes
    *n = std::min<int64_t>(kBlock4, numel - *e0);
  }

  // One block of n (<= kBlock4) elements from e0. ptr: the tuple's lists (param, grad, (codes, absmax) per
  // state, copy).
  template <class L, typename Op, bool kVector>
  static inline __attribute__((always_inline)) void body(void* const* ptr, int64_t b, int64_t e0, int64_t n,
                                                         const Op& op_in, uint32_t key, const Forms& fm) {
    using T = at::opmath_type<typename L::P>;
    constexpr int S = Op::depth - 2;
    static_assert(StoreMask<Op>::value == ~0u && BlockSums<Op>::value == 0,
                  "4-bit blocks requantize every state (Note [block passes that read or reduce] in quant.h)");
    const Op op = op_in;
    const int64_t nb = (n + 1) / 2;  // bytes of this block
    T st[S > 0 ? S : 1][kBlock4];
    alignas(32) int32_t code[kBlock4];
    const int64_t n8 = (n + 7) & ~int64_t(7);  // whole vectors of 8 (<= kBlock4)
    for (int s = 0; s < S; ++s) {
      const float absmax = static_cast<const float*>(ptr[3 + 2 * s])[b];
      const uint8_t* __restrict__ c = static_cast<const uint8_t*>(ptr[2 + 2 * s]) + e0 / 2;
      for (int64_t k = 0; k < nb; ++k) {
        code[2 * k] = c[k] & 15;
        code[2 * k + 1] = c[k] >> 4;
      }
      for (int64_t i = 2 * nb; i < n8; ++i) code[i] = 0;  // a tail's lanes past n (decoded, never used)
      // Note [4-bit block loops]: the 16-entry table as two vectors of 8, looked up by a two-register shuffle
      // (AVX2: two vpermps and a blend, no gather); the same values as table[code]
      const float* table = fm.is_signed(s) ? kMaps4.signed_value : kMaps4.unsigned_value;
      F8 lo, hi;
      __builtin_memcpy(&lo, table, sizeof(F8));
      __builtin_memcpy(&hi, table + 8, sizeof(F8));
      T* __restrict__ x = st[s];
      for (int64_t i = 0; i < n8; i += 8) {
        I8 k;
        __builtin_memcpy(&k, code + i, sizeof(I8));
        F8 v = __builtin_shuffle(lo, hi, k) * absmax;
        if (!fm.is_signed(s)) v = v * v;  // Note [square-root states] (rules_quant.h): the codes hold sqrt(state)
        for (int j = 0; j < 8; ++j) x[i + j] = static_cast<T>(v[j]);
      }
    }
    cpu_impl::update_block<L>(ptr, e0, n, op, key, st, 2 + 2 * S);
    for (int s = 0; s < S; ++s) {
      T* __restrict__ x = st[s];
      const float absmax = cpu_impl::state_absmax(x, n, fm.is_signed(s));
      static_cast<float*>(ptr[3 + 2 * s])[b] = absmax;
      const T inv = absmax > 0.0f ? T(1) / static_cast<T>(absmax) : T(0);
      const float* mid = fm.is_signed(s) ? kMaps4.signed_mid : kMaps4.unsigned_mid;
      T m[15];
      for (int k = 0; k < 15; ++k) m[k] = static_cast<T>(mid[k]);
      for (int64_t i = 0; i < n; ++i) {
        const T v = x[i] * inv;
        int c = 0;
#pragma GCC unroll 15
        for (int k = 0; k < 15; ++k) c += m[k] < v ? 1 : 0;  // quant4.h's encode4
        code[i] = c;
      }
      if (n & 1) code[n] = 0;  // the unused high nibble of an odd tail
      uint8_t* __restrict__ c = static_cast<uint8_t*>(ptr[2 + 2 * s]) + e0 / 2;
      for (int64_t k = 0; k < nb; ++k) c[k] = static_cast<uint8_t>(code[2 * k] | (code[2 * k + 1] << 4));
    }
  }
};

}  // namespace cpu4_impl

template <>
struct Driver4<cpu::Backend> {
  template <class L, typename Op>
  static void apply(const Work& work, const Op& op, const Forms& fm) {
    for (int s = 0; s < Op::depth - 2; ++s) {
      TORCH_CHECK(!fm.is_float(s), "fusedtrain: 4-bit states keep no float state (Note [mixed state lists])");
    }
    cpu_impl::run_blocks<cpu4_impl::Packed4, L>(work, op, fm);
  }
};

}  // namespace quant
}  // namespace fusedtrain
