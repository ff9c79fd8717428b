// Counter-based Philox-4x32-10 (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as
// 1, 2, 3", SC 2011), written once for host and device.
//
// Note [fusedtrain random stream]:
// A stream is keyed by a 64-bit seed and a 64-bit offset. Its n-th Philox call ("block" n) encrypts the
// counter (lo32(n), hi32(n), lo32(offset), hi32(offset)) under the key (lo32(seed), hi32(seed)) and yields
// four uint32 words; word j of block n is the random word of index 4n + j. So the word of index i depends
// on (seed, offset, i) alone: any thread of any driver, on the CPU or on a GPU, in any order, computes
// the same word for the same index, and the backward pass recomputes exactly the forward's words.
// The rounds are plain 32-bit arithmetic with the high half of a product taken from a 64-bit multiply,
// so GCC vectorizes a loop of independent blocks (one block per SIMD lane) and nvcc emits mul.hi.
// Checked against Random123's known-answer vectors in tests/test_dropout.py.
#pragma once

#include <cstdint>

#include "fusedtrain/math.h"  // FT_HD

namespace fusedtrain {
namespace philox {

constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kWeyl1 = 0xBB67AE85u;  // sqrt(3) - 1

// Philox-4x32 with 10 rounds, in place on the counter (c0..c3), key (k0, k1). W is uint32_t, or
// uint64_t holding a 32-bit value: the CPU lane loops use the 64-bit form, which GCC turns into 64-bit
// SIMD multiplies without the widen/narrow shuffles of the 32-bit form (1.6x faster with AVX-512; see
// benchmarks/NOTES.md). Both forms compute the same words; the masks cost nothing on the GPU.
template <typename W>
FT_HD void philox4x32_10(W& c0, W& c1, W& c2, W& c3, uint32_t k0, uint32_t k1) {
  constexpr W kLow = static_cast<W>(0xFFFFFFFFu);
#if defined(__CUDACC__)
#pragma unroll
#else
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(c0 & kLow) * kMul0;
    const uint64_t p1 = static_cast<uint64_t>(c2 & kLow) * kMul1;
    const W n0 = static_cast<W>(p1 >> 32) ^ c1 ^ static_cast<W>(k0);
    const W n2 = static_cast<W>(p0 >> 32) ^ c3 ^ static_cast<W>(k1);
    c1 = static_cast<W>(p1 & 0xFFFFFFFFu);
    c3 = static_cast<W>(p0 & 0xFFFFFFFFu);
    c0 = n0;
    c2 = n2;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
}

// One stream of Note [fusedtrain random stream].
struct Stream {
  uint32_t k0, k1;  // seed
  uint32_t o0, o1;  // offset

  static Stream make(uint64_t seed, uint64_t offset) {
    return Stream{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), static_cast<uint32_t>(offset),
                  static_cast<uint32_t>(offset >> 32)};
  }

  // The four words of block n: indices 4n .. 4n+3.
  FT_HD void block(uint64_t n, uint32_t& w0, uint32_t& w1, uint32_t& w2, uint32_t& w3) const {
    w0 = static_cast<uint32_t>(n);
    w1 = static_cast<uint32_t>(n >> 32);
    w2 = o0;
    w3 = o1;
    philox4x32_10(w0, w1, w2, w3, k0, k1);
  }

  // The word of index i (one whole block computed; for scattered indices only).
  FT_HD uint32_t word(uint64_t i) const {
    uint32_t w[4];
    block(i >> 2, w[0], w[1], w[2], w[3]);
    return w[i & 3];
  }
};

// Note [device seed]:
// What a kernel receives for one stream: the offset, and the seed either by value (read on the host from
// a CPU seed tensor) or as a pointer to a one-element int64 tensor in device memory that the kernel
// reads when it starts. The pointer form is what CUDA graph capture needs: a value read on the host is
// frozen into the captured launch, while a seed tensor drawn on the device by torch's CUDA generator
// (whose Philox offset torch advances on every replay) is refreshed before each replay reads it. Both
// forms give the same stream for the same seed value: the masks do not depend on where the seed lives.
struct StreamArg {
  Stream stream;        // the offset; the seed too when `seed` is null
  const int64_t* seed;  // device memory holding the seed, or null

  FT_HD Stream get() const {
    if (seed == nullptr) return stream;
    const uint64_t value = static_cast<uint64_t>(*seed);
    Stream s = stream;
    s.k0 = static_cast<uint32_t>(value);
    s.k1 = static_cast<uint32_t>(value >> 32);
    return s;
  }
};

}  // namespace philox
}  // namespace fusedtrain
