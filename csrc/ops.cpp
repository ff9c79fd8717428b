// Every fusedtrain op schema, declared once. Backends add implementations with TORCH_LIBRARY_IMPL
// (cpu/optim.cpp, cuda/optim.cu); python/fusedtrain/_ops.py registers the fake kernels.
//
// Note [optimizer op conventions]:
// Every fused optimizer update is one op, step_, parametrized by the name of a rule (Note [optimizer
// rules] in csrc/include/fusedtrain/rules.h: "sgd", "adagrad", "rmsprop", "adam", ...) and its
// hyperparameters `hyper`, in the order the rule declares (fusedtrain._C.rules() lists them; flags as 0/1).
// In-place lists are `Tensor(x!)[]` and the op returns `()`:
//   params        the tensors updated (one device, one dtype); with param_copies, their float32 masters;
//   grads         read only, one per param;
//   states        the rule's state lists for these hyperparameters (e.g. exp_avgs then exp_avg_sqs), each
//                 of len(params) tensors, concatenated list by list;
//   state_steps   one-element float step counters (CPU, or capturable on the params' device), advanced by
//                 the op after every check has passed; empty for rules that count no steps;
//   ema_params    when non-empty, the same pass also moves each average toward its freshly updated
//                 parameter: a <- lerp(a, p, ema_weight);
//   param_copies  master weights (Note [mixed-precision layouts] in rounding.h): params are float32 masters,
//                 grads and param_copies float16 or bfloat16; the copies receive the rounded new masters.
// Then what every rule shares (Note [per-tensor binding] in math.h), each optional tensor a one-element
// tensor on the CPU (read by the host) or on the parameters' device (read by the kernels, no host sync):
//   lr / lr_tensor           the learning rate (a tensor overrides the float: torch's tensor lr, capturable);
//   l1                       the L1 coefficient: l1*sign(p) added to the gradient (after maximize and decay);
//   ema_weight(_tensor)      the weight of the fused average (a tensor: captured steps replay fresh weights);
//   grad_scale               GradScaler's scale: gradients are multiplied by 1/grad_scale in registers;
//   found_inf                GradScaler's flag: non-zero skips the update (and the step counters stay);
//   clip_coef                max_grad_norm's coefficient min(1, max_norm / (norm + 1e-6)), after unscaling;
//   stochastic_rounding      bfloat16 params (without masters) are stored with stochastic rounding, from
//                            random bits keyed by sr_seed (int64; on the device under CUDA-graph capture);
//   check_only               run every check (lists, layouts, scalars) and write nothing: a caller that
//                            splits one update into several calls checks them all before the first write;
//   aux_states               the rule's tensor scalars (Note [tensor scalars] in rules.h: NAdam's
//                            mu_products, ASGD's etas and mus), concatenated list by list, where the step
//                            counters are; advanced by the op with the counters.
// States may be float32 or bfloat16 with float32 params, or float32 / the copies' dtype with masters.
#include <torch/library.h>

TORCH_LIBRARY(fusedtrain, m) {
  m.def(
      "step_(str rule, float[] hyper, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] states, "
      "Tensor(c!)[] state_steps, Tensor(d!)[] ema_params, Tensor(e!)[] param_copies, Tensor(f!)[] aux_states, "
      "float lr, float l1=0.0, "
      "float ema_weight=0.0, Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "Tensor? clip_coef=None, Tensor? ema_weight_tensor=None, bool stochastic_rounding=False, "
      "Tensor? sr_seed=None, bool check_only=False) -> ()");
  // averages <- lerp(averages, params, weight): EMA / Polyak (weight = 1 - decay), SWA (1 / (n + 1)). A
  // weight_tensor overrides weight; a non-zero found_inf skips the update (GradScaler's skipped step).
  m.def("ema_(Tensor(a!)[] averages, Tensor[] params, float weight, Tensor? weight_tensor=None, "
        "Tensor? found_inf=None) -> ()");
  // The vector norm of all tensors together (one device, one dtype): float32 (float64 for float64 input).
  m.def("total_norm(Tensor[] tensors, float norm_type) -> Tensor");
  // torch.optim.Adafactor's step of one param group's tensors of one dtype (Note [Adafactor passes] and
  // [Adafactor blocks], include/fusedtrain/adafactor.h and cpu/optim_adafactor.cpp): row_vars / col_vars
  // hold one entry per >= 2-D param, variances one per 0-D / 1-D param, each in params order; state_steps
  // one per param, advanced by the op, which derives each tensor's step ** beta2_decay and
  // min(lr, step ** -0.5) from them as torch does in Python. decay = 1 - lr*weight_decay (applied when
  // apply_decay); eps1 resolved by the caller (torch: the first parameter's finfo(dtype).eps when None);
  // inv_scale / clip_coef: GradScaler's and max_grad_norm's factors on the gradient (1: unused);
  // check_only: run every check and write nothing (Note [optimizer op conventions]).
  m.def("adafactor_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] row_vars, Tensor(c!)[] col_vars, "
        "Tensor(d!)[] variances, Tensor(e!)[] state_steps, float beta2_decay, float eps1, float eps2, float lr, "
        "float decay, bool apply_decay, float d, bool maximize, float inv_scale=1.0, float clip_coef=1.0, "
        "bool check_only=False) -> ()");

  // ---- Regularization (issue 4): dropout family and penalty. ----
  // Note [dropout op conventions]: `seed` is a one-element int64 tensor, on the CPU (read by the host) or on
  // the input's device (read by the kernels: Note [device seed] in philox.h), and `offset` an int; together
  // they name a Philox stream (Note [fusedtrain random stream], philox.h), and the element of logical
  // row-major index i is kept iff the stream's word of index i / group passes the keep test (Note [dropout
  // keep rule], dropout.h). group = 1: dropout; H*W: Dropout2d; numel / N: DropPath. rescale=False leaves
  // kept elements unscaled. The backward pass of each op is the same op on the gradient with the same
  // (seed, offset): no mask is stored.
  m.def("dropout(Tensor input, Tensor seed, int offset, float p, int group=1, bool rescale=True) -> Tensor");
  m.def("dropout_(Tensor(a!) input, Tensor seed, int offset, float p, int group=1, bool rescale=True) -> ()");
  // residual + dropout(input + bias), bias of shape [input.size(-1)]; backward -> (grad_input, grad_bias).
  m.def("bias_dropout_add(Tensor input, Tensor bias, Tensor residual, Tensor seed, int offset, float p) -> Tensor");
  m.def("bias_dropout_add_backward(Tensor grad, Tensor seed, int offset, float p, int bias_numel) -> (Tensor, Tensor)");
  // l1 * sum|theta| + l2 * sum theta^2 over every element of params (one device, one dtype), a 0-dim
  // tensor in the accumulation dtype (float32, or float64 for float64 params); backward -> grad * d/dtheta.
  m.def("penalty(Tensor[] params, float l1, float l2) -> Tensor");
  m.def("penalty_backward(Tensor[] params, Tensor grad, float l1, float l2) -> Tensor[]");
  // Fused softmax cross-entropy over class indices (Note [fused cross-entropy], include/fusedtrain/cross_entropy.h):
  // input [N, C] (any float dtype), target [N] int64 (ignore_index rows contribute nothing), reduction 'none' |
  // 'mean' | 'sum'. Returns (loss, grad): the loss in float32 (float64 for float64 input), 0-dim or [N] for
  // 'none'; grad = d sum(loss) / d input for a grad_output of 1, [N, C] in the input's dtype, computed in the
  // same pass when compute_grad (else an empty tensor). Targets outside [0, C) throw before anything is written.
  // The backward pass: cross_entropy_backward(grad, grad_output) = grad * grad_output (one value per row for
  // 'none', else one), in grad's dtype.
  m.def("cross_entropy(Tensor input, Tensor target, float label_smoothing=0.0, int ignore_index=-100, "
        "str reduction=\"mean\", bool compute_grad=True) -> (Tensor, Tensor)");
  m.def("cross_entropy_backward(Tensor grad, Tensor grad_output) -> Tensor");

  // ---- augment (issue 5) ----
  // Note [augment op]: random resized crop + horizontal flip + brightness/contrast/saturation +
  // normalize of uint8 (C, H, W) images in 0..255, or float32 ones in [0, 1] (torchvision's float
  // convention), any strides (NCHW or NHWC batches are passed as views), into one new
  // (N, C, size[0], size[1]) tensor of dtype out_dtype (an int size is square). Per-sample parameters
  // are CPU tensors the driver reads on the host: boxes int64 (N, 4) = (top, left, height, width) inside
  // each image, flips bool (N,), factors float32 (N, 3) = (brightness, contrast, saturation). mean/std
  // have C values.
  // antialias: torch's antialiased bilinear resize instead of the two-tap one.
  // Math: csrc/include/fusedtrain/augment.h.
  m.def(
      "augment(Tensor[] images, Tensor boxes, Tensor flips, Tensor factors, int[2] size, float[] mean, float[] std, "
      "ScalarType out_dtype, bool antialias=False) -> Tensor");
}
