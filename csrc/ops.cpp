// Every fusedtrain op schema, declared once. Backends add implementations with TORCH_LIBRARY_IMPL
// (cpu/optim.cpp, cuda/optim.cu); python/fusedtrain/_ops.py registers the fake kernels.
//
// Note [optimizer op conventions]:
// In-place multi-tensor updates take `Tensor(x!)[]` lists for what they mutate and return `()`.
// Lists that an option turns off (momentum buffers without momentum, max_exp_avg_sqs without
// amsgrad, ...) are passed empty. `state_steps` are one-element CPU float tensors, advanced by the op.
// Every optimizer op ends with `ema_params, ema_weight`: when the list is non-empty, the same pass also
// moves each average toward its freshly updated parameter (a <- lerp(a, p, ema_weight)).
#include <torch/library.h>

TORCH_LIBRARY(fusedtrain, m) {
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, float lr, float momentum, "
      "float dampening, float weight_decay, bool nesterov, bool maximize, bool first_step, Tensor(z!)[] ema_params, "
      "float ema_weight) -> ()");
  m.def(
      "adagrad_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_sums, Tensor(c!)[] state_steps, "
      "float lr, float lr_decay, float weight_decay, float eps, bool maximize, Tensor(z!)[] ema_params, "
      "float ema_weight) -> ()");
  m.def(
      "rmsprop_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, Tensor(c!)[] grad_avgs, "
      "Tensor(d!)[] momentum_buffers, Tensor(e!)[] state_steps, float lr, float alpha, float eps, "
      "float weight_decay, float momentum, bool centered, bool maximize, Tensor(z!)[] ema_params, float ema_weight) "
      "-> ()");
  m.def(
      "adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay, Tensor(z!)[] ema_params, "
      "float ema_weight) -> ()");
  // averages <- lerp(averages, params, weight): EMA / Polyak (weight = 1 - decay), SWA (1 / (n + 1)).
  m.def("ema_(Tensor(a!)[] averages, Tensor[] params, float weight) -> ()");

  // ---- augment (issue 5) ----
  // Note [augment op]: random resized crop + horizontal flip + brightness/contrast/saturation +
  // normalize of uint8 (C, H, W) images (any strides: NCHW or NHWC batches are passed as views) into one
  // new (N, C, size, size) tensor of dtype out_dtype. Per-sample parameters are CPU tensors the driver
  // reads on the host: boxes int64 (N, 4) = (top, left, height, width) inside each image, flips bool
  // (N,), factors float32 (N, 3) = (brightness, contrast, saturation). mean/std have C values.
  // antialias: torch's antialiased bilinear resize instead of the two-tap one.
  // Math: csrc/include/fusedtrain/augment.h.
  m.def(
      "augment(Tensor[] images, Tensor boxes, Tensor flips, Tensor factors, int size, float[] mean, float[] std, "
      "ScalarType out_dtype, bool antialias=False) -> Tensor");
}
