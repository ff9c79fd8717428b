// Host-side logic of the augment op shared by the CPU and CUDA drivers: argument checks and the
// per-sample descriptors (image geometry, crop box, flip, jitter factors, normalization) both drivers
// consume. The per-pixel math is in augment.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "fusedtrain/augment.h"

namespace fusedtrain {
namespace augment {

// One input image: a (C, H, W) view of uint8 or float32 data (Plan::float_input) with arbitrary strides
// (NCHW, NHWC, a crop of a larger tensor...), in elements.
struct ImageDesc {
  const void* data;
  int64_t height, width;
  int64_t stride_c, stride_h, stride_w;
};

// One sample's parameters: the crop box inside its image, the flip flag and the jitter factors.
struct SampleDesc {
  int32_t top, left, height, width;
  int32_t flip;
  SampleJitter jitter;  // contrast_rest is set by the driver once the sample's mean is known
};

struct Plan {
  int64_t channels = 0;
  int64_t out_h = 0, out_w = 0;  // output rows and columns
  bool float_input = false;      // float32 images in [0, 1] (else uint8 in 0..255): Note [augment pipeline]
  std::vector<ImageDesc> images;
  std::vector<SampleDesc> samples;
  Normalize norm{};
  bool any_contrast = false;    // some sample has a contrast factor != 1 (needs the mean pass)
  bool any_saturation = false;  // some sample has a saturation factor != 1 and C == 3
  bool antialias = false;       // antialiased resize (augment.h, aa_*)
};

// Limits of a crop box (Note [overflow-free bounds] in make_plan).
constexpr int64_t kMaxCropEnd = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxCropSide = int64_t{1} << 29;

inline bool is_interleaved(const ImageDesc& img, int64_t channels) {
  return img.stride_c == 1 && img.stride_w == channels;
}

// Checks every argument of fusedtrain::augment and builds the plan. Errors name the argument and the fix.
inline Plan make_plan(at::TensorList images, const at::Tensor& boxes, const at::Tensor& flips,
                      const at::Tensor& factors, at::IntArrayRef size, at::ArrayRef<double> mean,
                      at::ArrayRef<double> std, at::ScalarType out_dtype, bool antialias) {
  const int64_t n = static_cast<int64_t>(images.size());
  TORCH_CHECK(n > 0, "fusedtrain.augment: images is empty; pass at least one image (an empty batch has "
              "nothing to augment: skip the call instead)");
  TORCH_CHECK(size.size() == 2, "fusedtrain.augment: size must be (height, width), got ", size.size(), " values");
  TORCH_CHECK(size[0] >= 1 && size[0] <= 32768 && size[1] >= 1 && size[1] <= 32768,
              "fusedtrain.augment: size (height, width) must be in [1, 32768] each, got ", size);
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
              "fusedtrain.augment: out_dtype must be torch.float32, torch.float16 or torch.bfloat16, got ",
              out_dtype);
  Plan plan;
  plan.out_h = size[0];
  plan.out_w = size[1];
  plan.antialias = antialias;
  const at::Tensor& first = images[0];
  TORCH_CHECK(first.dim() == 3, "fusedtrain.augment: images[0] must be a (C, H, W) image, got ", first.dim(),
              " dimensions");
  plan.channels = first.size(0);
  const int64_t c = plan.channels;
  TORCH_CHECK(c == 1 || c == 3, "fusedtrain.augment: images have ", c,
              " channels; only 1 (grayscale) or 3 (RGB) are supported, as in torchvision's colour ops");
  TORCH_CHECK(first.scalar_type() == at::kByte || first.scalar_type() == at::kFloat, "fusedtrain.augment: images[0] "
              "has dtype ", first.scalar_type(), "; the op reads uint8 images (0..255) or float32 images (0..1, "
              "torchvision's float convention). Convert other float dtypes with .float()");
  plan.float_input = first.scalar_type() == at::kFloat;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& im = images[i];
    TORCH_CHECK(im.scalar_type() == first.scalar_type(), "fusedtrain.augment: images[", i, "] has dtype ",
                im.scalar_type(), " but images[0] has ", first.scalar_type(), "; pass images of one dtype");
    TORCH_CHECK(im.layout() == at::kStrided, "fusedtrain.augment: images[", i, "] is not a dense (strided) tensor");
    TORCH_CHECK(im.dim() == 3 && im.size(0) == c, "fusedtrain.augment: images[", i, "] has shape ", im.sizes(),
                " but images[0] has ", c, " channels; all images need the same channel count (C, H, W)");
    TORCH_CHECK(im.device() == first.device(), "fusedtrain.augment: images[", i, "] is on ", im.device(),
                " but images[0] is on ", first.device(), "; move all images to one device");
    TORCH_CHECK(im.size(1) >= 1 && im.size(2) >= 1, "fusedtrain.augment: images[", i, "] is empty (shape ",
                im.sizes(), ")");
    plan.images.push_back(ImageDesc{im.const_data_ptr(), im.size(1), im.size(2), im.stride(0), im.stride(1),
                                    im.stride(2)});
  }
  auto check_params = [&](const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t cols) {
    TORCH_CHECK(t.device().is_cpu(), "fusedtrain.augment: ", name, " must be a CPU tensor (the driver reads "
                "the per-sample parameters on the host to set up the work); pass ", name, ".cpu()");
    TORCH_CHECK(t.scalar_type() == dtype, "fusedtrain.augment: ", name, " must have dtype ", dtype, ", got ",
                t.scalar_type());
    const bool shape_ok = cols == 0 ? (t.dim() == 1 && t.size(0) == n)
                                    : (t.dim() == 2 && t.size(0) == n && t.size(1) == cols);
    TORCH_CHECK(shape_ok, "fusedtrain.augment: ", name, " must have shape (", n, cols == 0 ? "" : ", ",
                cols == 0 ? "" : std::to_string(cols), ") for ", n, " images, got ", t.sizes());
  };
  check_params(boxes, "boxes", at::kLong, 4);
  check_params(flips, "flips", at::kBool, 0);
  check_params(factors, "factors", at::kFloat, 3);
  const at::Tensor b = boxes.contiguous(), f = flips.contiguous(), j = factors.contiguous();
  const int64_t* bp = b.data_ptr<int64_t>();
  const bool* fp = f.data_ptr<bool>();
  const float* jp = j.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t top = bp[4 * i], left = bp[4 * i + 1], h = bp[4 * i + 2], w = bp[4 * i + 3];
    const ImageDesc& im = plan.images[i];
    // Note [overflow-free bounds]: compared by subtraction, never `top + h <= height`: the box is user input
    // and top + h can wrap around int64 (UB) to a negative sum that passes, and the crop is then read
    // outside the image. With top >= 0 and height >= 1, height - top cannot overflow.
    TORCH_CHECK(h >= 1 && w >= 1 && top >= 0 && left >= 0 && h <= im.height - top && w <= im.width - left,
                "fusedtrain.augment: boxes[", i, "] = (top ", top, ", left ", left, ", height ", h, ", width ", w,
                ") does not lie inside image ", i, " (", im.height, " x ", im.width,
                "); crops must have height, width >= 1 and lie inside the image (torchvision would pad; "
                "fusedtrain does not): clip the box");
    // SampleDesc and the kernels hold the box in int32 (row and column indices top + k < top + h), the CPU
    // column tables hold column * 4 in int32, and the resize computes window bounds near 2 * h in float
    // then int32: a crop side up to kMaxCropSide keeps all of these exact. Only views with huge logical
    // sizes (an expanded, stride-0 image) get here; the box is refused instead of narrowed.
    TORCH_CHECK(top + h <= kMaxCropEnd && left + w <= kMaxCropEnd && h <= kMaxCropSide && w <= kMaxCropSide,
                "fusedtrain.augment: boxes[", i, "] = (top ", top, ", left ", left, ", height ", h, ", width ", w,
                ") is too large: crops may be at most ", kMaxCropSide, " pixels on a side and end before row and "
                "column ", kMaxCropEnd, " (the kernels index crops in int32); crop a smaller region");
    const float fb = jp[3 * i], fc = jp[3 * i + 1], fs = jp[3 * i + 2];
    TORCH_CHECK(std::isfinite(fb) && std::isfinite(fc) && std::isfinite(fs) && fb >= 0.f && fc >= 0.f && fs >= 0.f,
                "fusedtrain.augment: factors[", i, "] = (", fb, ", ", fc, ", ", fs,
                ") must be finite and non-negative (brightness, contrast, saturation; 1 leaves the image as is)");
    SampleDesc s;
    s.top = static_cast<int32_t>(top);
    s.left = static_cast<int32_t>(left);
    s.height = static_cast<int32_t>(h);
    s.width = static_cast<int32_t>(w);
    s.flip = fp[i] ? 1 : 0;
    s.jitter.brightness = fb;
    s.jitter.contrast = fc;
    s.jitter.contrast_rest = 0.f;
    s.jitter.saturation = fs;
    // torchvision's _blend passes alpha = 1.0 - ratio, computed in double.
    s.jitter.one_minus_saturation = static_cast<float>(1.0 - static_cast<double>(fs));
    s.jitter.max_value = plan.float_input ? kMaxFloat : kMaxUint8;
    plan.any_contrast = plan.any_contrast || fc != 1.f;
    plan.any_saturation = plan.any_saturation || (fs != 1.f && c == 3);
    plan.samples.push_back(s);
  }
  TORCH_CHECK(static_cast<int64_t>(mean.size()) == c && static_cast<int64_t>(std.size()) == c,
              "fusedtrain.augment: mean and std need one value per channel (", c, "), got ", mean.size(), " and ",
              std.size(), " values; pass mean=[0.0] * C and std=[1.0] * C for no normalization");
  for (int64_t k = 0; k < c; ++k) {
    TORCH_CHECK(std::isfinite(mean[k]) && std::isfinite(std[k]) && std[k] != 0.0, "fusedtrain.augment: std[", k,
                "] = ", std[k], " and mean[", k, "] = ", mean[k], " must be finite and std non-zero");
    // (v / M - mean) / std == v * (1 / (M std)) + (-mean / std), folded in double; M = 255 (uint8) or 1 (float,
    // where this is torchvision's (v - mean) / std as one multiply-add).
    const double max_value = plan.float_input ? kMaxFloat : kMaxUint8;
    plan.norm.scale[k] = static_cast<float>(1.0 / (max_value * std[k]));
    plan.norm.shift[k] = static_cast<float>(-mean[k] / std[k]);
  }
  return plan;
}

// Runs Backend::template run<C, OutT>(plan, out) for the plan's channel count (1 or 3) and the output
// dtype (make_plan admits float32, float16 and bfloat16): the dispatch both drivers share.
template <class Backend>
void run_plan(const Plan& plan, at::Tensor& out, at::ScalarType out_dtype) {
  auto go = [&](auto tag) {
    using OutT = decltype(tag);
    if (plan.channels == 3) {
      Backend::template run<3, OutT>(plan, out);
    } else {
      Backend::template run<1, OutT>(plan, out);
    }
  };
  switch (out_dtype) {
    case at::kHalf:
      go(c10::Half{});
      break;
    case at::kBFloat16:
      go(c10::BFloat16{});
      break;
    default:
      go(float{});
      break;
  }
}

}  // namespace augment
}  // namespace fusedtrain
