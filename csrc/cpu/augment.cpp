// CPU driver of the augment op (per-pixel math: augment.h; checks and descriptors: augment_host.h).
//
// Note [CPU augment loop]:
// An output row of a sample is made in three loops over contiguous memory (compiled per ISA like
// cpu_driver.h, Note [CPU SIMD dispatch]):
//   1. vertical lerp of the two source rows the output row needs, over the crop's width, uint8 (or
//      float32: the loops are instantiated for both input types) -> float into `tmp`, one pixel per 4 floats (R, G, B, 0) whatever the input layout (NCHW planes,
//      NHWC runs, or any strides): the lerps run over contiguous values into `planes`, then 4-float
//      shuffles (a 4 x 4 transpose for NCHW, a widening for NHWC) assemble the pixels;
//   2. horizontal lerp: per output column two 16-byte pixel loads from `tmp` at offsets, and weights,
//      tabulated once per sample (they do not depend on the row; the flip is folded in by reversing
//      the table), into `row` (4 floats per pixel). Plain loops here make GCC vectorize over columns
//      with emulated gathers, value by value; a 4-float vector type (GCC's vector extension, so SSE,
//      AVX and NEON alike, no intrinsics) keeps one pixel per register instead (the whole op went from
//      16.2 to 13.2 ms per 64 images on one core, benchmarks/NOTES.md);
//   3. jitter + normalize per pixel, stored plane by plane into the (N, C, out_h, out_w) output.
// One-channel images use 1 float per pixel and plain loops.
// Contrast needs the mean gray level of the whole sample after brightness. Samples with a contrast
// factor != 1 therefore run loop 3 in two passes: the first stores the brightness-adjusted values in a
// per-thread float scratch of one sample (C * out_h * out_w floats, 600 KB at 224^2, so it stays in L2) and
// adds up gray per row; the second reads the scratch, applies contrast, saturation and normalize and
// writes the output once. The row sums use 16 fixed partial sums per row and are added in row order
// in double, so the mean (and the output) does not depend on the thread count or the ISA.
//
// Work split: with at least 4 samples per thread, threads take whole samples (each sample's scratch
// and tables stay in that thread's cache); with fewer, the samples are processed one after the other
// with the rows of each split between threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <cstdint>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "fusedtrain/augment.h"
#include "fusedtrain/augment_host.h"
#include "fusedtrain/cpu_isa.h"

namespace fusedtrain {
namespace augment {
namespace {

#define FT_INLINE inline __attribute__((always_inline))

constexpr int kLanes = 16;  // partial sums per row of the contrast mean
// Output values a thread's share of a parallel region must reach before the region is split (a few tens
// of microseconds of work; below that, waking the other threads costs more than it saves).
constexpr int64_t kMinValuesPerTask = 32768;

enum class Stage : int {
  kDirect = 0,  // brightness, saturation, normalize -> output (contrast factor 1)
  kFirst = 1,   // brightness -> scratch, gray row sums
  kSecond = 2,  // scratch -> contrast, saturation, normalize -> output
};

// Per-sample column tables of loop 2 (Note [CPU augment loop]).
struct ColumnTable {
  std::vector<int32_t> off0, off1;  // offsets into tmp's row (column index times its column stride)
  std::vector<float> w0, w1;
  // antialias: `taps` offsets and weights per output column (windows shorter than `taps` are padded with
  // weight 0 at a valid offset: adding 0 * v leaves the sum's bits unchanged)
  int32_t taps = 0;
  std::vector<int32_t> off;
  std::vector<float> w;
};

// Everything one row of one sample needs.
struct RowJob {
  const ImageDesc* image;
  const SampleDesc* sample;
  const Normalize* norm;
  const ColumnTable* columns;
  int64_t out_h, out_w;  // output rows and columns
  float* tmp;       // crop width * kLanesPerColumn floats
  float* row;       // size * kLanesPerColumn floats
  float* scratch;   // C * size * size floats (kFirst, kSecond)
  double* row_sum;  // size doubles (kFirst)
  float* gray;      // size floats (kFirst)
  float* planes;    // C * crop width + 1 floats: one row per channel (loop 1, antialias sums)
  float* wy;        // antialias: the row window's weights
  bool antialias;
  bool float_input;  // float32 images (else uint8): the source rows are read as InT in sample_row
  void* out;        // this sample's (C, size, size) output
};

// Floats per column in tmp and row: the C channels of a column side by side, padded to 4 for RGB so
// that one 16-byte load fetches a whole pixel in loop 2 (a plain loop GCC turns into vector loads of
// whole pixels instead of emulated gathers of single values).
template <int C>
constexpr int kLanesPerColumn = C == 3 ? 4 : 1;

typedef float Float4 __attribute__((vector_size(16)));
typedef int32_t Int4 __attribute__((vector_size(16)));
// A lane shuffle of two Float4 (indices 0-3: a, 4-7: b), compiled to SSE/NEON shuffles.
#if defined(__clang__)
#define FT_SHUFFLE4(a, b, i, j, k, l) __builtin_shufflevector(a, b, i, j, k, l)
#else
#define FT_SHUFFLE4(a, b, i, j, k, l) __builtin_shuffle(a, b, Int4{i, j, k, l})
#endif

// augment.h's lerp2 on four channels at once: the same two products and sum per lane.
FT_INLINE Float4 lerp4(Float4 a, Float4 b, float w0, float w1) {
  return w0 * a + w1 * b;
}

// Three channel rows (R at pl, G at pl + w, B at pl + 2w) to 4-lane pixels (R, G, B, 0) in tmp, four pixels
// per 4 x 4 transpose of vector-extension shuffles.
FT_INLINE void planes_to_pixels(const float* __restrict__ pl, int64_t w, float* __restrict__ tmp) {
  const Float4 zero = {0.f, 0.f, 0.f, 0.f};
  const float* __restrict__ R = pl;
  const float* __restrict__ G = pl + w;
  const float* __restrict__ B = pl + 2 * w;
  int64_t k = 0;
  for (; k + 4 <= w; k += 4) {
    Float4 r, g, b;
    std::memcpy(&r, R + k, sizeof(Float4));
    std::memcpy(&g, G + k, sizeof(Float4));
    std::memcpy(&b, B + k, sizeof(Float4));
    const Float4 rg_lo = FT_SHUFFLE4(r, g, 0, 4, 1, 5);     // r0 g0 r1 g1
    const Float4 rg_hi = FT_SHUFFLE4(r, g, 2, 6, 3, 7);     // r2 g2 r3 g3
    const Float4 b0_lo = FT_SHUFFLE4(b, zero, 0, 4, 1, 5);  // b0 0 b1 0
    const Float4 b0_hi = FT_SHUFFLE4(b, zero, 2, 6, 3, 7);  // b2 0 b3 0
    const Float4 p0 = FT_SHUFFLE4(rg_lo, b0_lo, 0, 1, 4, 5);
    const Float4 p1 = FT_SHUFFLE4(rg_lo, b0_lo, 2, 3, 6, 7);
    const Float4 p2 = FT_SHUFFLE4(rg_hi, b0_hi, 0, 1, 4, 5);
    const Float4 p3 = FT_SHUFFLE4(rg_hi, b0_hi, 2, 3, 6, 7);
    std::memcpy(tmp + 4 * k, &p0, sizeof(Float4));
    std::memcpy(tmp + 4 * k + 4, &p1, sizeof(Float4));
    std::memcpy(tmp + 4 * k + 8, &p2, sizeof(Float4));
    std::memcpy(tmp + 4 * k + 12, &p3, sizeof(Float4));
  }
  for (; k < w; ++k) {
    tmp[4 * k] = R[k];
    tmp[4 * k + 1] = G[k];
    tmp[4 * k + 2] = B[k];
    tmp[4 * k + 3] = 0.f;
  }
}

template <int C, typename InT>
FT_INLINE void sample_row(const RowJob& job, int64_t y) {
  constexpr int L = kLanesPerColumn<C>;
  const ImageDesc& im = *job.image;
  const SampleDesc& s = *job.sample;
  const int64_t S = job.out_w;
  const Tap ty = linear_tap(static_cast<int32_t>(y), static_cast<int32_t>(job.out_h), s.height);
  const float wy0 = ty.w0, wy1 = ty.w1;
  const InT* __restrict__ data = static_cast<const InT*>(im.data);
  const InT* __restrict__ r0 = data + (s.top + ty.i0) * im.stride_h + s.left * im.stride_w;
  const InT* __restrict__ r1 = data + (s.top + ty.i1) * im.stride_h + s.left * im.stride_w;
  float* __restrict__ tmp = job.tmp;
  const int64_t w = s.width;
  const int64_t sc = im.stride_c, sw = im.stride_w;
  // Loop 1: vertical lerp of the crop's row segment into tmp[column][lane].
  if constexpr (C == 3) {
    // Written as one loop storing tmp[k * 4 + c], GCC vectorizes the lerps but stores the floats one
    // by one (1.3 ns per pixel); lerps over contiguous floats followed by whole-pixel shuffles take
    // 0.7 ns (Note [CPU augment loop]).
    float* __restrict__ pl = job.planes;
    const Float4 zero = {0.f, 0.f, 0.f, 0.f};
    if (sc == 1 && sw == 3) {  // NHWC: lerp the row's 3w values, then widen each pixel to 4 lanes
      const int64_t n = 3 * w;
#pragma GCC ivdep
      for (int64_t k = 0; k < n; ++k) pl[k] = lerp2(static_cast<float>(r0[k]), static_cast<float>(r1[k]), wy0, wy1);
      pl[n] = 0.f;  // the last pixel's 16-byte load reads one float past the row
      for (int64_t k = 0; k < w; ++k) {
        Float4 p;
        std::memcpy(&p, pl + 3 * k, sizeof(Float4));
        p = FT_SHUFFLE4(p, zero, 0, 1, 2, 4);
        std::memcpy(tmp + 4 * k, &p, sizeof(Float4));
      }
    } else if (sw == 1) {  // NCHW: lerp each plane's row, then transpose 4 pixels at a time
      for (int c = 0; c < 3; ++c) {
        const InT* __restrict__ a = r0 + c * sc;
        const InT* __restrict__ b = r1 + c * sc;
        float* __restrict__ q = pl + c * w;
#pragma GCC ivdep
        for (int64_t k = 0; k < w; ++k) q[k] = lerp2(static_cast<float>(a[k]), static_cast<float>(b[k]), wy0, wy1);
      }
      planes_to_pixels(pl, w, tmp);
    } else {  // any other strides
      for (int64_t k = 0; k < w; ++k) {
        for (int c = 0; c < 3; ++c) {
          const int64_t o = c * sc + k * sw;
          tmp[k * 4 + c] = lerp2(static_cast<float>(r0[o]), static_cast<float>(r1[o]), wy0, wy1);
        }
        tmp[k * 4 + 3] = 0.f;
      }
    }
  } else {
    if (sw == 1) {
#pragma GCC ivdep
      for (int64_t k = 0; k < w; ++k) tmp[k] = lerp2(static_cast<float>(r0[k]), static_cast<float>(r1[k]), wy0, wy1);
    } else {
      for (int64_t k = 0; k < w; ++k) {
        tmp[k] = lerp2(static_cast<float>(r0[k * sw]), static_cast<float>(r1[k * sw]), wy0, wy1);
      }
    }
  }
  // Loop 2: horizontal lerp into row[x][lane].
  const int32_t* __restrict__ o0 = job.columns->off0.data();
  const int32_t* __restrict__ o1 = job.columns->off1.data();
  const float* __restrict__ w0 = job.columns->w0.data();
  const float* __restrict__ w1 = job.columns->w1.data();
  float* __restrict__ row = job.row;
  if constexpr (L == 4) {
    // A pixel is one 4-float vector (GCC vector extension: SSE on x86-64, NEON on ARM, no intrinsics).
    // Written as a plain loop over x and c, GCC vectorizes over x and emulates the two gathers value
    // by value, which took a third of the time.
    for (int64_t x = 0; x < S; ++x) {
      Float4 a, b;
      std::memcpy(&a, tmp + o0[x], sizeof(Float4));
      std::memcpy(&b, tmp + o1[x], sizeof(Float4));
      const Float4 r = lerp4(a, b, w0[x], w1[x]);
      std::memcpy(row + x * 4, &r, sizeof(Float4));
    }
  } else {
#pragma GCC ivdep
    for (int64_t x = 0; x < S; ++x) row[x] = lerp2(tmp[o0[x]], tmp[o1[x]], w0[x], w1[x]);
  }
}

// sample_row with antialias=True: the row's window of source rows, then each column's window.
template <int C, typename InT>
FT_INLINE void sample_row_aa(const RowJob& job, int64_t y) {
  constexpr int L = kLanesPerColumn<C>;
  const ImageDesc& im = *job.image;
  const SampleDesc& s = *job.sample;
  const int64_t S = job.out_w;
  const int64_t w = s.width;
  const int64_t sc = im.stride_c, sw = im.stride_w;
  const InT* __restrict__ data = static_cast<const InT*>(im.data);
  const AaAxis ay = aa_axis(s.height, static_cast<int32_t>(job.out_h));
  const AaWindow win = aa_window(ay, static_cast<int32_t>(y), s.height);
  float* __restrict__ wy = job.wy;
  for (int32_t j = 0; j < win.count; ++j) wy[j] = aa_weight(ay, win, j);
  // Loop 1: per channel, the weighted sum of the window's rows (taps in order, from 0).
  float* __restrict__ acc = L == 1 ? job.tmp : job.planes;
  for (int c = 0; c < C; ++c) {
    float* __restrict__ a = acc + c * w;
    for (int64_t k = 0; k < w; ++k) a[k] = 0.f;
    for (int32_t j = 0; j < win.count; ++j) {
      const InT* __restrict__ r = data + (s.top + win.start + j) * im.stride_h + s.left * sw + c * sc;
      const float wj = wy[j];
      if (sw == 1) {
#pragma GCC ivdep
        for (int64_t k = 0; k < w; ++k) a[k] = a[k] + wj * static_cast<float>(r[k]);
      } else {
        for (int64_t k = 0; k < w; ++k) a[k] = a[k] + wj * static_cast<float>(r[k * sw]);
      }
    }
  }
  float* __restrict__ tmp = job.tmp;
  if constexpr (L == 4) planes_to_pixels(acc, w, tmp);
  // Loop 2: per output column, the weighted sum of its window's pixels.
  const int32_t K = job.columns->taps;
  const int32_t* __restrict__ off = job.columns->off.data();
  const float* __restrict__ wx = job.columns->w.data();
  float* __restrict__ row = job.row;
  if constexpr (L == 4) {
    for (int64_t x = 0; x < S; ++x) {
      Float4 r = {0.f, 0.f, 0.f, 0.f};
      for (int32_t j = 0; j < K; ++j) {
        Float4 t;
        std::memcpy(&t, tmp + off[x * K + j], sizeof(Float4));
        r = r + wx[x * K + j] * t;
      }
      std::memcpy(row + x * 4, &r, sizeof(Float4));
    }
  } else {
    for (int64_t x = 0; x < S; ++x) {
      float r = 0.f;
      for (int32_t j = 0; j < K; ++j) r = r + wx[x * K + j] * tmp[off[x * K + j]];
      row[x] = r;
    }
  }
}

template <typename OutT>
FT_INLINE OutT to_out(float v) {
  return static_cast<OutT>(v);
}

template <int C, typename OutT, Stage STAGE, bool SAT>
FT_INLINE void rows_body(const RowJob& job, int64_t y_begin, int64_t y_end) {
  constexpr int L = kLanesPerColumn<C>;
  const int64_t S = job.out_w;
  const int64_t plane = job.out_h * S;
  const SampleJitter jit = job.sample->jitter;
  const Normalize nrm = *job.norm;
  OutT* __restrict__ out = static_cast<OutT*>(job.out);
  for (int64_t y = y_begin; y < y_end; ++y) {
    const int64_t base = y * S;
    if constexpr (STAGE != Stage::kSecond) {
      if (job.float_input) {
        job.antialias ? sample_row_aa<C, float>(job, y) : sample_row<C, float>(job, y);
      } else {
        job.antialias ? sample_row_aa<C, uint8_t>(job, y) : sample_row<C, uint8_t>(job, y);
      }
    }
    const float* __restrict__ row = job.row;
    float* __restrict__ scratch = job.scratch;
    if constexpr (STAGE == Stage::kDirect) {
#pragma GCC ivdep
      for (int64_t x = 0; x < S; ++x) {
        float v[C];
        for (int c = 0; c < C; ++c) v[c] = brightness(row[x * L + c], jit);
        finish_pixel<C, false, SAT>(v, jit, nrm);
        for (int c = 0; c < C; ++c) out[c * plane + base + x] = to_out<OutT>(v[c]);
      }
    } else if constexpr (STAGE == Stage::kFirst) {
      float* __restrict__ g = job.gray;
#pragma GCC ivdep
      for (int64_t x = 0; x < S; ++x) {
        float v[C];
        for (int c = 0; c < C; ++c) {
          v[c] = brightness(row[x * L + c], jit);
          scratch[c * plane + base + x] = v[c];
        }
        g[x] = contrast_source<C>(v);
      }
      // 16 partial sums in a fixed order (Note [CPU augment loop]).
      float acc[kLanes] = {};
      int64_t x = 0;
      for (; x + kLanes <= S; x += kLanes) {
        for (int l = 0; l < kLanes; ++l) acc[l] += g[x + l];
      }
      for (int l = 0; x < S; ++x, ++l) acc[l] += g[x];
      double sum = 0.0;
      for (int l = 0; l < kLanes; ++l) sum += static_cast<double>(acc[l]);
      job.row_sum[y] = sum;
    } else {
#pragma GCC ivdep
      for (int64_t x = 0; x < S; ++x) {
        float v[C];
        for (int c = 0; c < C; ++c) v[c] = scratch[c * plane + base + x];
        finish_pixel<C, true, SAT>(v, jit, nrm);
        for (int c = 0; c < C; ++c) out[c * plane + base + x] = to_out<OutT>(v[c]);
      }
    }
  }
}

using RowsFn = void (*)(const RowJob&, int64_t, int64_t);

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FT_AUG_X86 1
template <int C, typename OutT, Stage STAGE, bool SAT>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"))) void rows_avx512(const RowJob& job,
                                                                                          int64_t y0, int64_t y1) {
  rows_body<C, OutT, STAGE, SAT>(job, y0, y1);
}
template <int C, typename OutT, Stage STAGE, bool SAT>
__attribute__((target("avx2,fma,f16c"))) void rows_avx2(const RowJob& job, int64_t y0, int64_t y1) {
  rows_body<C, OutT, STAGE, SAT>(job, y0, y1);
}
#endif
template <int C, typename OutT, Stage STAGE, bool SAT>
void rows_baseline(const RowJob& job, int64_t y0, int64_t y1) {
  rows_body<C, OutT, STAGE, SAT>(job, y0, y1);
}

template <int C, typename OutT, Stage STAGE, bool SAT>
RowsFn select_rows() {
#ifdef FT_AUG_X86
  switch (cpu::active_isa()) {
    case cpu::Isa::kAvx512:
      return &rows_avx512<C, OutT, STAGE, SAT>;
    case cpu::Isa::kAvx2:
      return &rows_avx2<C, OutT, STAGE, SAT>;
    default:
      break;
  }
#endif
  return &rows_baseline<C, OutT, STAGE, SAT>;
}

// The three row functions one sample may need, for one (C, out dtype, saturation on/off).
struct RowFns {
  RowsFn direct, first, second;
};

template <int C, typename OutT>
RowFns row_fns(bool sat) {
  if (sat) {
    return {select_rows<C, OutT, Stage::kDirect, true>(), select_rows<C, OutT, Stage::kFirst, true>(),
            select_rows<C, OutT, Stage::kSecond, true>()};
  }
  return {select_rows<C, OutT, Stage::kDirect, false>(), select_rows<C, OutT, Stage::kFirst, false>(),
          select_rows<C, OutT, Stage::kSecond, false>()};
}

// The tables of one sample's `size` output columns.
void build_columns(const SampleDesc& s, int64_t size, int32_t lanes, bool antialias, ColumnTable& t) {
  if (!antialias) {
    t.off0.resize(size);
    t.off1.resize(size);
    t.w0.resize(size);
    t.w1.resize(size);
    for (int64_t x = 0; x < size; ++x) {
      const int64_t xs = s.flip ? size - 1 - x : x;  // horizontal_flip after the resize
      const Tap tap = linear_tap(static_cast<int32_t>(xs), static_cast<int32_t>(size), s.width);
      t.off0[x] = tap.i0 * lanes;
      t.off1[x] = tap.i1 * lanes;
      t.w0[x] = tap.w0;
      t.w1[x] = tap.w1;
    }
    return;
  }
  const AaAxis ax = aa_axis(s.width, static_cast<int32_t>(size));
  std::vector<AaWindow> wins(size);
  int32_t K = 1;  // the widest window of this sample (2 when upscaling, about 2 * scale + 1 when downscaling)
  for (int64_t x = 0; x < size; ++x) {
    const int64_t xs = s.flip ? size - 1 - x : x;
    wins[x] = aa_window(ax, static_cast<int32_t>(xs), s.width);
    TORCH_CHECK(wins[x].count >= 1, "fusedtrain.augment: internal error, empty antialias window");
    K = std::max(K, wins[x].count);
  }
  t.taps = K;
  t.off.assign(size * K, 0);
  t.w.assign(size * K, 0.f);
  for (int64_t x = 0; x < size; ++x) {
    const AaWindow& win = wins[x];
    for (int32_t j = 0; j < K; ++j) {
      const int32_t jj = j < win.count ? j : win.count - 1;
      t.off[x * K + j] = (win.start + jj) * lanes;
      t.w[x * K + j] = j < win.count ? aa_weight(ax, win, j) : 0.f;
    }
  }
}

// The mean over an out_h x out_w sample from its row sums.
double finish_mean(const std::vector<double>& row_sum, int64_t out_h, int64_t out_w) {
  double total = 0.0;
  for (int64_t y = 0; y < out_h; ++y) total += row_sum[y];
  return total / (static_cast<double>(out_h) * static_cast<double>(out_w));
}

// Thread-private buffers of one sample's rows.
struct Buffers {
  std::vector<float> tmp, row, gray, planes, wy;
};

template <int C, typename OutT>
void run(const Plan& plan, at::Tensor& out) {
  const int64_t n = static_cast<int64_t>(plan.samples.size());
  const int64_t SH = plan.out_h, SW = plan.out_w;
  const int64_t sample_elems = C * SH * SW;
  const RowFns fns = row_fns<C, OutT>(plan.any_saturation);
  OutT* out_base = out.data_ptr<OutT>();
  int64_t max_width = 1, max_row_taps = 1;
  for (const SampleDesc& s : plan.samples) {
    max_width = std::max<int64_t>(max_width, s.width);
    if (plan.antialias) max_row_taps = std::max<int64_t>(max_row_taps, aa_max_taps(s.height, static_cast<int32_t>(SH)));
  }

  auto make_job = [&](int64_t i, ColumnTable& cols, Buffers& buf, float* scratch, double* row_sum) {
    const ImageDesc& im = plan.images[i];
    const SampleDesc& s = plan.samples[i];
    build_columns(s, SW, kLanesPerColumn<C>, plan.antialias, cols);
    return RowJob{&im, &s, &plan.norm, &cols, SH, SW, buf.tmp.data(), buf.row.data(), scratch, row_sum,
                  buf.gray.data(), buf.planes.data(), buf.wy.data(), plan.antialias, plan.float_input,
                  out_base + i * sample_elems};
  };
  auto alloc = [&](Buffers& buf) {
    buf.tmp.resize(max_width * kLanesPerColumn<C>);
    buf.row.resize(SW * kLanesPerColumn<C>);
    buf.gray.resize(SW);
    buf.planes.resize(max_width * C + 1);
    if (plan.antialias) buf.wy.resize(max_row_taps);
  };

  const int64_t threads = at::get_num_threads();
  if (n >= 4 * threads) {
    // Whole samples per thread.
    at::parallel_for(0, n, std::max<int64_t>(1, kMinValuesPerTask / sample_elems), [&](int64_t begin, int64_t end) {
      Buffers buf;
      alloc(buf);
      ColumnTable cols;
      std::vector<float> scratch;
      std::vector<double> row_sum;
      for (int64_t i = begin; i < end; ++i) {
        const SampleDesc& s = plan.samples[i];
        if (s.jitter.contrast == 1.f) {
          const RowJob job = make_job(i, cols, buf, nullptr, nullptr);
          fns.direct(job, 0, SH);
          continue;
        }
        scratch.resize(sample_elems);
        row_sum.assign(SH, 0.0);
        RowJob job = make_job(i, cols, buf, scratch.data(), row_sum.data());
        fns.first(job, 0, SH);
        SampleDesc local = s;
        local.jitter.contrast_rest = contrast_rest(s.jitter.contrast, finish_mean(row_sum, SH, SW));
        job.sample = &local;
        fns.second(job, 0, SH);
      }
    });
    return;
  }
  // Few samples: one after the other, rows split between threads.
  const int64_t row_grain = std::max<int64_t>(1, kMinValuesPerTask / (C * SW));
  std::vector<float> scratch;
  std::vector<double> row_sum;
  for (int64_t i = 0; i < n; ++i) {
    const SampleDesc& s = plan.samples[i];
    const bool contrast = s.jitter.contrast != 1.f;
    if (contrast) {
      scratch.resize(sample_elems);
      row_sum.assign(SH, 0.0);
    }
    at::parallel_for(0, SH, row_grain, [&](int64_t y0, int64_t y1) {
      Buffers buf;
      alloc(buf);
      ColumnTable cols;
      const RowJob job = make_job(i, cols, buf, contrast ? scratch.data() : nullptr,
                                  contrast ? row_sum.data() : nullptr);
      (contrast ? fns.first : fns.direct)(job, y0, y1);
    });
    if (!contrast) continue;
    SampleDesc local = s;
    local.jitter.contrast_rest = contrast_rest(s.jitter.contrast, finish_mean(row_sum, SH, SW));
    at::parallel_for(0, SH, row_grain, [&](int64_t y0, int64_t y1) {
      Buffers buf;  // kSecond reads only the scratch
      ColumnTable cols;
      RowJob job{&plan.images[i], &local, &plan.norm, &cols, SH, SW, nullptr, nullptr, scratch.data(), nullptr,
                 nullptr, nullptr, nullptr, plan.antialias, plan.float_input, out_base + i * sample_elems};
      fns.second(job, y0, y1);
    });
  }
}

// Note [output pages]: a batch output is tens of MB (64 x 3 x 224^2 float32 = 38.5 MB), above glibc's
// mmap threshold, so every call gets fresh pages and the first touch of each 4 KB page faults. On the
// 2-core VM that cost 25 ms per batch, more than the augmentation itself (benchmarks/NOTES.md,
// "augment"). Asking for transparent huge pages on the 2 MB-aligned interior of the buffer before it
// is first written (what torch does for all allocations under THP_MEM_ALLOC_ENABLE=1) cuts it to
// about 5 ms. Only a hint: no effect where THP is off, and harmless on reused memory.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t n = static_cast<uintptr_t>(t.nbytes());
  if (n < 4 * kHuge) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t a = (p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t b = (p + n) & ~(kHuge - 1);
  if (b > a) madvise(reinterpret_cast<void*>(a), b - a, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

struct CpuDriver {
  template <int C, typename OutT>
  static void run(const Plan& plan, at::Tensor& out) {
    augment::run<C, OutT>(plan, out);  // the driver above (qualified: not this member)
  }
};

at::Tensor augment_cpu(at::TensorList images, const at::Tensor& boxes, const at::Tensor& flips,
                       const at::Tensor& factors, at::IntArrayRef size, at::ArrayRef<double> mean,
                       at::ArrayRef<double> std, at::ScalarType out_dtype, bool antialias) {
  const Plan plan = make_plan(images, boxes, flips, factors, size, mean, std, out_dtype, antialias);
  const int64_t n = static_cast<int64_t>(plan.samples.size());
  at::Tensor out = at::empty({n, plan.channels, plan.out_h, plan.out_w}, images[0].options().dtype(out_dtype));
  advise_huge_pages(out);
  run_plan<CpuDriver>(plan, out, out_dtype);
  return out;
}

}  // namespace
}  // namespace augment
}  // namespace fusedtrain

TORCH_LIBRARY_IMPL(fusedtrain, CPU, m) {
  m.impl("augment", &fusedtrain::augment::augment_cpu);
}
