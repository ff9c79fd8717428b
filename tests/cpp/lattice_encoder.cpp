// Exhaustive check of Note [lattice encoder] (csrc/include/fusedtrain/quant_cpu.h): the CPU block encoder
// against quant.h's binary search (the definition of the codes) for every float32 in [0, 1.001], both maps, both
// signs, through the vector path (AVX2, when the CPU has it) and, on every 61st value, the scalar path. Built
// and run by tests/test_quant_lattice.py with the extension's floating-point flags. Prints one line per case and
// "mismatches N"; exits 1 if N > 0.
#include <cstdio>
#include <cstring>

#include "fusedtrain/quant_cpu.h"

namespace q = fusedtrain::quant;

template <bool kSigned, bool kVector>
inline __attribute__((always_inline)) long check(uint32_t end_bits, uint32_t stride, bool negative) {
  long bad = 0, total = 0;
  float x[q::kBlock];
  q::cpu_impl::CodeOf<kSigned> code[q::kBlock];
  uint64_t bits = 0;
  while (bits < end_bits) {
    int n = 0;
    for (; n < q::kBlock && bits < end_bits; ++n, bits += stride) {
      const uint32_t b = static_cast<uint32_t>(bits);
      float f;
      std::memcpy(&f, &b, sizeof f);
      x[n] = negative ? -f : f;
    }
    q::cpu_impl::encode_block<float, kSigned, kVector>(x, 1.0f, n, code);
    for (int i = 0; i < n; ++i) {
      const int want = kSigned ? static_cast<int>(q::encode_signed(x[i], q::kMaps.signed_mid))
                               : static_cast<int>(q::encode_unsigned(x[i], q::kMaps.unsigned_mid));
      if (want != code[i] && ++bad <= 5) std::printf("x=%.9g: search %d, lattice %d\n", x[i], want, code[i]);
    }
    total += n;
  }
  std::printf("signed=%d vector=%d negative=%d values=%ld mismatches=%ld\n", kSigned, kVector, negative, total, bad);
  return bad;
}

template <bool kVector>
inline __attribute__((always_inline)) long check_nan() {  // NaN of either sign: code 0 (two full vectors)
  float nan[16];
  int8_t signed_code[16];
  uint8_t unsigned_code[16];
  long bad = 0;
  for (int i = 0; i < 16; ++i) nan[i] = (i % 2) ? __builtin_nanf("") : -__builtin_nanf("");
  q::cpu_impl::encode_block<float, true, kVector>(nan, 1.0f, 16, signed_code);
  q::cpu_impl::encode_block<float, false, kVector>(nan, 1.0f, 16, unsigned_code);
  for (int i = 0; i < 16; ++i) bad += (signed_code[i] != 0) + (unsigned_code[i] != 0);
  return bad;
}

#ifdef FT_HAVE_X86_DISPATCH
// compiled as the extension's AVX2 block function is (Note [lattice encoder] only runs there)
__attribute__((target("avx2,fma,f16c"))) long check_vector(uint32_t end_bits) {
  return check<false, true>(end_bits, 1, false) + check<true, true>(end_bits, 1, false) +
         check<true, true>(end_bits, 1, true) + check_nan<true>();
}
#endif

// compiled for the baseline ISA, as block_baseline is
long check_scalar(uint32_t end_bits) {
  return check<false, false>(end_bits, 61, false) + check<true, false>(end_bits, 61, false) +
         check<true, false>(end_bits, 61, true) + check_nan<false>();
}

int main() {
  const float end = 1.001f;
  uint32_t end_bits;
  std::memcpy(&end_bits, &end, sizeof end);
  long bad = 0;
#ifdef FT_HAVE_X86_DISPATCH
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    bad += check_vector(end_bits);
  } else {
    std::printf("no AVX2: vector path not checked\n");
  }
#endif
  bad += check_scalar(end_bits);
  std::printf("mismatches %ld\n", bad);
  return bad == 0 ? 0 : 1;
}
