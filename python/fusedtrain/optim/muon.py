"""Muon on batched Newton-Schulz matmuls and fusedtrain's fused element-wise kernels.

Note [Muon's step]:
torch.optim.Muon updates one matrix at a time: a momentum pass, five Newton-Schulz iterations of three
matmuls each (in bfloat16 on every device), a weight-decay pass and an update pass. Here:

1. one fused element-wise pass per group of parameters ("muon_momentum", csrc/include/fusedtrain/
   rules_muon.h) updates the momentum buffers and writes the Nesterov update straight into the batch
   tensor of the Newton-Schulz input (bfloat16 from float32 parameters, as torch's ``.bfloat16()`` rounds
   it), transposed where torch transposes (a tall matrix is orthogonalized as its transpose);
2. the parameters of one (device, dtype, oriented shape) are orthogonalized together: torch.bmm and
   torch.baddbmm over the batch, the same three products per iteration as torch's mm / addmm;
3. one fused element-wise pass per learning rate ("muon_update") applies the decoupled weight decay and
   the shape-adjusted update, and, with ``ema=``, moves the parameters' EMA averages in the same pass (the
   AdamW groups' pass does the same), so the EMA costs no pass of its own over these parameters.

Newton-Schulz precision (``ns_dtype``): bfloat16 (torch's) by default. A bfloat16 product of bfloat16
matrices is, on every backend torch uses, the float32 sum of exact products rounded to bfloat16 once. On
the GPU it runs in bfloat16 (tensor cores). On the CPU, where torch's bfloat16 GEMM is a slow fallback
unless the CPU has bfloat16 instructions, the same products are computed by float32 GEMMs on the
bfloat16 values and each result is rounded to bfloat16: the same numbers, up to the order of the float32
summation (results agree with torch to bfloat16 rounding). ``ns_dtype=torch.float32`` (or float64) runs the
iteration in that dtype: a more exact orthogonalization than torch's, at the cost of parity.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import _ops
from .._dtensor import is_dtensor
from ..clip import clip_coefficient, grads_norm
from ._base import (KeepsOptions, check_max_grad_norm, check_own_step_options, check_param, check_state_bits,
                    convert_state_bits, new_step, quantized_states, restore_saved_codes, where)

__all__ = ["Muon"]

_torch_muon: Any = getattr(torch.optim, "Muon", None)
if _torch_muon is None:  # torch < 2.9: fusedtrain.optim does not export Muon (see optim/__init__.py)
    raise ImportError("torch.optim.Muon is not available in this version of torch")

from torch.optim import _muon as _tm  # noqa: E402  (torch's defaults and lr adjustment: one source of truth)
try:  # torch's conversion of a tensor hyperparameter (a 1-element tensor becomes 0-dim), where it has one
    from torch.optim.optimizer import _to_scalar
except ImportError:  # pragma: no cover
    def _to_scalar(x: Any) -> Any:  # type: ignore[no-redef]
        return x.squeeze() if isinstance(x, Tensor) and x.dim() != 0 else x

_NS_DTYPES = (torch.bfloat16, torch.float32, torch.float64)


def _shape2d(p: Tensor) -> tuple[int, int]:
    """The matrix a parameter is orthogonalized as: itself (2-D), or flattened to (shape[0], rest) (timm)."""
    return p.shape[0], math.prod(p.shape[1:])


def _grad(p: Tensor) -> Tensor:
    """The gradient of a parameter the step takes (one with a gradient)."""
    assert p.grad is not None
    return p.grad


def _round_bf16_(t: Tensor) -> Tensor:
    """Rounds a float32 tensor to bfloat16 values (round to nearest even), in place."""
    return t.copy_(t.to(torch.bfloat16))


def newton_schulz(x: Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float,
                  emulate_bf16: bool = False) -> Tensor:
    r"""torch.optim.Muon's Newton-Schulz orthogonalization of a batch of short-wide matrices ``x``
    (``[B, r, c]``, ``r <= c``), in ``x``'s dtype: :math:`X \leftarrow X/\max(\lVert X\rVert_F, \epsilon)`, then
    ``ns_steps`` times :math:`G = XX^T,\ X \leftarrow aX + (bG + cG^2)X`.

    ``emulate_bf16``: ``x`` holds bfloat16 values in float32; every product is computed in float32 and
    rounded to bfloat16, as a bfloat16 GEMM with float32 accumulation computes it (Note [Muon's step]).
    Returns a new tensor (bfloat16 values in float32 when emulating)."""
    a, b, c = ns_coefficients
    if emulate_bf16:
        xb = x.to(torch.bfloat16)
        # torch: ortho_grad.div_(ortho_grad.norm().clamp(min=eps)), all in bfloat16
        xb = xb / torch.linalg.vector_norm(xb, dim=(-2, -1), keepdim=True).clamp(min=eps)
        x = xb.to(torch.float32)
    else:
        x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(ns_steps):
        gram = torch.bmm(x, x.mT)
        if emulate_bf16:
            _round_bf16_(gram)
        update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        if emulate_bf16:
            _round_bf16_(update)
        x = torch.baddbmm(x, update, x, beta=a)
        if emulate_bf16:
            _round_bf16_(x)
    return x


def _passes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """A group's plan split into update passes: torch's for-loop updates a parameter listed twice twice, one
    update after the other (with a warning from add_param_group), and one fused call must see each tensor
    once, so the k-th occurrence of a parameter goes to pass k."""
    seen: dict[int, int] = {}
    passes: list[list[int]] = []
    for i, p in enumerate(plan["params"]):
        k = seen.get(id(p), 0)
        seen[id(p)] = k + 1
        if k == len(passes):
            passes.append([])
        passes[k].append(i)
    if len(passes) <= 1:
        return [plan]
    return [dict(plan, params=[plan["params"][i] for i in idx],
                 **({"adjusted": [plan["adjusted"][i] for i in idx]} if "adjusted" in plan else {}))
            for idx in passes]


class Muon(KeepsOptions, _torch_muon):  # type: ignore[misc,valid-type]
    r"""Muon (Jordan et al. 2024: momentum orthogonalized by Newton-Schulz), a drop-in for
    :class:`torch.optim.Muon` that orthogonalizes all matrices of one shape in batched matmuls and runs
    everything else in fused element-wise kernels (Note [Muon's step] in ``fusedtrain/optim/muon.py``).

    .. math::
        B_t = \mu B_{t-1} + (1-\mu) g_t,\quad \tilde B_t = (1-\mu) g_t + \mu B_t \text{ (nesterov) or } B_t,\quad
        \theta_t = \theta_{t-1}(1-\eta\lambda) - \eta\,s(A, B)\,\mathrm{NS}_k^{(a,b,c)}(\tilde B_t)

    (torch's parametrization: ``buf.lerp_(grad, 1 - momentum)``; :math:`s` is ``adjust_lr_fn``'s ratio).

    Args:
        params, lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn: as in
            torch.optim.Muon (same defaults, validation errors and state: ``momentum_buffer``).
        flatten: orthogonalize >= 3-D parameters (conv kernels ``[out, in, kh, kw]``) as the matrix
            ``[out, in*kh*kw]``, as timm's Muon does (``adjust_lr_fn`` sees that 2-D shape). Default False:
            like torch, only 2-D parameters are accepted.
        ns_dtype: dtype of the Newton-Schulz iteration: ``torch.bfloat16`` (torch's, default), ``torch.float32``
            or ``torch.float64``.
        adamw_betas, adamw_eps: AdamW's betas and eps for the parameter groups with ``use_muon=False``.
        foreach, fused: validated as torch validates them elsewhere (``fused`` with ``foreach`` is an error)
            and otherwise ignored: the batched kernels always run.
        ema: a :class:`fusedtrain.ensemble.EMA` updated with every step: the update kernels move the averages
            of the parameters they write (the Muon and AdamW passes), one more pass the others and the buffers;
            equal to ``step()`` then ``ema.update()``.
        max_grad_norm: clip the joint 2-norm of all gradients of this optimizer (Muon and AdamW groups)
            inside the step; the clip factor is applied in the fused momentum / AdamW passes. The norm is kept
            in ``last_grad_norm``.
        state_bits: 32 (float states, default) or 8: blockwise-quantized 8-bit states (Note [8-bit states in the
            optimizers], docs/optim.md) for every parameter of >= 2 dims with at least ``min_8bit_size``
            elements: the Muon groups' ``momentum_buffer`` (int8 codes, Note [Muon's 8-bit momentum] in
            ``csrc/include/fusedtrain/rules_muon_quant.h``) and the AdamW groups' ``exp_avg`` / ``exp_avg_sq``
            (as ``AdamW(state_bits=8)``), each with its ``<key>_absmax`` scales in the state.
            :func:`fusedtrain.optim.to_torch_state_dict` turns such a state dict into one torch.optim.Muon loads;
            a float state dict (torch's) loads into an 8-bit Muon and is quantized.
        min_8bit_size: parameters with fewer elements keep float states at ``state_bits=8`` (default 4096).

    GradScaler: supported (``scaler.step(opt)`` hands the scale to the fused passes; a step with
    ``found_inf`` is skipped, read on the host). Not supported, refused with an error naming them:
    ``differentiable``, ``capturable``, ``l1``, ``master_weights``, ``stochastic_rounding``, ``state_dtype``,
    ``state_bits=4``; DTensor (FSDP2 / tensor-parallel) parameters are refused at the step, before any write
    (Newton-Schulz needs whole matrices; use torch.optim.Muon there).

    **Muon and AdamW in one optimizer.** Muon is meant for the 2-D matrices of hidden layers; biases,
    norms' weights (0-D / 1-D) and, by the usual recipe, embeddings and the output head are trained with
    AdamW. A parameter group with ``use_muon=False`` is updated by fusedtrain's fused AdamW (same results
    as :class:`torch.optim.AdamW` with ``amsgrad=False``), with the group's ``lr`` and ``weight_decay`` and
    its ``adamw_betas`` / ``adamw_eps``; such groups take parameters of any shape and keep AdamW's state
    (``step``, ``exp_avg``, ``exp_avg_sq``)::

        hidden = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n and "head" not in n]
        others = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n or "head" in n]
        opt = fusedtrain.optim.Muon([
            dict(params=hidden),                                            # Muon, lr=0.02
            dict(params=others, use_muon=False, lr=3e-4, weight_decay=0.0,  # fused AdamW
                 adamw_betas=(0.9, 0.95)),
        ], lr=0.02, weight_decay=0.01, flatten=True)
    """

    _opt_name = "Muon"
    _rule_8bit = "muon_momentum8bit"
    # (Muon's state_bits / min_8bit_size; class defaults for objects unpickled from before they existed)
    state_bits = 32
    min_8bit_size = 4096
    # torch.amp.GradScaler hands its scale and found_inf (attributes grad_scale / found_inf during step)
    _step_supports_amp_scaling = True

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True,
                 ns_coefficients: tuple[float, float, float] = (_tm.DEFAULT_A, _tm.DEFAULT_B, _tm.DEFAULT_C),
                 eps: float = _tm.EPS, ns_steps: int = _tm.DEFAULT_NS_STEPS, adjust_lr_fn: str | None = None, *,
                 flatten: bool = False, ns_dtype: torch.dtype = torch.bfloat16,
                 adamw_betas: tuple[float, float] = (0.9, 0.999), adamw_eps: float = 1e-8,
                 foreach: bool | None = None, fused: bool | None = None, differentiable: bool = False,
                 ema: Any = None, max_grad_norm: float | None = None, state_bits: int = 32,
                 min_8bit_size: int = 4096, **refused: Any) -> None:
        check_own_step_options("Muon", foreach, fused, differentiable, refused)
        check_state_bits("Muon", state_bits, min_8bit_size, rule_8bit=self._rule_8bit, rule_4bit=None)
        if ns_dtype not in _NS_DTYPES:
            raise ValueError(f"Invalid ns_dtype: {ns_dtype}; use torch.bfloat16 (torch's), torch.float32 or "
                             "torch.float64")
        max_grad_norm = check_max_grad_norm(max_grad_norm)
        # torch's own validation of its hyperparameters (same errors, same order), on a stand-in matrix
        _torch_muon([torch.empty(0, 0)], lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps,
                    adjust_lr_fn)
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                        use_muon=True, flatten=bool(flatten), ns_dtype=ns_dtype, adamw_betas=tuple(adamw_betas),
                        adamw_eps=adamw_eps)
        self.max_grad_norm = max_grad_norm
        self.ema = ema
        self.state_bits = int(state_bits)
        self.min_8bit_size = int(min_8bit_size)
        self.last_grad_norm: Tensor | None = None
        torch.optim.Optimizer.__init__(self, params, defaults)

    # ------------------------------------------------------------------------------- param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group; a Muon group (``use_muon`` True, the default) takes 2-D parameters only
        (>= 2-D with ``flatten``), checked before the group is added."""
        use_muon = param_group.get("use_muon", self.defaults["use_muon"])
        flatten = param_group.get("flatten", self.defaults["flatten"])
        params = param_group["params"]
        listed = [params] if isinstance(params, Tensor) else list(params)
        param_group = dict(param_group, params=listed)
        if use_muon:
            for p in listed:
                t = p[1] if isinstance(p, tuple) else p
                if not isinstance(t, Tensor):
                    continue  # torch's add_param_group gives its own error
                if t.ndim != 2 and not (flatten and t.ndim > 2):
                    raise ValueError(
                        f"Muon only supports 2D parameters whereas we found a parameter with size: {t.size()}; "
                        "put biases, norms and other 0-D/1-D parameters in a param group with use_muon=False "
                        "(updated by a fused AdamW), and pass flatten=True for conv kernels")
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._fill_group_defaults()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load_state_dict (a torch.optim.Muon state dict loads, and ours loads into torch's); the
        fusedtrain group keys a torch state dict lacks take this optimizer's defaults. Quantized states keep
        their codes; states are brought to this optimizer's ``state_bits`` (float states quantized, codes
        dequantized)."""
        super().load_state_dict(state_dict)
        self._fill_group_defaults()
        for _ in restore_saved_codes(self.param_groups, self.state, state_dict):
            pass  # float states keep torch's cast to the parameter's dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state and p.device.type != "meta":
                    self._state_form(group, p)

    # Which states of a group's parameters are quantized at state_bits=8, and whether each is signed.
    _MUON_STATES = (("momentum_buffer", True),)
    _ADAMW_STATES = (("exp_avg", True), ("exp_avg_sq", False))

    def _quantized(self, p: Tensor) -> bool:
        """Whether ``p``'s states are 8-bit (``state_bits=8``, >= 2 dims, >= ``min_8bit_size`` elements)."""
        return quantized_states(p, self.state_bits, self.min_8bit_size)

    def _state_form(self, group: dict[str, Any], p: Tensor) -> bool:
        """``p``'s states in the form its pass updates: 8-bit codes (returns True) or float states of the
        parameter's dtype (codes of a loaded 8-bit state dict are dequantized)."""
        state = self.state[p]
        bits = 8 if self._quantized(p) else 32
        codes = False
        for key, signed in self._MUON_STATES if group["use_muon"] else self._ADAMW_STATES:
            if convert_state_bits(self._opt_name, state, key, p, bits, signed):
                codes = True
            elif isinstance(state.get(key), Tensor) and state[key].dtype != p.dtype:
                state[key] = state[key].to(p.dtype)
        return codes

    def _fill_group_defaults(self) -> None:
        defaults = getattr(self, "defaults", {})
        for group in self.param_groups:
            for key in ("use_muon", "flatten", "ns_dtype", "adamw_betas", "adamw_eps"):
                if key in defaults:
                    group.setdefault(key, defaults[key])

    # ------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Muon step (Note [Muon's step]); AdamW for the groups with ``use_muon=False``. Every check
        runs before the first write: a refused step changes nothing.

        Args:
            closure: a callable that re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = self._amp()
        plans = [self._collect(gi, group) for gi, group in enumerate(self.param_groups)]
        if found_inf is not None and float(found_inf) != 0.0:
            return loss  # GradScaler found an inf/NaN: the step is skipped, as torch's fused optimizers do
        fused = [p for plan in plans for p in plan["params"]]
        clip_coef = None
        if self.max_grad_norm is not None and fused:
            norm = self._unscaled_norm(grads_norm([_grad(p) for p in fused]), grad_scale)
            clip_coef = clip_coefficient(norm, self.max_grad_norm)
        # the EMA rides on the update kernels (Note [Muon's step]) unless a parameter is updated twice in the
        # step (its average must move toward its final value): then ema.update() runs after the step
        fused_ema: list[Tensor] | None = None
        if self.ema is not None and len({id(p) for p in fused}) == len(fused):
            fused_ema = []
        for group, plan in zip(self.param_groups, plans):
            for part in _passes(plan):
                if group["use_muon"]:
                    self._muon_group(group, part, grad_scale, clip_coef, fused_ema)
                else:
                    self._adamw_group(group, part, grad_scale, clip_coef, fused_ema)
            if plan["meta"]:
                self._meta_step(group, plan["meta"])
        if self.ema is not None:
            if fused_ema is None:
                self.ema.update()
            else:
                self.ema.finish_fused_update(fused_ema)  # the averages of the other parameters, the buffers
        return loss

    def _ema_kwargs(self, ps: list[Tensor], fused_ema: list[Tensor] | None) -> dict[str, Any]:
        """The update kernel's EMA arguments for ``ps`` (recorded in ``fused_ema``), or none where the EMA
        does not hold them all with their device and dtype (those averages follow in finish_fused_update)."""
        if fused_ema is None or self.ema is None:
            return {}
        averages = self.ema.averages_for(ps)
        if averages is None or any(a.device != p.device or a.dtype != p.dtype for a, p in zip(averages, ps)):
            return {}
        weight, weight_tensor = self.ema.weight_args(ps[0].device)
        fused_ema.extend(ps)
        return dict(ema_params=averages, ema_weight=weight, ema_weight_tensor=weight_tensor)

    def _collect(self, gi: int, group: dict[str, Any]) -> dict[str, Any]:
        """A group's parameters with gradients, checked (torch's errors first); nothing is written."""
        params, meta = [], []
        for pos, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if torch.is_complex(p):
                raise RuntimeError("Muon does not support complex parameters")
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            if p.device.type == "meta":
                meta.append(p)
                continue
            check_param(self._opt_name, p, where(gi, pos))
            if is_dtensor(p):  # before any write: a refused step changes nothing
                raise RuntimeError(f"fusedtrain.optim.Muon: {where(gi, pos)} is a DTensor (FSDP2 / tensor parallel); "
                                   "Newton-Schulz orthogonalizes whole matrices, which this implementation does not "
                                   "gather across shards. Use torch.optim.Muon for sharded parameters, or an "
                                   "element-wise optimizer (e.g. fusedtrain.optim.AdamW). Nothing was updated.")
            params.append(p)
        plan: dict[str, Any] = dict(params=params, meta=meta)
        if group["use_muon"]:
            ns_coefficients, ns_steps = group["ns_coefficients"], group["ns_steps"]
            if ns_steps >= 100:
                raise ValueError("Number of steps must be less than 100 for computational efficiency")
            if len(ns_coefficients) != 3:
                raise ValueError("Coefficients must be a tuple of exactly 3 values")
            if group["ns_dtype"] not in _NS_DTYPES:
                raise ValueError(f"Invalid ns_dtype: {group['ns_dtype']}; use torch.bfloat16, torch.float32 or "
                                 "torch.float64")
            for p in params + meta:
                if p.ndim != 2 and not (group["flatten"] and p.ndim > 2):
                    raise ValueError("Param gradient must be a 2D matrix")
            # torch's arithmetic of the step sizes, in Python (a tensor lr stays a tensor there and rounds
            # them to its dtype); _adjust_lr raises torch's error for an (n, 0) matrix here, before any write
            lr = _to_scalar(group["lr"])
            plan["decay"] = float(1 - lr * group["weight_decay"])
            plan["adjusted"] = [float(_tm._adjust_lr(lr, group["adjust_lr_fn"], torch.Size(_shape2d(p))))
                                for p in params]
        return plan

    def _muon_group(self, group: dict[str, Any], plan: dict[str, Any], grad_scale: Tensor | None,
                    clip_coef: Tensor | None, fused_ema: list[Tensor] | None) -> None:
        params: list[Tensor] = plan["params"]
        if not params:
            return
        ns_dtype: torch.dtype = group["ns_dtype"]
        batches: dict[tuple[Any, ...], list[int]] = {}
        quantized: list[bool] = []
        for i, p in enumerate(params):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(_grad(p), memory_format=torch.preserve_format)
            quantized.append(self._state_form(group, p))
            m, n = _shape2d(p)
            batches.setdefault((p.device, p.dtype, min(m, n), max(m, n)), []).append(i)
        hypers = {rule: _ops.hyper_list(rule, dict(momentum=group["momentum"], nesterov=group["nesterov"]))
                  for rule in ("muon_momentum", self._rule_8bit)}
        for (device, dtype, rows, cols), idx in batches.items():
            ps = [params[i] for i in idx]
            emulate = ns_dtype == torch.bfloat16 and device.type == "cpu"
            # the dtype the momentum pass writes: the Newton-Schulz input itself where a layout allows it
            # (bfloat16 from float32: torch's .bfloat16() of the float32 update), else the parameter's, converted
            # after (float64 -> bfloat16 rounds once, as torch does); the 8-bit pass writes the parameter's
            # (Note [Muon's 8-bit momentum])
            direct = ns_dtype == dtype or (dtype == torch.float32 and ns_dtype == torch.bfloat16)
            if any(quantized[i] for i in idx):
                direct = ns_dtype == dtype
            u = torch.empty(len(ps), rows, cols, dtype=ns_dtype if direct else dtype, device=device)
            views = [self._as_param(u[k], p) for k, p in enumerate(ps)]
            kw: dict[str, Any] = {}
            if grad_scale is not None:
                kw["grad_scale"] = grad_scale if device.type == "cpu" else grad_scale.to(device)
            if clip_coef is not None:
                kw["clip_coef"] = clip_coef if clip_coef.device == device else clip_coef.to(device)
            floats = [k for k, i in enumerate(idx) if not quantized[i]]
            codes = [k for k, i in enumerate(idx) if quantized[i]]
            if floats:
                _ops.step_("muon_momentum", hypers["muon_momentum"],
                           [self.state[ps[k]]["momentum_buffer"] for k in floats], [_grad(ps[k]) for k in floats],
                           [views[k] for k in floats], **kw)
            if codes:
                states = [self.state[ps[k]] for k in codes]
                _ops.step_(self._rule_8bit, hypers[self._rule_8bit], [views[k] for k in codes],
                           [_grad(ps[k]) for k in codes],
                           [s["momentum_buffer"] for s in states] + [s["momentum_buffer_absmax"] for s in states],
                           **kw)
            x = u if u.dtype == ns_dtype else u.to(ns_dtype)
            if emulate:
                x = x.to(torch.float32)
            out = newton_schulz(x, group["ns_coefficients"], group["ns_steps"], group["eps"], emulate)
            out = out.to(dtype)  # exact for bfloat16 values into float32/float64
            by_lr: dict[float, list[int]] = {}
            for k, i in enumerate(idx):
                by_lr.setdefault(plan["adjusted"][i], []).append(k)
            for adjusted, ks in by_lr.items():
                update = [ps[k] for k in ks]
                _ops.step_("muon_update", [plan["decay"]], update, [self._as_param(out[k], ps[k]) for k in ks], [],
                           lr=adjusted, **self._ema_kwargs(update, fused_ema))

    @staticmethod
    def _as_param(matrix: Tensor, p: Tensor) -> Tensor:
        """A batch entry (the oriented matrix: short-wide) as a view of ``p``'s shape: transposed back for a
        tall matrix, unflattened for a conv kernel."""
        m, n = _shape2d(p)
        return (matrix.mT if m > n else matrix).view(p.shape)

    def _adamw_group(self, group: dict[str, Any], plan: dict[str, Any], grad_scale: Tensor | None,
                     clip_coef: Tensor | None, fused_ema: list[Tensor] | None) -> None:
        params: list[Tensor] = plan["params"]
        splits: dict[tuple[Any, ...], list[Tensor]] = {}
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = new_step()
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            splits.setdefault((p.device, p.dtype, self._state_form(group, p)), []).append(p)
        beta1, beta2 = group["adamw_betas"]
        adam = dict(beta1=beta1, beta2=beta2, eps=group["adamw_eps"], weight_decay=group["weight_decay"],
                    amsgrad=False, maximize=False, decoupled_weight_decay=True)
        lr = group["lr"]
        for (device, _, codes), ps in splits.items():
            states = [self.state[p] for p in ps]
            # the 8-bit rule's state lists: each state's codes, then its absmax (Note [quantized state lists])
            keys = ("exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax") if codes else (
                "exp_avg", "exp_avg_sq")
            rule = "adam8bit" if codes else "adam"
            kw: dict[str, Any] = {}
            if isinstance(lr, Tensor) and device.type == "cuda":
                kw["lr_tensor"] = lr.to(device)
            else:
                kw["lr"] = float(lr)
            if grad_scale is not None:
                kw["grad_scale"] = grad_scale if device.type == "cpu" else grad_scale.to(device)
            if clip_coef is not None:
                kw["clip_coef"] = clip_coef if clip_coef.device == device else clip_coef.to(device)
            # (the 8-bit rule's kernels do not carry EMA averages: those follow in finish_fused_update)
            ema_kw = {} if codes else self._ema_kwargs(ps, fused_ema)
            _ops.step_(rule, _ops.hyper_list(rule, adam), ps, [_grad(p) for p in ps],
                       [s[key] for key in keys for s in states], [s["step"] for s in states], **kw, **ema_kw)

    def _meta_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Parameters on the meta device (model-building flows): their state is made as torch makes it; the
        values do not exist, so the step is a no-op on them, as torch's is."""
        for p in params:
            state = self.state[p]
            if group["use_muon"]:
                state.setdefault("momentum_buffer", torch.zeros_like(_grad(p), memory_format=torch.preserve_format))
            else:
                if "step" not in state:
                    state["step"] = new_step()
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
