"""fastoptim.torch.Adafactor: torch.optim.Adafactor's signature, state and checks on
fastoptim's Adafactor kernel.

Adafactor is not element-wise (its factors are reductions over whole rows and columns),
so it does not go through the planned step of the other classes (_plan, _reuse), which
see every parameter as a flat run of elements: this class views each parameter, its
gradient and its state as the kernel takes them (C order; a parameter in another
layout goes through a C-ordered copy that is written back), checks every group, then
runs them all. A refused step changes nothing. Its group's prepared kernel call is kept
between steps as the other classes keep theirs (_reuse._Keeping), when no copy was
needed.
"""
import numpy as np
import torch
from torch.optim.optimizer import Optimizer as _TorchOptimizer

from .. import functional as F
from ..rules import spec
from ._base import _step_hooks, _to_scalar, _value
from ._plan import _Planning
from ._reuse import _Keeping, _State
from ._tensors import _DTensor, _scalar_dtype

_FLOAT = (torch.float32, torch.float64)


class Adafactor(_Keeping, _TorchOptimizer):
    """torch.optim.Adafactor on fastoptim's compiled kernel (same signature, defaults,
    errors, state and state_dict; ``foreach`` is accepted and kept, the kernel runs
    either way). Parameters must be float32 or float64 CPU tensors (torch refuses
    complex ones too); a DTensor is refused: its row and column statistics would need
    reductions across ranks."""
    _rule = spec("adafactor")
    _has_step = True

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                 weight_decay=0.0, *, foreach=None, maximize=False):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        self._rule.check_bounds({"lr": lr, "beta2_decay": beta2_decay, "eps": eps, "d": d,
                                 "weight_decay": weight_decay})
        defaults = {"lr": lr, "beta2_decay": beta2_decay, "eps": eps, "d": d,
                    "weight_decay": weight_decay, "foreach": foreach, "maximize": maximize}
        super().__init__(params, defaults)
        self.state = _State(dict, self.state)

    def __setstate__(self, state):
        super().__setstate__(state)
        if not isinstance(self.state, _State):
            self.state = _State(dict, self.state)
        self._reuses = {}
        for group in self.param_groups:
            group.setdefault("foreach", None)
            for p in group["params"]:
                p_state = self.state.get(p, [])
                if len(p_state) != 0 and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = torch.tensor(float(p_state["step"]),
                                                   dtype=_scalar_dtype())

    @_step_hooks
    def step(self, closure=None):
        """Perform a single optimization step (torch's semantics)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_groups()
        return loss

    def _state_names(self, group):
        return self._rule.state

    def _prepare(self, group, params, grads, states, steps):
        """The kernel call for ``params`` (their state lists by name, None where a
        parameter keeps no such state)."""
        options = {k: (_value(k, _to_scalar(group[k])) if k != "eps" else group[k])
                   for k in ("lr", "beta2_decay", "d", "weight_decay", "eps")}
        return F.prepare_adafactor(
            params, grads, states.get("row_var", []), states.get("col_var", []),
            states.get("variance", []), steps, maximize=bool(group["maximize"]), **options)

    def _plan(self, gi, group):
        """One group checked and prepared; nothing changed."""
        plan = _Plan(self.state)
        params, grads, rows, cols, variances, steps = [], [], [], [], [], []
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            where = f"param_groups[{gi}]['params'][{i}]"
            if torch.is_complex(p):
                raise RuntimeError("Adafactor does not support complex parameters")
            if p.grad.is_sparse:
                raise RuntimeError("Adafactor does not support sparse gradients")
            if isinstance(p, _DTensor):
                raise ValueError(f"{where} is a DTensor: fastoptim.torch.Adafactor steps "
                                 "plain CPU tensors (its factors would need reductions "
                                 "across ranks); use torch.optim.Adafactor under FSDP")
            if not p.is_cpu or p.dtype not in _FLOAT:
                raise ValueError(f"{where} is a {p.dtype} tensor on {p.device}; "
                                 "fastoptim.torch.Adafactor steps float32 and float64 "
                                 "CPU tensors")
            g = p.grad
            if g.shape != p.shape or g.dtype != p.dtype or not g.is_cpu:
                raise ValueError(f"the gradient of {where} is a {g.dtype} tensor of shape "
                                 f"{tuple(g.shape)} on {g.device}; the parameter is "
                                 f"{p.dtype} of shape {tuple(p.shape)}")
            state = self.state.get(p)
            shapes = _kept_shapes(self._rule, p.shape)
            if not state:
                state = {"step": torch.tensor(0.0, dtype=_scalar_dtype())}
                for name, shape in shapes:
                    state[name] = (g.new_zeros(shape) if shape != g.shape else
                                   torch.zeros_like(g, memory_format=torch.preserve_format))
                plan.new_state.append((p, state))
            kept = {}
            for name, shape in shapes:
                t = state.get(name)
                if not (isinstance(t, torch.Tensor) and t.dtype == p.dtype and t.is_cpu
                        and tuple(t.shape) == shape):
                    got = ((t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor)
                           else repr(t))
                    raise ValueError(f"state[{name!r}] of {where} must be a {p.dtype} CPU "
                                     f"tensor of shape {shape}, got {got}")
                kept[name] = plan.view(t)
            step = state.get("step")
            if not (isinstance(step, torch.Tensor) and step.numel() == 1):
                raise TypeError(f"state['step'] of {where} must be a one-element tensor, "
                                f"got {step!r}")
            count = float(step)
            if not (count >= 0 and count == int(count)):
                raise ValueError(f"state['step'] of {where} is {count}; a step count must "
                                 "be a whole number >= 0")
            params.append(plan.view(p))
            grads.append(_Planning._grad_array(g))
            if not grads[-1].flags.c_contiguous:
                plan.reusable = False            # (the kernel reads a copy of it)
            plan.used.append(p)
            plan.grads.append(g)
            rows.append(kept.get("row_var"))
            cols.append(kept.get("col_var"))
            variances.append(kept.get("variance"))
            steps.append(int(count))
            plan.step_tensors.append(step)
            plan.written.append(p)
            plan.written.extend(state[n] for n, _ in shapes)
        plan.steps = np.array(steps, dtype=np.int64)
        try:
            plan.kernel = self._prepare(
                group, params, grads,
                {"row_var": rows, "col_var": cols, "variance": variances}, plan.steps)
        except (TypeError, ValueError) as e:
            raise type(e)(f"param_groups[{gi}]: {e}") from None
        return plan


class _Plan:
    """A group's prepared Adafactor step: run() moves data and cannot fail. (With what
    _Keeping._keep reads to keep it: ``used``, ``grads``, ``reusable``, ``fills``.)"""
    __slots__ = ("kernel", "backs", "steps", "step_tensors", "new_state", "written",
                 "state", "used", "grads", "reusable")

    def __init__(self, state):
        self.kernel = None
        self.backs = []          # (tensor, C-ordered copy): written back after the run
        self.steps = None
        self.step_tensors = []
        self.new_state = []      # (param, state) made by this step
        self.written = []
        self.state = state       # the optimizer's, where new_state goes after the run
        self.used = []           # the parameters with a gradient (the kernel's order)
        self.grads = []          # their gradients
        self.reusable = True     # whether a _Reuse can be made of this plan

    @property
    def fills(self):
        # (a kept step must need no copies: those of parameters are written back)
        return self.backs

    def view(self, t):
        """The tensor as a C-ordered NumPy array: its own memory, or a copy written
        back after the run."""
        a = t.detach().numpy()
        if a.flags.c_contiguous:
            return a
        c = np.ascontiguousarray(a)
        self.backs.append((a, c))
        return c

    def run(self, n_threads):
        self.kernel.run(n_threads)
        for dst, src in self.backs:
            np.copyto(dst, src)
        for t, count in zip(self.step_tensors, self.steps.tolist()):
            t.fill_(count)
        torch.autograd.graph.increment_version(self.written)
        for p, state in self.new_state:
            self.state[p] = state


_SHAPES = {}


def _kept_shapes(rule, shape):
    """((name, shape), ...) of the state a parameter of ``shape`` keeps (the registry's
    state_shape, asked once per shape)."""
    kept = _SHAPES.get(shape)
    if kept is None:
        if len(_SHAPES) > 4096:
            _SHAPES.clear()
        kept = _SHAPES[shape] = tuple((n, s) for n, s in (
            (n, rule.state_shape(n, shape)) for n in rule.state) if s is not None)
    return kept
