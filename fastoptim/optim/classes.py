"""One class per rule: torch.optim's constructors and options, the rule's registry
entry, and what a rule does beyond the base class (Adagrad's initial accumulator,
Adam's bfloat16 state, the curvature rules' extra inputs)."""
import numbers

import numpy as np

from .. import functional as F
from .. import reference as R
from ..reference import adopt_clip
from ..rules import spec
from .base import Optimizer


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum.

    Same options and defaults as ``torch.optim.SGD``; formulas in
    :func:`fastoptim.reference.sgd_`. State: ``momentum_buffer`` (momentum != 0 only).
    ``state_dtype``, ``rounding``, ``seed``: bfloat16 state, as :class:`Adam`'s.
    """
    _rule = spec("sgd")
    _optional_state = ("momentum_buffer",)

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, state_dtype=None, rounding="nearest",
                 seed=0, min_8bit_size=4096, nonfinite="propagate"):
        self._take_min_8bit_size(min_8bit_size)
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      maximize=maximize, state_dtype=state_dtype,
                                      rounding=rounding, seed=seed), nonfinite)

    def _step_from_state(self, entry):
        return entry.get("momentum_buffer") is not None



class Adagrad(Optimizer):
    """AdaGrad. Same options and defaults as ``torch.optim.Adagrad``; formulas in
    :func:`fastoptim.reference.adagrad_`. State: ``step``, ``sum``. ``state_dtype``,
    ``rounding``, ``seed``: bfloat16 state, as :class:`Adam`'s (the initial value
    rounded to nearest even)."""
    _rule = spec("adagrad")

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                 initial_accumulator_value=0.0, eps=1e-10, *, maximize=False,
                 state_dtype=None, rounding="nearest", seed=0, min_8bit_size=4096,
                 nonfinite="propagate"):
        self._take_min_8bit_size(min_8bit_size)
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value,
                                      eps=eps, maximize=maximize, state_dtype=state_dtype,
                                      rounding=rounding, seed=seed), nonfinite)

    def _check_hyperparameters(self, group):
        value = group["initial_accumulator_value"]
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise TypeError("initial_accumulator_value must be a real number, got "
                            f"{type(value).__name__}")
        if not 0.0 <= value < float("inf"):
            raise ValueError(f"Invalid initial_accumulator_value value: {value}")
        super()._check_hyperparameters(group)

    def _initial_state_value(self, group, name):
        return group["initial_accumulator_value"]

    def _init_state(self, group, state):
        for i, p in enumerate(group["params"]):
            for key, arr in self._new_state_entry("sum", group, p).items():
                state.arrays.setdefault(key, [None] * len(group["params"]))[i] = arr
        state.complete_for = ("sum",)



class RMSprop(Optimizer):
    """RMSProp. Same options and defaults as ``torch.optim.RMSprop``; formulas in
    :func:`fastoptim.reference.rmsprop_`. State: ``step``, ``square_avg``,
    ``momentum_buffer`` (momentum > 0), ``grad_avg`` (centered). ``state_dtype``,
    ``rounding``, ``seed``: bfloat16 state, as :class:`Adam`'s."""
    _rule = spec("rmsprop")

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
                 momentum=0.0, centered=False, *, maximize=False, state_dtype=None,
                 rounding="nearest", seed=0, min_8bit_size=4096,
                 nonfinite="propagate"):
        self._take_min_8bit_size(min_8bit_size)
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps,
                                      weight_decay=weight_decay, momentum=momentum,
                                      centered=centered, maximize=maximize,
                                      state_dtype=state_dtype, rounding=rounding,
                                      seed=seed), nonfinite)



class Adam(Optimizer):
    """Adam (L2 weight decay). Same options and defaults as ``torch.optim.Adam``;
    formulas in :func:`fastoptim.reference.adam_`. State: ``step``, ``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad).

    ``state_dtype="bfloat16"`` keeps the moments in bfloat16 (uint16 arrays of bfloat16
    bits, half the bytes; float32 parameters only), rounded to nearest even or, with
    ``rounding="stochastic"``, stochastically from a counter-based hash of ``seed``,
    the step and the element (reproducible, independent of the thread count). Read such
    state as numbers with :func:`fastoptim.bfloat16_to_float32` or
    ``state_dict(bfloat16="float32")``. ``load_state_dict`` keeps the optimizer's own
    ``state_dtype`` and converts the loaded state to it (float32 -> bfloat16 rounded to
    nearest even, bfloat16 -> float32 exactly)."""
    _rule = spec("adam")
    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, maximize=False, state_dtype=None, rounding="nearest",
                 seed=0, min_8bit_size=4096, nonfinite="propagate"):
        self._take_min_8bit_size(min_8bit_size)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps,
                                      weight_decay=weight_decay, amsgrad=amsgrad,
                                      maximize=maximize, state_dtype=state_dtype,
                                      rounding=rounding, seed=seed), nonfinite)

    def _options_to_load(self, saved, gi):
        decoupled = saved.get("decoupled_weight_decay", False)    # torch.optim's
        where = f"state_dict['param_groups'][{gi}]['decoupled_weight_decay']"
        if not isinstance(decoupled, (bool, np.bool_)):
            raise TypeError(f"{where} must be a bool, got {type(decoupled).__name__}")
        if decoupled and not self._decoupled:
            raise ValueError(f"{where} is True (AdamW's rule), which Adam does not "
                             "follow: load it into fastoptim.AdamW")
        return super()._options_to_load(
            {k: v for k, v in saved.items() if k != "decoupled_weight_decay"}, gi)



class AdamW(Adam):
    """AdamW (decoupled weight decay, default 1e-2). Same options and defaults as
    ``torch.optim.AdamW``; formulas in :func:`fastoptim.reference.adamw_`. Takes
    Adam's ``state_dtype``, ``rounding`` and ``seed`` too."""
    _rule = spec("adamw")
    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, state_dtype=None, rounding="nearest",
                 seed=0, min_8bit_size=4096, nonfinite="propagate"):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, state_dtype=state_dtype,
                         rounding=rounding, seed=seed, min_8bit_size=min_8bit_size,
                         nonfinite=nonfinite)


class Adamax(Optimizer):
    """Adamax (Adam with the infinity norm). Same options and defaults as
    ``torch.optim.Adamax``; formulas in :func:`fastoptim.reference.adamax_`. State:
    ``step``, ``exp_avg``, ``exp_inf``. ``state_dtype``, ``rounding``, ``seed``,
    ``min_8bit_size``: compressed state, as :class:`Adam`'s."""
    _rule = spec("adamax")

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 maximize=False, state_dtype=None, rounding="nearest", seed=0,
                 min_8bit_size=4096, nonfinite="propagate"):
        self._take_min_8bit_size(min_8bit_size)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps,
                                      weight_decay=weight_decay, maximize=maximize,
                                      state_dtype=state_dtype, rounding=rounding,
                                      seed=seed), nonfinite)


class Adadelta(Optimizer):
    """Adadelta. Same options and defaults as ``torch.optim.Adadelta`` (lr 1.0);
    formulas in :func:`fastoptim.reference.adadelta_`. State: ``step``, ``square_avg``,
    ``acc_delta``. ``state_dtype``, ``rounding``, ``seed``, ``min_8bit_size``:
    compressed state, as :class:`Adam`'s."""
    _rule = spec("adadelta")

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, *,
                 maximize=False, state_dtype=None, rounding="nearest", seed=0,
                 min_8bit_size=4096, nonfinite="propagate"):
        self._take_min_8bit_size(min_8bit_size)
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay,
                                      maximize=maximize, state_dtype=state_dtype,
                                      rounding=rounding, seed=seed), nonfinite)


class RAdam(Optimizer):
    """RAdam (rectified Adam). Same options and defaults as ``torch.optim.RAdam``
    (``decoupled_weight_decay`` included); formulas in :func:`fastoptim.reference.radam_`.
    State: ``step``, ``exp_avg``, ``exp_avg_sq``. ``state_dtype``, ``rounding``,
    ``seed``, ``min_8bit_size``: compressed state, as :class:`Adam`'s."""
    _rule = spec("radam")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False, *, maximize=False, state_dtype=None,
                 rounding="nearest", seed=0, min_8bit_size=4096, nonfinite="propagate"):
        self._take_min_8bit_size(min_8bit_size)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      decoupled_weight_decay=decoupled_weight_decay,
                                      maximize=maximize, state_dtype=state_dtype,
                                      rounding=rounding, seed=seed), nonfinite)


class Rprop(Optimizer):
    """Rprop (resilient backpropagation). Same options and defaults as
    ``torch.optim.Rprop``; formulas in :func:`fastoptim.reference.rprop_`. State:
    ``step``, ``prev``, ``step_size`` (starting at ``lr``). ``state_dtype``,
    ``rounding``, ``seed``, ``min_8bit_size``: compressed state, as :class:`Adam`'s."""
    _rule = spec("rprop")

    def __init__(self, params, lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50), *,
                 maximize=False, state_dtype=None, rounding="nearest", seed=0,
                 min_8bit_size=4096, nonfinite="propagate"):
        self._take_min_8bit_size(min_8bit_size)
        super().__init__(params, dict(lr=lr, etas=etas, step_sizes=step_sizes,
                                      maximize=maximize, state_dtype=state_dtype,
                                      rounding=rounding, seed=seed), nonfinite)

    def _initial_state_value(self, group, name):
        return group["lr"] if name == "step_size" else 0


class NAdam(Optimizer):
    """NAdam (Adam with Nesterov momentum). Same options and defaults as
    ``torch.optim.NAdam``; formulas in :func:`fastoptim.reference.nadam_`. State:
    ``step``, ``mu_product`` (a 0-d float32 array, as torch keeps it), ``exp_avg``,
    ``exp_avg_sq``. ``state_dtype``, ``rounding``, ``seed``, ``min_8bit_size``:
    compressed state, as :class:`Adam`'s."""
    _rule = spec("nadam")

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 momentum_decay=4e-3, decoupled_weight_decay=False, *, maximize=False,
                 state_dtype=None, rounding="nearest", seed=0, min_8bit_size=4096,
                 nonfinite="propagate"):
        self._take_min_8bit_size(min_8bit_size)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      momentum_decay=momentum_decay,
                                      decoupled_weight_decay=decoupled_weight_decay,
                                      maximize=maximize, state_dtype=state_dtype,
                                      rounding=rounding, seed=seed), nonfinite)


class ASGD(Optimizer):
    """ASGD (averaged SGD). Same options and defaults as ``torch.optim.ASGD``; formulas
    in :func:`fastoptim.reference.asgd_`. State: ``step``, ``eta`` and ``mu`` (0-d
    float32 arrays, as torch keeps them), ``ax`` (the average). ``state_dtype``,
    ``rounding``, ``seed``, ``min_8bit_size``: compressed state, as :class:`Adam`'s."""
    _rule = spec("asgd")

    def __init__(self, params, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0,
                 *, maximize=False, state_dtype=None, rounding="nearest", seed=0,
                 min_8bit_size=4096, nonfinite="propagate"):
        self._take_min_8bit_size(min_8bit_size)
        super().__init__(params, dict(lr=lr, lambd=lambd, alpha=alpha, t0=t0,
                                      weight_decay=weight_decay, maximize=maximize,
                                      state_dtype=state_dtype, rounding=rounding,
                                      seed=seed), nonfinite)


class Lion(Optimizer):
    """Lion (sign of the interpolated momentum). Same options and defaults as
    ``lion_pytorch.Lion``; formulas in :func:`fastoptim.reference.lion_`. State:
    ``exp_avg`` (no step counter). ``decoupled_weight_decay=True`` divides every
    group's ``weight_decay`` by the initial ``lr`` at each step, as the oracle does.
    ``state_dtype``, ``rounding``, ``seed``, ``min_8bit_size``: compressed state, as
    :class:`Adam`'s."""
    _rule = spec("lion")

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *,
                 maximize=False, decoupled_weight_decay=False, state_dtype=None,
                 rounding="nearest", seed=0, min_8bit_size=4096, nonfinite="propagate"):
        self._take_min_8bit_size(min_8bit_size)
        self.decoupled_weight_decay, self._init_lr = _lion_decoupling(
            decoupled_weight_decay, lr)
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                      maximize=maximize, state_dtype=state_dtype,
                                      rounding=rounding, seed=seed), nonfinite)

    def _prepare(self, group, grads, arrays, steps):
        if self.decoupled_weight_decay:
            group = dict(group, weight_decay=group["weight_decay"] / self._init_lr)
        return super()._prepare(group, grads, arrays, steps)

    def __getstate__(self):
        return dict(super().__getstate__(), decoupled_weight_decay=self.decoupled_weight_decay,
                    init_lr=self._init_lr)

    def __setstate__(self, d):
        super().__setstate__(d)
        self.decoupled_weight_decay = d.get("decoupled_weight_decay", False)
        self._init_lr = d.get("init_lr", self.defaults["lr"])


class ADOPT(Optimizer):
    """ADOPT (the gradient normalized by the previous second moment, then clipped).
    Same options and defaults as ``pytorch_optimizer.ADOPT``; formulas in
    :func:`fastoptim.reference.adopt_`. State: ``exp_avg``, ``exp_avg_sq``; the step is
    counted per group (``state_dict()["param_groups"][k]["step"]``, as the oracle
    keeps it). ``clip_lambda``: a function of the step, or None. ``state_dtype``,
    ``rounding``, ``seed``, ``min_8bit_size``: compressed state, as :class:`Adam`'s."""
    _rule = spec("adopt")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.9999), clip_lambda=adopt_clip,
                 weight_decay=0.0, weight_decouple=False, fixed_decay=False, eps=1e-6, *,
                 maximize=False, state_dtype=None, rounding="nearest", seed=0,
                 min_8bit_size=4096, nonfinite="propagate"):
        self._take_min_8bit_size(min_8bit_size)
        super().__init__(params, dict(lr=lr, betas=betas, clip_lambda=clip_lambda,
                                      weight_decay=weight_decay,
                                      weight_decouple=weight_decouple,
                                      fixed_decay=fixed_decay, eps=eps, maximize=maximize,
                                      state_dtype=state_dtype, rounding=rounding,
                                      seed=seed), nonfinite)


class AdEMAMix(Optimizer):
    """AdEMAMix (Adam with a fast and a slow first moment). Same options and defaults
    as ``pytorch_optimizer.AdEMAMix``; formulas in :func:`fastoptim.reference.ademamix_`.
    State: ``exp_avg``, ``exp_avg_sq``, ``exp_avg_slow``; the step is counted per group,
    as :class:`ADOPT`'s. ``state_dtype``, ``rounding``, ``seed``, ``min_8bit_size``:
    compressed state, as :class:`Adam`'s."""
    _rule = spec("ademamix")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), weight_decay=0.0,
                 weight_decouple=False, fixed_decay=False, alpha=5.0, t_alpha_beta3=None,
                 eps=1e-8, *, maximize=False, state_dtype=None, rounding="nearest", seed=0,
                 min_8bit_size=4096, nonfinite="propagate"):
        self._take_min_8bit_size(min_8bit_size)
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                      weight_decouple=weight_decouple,
                                      fixed_decay=fixed_decay, alpha=alpha,
                                      t_alpha_beta3=t_alpha_beta3, eps=eps,
                                      maximize=maximize, state_dtype=state_dtype,
                                      rounding=rounding, seed=seed), nonfinite)


class AdamWScheduleFree(Optimizer):
    """Schedule-Free AdamW. Same options and defaults as
    ``schedulefree.AdamWScheduleFree``; formulas in
    :func:`fastoptim.reference.adamw_schedulefree_`. The parameters hold the gradient
    point y while training and the average x while evaluating: call :meth:`train`
    before the first step (a step in eval mode raises) and :meth:`eval` before
    evaluating or saving, as with the oracle. State: ``z`` (a copy of the parameter at
    its first step) and ``exp_avg_sq``; the groups keep the oracle's running values
    (``k``, the step count; ``train_mode``, ``weight_sum``, ``lr_max``,
    ``scheduled_lr``). No compressed state: ``z`` is an iterate, not a statistic."""
    _rule = spec("adamw_schedulefree")

    def __init__(self, params, lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 warmup_steps=0, r=0.0, weight_lr_power=2.0, *, maximize=False,
                 nonfinite="propagate"):
        self._pending = {}
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, r=r, k=0,
                                      warmup_steps=warmup_steps, train_mode=False,
                                      weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0,
                                      weight_lr_power=weight_lr_power,
                                      weight_decay=weight_decay, maximize=maximize),
                         nonfinite)

    def train(self):
        """Parameters to the gradient point y (``p = lerp(p, z, 1 - beta1)``)."""
        self._switch(True)

    def eval(self):
        """Parameters to the average x (``p = lerp(p, z, 1 - 1/beta1)``)."""
        self._switch(False)

    def _switch(self, to_train):
        for group, gstate in zip(self.param_groups, self._gstate):
            if bool(group["train_mode"]) != to_train:
                beta1 = group["betas"][0]
                zs = gstate.arrays.get("z") or []
                R.schedulefree_switch_(group["params"][:len(zs)], zs,
                                       1 - beta1 if to_train else 1 - 1 / beta1)
                group["train_mode"] = to_train

    def step(self, grads):
        """One step from the gradients at y (train mode only, as the oracle)."""
        if not self.param_groups[0]["train_mode"]:
            raise RuntimeError(_SCHEDULEFREE_EVAL_STEP)
        self._pending = {id(g): _schedule(g, lambda name, x: x) for g in self.param_groups}
        try:
            done = self._step(self._split_grads(grads))
        finally:
            pending, self._pending = self._pending, {}
        if done:
            for group in self.param_groups:
                _apply_schedule(group, pending[id(group)])
        return done

    def _prepare(self, group, grads, arrays, steps, *inputs):
        lr, _, _, ckp1 = self._pending.get(id(group), (group["lr"], None, None, 1.0))
        return super()._prepare(dict(group, lr=lr, ckp1=ckp1), grads, arrays, steps)


_SCHEDULEFREE_EVAL_STEP = ("Optimizer was not in train mode when step is called. Please "
                           "insert .train() and .eval() calls on the optimizer. See "
                           "documentation for details.")


def _schedule(group, value):
    """This step's Schedule-Free numbers for ``group`` (both class layers; ``value``
    reads an option, a tensor lr as its number)."""
    return R.schedulefree_schedule(group["k"] if "k" in group else 0,
                                   value("lr", group["lr"]), group["warmup_steps"],
                                   group["r"], group["weight_lr_power"], group["lr_max"],
                                   group["weight_sum"])


def _apply_schedule(group, numbers_):
    """Keep a step's running values in its group, as the oracle does."""
    group["scheduled_lr"], group["lr_max"], group["weight_sum"], _ = numbers_


def _lion_decoupling(decoupled, lr):
    """Lion's decoupled_weight_decay flag and the initial lr it divides by (both class
    layers)."""
    if not isinstance(decoupled, (bool, np.bool_)):
        raise TypeError("decoupled_weight_decay must be a bool, got "
                        f"{type(decoupled).__name__}")
    if decoupled and not (isinstance(lr, numbers.Real) and lr > 0):
        raise ValueError("decoupled_weight_decay=True divides weight_decay by the initial "
                         f"learning rate, which must be a number > 0; got lr={lr!r}")
    return bool(decoupled), lr


class _CurvatureOptimizer(Optimizer):
    """Base of the second-order optimizers, whose step takes, besides one gradient per
    parameter, one curvature input per parameter (a Hessian diagonal for AdaHessian, a
    Hessian for Newton), split across groups like the gradients."""

    #: what the curvature argument of ``step`` is called (for error messages)
    _curvature_name = "curvature"

    def _step_with(self, grads, curvature):
        per_group = self._split_grads(grads)
        curvature = self._split_per_param(
            curvature, self._curvature_name, "entry",
            lambda v: isinstance(v, np.ndarray) or (callable(v) and
                                                    not isinstance(v, (list, tuple))))
        return self._step(per_group, curvature)

    def step(self, grads, curvature):
        return self._step_with(grads, curvature)


class Adafactor(Optimizer):
    """Adafactor. Same options and defaults as ``torch.optim.Adafactor``; formulas in
    :func:`fastoptim.reference.adafactor_`. State: ``step``, and ``row_var`` and
    ``col_var`` (the parameter's shape with the last, or the one before, axis 1) for a
    parameter of two or more dimensions, ``variance`` (its shape) for a vector or 0-d
    one, as torch keeps them. Parameters of two or more dimensions must be C-contiguous
    (the factors follow the last two axes). No compressed state formats: the factored
    state is already ``m + n`` values per ``m x n`` matrix."""
    _rule = spec("adafactor")

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                 weight_decay=0.0, *, maximize=False, nonfinite="propagate"):
        super().__init__(params, dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d,
                                      weight_decay=weight_decay, maximize=maximize),
                         nonfinite)


class AdaHessian(_CurvatureOptimizer):
    """AdaHessian (Yao et al. 2021): Adam with the squared gradient replaced by the
    squared Hutchinson estimate of the Hessian diagonal. Formulas in
    :func:`fastoptim.reference.adahessian_`; defaults are the paper's (lr 0.15,
    eps 1e-4, decoupled weight decay, ``hessian_power`` 1). State: ``step``,
    ``exp_avg``, ``exp_hessian_diag_sq``.

    The optimizer does not differentiate anything: each step takes the gradients and
    an estimate of each parameter's Hessian diagonal, computed by the caller::

        opt = fastoptim.AdaHessian([w], lr=0.15)
        g = grad(w)
        d = fastoptim.hutchinson_diag(lambda z: hvp(w, z), w, rng=rng)   # z * (H z)
        opt.step([g], [d])

    (with PyTorch: :func:`fastoptim.torch_hessian.hutchinson_diag` from autograd).
    """
    _curvature_name = "hessian_diags"
    _rule = spec("adahessian")

    def __init__(self, params, lr=0.15, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.0,
                 hessian_power=1.0, *, maximize=False, nonfinite="propagate"):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps,
                                      weight_decay=weight_decay,
                                      hessian_power=hessian_power, maximize=maximize),
                         nonfinite)

    def step(self, grads, hessian_diags):
        """Update every parameter in place from its gradient and its Hessian-diagonal
        estimate (same shape as the parameter). ``grads[i] is None`` skips parameter
        i (``hessian_diags[i]`` is then ignored and may be None)."""
        return self._step_with(grads, hessian_diags)

    def _prepare(self, group, grads, arrays, steps, hessian_diags=None):
        return self._kernel_call(group["params"], grads, arrays, steps, group,
                                 hessian_diags if hessian_diags is not None else [])


class SophiaH(_CurvatureOptimizer):
    """SophiaH (clipped steps preconditioned by Hessian-diagonal estimates). Same
    options and defaults as ``pytorch_optimizer.SophiaH``; formulas in
    :func:`fastoptim.reference.sophiah_`. State: ``momentum``, ``hessian_moment``; the
    step is counted per group, as :class:`ADOPT`'s.

    ``step(grads, hessian=None)``: ``hessian`` is one Hessian-diagonal estimate per
    parameter (:func:`fastoptim.hutchinson_diag`), needed on the steps that update the
    Hessian moment: the first and every ``update_period``-th after it, counted by the
    first group as the oracle counts (a step without one then raises, changing
    nothing); given on another step, it updates the moment there too. This class
    differentiates nothing: ``num_samples`` and ``hessian_distribution`` are kept for
    state dicts and for :class:`fastoptim.torch.SophiaH`, which estimates.
    ``state_dtype``, ``rounding``, ``seed``, ``min_8bit_size``: compressed state, as
    :class:`Adam`'s (both state arrays with the signed map: estimates may be negative).
    """
    _curvature_name = "hessian"
    _rule = spec("sophiah")

    def __init__(self, params, lr=6e-2, betas=(0.96, 0.99), weight_decay=0.0,
                 weight_decouple=True, fixed_decay=False, p=1e-2, update_period=10,
                 num_samples=1, hessian_distribution="gaussian", eps=1e-12, *,
                 maximize=False, state_dtype=None, rounding="nearest", seed=0,
                 min_8bit_size=4096, nonfinite="propagate"):
        self._take_min_8bit_size(min_8bit_size)
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                      weight_decouple=weight_decouple,
                                      fixed_decay=fixed_decay, p=p,
                                      update_period=update_period, num_samples=num_samples,
                                      hessian_distribution=hessian_distribution, eps=eps,
                                      maximize=maximize, state_dtype=state_dtype,
                                      rounding=rounding, seed=seed), nonfinite)

    def _check_hyperparameters(self, group):
        _check_hutchinson(group["update_period"], group["num_samples"],
                          group["hessian_distribution"])
        super()._check_hyperparameters(group)

    def step(self, grads, hessian=None):
        """Update every parameter in place from its gradient; ``hessian``: the
        Hessian-diagonal estimates, on the steps that update their average."""
        if hessian is not None:
            return self._step_with(grads, hessian)
        step = int(self._gstate[0].steps[0]) + 1
        period = self.param_groups[0]["update_period"]
        if (step - 1) % period == 0:
            raise ValueError(f"step {step} updates the Hessian moment (the first step and "
                             f"every update_period={period} after it): pass "
                             "hessian=[one Hessian-diagonal estimate per parameter]; "
                             "nothing was changed")
        return self._step(self._split_grads(grads))


def _check_hutchinson(update_period, num_samples, distribution):
    """SophiaH's options of its Hessian estimate (both class layers)."""
    for name, value in (("update_period", update_period), ("num_samples", num_samples)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if distribution not in ("gaussian", "rademacher"):
        raise ValueError("hessian_distribution must be 'gaussian' or 'rademacher', got "
                         f"{distribution!r}")


class Newton(_CurvatureOptimizer):
    """Damped Newton steps for small dense problems, with a saddle-free option.

    ``p -= lr * solve(H + damping*I, grad)``, one dense Hessian block per parameter;
    with ``saddle_free=True`` H is replaced by ``|H| = Q |Lambda| Q^T`` (eigenvalues by
    absolute value), so the step goes downhill along negative curvature and is
    repelled by saddles instead of drawn to them. Formulas in
    :func:`fastoptim.reference.newton_`. State: ``step`` only.

    Not an element-wise rule: the work is an O(n^3) dense solve per parameter, done by
    LAPACK through ``numpy.linalg`` (its compiled kernel), so it suits parameters of
    up to a few thousand elements::

        opt = fastoptim.Newton([x], lr=1.0, damping=1e-3, saddle_free=True)
        opt.step([grad(x)], [hess(x)])        # or [hess]: a callable h(x) -> Hessian
    """
    _curvature_name = "hessians"

    def __init__(self, params, lr=1.0, damping=0.0, saddle_free=False, *,
                 nonfinite="propagate"):
        super().__init__(params, dict(lr=lr, damping=damping, saddle_free=saddle_free),
                         nonfinite)

    def step(self, grads, hessians):
        """Update every parameter in place. ``hessians[i]`` is parameter i's Hessian,
        of shape ``(n, n)`` or ``p.shape + p.shape`` (n = ``p.size``, C order), or a
        callable ``h(p)`` returning one; ``grads[i] is None`` skips parameter i. A
        singular system raises ``numpy.linalg.LinAlgError`` before any change."""
        return self._step_with(grads, hessians)

    def _prepare(self, group, grads, arrays, steps, hessians=None):
        return F.prepare_newton(group["params"], grads,
                                hessians if hessians is not None else [], steps,
                                lr=group["lr"], damping=group["damping"],
                                saddle_free=group["saddle_free"])
