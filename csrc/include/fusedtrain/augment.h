// Per-pixel math of the fused augmentation op (random resized crop + horizontal flip + colour jitter
// + normalize), used by both the CPU driver (cpu/augment.cpp) and the CUDA driver (cuda/augment.cu).
//
// Note [augment pipeline]:
// For each sample n with crop box (top, left, h, w), flip flag and jitter factors (b, c, s), the op
// computes, for every output pixel (y, x) of the out_h x out_w output and channel k:
//   v   = bilinear sample of the crop at (y, flip ? out_w-1-x : x)  torch's interpolate(mode="bilinear",
//         align_corners=False, antialias=False) on the cropped region, values in [0, M]
//   v   = clamp(b * v, 0, M)                                       adjust_brightness
//   v   = clamp(c * v + (1 - c) * m, 0, M)                         adjust_contrast; m = mean over all
//         output pixels of gray(v) (3 channels) or of v (1 channel), after brightness
//   v   = clamp(s * v + (1 - s) * gray(v), 0, M)                   adjust_saturation (3 channels only;
//         one channel is left unchanged, as torchvision and PIL do)
//   out = v * scale_k + shift_k,  scale_k = 1 / (M std_k),  shift_k = -mean_k / std_k     normalize
// with gray(r, g, b) = 0.2989 r + 0.587 g + 0.114 b (torchvision's weights) and M the largest value of
// the input's convention (torchvision's "bound"): 255 for uint8 images, 1 for float images in [0, 1].
// Everything is computed in float on the input's own scale, without rounding to integers between the
// steps (see the Python docstring of fusedtrain.augment.functional.augment for why that, not
// torchvision's uint8 chain, is the reference). Float input therefore runs torchvision's float chain
// step for step; uint8 input runs the same chain on values 0..255.
//
// Note [bilinear order]:
// A sample is two vertical lerps (one per source column) followed by one horizontal lerp. The CPU
// driver runs the vertical lerp over a whole source row segment and then the horizontal one over the
// output row; the CUDA driver does both per pixel. The float operations and their order are the same,
// and the build disables FMA contraction (math.h, Note [no FMA contraction]), so both backends give
// the same bits for everything but the contrast mean (a sum whose order differs).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "fusedtrain/math.h"  // FT_HD

namespace fusedtrain {
namespace augment {

// The largest value of each input convention (torchvision's `bound`).
constexpr float kMaxUint8 = 255.f;
constexpr float kMaxFloat = 1.f;
constexpr float kGrayR = 0.2989f;
constexpr float kGrayG = 0.587f;
constexpr float kGrayB = 0.114f;
constexpr int kMaxChannels = 3;

// Two source indices and their weights along one axis.
struct Tap {
  int32_t i0, i1;
  float w0, w1;
};

// torch's source index for bilinear interpolation with align_corners=False (ATen/native/UpSample.h,
// compute_source_index_and_lambda): scale = in / out in float, src = scale * (out + 0.5) - 0.5
// clamped at 0; i0 = min(floor(src), in - 1), i1 = i0 + 1 unless i0 is the last index, w1 = src - i0.
// Equal sizes copy (torchvision returns the crop unchanged then).
FT_HD Tap linear_tap(int32_t out_index, int32_t out_size, int32_t in_size) {
  Tap t;
  if (out_size == in_size) {
    t.i0 = out_index;
    t.i1 = out_index;
    t.w0 = 1.f;
    t.w1 = 0.f;
    return t;
  }
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  float src = scale * (static_cast<float>(out_index) + 0.5f) - 0.5f;
  src = src < 0.f ? 0.f : src;
  int32_t i0 = static_cast<int32_t>(floorf(src));
  i0 = i0 < in_size - 1 ? i0 : in_size - 1;
  float w1 = src - static_cast<float>(i0);
  w1 = w1 < 0.f ? 0.f : (w1 > 1.f ? 1.f : w1);
  t.i0 = i0;
  t.i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
  t.w1 = w1;
  t.w0 = 1.f - w1;
  return t;
}

// One linear interpolation step: w0 * a + w1 * b (torch's order of the two products).
FT_HD float lerp2(float a, float b, float w0, float w1) {
  return w0 * a + w1 * b;
}

// Antialiased bilinear (torch's interpolate(..., antialias=True), ATen/native/cpu/UpSampleKernel.cpp,
// _compute_weights_aa with the triangle filter): output index i along an axis of in_size source
// pixels averages the window [start, start + count) with weights max(0, 1 - |d|) normalized to sum 1,
// where d = (j - center + 0.5) / max(scale, 1), center = scale * (i + 0.5), scale = in / out, and the
// window reaches support = max(scale, 1) around the center. Downscaling then averages every source
// pixel under the output pixel instead of sampling two (no aliasing); upscaling is the plain bilinear
// inside the image and differs from it only at the borders (the weights are renormalized instead of
// clamping the index).
struct AaAxis {
  float scale, support, invscale;
};

FT_HD AaAxis aa_axis(int32_t in_size, int32_t out_size) {
  AaAxis a;
  a.scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  a.support = a.scale >= 1.f ? a.scale : 1.f;
  a.invscale = a.scale >= 1.f ? 1.f / a.scale : 1.f;
  return a;
}

// Most taps a window of this axis can have (host: buffer sizes).
inline int32_t aa_max_taps(int32_t in_size, int32_t out_size) {
  const AaAxis a = aa_axis(in_size, out_size);
  return static_cast<int32_t>(std::ceil(2.f * a.support)) + 2;
}

struct AaWindow {
  int32_t start, count;
  float center, total;  // total: sum of the unnormalized weights
};

FT_HD float aa_filter(const AaAxis& a, const AaWindow& win, int32_t j) {
  float d = (static_cast<float>(j + win.start) - win.center + 0.5f) * a.invscale;
  d = d < 0.f ? -d : d;
  return d < 1.f ? 1.f - d : 0.f;
}

FT_HD AaWindow aa_window(const AaAxis& a, int32_t out_index, int32_t in_size) {
  AaWindow w;
  w.center = a.scale * (static_cast<float>(out_index) + 0.5f);
  // torch truncates toward zero (static_cast<int64_t>) and clamps to the image.
  const int32_t lo = static_cast<int32_t>(w.center - a.support + 0.5f);
  const int32_t hi = static_cast<int32_t>(w.center + a.support + 0.5f);
  w.start = lo > 0 ? lo : 0;
  w.count = (hi < in_size ? hi : in_size) - w.start;
  w.total = 0.f;
  for (int32_t j = 0; j < w.count; ++j) w.total += aa_filter(a, w, j);
  return w;
}

// The normalized weight of tap j of the window.
FT_HD float aa_weight(const AaAxis& a, const AaWindow& win, int32_t j) {
  return aa_filter(a, win, j) / win.total;
}

// clamp(v, 0, max_value): max_value is kMaxUint8 or kMaxFloat.
FT_HD float clamp_value(float v, float max_value) {
  v = v < 0.f ? 0.f : v;
  return v > max_value ? max_value : v;
}

// adjust_brightness: clamp(b * v).
FT_HD float brightness(float v, float b, float max_value) {
  return clamp_value(v * b, max_value);
}

// torchvision's _blend(image1, image2, ratio) = clamp(image1 * ratio + (1 - ratio) * image2), with
// `rest` = (1 - ratio) * image2 precomputed where image2 is a per-image constant (contrast's mean).
FT_HD float blend(float v, float ratio, float rest, float max_value) {
  return clamp_value(v * ratio + rest, max_value);
}

// rgb_to_grayscale (torchvision): r * 0.2989 + 0.587 * g + 0.114 * b, summed left to right.
FT_HD float gray(float r, float g, float b) {
  return r * kGrayR + kGrayG * g + kGrayB * b;
}

// The jitter of one sample. `contrast_rest` = (1 - c) * m is filled in once the contrast mean m of the
// sample is known; `max_value` is the input convention's largest value (kMaxUint8 or kMaxFloat).
struct SampleJitter {
  float brightness;
  float contrast;
  float contrast_rest;
  float saturation;
  float one_minus_saturation;
  float max_value;
};

// adjust_brightness of one sample's value.
FT_HD float brightness(float v, const SampleJitter& j) {
  return brightness(v, j.brightness, j.max_value);
}

// contrast_rest = (1 - c) * m for a sample whose mean is m (torchvision's _blend(image, mean, c) passes
// alpha = 1.0 - c computed in double; the mean is a float32 tensor there).
FT_HD float contrast_rest(float contrast, double mean) {
  return static_cast<float>(1.0 - static_cast<double>(contrast)) * static_cast<float>(mean);
}

// Per-channel normalization folded into one multiply-add: out = v * scale + shift.
struct Normalize {
  float scale[kMaxChannels];
  float shift[kMaxChannels];
};

// The value whose mean contrast needs: gray of the (brightness-adjusted) pixel, or the value itself.
template <int C>
FT_HD float contrast_source(const float* v) {
  if constexpr (C == 3) {
    return gray(v[0], v[1], v[2]);
  } else {
    return v[0];
  }
}

// Contrast, saturation and normalization of one pixel whose C values have had brightness applied.
// CONTRAST / SATURATION false skip a factor of exactly 1, which is the identity (v * 1 + 0 == v).
template <int C, bool CONTRAST, bool SATURATION>
FT_HD void finish_pixel(float* v, const SampleJitter& j, const Normalize& nrm) {
  if constexpr (CONTRAST) {
    for (int k = 0; k < C; ++k) v[k] = blend(v[k], j.contrast, j.contrast_rest, j.max_value);
  }
  if constexpr (SATURATION && C == 3) {
    const float g = gray(v[0], v[1], v[2]);
    const float rest = j.one_minus_saturation * g;
    for (int k = 0; k < C; ++k) v[k] = blend(v[k], j.saturation, rest, j.max_value);
  }
  for (int k = 0; k < C; ++k) v[k] = v[k] * nrm.scale[k] + nrm.shift[k];
}

}  // namespace augment
}  // namespace fusedtrain
