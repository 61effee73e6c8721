"""The base class of the drop-in optimizers: torch's Optimizer with the checks, the
step and the state of fastoptim's kernels (the planned and kept steps are mixins)."""
import functools
from collections.abc import Mapping

import numpy as np
import torch
from torch.optim import optimizer as _torch_optimizer
from torch.optim.optimizer import Optimizer as _TorchOptimizer

from .. import _config
from .. import functional as F
from . import _compressed
from ._plan import _Planning
from ._reuse import _Keeping, _State, _threads  # noqa: F401 (_threads: re-exported)
from ._tensors import _DTYPES, _new_step, _placeable, _scalar_dtype, _state_like


def _check_fused(fused, differentiable, foreach):
    """torch.optim's own checks of the fused flag (same messages)."""
    if fused:
        if differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        if foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def _to_scalar(x):
    """torch.optim's _to_scalar: a 1-element tensor hyperparameter becomes 0-d."""
    if isinstance(x, torch.Tensor) and x.dim() != 0:
        return x.squeeze()
    return x


def _value(name, x):
    """A hyperparameter as the kernels take it: a plain number (tensors: their value)."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        return x.item()
    return x


class _Options(Mapping):
    """A parameter group's options as the kernels take them: a tensor (``lr``, each
    beta) becomes its value, a flag a bool (torch.optim keeps what it was given; the
    registry's default says which options are flags)."""
    __slots__ = ("group", "defaults")

    def __init__(self, group, defaults):
        self.group, self.defaults = group, defaults

    def __getitem__(self, name):
        x = self.group[name]
        if isinstance(self.defaults.get(name, x), bool):
            return bool(x)
        if isinstance(x, (tuple, list)):
            return tuple(_value(f"{name}[{i}]", y) for i, y in enumerate(x))
        return _value(name, x)

    def __contains__(self, name):
        # (Mapping's would read the value through __getitem__: the kernel call asks for
        # each option the group may lack, the compressed-state keys among them)
        return name in self.group

    def __iter__(self):
        return iter(self.group)

    def __len__(self):
        return len(self.group)


def _step_hooks(step):
    """``step`` wrapped as torch wraps every optimizer's step (pre- and post-hooks, a
    profiler range), but with torch's wrapper entered only when a hook is registered or
    the profiler runs: entering it costs ~20 us a step, more than a whole small step.
    Marked ``hooked`` so that torch's Optimizer.__init__ does not wrap it again."""
    wrapped = _TorchOptimizer.profile_hook_step(step)

    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        if (_torch_optimizer._global_optimizer_pre_hooks
                or _torch_optimizer._global_optimizer_post_hooks
                or self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                or torch.autograd._profiler_enabled()):
            return wrapped(self, *args, **kwargs)
        out = step(self, *args, **kwargs)
        self._optimizer_step_code()
        return out
    wrapper.hooked = True
    return wrapper


class _Optimizer(_Keeping, _Planning, _TorchOptimizer):
    """What the five classes share: checks, cached views, the planned step.

    A subclass names its rule (``_rule``, a registry entry: the state names, their
    order and the kernel call come from it) and gives torch's constructor, argument
    checks and ``__setstate__`` defaults; where torch's lazy state differs from zeros
    in the registry's order, ``_new_state(group, p)`` or ``_step_tensor(group, p)``."""

    #: whether the state carries a "step" counter (torch's SGD has none)
    _has_step = True
    #: whether complex parameters are stepped (as their view_as_real twins)
    _complex_params = True

    # --- construction and checks -------------------------------------------------------
    def _fastoptim_init(self):
        """End of each subclass __init__, after torch's own argument checks."""
        for gi, group in enumerate(self.param_groups):
            self._check_group(gi, group)
        self.state = _State(dict, self.state)
        self._fastoptim_ready = True

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        if getattr(self, "_fastoptim_ready", False):
            try:
                self._check_group(len(self.param_groups) - 1, self.param_groups[-1])
            except Exception:
                self.param_groups.pop()
                raise

    def __setstate__(self, state):
        super().__setstate__(state)
        if not isinstance(self.state, _State):
            self.state = _State(dict, self.state)
        self._fastoptim_ready = True
        self._views = {}
        self._reuses = {}

    def _group_defaults(self, **options):
        """torch's ``__setstate__`` for a state dict of an older torch: each option a
        group lacks takes its default, and a number ``step`` (or per-parameter scalar
        state: NAdam's mu_product, ASGD's eta and mu) becomes a tensor of torch's
        scalar dtype."""
        scalars = tuple(n for n, _ in self._rule.scalar_state)
        for group in self.param_groups:
            for key, value in options.items():
                group.setdefault(key, value)
            for p in group["params"]:
                p_state = self.state.get(p, [])
                if len(p_state) == 0:
                    continue
                if not torch.is_tensor(p_state["step"]):      # (as torch: it must be there)
                    p_state["step"] = torch.tensor(float(p_state["step"]),
                                                   dtype=_scalar_dtype())
                for key in scalars:
                    if key in p_state and not torch.is_tensor(p_state[key]):
                        p_state[key] = torch.tensor(float(p_state[key]),
                                                    dtype=_scalar_dtype())

    def _check_group(self, gi, group):
        """Refuse options and parameters the kernels cannot honour."""
        name = type(self).__name__
        if group.get("differentiable", False):
            raise ValueError(
                f"fastoptim.torch.{name} does not support differentiable=True "
                f"(param_groups[{gi}]): the compiled kernel updates the parameters' "
                f"memory outside autograd, so the step cannot be differentiated; use "
                f"torch.optim.{name} for differentiable steps")
        if group.get("capturable", False):
            raise ValueError(
                f"fastoptim.torch.{name} does not support capturable=True "
                f"(param_groups[{gi}]): it updates CPU tensors outside CUDA graphs; "
                f"set capturable=False")
        for i, p in enumerate(group["params"]):
            self._check_param(gi, group, i, p)
        if _compressed.compressed(group) or "min_8bit_size" in group:
            _compressed.check(self._rule, group, f"param_groups[{gi}]")
        # the hyperparameters, by preparing an update of no parameters
        self._prepare(group, [], [], {n: [] for n in self._state_names(group)},
                      np.zeros(0, dtype=np.int64))

    @staticmethod
    def _param_name(gi, group, i):
        where = f"param_groups[{gi}]['params'][{i}]"
        names = group.get("param_names")
        if names is not None and i < len(names):
            return f"parameter {names[i]!r} ({where})"
        return f"parameter {where}"

    def _check_param(self, gi, group, i, p):
        label = self._param_name(gi, group, i)
        if p.layout != torch.strided:
            raise TypeError(f"{label} has layout {p.layout}; fastoptim.torch updates "
                            f"dense (strided) tensors only")
        if p.device.type != "cpu":
            raise ValueError(f"{label} is on device {p.device}; fastoptim.torch updates "
                             f"CPU tensors only")
        if p.dtype not in _DTYPES:
            raise TypeError(f"{label} has dtype {p.dtype}; fastoptim.torch supports "
                            f"float32, float64, complex64 and complex128 parameters")
        if p.is_complex() and not self._complex_params:
            raise TypeError(f"{label} is complex ({p.dtype}); fastoptim.torch."
                            f"{type(self).__name__} takes real parameters only")
        if p.is_conj() or p.is_neg():
            raise ValueError(f"{label} has its conjugate or negative bit set; call "
                             f"resolve_conj()/resolve_neg() on it first")

    def _check_grad(self, gi, group, i, p, g):
        label = self._param_name(gi, group, i)
        if g.layout != torch.strided:
            raise TypeError(f"{label} has a sparse gradient (layout {g.layout}); "
                            f"fastoptim.torch supports dense gradients only")
        if g.device != p.device or g.dtype != p.dtype or g.shape != p.shape:
            raise ValueError(f"the gradient of {label} is a {g.dtype} tensor of shape "
                             f"{tuple(g.shape)} on {g.device}, but the parameter is "
                             f"{p.dtype} of shape {tuple(p.shape)} on {p.device}")

    # --- the step ----------------------------------------------------------------------

    def _step(self, closure=None):
        """The step, without torch's hooks (a subclass's step wraps it)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_groups()
        return loss

    @_step_hooks
    def step(self, closure=None):
        """Perform a single optimization step (one compiled call per parameter group).

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        return self._step(closure)

    # (the kept step: _reuse._Keeping; the planned one: _plan._Planning)

    # --- state memory ------------------------------------------------------------------

    #: the rule's entry in fastoptim.rules: its state tensors, in one order (a tensor's
    #: place, 1, 2, 3, decides where a large one goes in memory: fastoptim._placement)
    _rule = None

    def _state_tensor(self, p, name, fill=0):
        """A new state tensor ``name`` of ``p``, as torch makes it, placed when large."""
        return _state_like(p, self._rule.state.index(name) + 1, fill)

    def _state_entries(self, group, p, name, fill=0):
        """A new state tensor ``name`` of ``p`` in the group's state format: ``{name:
        tensor}`` (and ``{name + "_absmax": block scales}`` for 8-bit state)."""
        return _compressed.new_entries(
            p, name, fill, _compressed.param_format(group, p),
            name not in self._rule.unsigned_state,
            lambda: self._state_tensor(p, name, fill))

    def load_state_dict(self, state_dict):
        """torch's ``load_state_dict``, with the optimizer's own state format kept:
        state saved in another format (float32, bfloat16, 8-bit codes with their block
        scales, or a bitsandbytes 8-bit optimizer's nested state) is converted to it,
        never through a float32 copy made by torch (which casts every floating state
        tensor to the parameter's dtype); the groups keep the optimizer's
        compressed-state keys. A bitsandbytes state dict's groups carry none of torch's
        flags: those keep the optimizer's values (a torch checkpoint's missing keys
        take torch's defaults, as torch loads them). Then each large state tensor
        in the parameter's dtype is copied into placed memory (as a new state tensor
        would be): the loaded ones are torch's allocations, or the very tensors of
        ``state_dict``."""
        own = [dict(g) for g in self.param_groups]
        saved, kept, bnb = _compressed.set_aside(state_dict, self._rule.state)
        super().load_state_dict(saved)
        ids = [i for g in saved["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(ids, params))
        for g, o, sg in zip(self.param_groups, own, saved["param_groups"]):
            for k in _compressed.KEYS:
                g.pop(k, None)
            for k, v in o.items():
                if k in _compressed.KEYS or (bnb and k not in sg):
                    g[k] = v
            if bnb:
                for k in _compressed.BNB_GROUP_KEYS:
                    if k not in o:
                        g.pop(k, None)
        for key, entries in kept.items():
            p = by_id.get(key)
            if p is not None:
                self.state[p].update(entries)
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                st = self.state.get(p)
                if not isinstance(st, dict):
                    continue
                fmt = _compressed.param_format(group, p)
                for name in self._rule.state:
                    _compressed.convert(st, name, fmt, p,
                                        name not in self._rule.unsigned_state,
                                        f"the state of {self._param_name(gi, group, i)}")
                if fmt is None and isinstance(p, torch.Tensor) and _placeable(p):
                    for name in self._rule.state:
                        t = st.get(name)
                        if (isinstance(t, torch.Tensor) and t.shape == p.shape
                                and t.dtype == p.dtype and t.is_cpu):
                            placed = self._state_tensor(p, name)
                            placed.copy_(t)
                            st[name] = placed

    # --- class hooks -------------------------------------------------------------------

    #: whether a non-empty state may still lack what a step needs (SGD's buffer)
    _partial_state = False

    def _has_state(self, state, group):
        return True

    def _state_names(self, group):
        """The state tensors the kernel updates for this group, in the rule's order."""
        return self._rule.state_names(group, _value)

    def _new_state(self, group, p):
        """torch's lazy state of a parameter: its ``step`` (if the rule counts steps),
        its scalar state (0-d tensors of torch's scalar dtype: NAdam's mu_product from 1,
        ASGD's eta from the group's lr and mu from 1), then a zero tensor per state
        name, in the registry's order."""
        state = {"step": self._step_tensor(group, p)} if self._has_step else {}
        for name, value in self._rule.scalar_values(group, _value):
            state[name] = torch.tensor(value, dtype=_scalar_dtype())
        for name in self._state_names(group):
            state.update(self._state_entries(group, p, name))
            if name in self._rule.param_copies:         # (Schedule-Free's z)
                state[name].copy_(p.detach())
        return state

    def _step_tensor(self, group, p):
        return _new_step(group, p)

    def _prepare(self, group, params, grads, states, steps, *inputs):
        """The kernel call for ``params`` (their state lists by name), through the
        registry; options are read as plain numbers (see _Options). ``inputs``: the
        rule's read-only inputs (the registry's ``inputs``: one list each, or None on a
        step without them)."""
        if len(inputs) < len(self._rule.inputs):
            inputs = (None,) * len(self._rule.inputs)
        if group.get("state_dtype") == "8bit" and "absmaxes" not in states:
            states = dict(states, absmaxes=tuple([] for _ in self._rule.kernel_state))
        if self._rule.attributes:           # (options the oracle keeps outside its groups)
            group = dict(group, **{k: getattr(self, k) for k in self._rule.attributes})
        return F.prepare(self._kernel_rule(group), params, grads, states, steps,
                         _Options(group, self._rule.defaults), *inputs)

    def _kernel_rule(self, group):
        return self._rule
