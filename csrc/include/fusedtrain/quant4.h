// 4-bit blockwise-quantized optimizer states: the code maps, the packing and the (de)quantization of one
// value, for the host and the device. The one definition of the 4-bit format; the CPU (quant4_cpu.h) and
// CUDA (quant4_cuda.cuh) drivers and Python (fusedtrain._C.quant4_maps(), optim/_quant.py) read it from here.
//
// Note [4-bit optimizer states]:
// The 8-bit format (Note [8-bit optimizer states] in quant.h) with half the code bits, after torchao's
// 4-bit AdamW (prototype low_bit_optim) and Li et al. 2023, "Memory Efficient Optimizers with 4-bit States":
//  - packing: a state of n elements is ceil(n / 2) bytes, element 2k in the low nibble of byte k and element
//    2k + 1 in the high nibble (row-major element order of the parameter, whatever its strides); an odd n
//    leaves the last high nibble 0. The codes of signed states are kept as int8 bytes, those of unsigned
//    states as uint8 (the same bits: the dtype only names the map, as at 8 bits);
//  - scales: one float32 absmax per block of kBlock4 = 128 consecutive elements (the last block may be
//    shorter), so Adam keeps 2 * (0.5 + 4 / 128) = 1.0625 bytes of state per parameter;
//  - value = map[code] * absmax (float32); code c of 0..15 indexes a strictly increasing 16-entry map;
//  - the nearest code of x (already divided by absmax) is the number of the 15 midpoints (float32, computed
//    in double and rounded) strictly below x: a value on a midpoint takes the lower code, a NaN code 0;
//  - update: dequantize a whole block, run the rule's functor of math.h, take the block's new absmax
//    (a NaN anywhere wins, as at 8 bits), requantize: the same step as Note [quantized rules].
// The maps:
//  - signed (exp_avg): bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=4),
//    torchao's 4-bit signed map: 0, 1 and, for i = 0..2 and k = 0..2^i - 1,
//        +-10^(i-2) * (0.1 + 0.9 * (k + 1/2) / 2^i)
//    (+-0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875; code 7 is 0, code 15 is 1, code 0 is -0.8875:
//    the map has no -1, so a block whose absmax is a negative value stores it 11 % small);
//  - unsigned (the square roots of second moments, Note [square-root states] in rules_quant.h): code c ->
//    (c + 1) / 16, a linear map without zero. With a zero code a small second moment rounds to 0 and
//    m / (sqrt(0) + eps) throws the parameter (the "zero-point problem" of Li et al.; simulated on the
//    digits MLP of tests/test_optim_4bit.py, the map (0 .. 15) / 15 diverged to a loss of 5e16); without it
//    a small state reads up to 1/16 of the block's max root, which only shrinks its update. Square roots
//    rather than the states themselves (torchao quantizes exp_avg_sq directly): on the CI batch order that
//    run ended 11-13 % above float32 with the states, within 3 % with their roots (benchmarks/NOTES.md,
//    "4-bit optimizer states", which also has the spread over other batch orders).
#pragma once

#include <cstdint>

#include "fusedtrain/math.h"
#include "fusedtrain/quant.h"

namespace fusedtrain {
namespace quant {

constexpr int kBlock4 = 128;  // elements per scale

FT_HD int64_t num_blocks4(int64_t n) { return (n + kBlock4 - 1) / kBlock4; }
FT_HD int64_t num_bytes4(int64_t n) { return (n + 1) / 2; }

struct Maps4 {
  float signed_value[16];
  float signed_mid[15];
  float unsigned_value[16];
  float unsigned_mid[15];
};

constexpr double signed4_entry(int c) {  // code c of 0..15 (Note [4-bit optimizer states])
  if (c == 7) return 0.0;
  if (c == 15) return 1.0;
  const bool neg = c < 7;
  const int r = neg ? 6 - c : c - 8;  // rank of the magnitude among the 7: 0 = smallest
  const int i = r == 0 ? 0 : (r < 3 ? 1 : 2);
  const int k = r - ((1 << i) - 1);
  double p = 1.0;
  for (int t = i; t < 2; ++t) p /= 10.0;
  const double mag = p * (0.1 + 0.9 * (k + 0.5) / static_cast<double>(1 << i));
  return neg ? -mag : mag;
}

constexpr double unsigned4_entry(int c) { return (c + 1) / 16.0; }

constexpr Maps4 make_maps4() {
  Maps4 m{};
  for (int c = 0; c < 16; ++c) {
    m.signed_value[c] = static_cast<float>(signed4_entry(c));
    m.unsigned_value[c] = static_cast<float>(unsigned4_entry(c));
  }
  for (int c = 0; c < 15; ++c) {
    m.signed_mid[c] = static_cast<float>((static_cast<double>(m.signed_value[c]) + m.signed_value[c + 1]) / 2);
    m.unsigned_mid[c] = static_cast<float>((static_cast<double>(m.unsigned_value[c]) + m.unsigned_value[c + 1]) / 2);
  }
  return m;
}

inline constexpr Maps4 kMaps4 = make_maps4();

// Nearest code of x (Note [4-bit optimizer states]): the count of midpoints strictly below x, fifteen
// independent comparisons with no gather (they vectorize on the CPU and do not diverge on the GPU).
template <typename T>
FT_HD int encode4(T x, const float* mid) {
  int c = 0;
#if defined(__CUDACC__)
#pragma unroll
#else
#pragma GCC unroll 15
#endif
  for (int k = 0; k < 15; ++k) c += static_cast<T>(mid[k]) < x ? 1 : 0;
  return c;
}

// The nibble of element e in its packed bytes.
FT_HD int nibble4(const uint8_t* bytes, int64_t e) { return (bytes[e >> 1] >> ((e & 1) * 4)) & 15; }

}  // namespace quant
}  // namespace fusedtrain
