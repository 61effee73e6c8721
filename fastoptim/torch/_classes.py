"""The drop-in optimizers: torch 2.13's constructors, checks and state, on
fastoptim's kernels (the rest is the base class's and the registry's)."""
import torch

from .. import _config
from ..optim.classes import (_SCHEDULEFREE_EVAL_STEP, _apply_schedule, _check_hutchinson,
                             _lion_decoupling, _schedule)
from ..reference import adopt_clip
from ..rules import spec
from ._base import _check_fused, _Optimizer, _step_hooks, _to_scalar, _value
from ._tensors import _new_step, _scalar_dtype, _step_to_tensor


_ADAMW = spec("adamw")


# --- the optimizers -------------------------------------------------------------------

class SGD(_Optimizer):
    """``torch.optim.SGD`` (optionally with (Nesterov) momentum) on fastoptim's kernel.

    Same signature, defaults, checks and state as torch 2.13's SGD: the only state is
    ``momentum_buffer`` (momentum != 0), set to the gradient on a parameter's first
    step. See :func:`fastoptim.reference.sgd_` for the update.
    """
    _rule = spec("sgd")
    _has_step = False
    _partial_state = True          # torch 1.x checkpoints hold momentum_buffer=None

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        self._rule.check_bounds(
            {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
        }
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, defaults)

        _check_fused(fused, differentiable, foreach)
        self._fastoptim_init()

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)

    def _has_state(self, state, group):
        return state.get("momentum_buffer") is not None or not self._state_names(group)


class Adagrad(_Optimizer):
    """``torch.optim.Adagrad`` on fastoptim's kernel.

    Same signature, defaults, checks and state as torch 2.13's Adagrad: ``step`` and
    ``sum`` exist for every parameter from construction on (``sum`` starts at
    ``initial_accumulator_value``). Sparse gradients are refused. See
    :func:`fastoptim.reference.adagrad_` for the update.
    """
    _rule = spec("adagrad")

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0,
                 initial_accumulator_value=0, eps=1e-10, foreach=None, *, maximize=False,
                 differentiable=False, fused=None):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        self._rule.check_bounds(
            {"lr": lr, "lr_decay": lr_decay, "weight_decay": weight_decay,
             "initial_accumulator_value": initial_accumulator_value, "eps": eps})

        defaults = {
            "lr": lr,
            "lr_decay": lr_decay,
            "eps": eps,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "fused": fused,
        }
        super().__init__(params, defaults)

        _check_fused(fused, differentiable, foreach)
        self._fastoptim_init()

        # torch's Adagrad creates the state of its first groups at construction,
        # from the group's initial_accumulator_value
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["step"] = (
                    torch.zeros((), dtype=_scalar_dtype(is_fused=group["fused"]),
                                device=p.device)
                    if group["fused"]
                    else torch.tensor(0.0, dtype=_scalar_dtype()))
                init_value = (
                    complex(initial_accumulator_value, initial_accumulator_value)
                    if torch.is_complex(p) else initial_accumulator_value)
                state.update(self._state_entries(group, p, "sum", init_value))

    def __setstate__(self, state):
        super().__setstate__(state)
        fused = None
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            fused = group.setdefault("fused", None)
            for p in group["params"]:
                p_state = self.state.get(p, [])
                _step_to_tensor(group, p, p_state, fused)
        state_values = list(self.state.values())
        step_is_tensor = (len(state_values) != 0) and torch.is_tensor(
            state_values[0]["step"])
        if not step_is_tensor:
            for s in state_values:
                s["step"] = torch.tensor(float(s["step"]),
                                         dtype=_scalar_dtype(is_fused=fused))

    def share_memory(self):
        """Calls tensor.share_memory_() on the state sum tensors."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["sum"].share_memory_()

    def _new_state(self, group, p):
        # parameters added after construction: torch uses the optimizer's default
        # initial_accumulator_value (not the group's)
        iav = self.defaults["initial_accumulator_value"]
        init_value = complex(iav, iav) if torch.is_complex(p) else iav
        return {"step": _new_step({"fused": group["fused"]}, p),
                **self._state_entries(group, p, "sum", init_value)}


class RMSprop(_Optimizer):
    """``torch.optim.RMSprop`` on fastoptim's kernel.

    Same signature, defaults, checks and state as torch 2.13's RMSprop: ``step``,
    ``square_avg``, ``momentum_buffer`` (momentum > 0) and ``grad_avg`` (centered).
    See :func:`fastoptim.reference.rmsprop_` for the update.
    """
    _rule = spec("rmsprop")

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, capturable=False, foreach=None, maximize=False,
                 differentiable=False):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        self._rule.check_bounds({"lr": lr, "eps": eps, "momentum": momentum,
                                 "weight_decay": weight_decay, "alpha": alpha})

        defaults = {
            "lr": lr,
            "momentum": momentum,
            "alpha": alpha,
            "eps": eps,
            "centered": centered,
            "weight_decay": weight_decay,
            "capturable": capturable,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
        }
        super().__init__(params, defaults)
        self._fastoptim_init()

    def __setstate__(self, state):
        super().__setstate__(state)
        self._group_defaults(momentum=0, centered=False, foreach=None, maximize=False,
                             differentiable=False, capturable=False)

    def _step_tensor(self, group, p):
        return torch.zeros((), dtype=_scalar_dtype())     # (torch's RMSprop has no fused)


class Adam(_Optimizer):
    """``torch.optim.Adam`` on fastoptim's kernel.

    Same signature, defaults, checks and state as torch 2.13's Adam (including
    ``decoupled_weight_decay``): ``step``, ``exp_avg``, ``exp_avg_sq`` and
    ``max_exp_avg_sq`` (amsgrad). ``lr`` and ``betas`` may be 1-element tensors. See
    :func:`fastoptim.reference.adam_` for the update.
    """
    _rule = spec("adam")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False):
        if isinstance(lr, torch.Tensor):
            if foreach and not capturable:
                raise ValueError(
                    "lr as a Tensor is not supported for capturable=False and foreach=True")
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        self._rule.check_bounds(
            {"lr": lr, "eps": eps, "betas": betas, "weight_decay": weight_decay})
        if not (
            (isinstance(betas[0], float) and isinstance(betas[1], float))
            or (isinstance(betas[0], torch.Tensor) and isinstance(betas[1], torch.Tensor))
        ):
            raise ValueError("betas must be either both floats or both Tensors")
        if isinstance(betas[0], torch.Tensor):
            if not capturable and foreach:
                raise ValueError(
                    "betas[0] as a Tensor is not supported for capturable=False and "
                    "foreach=True")
            if betas[0].numel() != 1:
                raise ValueError("Tensor betas[0] must be 1-element")
        if isinstance(betas[1], torch.Tensor):
            if not capturable and foreach:
                raise ValueError(
                    "betas[1] as a Tensor is not supported for capturable=False and "
                    "foreach=True")
            if betas[1].numel() != 1:
                raise ValueError("Tensor betas[1] must be 1-element")
        betas = tuple(map(_to_scalar, betas))

        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(params, defaults)

        _check_fused(fused, differentiable, foreach)
        self._fastoptim_init()

    def _kernel_rule(self, group):
        # torch 2.13's Adam(decoupled_weight_decay=True) is AdamW's rule
        return _ADAMW if bool(group.get("decoupled_weight_decay", False)) else self._rule

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("decoupled_weight_decay", False)
            fused = group.setdefault("fused", None)
            for p in group["params"]:
                p_state = self.state.get(p, [])
                _step_to_tensor(group, p, p_state, fused)


class AdamW(Adam):
    """``torch.optim.AdamW`` on fastoptim's kernel: Adam with decoupled weight decay
    (default 1e-2). Same signature, defaults, checks and state as torch 2.13's AdamW;
    loading a state dict keeps ``decoupled_weight_decay=True``."""
    _rule = spec("adamw")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


class Adamax(_Optimizer):
    """``torch.optim.Adamax`` on fastoptim's kernel.

    Same signature, defaults, checks and state as torch 2.13's Adamax: ``step``,
    ``exp_avg`` and ``exp_inf``. See :func:`fastoptim.reference.adamax_` for the
    update.
    """
    _rule = spec("adamax")

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 foreach=None, *, maximize=False, differentiable=False, capturable=False):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        self._rule.check_bounds(
            {"lr": lr, "eps": eps, "betas": betas, "weight_decay": weight_decay})

        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "capturable": capturable,
        }
        super().__init__(params, defaults)
        self._fastoptim_init()

    def __setstate__(self, state):
        super().__setstate__(state)
        self._group_defaults(foreach=None, maximize=False, differentiable=False,
                             capturable=False)


class Adadelta(_Optimizer):
    """``torch.optim.Adadelta`` on fastoptim's kernel.

    Same signature, defaults, checks and state as torch 2.13's Adadelta: ``step``,
    ``square_avg`` and ``acc_delta``. See :func:`fastoptim.reference.adadelta_` for
    the update.
    """
    _rule = spec("adadelta")

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0, foreach=None, *,
                 capturable=False, maximize=False, differentiable=False):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        self._rule.check_bounds(
            {"lr": lr, "rho": rho, "eps": eps, "weight_decay": weight_decay})

        defaults = {
            "lr": lr,
            "rho": rho,
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "capturable": capturable,
            "foreach": foreach,
            "differentiable": differentiable,
        }
        super().__init__(params, defaults)
        self._fastoptim_init()

    def __setstate__(self, state):
        super().__setstate__(state)
        self._group_defaults(foreach=None, maximize=False, differentiable=False,
                             capturable=False)


class RAdam(_Optimizer):
    """``torch.optim.RAdam`` on fastoptim's kernel.

    Same signature, defaults, checks and state as torch 2.13's RAdam (including
    ``decoupled_weight_decay``): ``step``, ``exp_avg`` and ``exp_avg_sq``. See
    :func:`fastoptim.reference.radam_` for the update.
    """
    _rule = spec("radam")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 decoupled_weight_decay=False, *, foreach=None, maximize=False,
                 capturable=False, differentiable=False):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        self._rule.check_bounds(
            {"lr": lr, "eps": eps, "betas": betas, "weight_decay": weight_decay})

        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "decoupled_weight_decay": decoupled_weight_decay,
            "differentiable": differentiable,
        }
        super().__init__(params, defaults)
        self._fastoptim_init()

    def __setstate__(self, state):
        super().__setstate__(state)
        self._group_defaults(foreach=None, maximize=False, differentiable=False,
                             decoupled_weight_decay=False, capturable=False)


class Rprop(_Optimizer):
    """``torch.optim.Rprop`` on fastoptim's kernel.

    Same signature, defaults, checks and state as torch 2.13's Rprop: ``step``,
    ``prev`` and ``step_size`` (which starts at the group's ``lr``). See
    :func:`fastoptim.reference.rprop_` for the update.
    """
    _rule = spec("rprop")

    def __init__(self, params, lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50), *,
                 capturable=False, foreach=None, maximize=False, differentiable=False):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 < etas[0] < 1.0 < etas[1]:
            raise ValueError(f"Invalid eta values: {etas[0]}, {etas[1]}")

        defaults = {
            "lr": lr,
            "etas": etas,
            "step_sizes": step_sizes,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "capturable": capturable,
        }
        super().__init__(params, defaults)
        self._fastoptim_init()

    def __setstate__(self, state):
        super().__setstate__(state)
        self._group_defaults(foreach=None, maximize=False, differentiable=False,
                             capturable=False)

    def _new_state(self, group, p):
        # torch: step 0, prev zeros, step_size full of the group's lr
        lr = _value("lr", group["lr"])
        if torch.is_complex(p):            # two independent reals: lr for both parts
            lr = complex(lr, lr)
        return {"step": torch.zeros((), dtype=_scalar_dtype()),
                **self._state_entries(group, p, "prev"),
                **self._state_entries(group, p, "step_size", lr)}


class NAdam(_Optimizer):
    """``torch.optim.NAdam`` on fastoptim's kernel.

    Same signature, defaults, checks and state as torch 2.13's NAdam (including
    ``decoupled_weight_decay``): ``step``, ``mu_product`` (a 0-d tensor of torch's
    scalar dtype, updated in place by the kernel), ``exp_avg`` and ``exp_avg_sq``. See
    :func:`fastoptim.reference.nadam_` for the update.
    """
    _rule = spec("nadam")

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 momentum_decay=4e-3, decoupled_weight_decay=False, *, foreach=None,
                 maximize=False, capturable=False, differentiable=False):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        self._rule.check_bounds({"lr": lr, "eps": eps, "betas": betas,
                                 "weight_decay": weight_decay,
                                 "momentum_decay": momentum_decay})

        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "momentum_decay": momentum_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
        }
        super().__init__(params, defaults)
        self._fastoptim_init()

    def __setstate__(self, state):
        super().__setstate__(state)
        self._group_defaults(maximize=False, foreach=None, capturable=False,
                             differentiable=False, decoupled_weight_decay=False)


class ASGD(_Optimizer):
    """``torch.optim.ASGD`` on fastoptim's kernel.

    Same signature, defaults, checks and state as torch 2.13's ASGD: ``step``, ``eta``
    and ``mu`` (0-d tensors of torch's scalar dtype, updated in place by the kernel) and
    ``ax`` (the average). See :func:`fastoptim.reference.asgd_` for the update.
    """
    _rule = spec("asgd")

    def __init__(self, params, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0,
                 foreach=None, maximize=False, differentiable=False, capturable=False):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        self._rule.check_bounds({"lr": lr, "weight_decay": weight_decay})

        defaults = {
            "lr": lr,
            "lambd": lambd,
            "alpha": alpha,
            "t0": t0,
            "weight_decay": weight_decay,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "capturable": capturable,
        }
        super().__init__(params, defaults)
        self._fastoptim_init()

    def __setstate__(self, state):
        super().__setstate__(state)
        self._group_defaults(foreach=None, maximize=False, differentiable=False,
                             capturable=False)


class Lion(_Optimizer):
    """``lion_pytorch.Lion`` on fastoptim's kernel.

    Same signature, defaults and state as lion-pytorch 0.2.5's Lion: ``exp_avg`` only
    (no step counter), group keys ``lr``, ``betas``, ``weight_decay``; ``maximize``
    (default False) is added. ``decoupled_weight_decay=True`` divides the groups'
    weight decay by the initial lr, as the oracle does. Its argument asserts are
    ``ValueError``s here; ``use_triton=True`` is refused (Triton kernels are for
    CUDA), and so are complex parameters (the oracle's step is then ``sgn`` of a
    complex number, its direction, not a per-element sign). See
    :func:`fastoptim.reference.lion_` for the update.
    """
    _rule = spec("lion")
    _has_step = False
    _complex_params = False

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0,
                 use_triton=False, decoupled_weight_decay=False, *, maximize=False):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if use_triton:
            raise ValueError("use_triton=True: fastoptim.torch.Lion runs its compiled CPU "
                             "kernel; Triton kernels are for CUDA tensors")
        self._rule.check_bounds({"lr": lr, "betas": betas, "weight_decay": weight_decay})
        # the oracle's attributes, under its names
        self.decoupled_wd, self._init_lr = _lion_decoupling(decoupled_weight_decay,
                                                            _value("lr", lr))
        defaults = {"lr": lr, "betas": betas, "weight_decay": weight_decay,
                    "maximize": maximize}
        super().__init__(params, defaults)
        self._fastoptim_init()

    def __getstate__(self):
        return dict(super().__getstate__(), decoupled_wd=self.decoupled_wd,
                    _init_lr=self._init_lr)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("decoupled_wd", False)
        self.__dict__.setdefault("_init_lr", self.defaults["lr"])
        for group in self.param_groups:
            group.setdefault("maximize", False)

    def _prepare(self, group, params, grads, states, steps):
        if self.decoupled_wd:
            group = dict(group, weight_decay=_value("weight_decay", group["weight_decay"])
                         / self._init_lr)
        return super()._prepare(group, params, grads, states, steps)



class _OracleRule(_Optimizer):
    """What the classes of the rules beyond torch.optim share: the options their oracle
    keeps as attributes of the optimizer (the registry's ``attributes``, and
    pytorch_optimizer's ``foreach``), which survive pickling, and pytorch_optimizer's
    extra keyword options (``cautious``, ``stable_adamw``: refused when true, kept in
    the groups as it keeps them)."""
    _has_step = False
    #: the attributes' values for an optimizer unpickled from before they existed
    _attribute_defaults = {}

    def _oracle_init(self, params, defaults, kwargs, attributes):
        """The constructor's end: torch's check of a tensor lr, the oracle's extra
        keyword options, the bounds, the attributes, then torch's Optimizer."""
        lr = defaults["lr"]
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        name = type(self).__name__
        for key, value in kwargs.items():
            if key not in ("cautious", "stable_adamw"):
                raise TypeError(f"{name} got an unexpected keyword argument {key!r}")
            if value:
                raise ValueError(f"{key}=True: fastoptim.torch.{name} runs the plain "
                                 f"{name} update; use pytorch_optimizer.{name} for this "
                                 "variant")
        self._rule.check_bounds(defaults)
        self.__dict__.update(attributes)      # (the oracle's attributes, its names)
        super().__init__(params, dict(defaults, **kwargs))
        self._fastoptim_init()

    def __getstate__(self):
        return dict(super().__getstate__(),
                    **{k: self.__dict__[k] for k in self._attribute_defaults})

    def __setstate__(self, state):
        super().__setstate__(state)
        for key, value in self._attribute_defaults.items():
            self.__dict__.setdefault(key, value)


class ADOPT(_OracleRule):
    """``pytorch_optimizer.ADOPT`` on fastoptim's kernel.

    Same signature, defaults, group keys and state as pytorch-optimizer 4.1's ADOPT:
    ``exp_avg`` and ``exp_avg_sq`` per parameter, the step in the group
    (``group["step"]``, advanced once per step for every group), and ``clip_lambda``
    and ``maximize`` as attributes of the optimizer, as the oracle keeps them.
    ``cautious`` and ``stable_adamw`` (the oracle's extra keyword options) are
    refused when true. Complex parameters are stepped as their real pairs, as the
    oracle steps them. Unlike the oracle, the step never writes ``p.grad``. See
    :func:`fastoptim.reference.adopt_` for the update.
    """
    _rule = spec("adopt")
    _attribute_defaults = {"clip_lambda": adopt_clip, "maximize": False, "foreach": None}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.9999), clip_lambda=adopt_clip,
                 weight_decay=0.0, weight_decouple=False, fixed_decay=False, foreach=None,
                 eps=1e-6, maximize=False, **kwargs):
        self._oracle_init(
            params, {"lr": lr, "betas": betas, "weight_decay": weight_decay,
                     "weight_decouple": weight_decouple, "fixed_decay": fixed_decay,
                     "foreach": foreach, "eps": eps}, kwargs,
            {"clip_lambda": clip_lambda, "maximize": maximize, "foreach": foreach})

    def _kept_refresh(self, kernel):
        # a kept step's clips, from the step it is about to take
        _config._kernels.adopt_set_clips(kernel, self.clip_lambda)


class AdEMAMix(_OracleRule):
    """``pytorch_optimizer.AdEMAMix`` on fastoptim's kernel.

    Same signature, defaults, group keys and state as pytorch-optimizer 4.1's AdEMAMix:
    ``exp_avg``, ``exp_avg_sq`` and ``exp_avg_slow`` per parameter, the step in the
    group, ``maximize`` an attribute of the optimizer. Complex parameters are refused,
    as the oracle refuses them; ``cautious``/``stable_adamw`` as :class:`ADOPT`'s. See
    :func:`fastoptim.reference.ademamix_` for the update.
    """
    _rule = spec("ademamix")
    _complex_params = False
    _attribute_defaults = {"maximize": False, "foreach": None}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), weight_decay=0.0,
                 weight_decouple=False, fixed_decay=False, alpha=5.0, t_alpha_beta3=None,
                 eps=1e-8, maximize=False, foreach=None, **kwargs):
        self._oracle_init(
            params, {"lr": lr, "betas": betas, "weight_decay": weight_decay,
                     "weight_decouple": weight_decouple, "fixed_decay": fixed_decay,
                     "alpha": alpha, "t_alpha_beta3": t_alpha_beta3, "eps": eps,
                     "foreach": foreach}, kwargs, {"maximize": maximize, "foreach": foreach})


class SophiaH(_OracleRule):
    """``pytorch_optimizer.SophiaH`` on fastoptim's kernel.

    Same signature, defaults, group keys and state as pytorch-optimizer 4.1's SophiaH:
    ``momentum`` and ``hessian_moment`` per parameter, the step in the group, and
    ``update_period``, ``num_samples``, ``distribution`` and ``maximize`` as
    attributes of the optimizer. Every ``update_period`` steps (counted by the first
    group), ``step()`` estimates each Hessian diagonal by Hutchinson's method with
    autograd, as the oracle does: ``num_samples`` Hessian-vector products of the
    gradients (so ``loss.backward(create_graph=True)`` must have made them) along
    ``torch.randn_like`` (or Rademacher) vectors drawn from torch's generator in the
    oracle's order. ``step(hessian=[...])`` takes estimates instead (one per
    parameter, in group order), as the oracle does; the estimate is not kept in the
    state (the oracle keeps a copy, ``state["hessian"]``, which a checkpoint may carry
    and loading ignores). Complex parameters are refused, as the oracle refuses them.
    See :func:`fastoptim.reference.sophiah_` for the update.
    """
    _rule = spec("sophiah")
    _complex_params = False
    _attribute_defaults = {"update_period": 10, "num_samples": 1, "distribution": "gaussian",
                           "maximize": False, "foreach": None}

    def __init__(self, params, lr=6e-2, betas=(0.96, 0.99), weight_decay=0.0,
                 weight_decouple=True, fixed_decay=False, p=1e-2, update_period=10,
                 num_samples=1, hessian_distribution="gaussian", eps=1e-12, maximize=False,
                 foreach=None, **kwargs):
        _check_hutchinson(update_period, num_samples, hessian_distribution)
        self._oracle_init(
            params, {"lr": lr, "foreach": foreach, "betas": betas,
                     "weight_decay": weight_decay, "weight_decouple": weight_decouple,
                     "fixed_decay": fixed_decay, "p": p, "eps": eps}, kwargs,
            {"update_period": update_period, "num_samples": num_samples,
             "distribution": hessian_distribution, "maximize": maximize,
             "foreach": foreach})

    def load_state_dict(self, state_dict):
        """torch's load; the oracle's copy of the last estimate (``hessian``) is
        dropped (a step never reads it)."""
        super().load_state_dict(state_dict)
        for st in self.state.values():
            if isinstance(st, dict):
                st.pop("hessian", None)

    @property
    def hessian_distribution(self):
        """The constructor's name for ``distribution`` (the oracle's attribute)."""
        return self.distribution

    @_step_hooks
    def step(self, closure=None, hessian=None):
        """One step; on the steps that update the Hessian moment (every
        ``update_period``, or when ``hessian`` is given) the Hessian diagonals are
        estimated first (or taken from ``hessian``, one tensor per parameter)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        step = self.param_groups[0].get("step", 0) + 1
        if hessian is not None:
            inputs = self._given_hessians(hessian)
        elif (step - 1) % self.update_period == 0:
            inputs = self._hutchinson(step)
        else:
            inputs = None
        self._step_inputs = inputs
        try:
            self._step()
        finally:
            self._step_inputs = None
        return loss

    def _given_hessians(self, hessian):
        params = [p for g in self.param_groups for p in g["params"]]
        if not isinstance(hessian, (list, tuple)) or len(hessian) != len(params):
            raise ValueError(f"hessian must be a list of one tensor per parameter "
                             f"({len(params)}, in group order), got "
                             f"{type(hessian).__name__}")
        out = {}
        for i, (p, h) in enumerate(zip(params, hessian)):
            if not isinstance(h, torch.Tensor):
                raise TypeError(f"hessian[{i}] must be a tensor, got {type(h).__name__}")
            if h.shape != p.shape:
                raise ValueError(f"the shape of parameter and hessian does not match. "
                                 f"{p.size()} vs {h.size()} (hessian[{i}])")
            out[id(p)] = h.detach()
        return out

    def _hutchinson(self, step):
        """The oracle's estimate: z * (H z), averaged over num_samples vectors z."""
        for gi, g in enumerate(self.param_groups):
            for i, p in enumerate(g["params"]):
                if p.grad is not None and not p.requires_grad:
                    # (the oracle would step it without updating its Hessian moment,
                    # which one kernel call for the group cannot do)
                    raise ValueError(
                        f"{self._param_name(gi, g, i)} has a gradient but does not require "
                        f"one: SophiaH cannot estimate its Hessian at step {step}; pass "
                        "step(hessian=[...]) or set requires_grad")
        params = [p for g in self.param_groups for p in g["params"]
                  if p.grad is not None and not p.grad.is_sparse]
        out = {id(p): torch.zeros_like(p) for p in params}
        if not params:
            return out
        grads = [p.grad for p in params]
        for i in range(self.num_samples):
            if self.distribution == "rademacher":
                zs = [torch.randint_like(p, 0, 2) * 2.0 - 1.0 for p in params]
            else:
                zs = [torch.randn_like(p) for p in params]
            try:
                h_zs = torch.autograd.grad(grads, params, grad_outputs=zs,
                                           retain_graph=i < self.num_samples - 1)
            except RuntimeError as e:
                raise RuntimeError(
                    f"SophiaH estimates the Hessian diagonal at step {step} (every "
                    f"update_period={self.update_period} steps) from the gradients' graph: "
                    f"call loss.backward(create_graph=True) before step(), or pass "
                    f"step(hessian=[...]) ({e})") from None
            for h_z, z, p in zip(h_zs, zs, params):
                out[id(p)].addcmul_(h_z, z, value=1.0 / self.num_samples)
        return out



class AdamWScheduleFree(_OracleRule):
    """``schedulefree.AdamWScheduleFree`` on fastoptim's kernel.

    Same signature, defaults, group keys (``k``, ``train_mode``, ``weight_sum``,
    ``lr_max``, ``scheduled_lr`` among them, kept as the oracle keeps them) and state
    (``z``, a copy of the parameter at its first step, and ``exp_avg_sq``) as
    schedulefree 1.4's. ``train()`` and ``eval()`` move the parameters between the
    gradient point y and the average x with the oracle's ``lerp_``; a step in eval mode
    raises the oracle's error (as a ``RuntimeError``). ``maximize`` (keyword-only) is
    added, as an attribute of the optimizer (the groups stay the oracle's). Complex
    parameters are refused. Unlike the oracle (which normalizes ``p.grad`` in place), a
    step never writes ``p.grad``. See :func:`fastoptim.reference.adamw_schedulefree_`
    for the update.
    """
    _rule = spec("adamw_schedulefree")
    _complex_params = False
    _attribute_defaults = {"maximize": False}
    _hyperparameters_per_step = True        # (the step's scheduled lr and ckp1)

    def __init__(self, params, lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 warmup_steps=0, r=0.0, weight_lr_power=2.0,
                 foreach=hasattr(torch, "_foreach_mul_"), *, maximize=False):
        self._pending = {}
        self._oracle_init(
            params, dict(lr=lr, betas=betas, eps=eps, r=r, k=0, warmup_steps=warmup_steps,
                         train_mode=False, weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0,
                         weight_lr_power=weight_lr_power, weight_decay=weight_decay,
                         foreach=foreach), {}, {"maximize": maximize})

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_pending", {})

    @torch.no_grad()
    def eval(self):
        """Parameters to the average x, as the oracle: ``p.lerp_(z, 1 - 1/beta1)``."""
        for group in self.param_groups:
            if group["train_mode"]:
                beta1, _ = group["betas"]
                for p in group["params"]:
                    state = self.state[p]
                    if "z" in state:
                        p.lerp_(end=state["z"].to(p.device), weight=1 - 1 / beta1)
                group["train_mode"] = False

    @torch.no_grad()
    def train(self):
        """Parameters to the gradient point y, as the oracle: ``p.lerp_(z, 1 - beta1)``."""
        for group in self.param_groups:
            if not group["train_mode"]:
                beta1, _ = group["betas"]
                for p in group["params"]:
                    state = self.state[p]
                    if "z" in state:
                        p.lerp_(end=state["z"].to(p.device), weight=1 - beta1)
                group["train_mode"] = True

    @_step_hooks
    def step(self, closure=None):
        """One step from the gradients at y (train mode only, as the oracle)."""
        if not self.param_groups[0]["train_mode"]:
            raise RuntimeError(_SCHEDULEFREE_EVAL_STEP)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._pending = {id(g): _schedule(g, _value) for g in self.param_groups}
        try:
            self._step()
        finally:
            pending, self._pending = self._pending, {}
        for group in self.param_groups:
            _apply_schedule(group, pending[id(group)])
        return loss

    def _prepare(self, group, params, grads, states, steps, *inputs):
        lr, _, _, ckp1 = self.__dict__.get("_pending", {}).get(
            id(group), (group["lr"], None, None, 1.0))
        return super()._prepare(dict(group, lr=lr, ckp1=ckp1), params, grads, states, steps)
