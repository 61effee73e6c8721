"""The planned step: a group viewed, checked and prepared (see _Planning)."""
import math
import numbers
import re

import numpy as np
import torch

from . import _compressed
from ._tensors import (_COMPLEX_DTYPES, _FLOAT_DTYPES, _STRIDED, _DTensor, _dense, _like,
                       _local, _meta, _same_order, _shares_memory)


# the kernels' names for their array lists, as they appear in their error messages
_KERNEL_NAME = re.compile(r"\b(params|grads|momentum_buffers|state_sums|square_avgs|"
                          r"grad_avgs|exp_avgs|exp_avg_sqs|max_exp_avg_sqs)\[(\d+)\]")


class _Views:
    """Cached NumPy views of one parameter and its state tensors, as the kernel takes
    them (1-D, all in the parameter's memory order). Valid while ``_meta`` of the
    parameter is unchanged and each state tensor is the same object at the same
    address."""
    __slots__ = ("p", "meta", "array", "layout", "c_order", "strided", "states", "step")

    def __init__(self, p, meta, array, layout, strided):
        self.p = p                # the parameter
        self.meta = meta          # _meta(p) when the views were made
        self.c_order = layout.flags.c_contiguous
        self.array = array        # 1-D array the kernel updates
        self.layout = layout      # ``array`` seen with p's shape (to align grad/state)
        self.strided = strided    # p's strided memory, when ``array`` is a buffer
        self.states = {}          # (name, state format) -> (tensor, data_ptr, kernel
                                  # array, fill or None)
        self.step = None          # (step tensor, data_ptr, 0-d view)


class _GroupPlan:
    """One parameter group's prepared step: everything is checked and allocated; run()
    only moves data and cannot fail."""
    __slots__ = ("kernel", "fills", "backs", "step_views", "steps", "new_state",
                 "written", "used", "grads", "reusable")

    def __init__(self):
        self.kernel = None       # fastoptim Step (None: no parameter has a gradient)
        self.fills = []          # (dst, src): copy into kernel buffers before the run
        self.backs = []          # (dst, src): copy results back after the run
        self.step_views = []     # 0-d NumPy views of the state["step"] tensors
        self.steps = None        # int64 counters the kernel reads and increments
        self.new_state = []      # (state dict, param, entries) created by this step
        self.written = []        # tensors whose version counter is bumped
        self.used = []           # the parameters with a gradient (the kernel's order)
        self.grads = []          # their gradients
        self.reusable = True     # whether a _Reuse can be made of this plan

    def run(self, n_threads):
        for dst, src in self.fills:
            np.copyto(dst, src)
        self.kernel.run(n_threads)
        for dst, src in self.backs:
            np.copyto(dst, src)
        if self.step_views:
            for view, count in zip(self.step_views, self.steps.tolist()):
                view[()] = count
        for state, p, entries in self.new_state:
            state.setdefault(p, {}).update(entries)
        torch.autograd.graph.increment_version(self.written)


class _Planning:
    """The planned step of :class:`fastoptim.torch._base._Optimizer`: a group's
    parameters, gradients and state viewed as the kernels take them (views cached
    between steps), checked, and prepared into one kernel call; nothing changes."""

    def _plan(self, gi, group):
        """Check one group and prepare its kernel call; change nothing."""
        plan = _GroupPlan()
        if group.get("differentiable", False) or group.get("capturable", False):
            self._check_group(gi, group)
        cache = self.__dict__.get("_views")
        if cache is None:
            cache = self._views = {}
        names = self._state_names(group)
        kparams, kgrads, kstates = [], [], {n: [] for n in names}
        # the rule's read-only inputs this step (SophiaH's Hessian diagonals: set by its
        # step, by parameter), read as gradients are
        given = self.__dict__.get("_step_inputs") if self._rule.inputs else None
        kinputs = [] if given is not None else None
        steps, fresh, where, strided = [], [], [], []
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            pl = _local(p)
            if pl is not p:                   # a DTensor: its local shard, and the grad's
                g = self._local_grad(gi, group, i, p, g)
                plan.reusable = False
            v = self._plan_param(plan, gi, group, i, p, pl, cache, strided)
            kparams.append(v.array)
            kgrads.append(self._plan_grad(plan, gi, group, i, p, pl, g, v))
            if kinputs is not None:
                kinputs.append(self._plan_grad(plan, gi, group, i, p, pl, given[id(p)], v))
            plan.used.append(p)
            plan.grads.append(g)
            is_new, step = self._plan_state(plan, gi, group, i, p, v, names, kstates)
            if step is not None:
                steps.append(step)
            fresh.append(is_new)
            where.append(i)
            plan.written.append(p)
        if not kparams:
            return plan
        if kinputs is not None:
            plan.reusable = False   # (a kept step points its kernel at no new inputs)
        if _compressed.compressed(group):
            if group["state_dtype"] == "8bit":
                kstates["absmaxes"] = tuple(kstates.pop(n + _compressed.ABSMAX, None)
                                            for n in self._rule.kernel_state)
        plan.steps = self._step_counts(gi, group, names, steps, fresh, where)
        if self._has_step:
            plan.step_views = steps
        try:
            plan.kernel = self._prepare(group, kparams, kgrads, kstates, plan.steps,
                                        *((kinputs,) if self._rule.inputs else ()))
        except (TypeError, ValueError) as e:
            # name the user's parameter instead of the kernel's list position
            msg = _KERNEL_NAME.sub(
                lambda m: self._param_name(gi, group, where[int(m.group(2))]), str(e))
            raise type(e)(msg) from None
        return plan

    def _plan_param(self, plan, gi, group, i, p, pl, cache, strided):
        """The parameter's views (cached while its memory and layout stay): a flat view
        of its memory for the kernel, or a buffer copied in before and out after."""
        v = cache.get(id(p))
        if v is None or v.p is not p or v.meta != (pl.data_ptr(), pl.shape, pl.stride(),
                                                   pl.dtype):
            v = self._param_views(gi, group, i, p, cache)
        if v.strided is not None:
            self._check_strided(gi, group, i, v, strided)
            plan.fills.append((v.layout, v.strided))
            plan.backs.append((v.strided, v.layout))
        return v

    def _plan_grad(self, plan, gi, group, i, p, pl, g, v):
        """The gradient as the kernel reads it: in the parameter's memory order, its own
        memory where it can be (never written), else a copy."""
        if not (g.is_cpu and g.layout is _STRIDED and g.dtype is p.dtype
                and g.shape == pl.shape):
            self._check_grad(gi, group, i, pl, g)
        if g.dtype in _FLOAT_DTYPES and not g.requires_grad:
            try:
                ga = g.numpy()
            except RuntimeError:              # negative bit set
                ga = self._grad_array(g)
                plan.reusable = False
        else:
            ga = self._grad_array(g)
            # a reused step reads the gradient's own memory: not through a copy
            if g.dtype not in _FLOAT_DTYPES or g.is_neg():
                plan.reusable = False
        if (v.c_order and ga.flags.c_contiguous) or _same_order(ga, v.layout):
            return ga.ravel("K")
        buf, view = _like(v.layout)
        np.copyto(view, ga)
        plan.reusable = False
        return buf

    def _plan_state(self, plan, gi, group, i, p, v, names, kstates):
        """The parameter's state tensors (made as torch makes them on a first step),
        viewed in the parameter's memory order into ``kstates``; returns whether the
        state is new, and the step counter's view (or None)."""
        state = self.state.get(p)
        is_new = not state or (self._partial_state and not self._has_state(state, group))
        if is_new:
            state = self._new_state(group, p)
            if state:
                plan.new_state.append((self.state, p, state))
        vstates = v.states
        fmt = _compressed.param_format(group, p) if _compressed.compressed(group) else None
        for sname in names:
            t = state.get(sname)
            c = vstates.get((sname, fmt))
            # a state tensor is only ever replaced (load_state_dict, ZeRO) or moved
            # (share_memory_, .data = ...), which changes its identity or pointer; the
            # format it must have may change with the group's options (min_8bit_size)
            if c is None or c[0] is not t or c[1] != t.data_ptr():
                c = self._state_views(gi, group, i, v, sname, state, t, fmt)
            kstates[sname].append(c[2])
            if group.get("state_dtype") == "8bit":
                scales = None
                if fmt:
                    scales = self._absmax_view(gi, group, i, p, sname, state)
                    plan.written.append(state[sname + _compressed.ABSMAX])
                kstates.setdefault(sname + _compressed.ABSMAX, []).append(scales)
            if c[3] is not None:
                plan.fills.append((c[3][0], c[3][1]))
                plan.backs.append((c[3][1], c[3][0]))
            plan.written.append(t)
        for sname, _ in self._rule.scalar_state:
            kstates.setdefault(sname, []).append(
                self._scalar_view(gi, group, i, sname, state.get(sname)))
            plan.written.append(state[sname])
        if not self._has_step:
            return is_new, None
        t = state.get("step")
        c = v.step
        if c is None or c[0] is not t or c[1] != t.data_ptr():
            c = self._step_view(gi, group, i, v, t)
        return is_new, c[2]

    def _step_counts(self, gi, group, names, steps, fresh, where):
        """The step counts the kernel takes (int64), from the state's step tensors (or
        the group's count, for a rule that keeps one: every parameter's)."""
        if self._rule.group_step:
            key = self._rule.group_step
            count = group.get(key, 0)
            if isinstance(count, bool) or not isinstance(count, numbers.Integral) \
                    or count < 0:
                raise ValueError(f"param_groups[{gi}][{key!r}] is {count!r}; the group's "
                                 "step count must be an int >= 0")
            return np.full(len(fresh), count, dtype=np.int64)
        if self._has_step:
            # plain Python here: a few NumPy reductions would cost more (~5 us each
            # with cold caches) than the whole list
            values = [float(s) for s in steps]
            try:
                ints = [int(x) for x in values]
            except (ValueError, OverflowError):
                ints = None
            if ints is None or ints != values or min(ints) < 0:
                j = next(j for j, x in enumerate(values)
                         if not (x == x and abs(x) != math.inf and x == int(x) and x >= 0))
                raise ValueError(
                    f"state['step'] of {self._param_name(gi, group, where[j])} is "
                    f"{values[j]}; a step count must be a whole number >= 0")
            return np.array(ints, dtype=np.int64)
        if names:
            # SGD: the kernel sets a momentum buffer to the gradient when its counter
            # goes from 0 to 1, so a buffer created by this step counts 0.
            return np.array([0 if f else 1 for f in fresh], dtype=np.int64)
        return None

    def _local_grad(self, gi, group, i, p, g):
        """The local shard of a DTensor parameter's gradient, which must be sharded as
        the parameter is (FSDP2 reduce-scatters it so)."""
        if (not isinstance(g, _DTensor) or g.device_mesh != p.device_mesh
                or g.placements != p.placements or g.shape != p.shape):
            what = (f"a DTensor with placements {g.placements} of shape {tuple(g.shape)}"
                    if isinstance(g, _DTensor) else f"a {type(g).__name__}")
            raise ValueError(f"the gradient of {self._param_name(gi, group, i)} is {what}, "
                             f"but the parameter is a DTensor with placements "
                             f"{p.placements} of shape {tuple(p.shape)}: fastoptim.torch "
                             f"steps each rank's shard and needs the gradient sharded alike")
        return g.to_local()

    def _numpy(self, gi, group, i, t, what=""):
        """Zero-copy NumPy view of a CPU tensor's memory (complex: view_as_real; a
        DTensor: its local shard)."""
        t = _local(t).detach()
        try:
            if t.dtype in _COMPLEX_DTYPES:
                t = torch.view_as_real(t)
            return t.numpy()
        except RuntimeError as e:
            raise ValueError(f"{what}{self._param_name(gi, group, i)} cannot be viewed "
                             f"as a NumPy array: {e}") from None

    def _param_views(self, gi, group, i, p, cache):
        self._check_param(gi, group, i, p)
        meta = _meta(_local(p))
        pa = self._numpy(gi, group, i, p)
        if _dense(pa):
            v = _Views(p, meta, pa.ravel("K"), pa, None)
        else:
            if torch._debug_has_internal_overlap(_local(p)) == 1:
                raise ValueError(f"{self._param_name(gi, group, i)} has elements that "
                                 f"share memory; an in-place update of it is not defined")
            # A strided parameter: a contiguous buffer, filled right before its group
            # runs and copied back right after (so earlier groups' updates are seen).
            layout = np.empty(pa.shape, dtype=pa.dtype)
            v = _Views(p, meta, layout.reshape(-1), layout, pa)
        if len(cache) > 2 * sum(len(g["params"]) for g in self.param_groups) + 64:
            cache.clear()                       # forget parameters no longer in use
        cache[id(p)] = v
        return v

    def _check_strided(self, gi, group, i, v, strided):
        for j, other in strided:
            if _shares_memory(v.strided, other):
                raise ValueError(f"{self._param_name(gi, group, i)} shares memory with "
                                 f"{self._param_name(gi, group, j)}")
        strided.append((i, v.strided))

    @staticmethod
    def _grad_array(g):
        """NumPy view of a gradient, resolving what NumPy cannot see (a graph from
        create_graph=True, a conjugate or negative bit) into a detached copy."""
        g = g.detach()
        if g.dtype in _COMPLEX_DTYPES:
            g = torch.view_as_real(g.resolve_conj())
        return g.resolve_neg().numpy()

    def _state_views(self, gi, group, i, v, sname, state, t, fmt=None):
        """(tensor, data_ptr, kernel array, (buffer view, memory) or None) for one state
        tensor; state in another memory order than the parameter goes through a
        buffer that is filled before the run and copied back after (compressed state,
        ``fmt``: see _compressed, must be in the parameter's order)."""
        p = v.p
        label = self._param_name(gi, group, i)
        if fmt is not None:
            return self._compressed_views(gi, group, i, v, sname, state, t, fmt, label)
        if t is None:
            raise ValueError(
                f"the state of {label} has no {sname!r} (were the group's options "
                f"changed after its state was created?); it has {sorted(state)}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state[{sname!r}] of {label} must be a tensor, got "
                            f"{type(t).__name__}")
        if not (t.is_cpu and t.layout is _STRIDED and t.dtype is p.dtype
                and t.shape == p.shape):
            raise ValueError(f"state[{sname!r}] of {label} is a {t.dtype} tensor of shape "
                             f"{tuple(t.shape)} on {t.device}, but the parameter is "
                             f"{p.dtype} of shape {tuple(p.shape)} on {p.device}")
        if _local(p) is not p and (not isinstance(t, _DTensor)
                                   or t.placements != p.placements):
            raise ValueError(f"state[{sname!r}] of {label} must be a DTensor sharded as "
                             f"the parameter ({p.placements}), got "
                             f"{getattr(t, 'placements', type(t).__name__)}")
        sa = self._numpy(gi, group, i, t, what=f"state[{sname!r}] of ")
        if _same_order(sa, v.layout):
            c = (t, t.data_ptr(), sa.ravel("K"), None)
        else:
            buf, view = _like(v.layout)
            c = (t, t.data_ptr(), buf, (view, sa))
        v.states[sname, fmt] = c
        return c

    def _compressed_views(self, gi, group, i, v, sname, state, t, fmt, label):
        """_state_views of a bfloat16 or 8-bit state tensor (its bits, as the kernel
        takes them), which must have the parameter's shape and memory order."""
        p = v.p
        want = _compressed.state_dtype(fmt, p)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state[{sname!r}] of {label} must be a tensor, got "
                            f"{type(t).__name__ if t is not None else None}")
        if not (t.is_cpu and t.layout is _STRIDED and t.dtype is want
                and t.shape == p.shape):
            raise ValueError(f"state[{sname!r}] of {label} is a {t.dtype} tensor of shape "
                             f"{tuple(t.shape)} on {t.device}, but state_dtype={fmt!r} "
                             f"keeps {want} state of the parameter's shape "
                             f"{tuple(p.shape)} on the CPU")
        bits = t.detach().view(torch.int16) if want is torch.bfloat16 else t.detach()
        sa = bits.numpy()
        if want is torch.bfloat16:
            sa = sa.view(np.uint16)
        if not _same_order(sa, v.layout):
            raise ValueError(f"state[{sname!r}] of {label} is not laid out in memory as "
                             f"the parameter is (strides {t.stride()} against "
                             f"{p.stride()}); {fmt} state keeps the parameter's order")
        c = (t, t.data_ptr(), sa.ravel("K"), None)
        v.states[sname, fmt] = c
        return c

    def _scalar_view(self, gi, group, i, sname, t):
        """The 0-d NumPy view of a per-parameter scalar state tensor (NAdam's
        mu_product), which the kernel updates in place."""
        if not (isinstance(t, torch.Tensor) and t.numel() == 1 and t.is_cpu
                and t.dtype in _FLOAT_DTYPES):
            raise TypeError(f"state[{sname!r}] of {self._param_name(gi, group, i)} must be "
                            f"a one-element float32 or float64 CPU tensor, got {t!r:.80}")
        return t.detach().numpy()

    def _absmax_view(self, gi, group, i, p, sname, state):
        """The NumPy view of 8-bit state ``sname``'s block scales."""
        a = state.get(sname + _compressed.ABSMAX)
        n = _compressed.blocks(p)
        if not (isinstance(a, torch.Tensor) and a.dtype is torch.float32 and a.is_cpu
                and a.shape == (n,) and a.is_contiguous()):
            raise ValueError(f"state[{sname + _compressed.ABSMAX!r}] of "
                             f"{self._param_name(gi, group, i)} must be a contiguous "
                             f"float32 CPU tensor of {n} block scales, got "
                             f"{a if not isinstance(a, torch.Tensor) else (a.dtype, tuple(a.shape))}")
        return a.detach().numpy()

    def _step_view(self, gi, group, i, v, t):
        """(tensor, data_ptr, 0-d NumPy view) of state["step"]: making the view costs
        ~0.5 us, reading or writing through it ~0.02 us (a torch in-place add ~1.4 us)."""
        if not isinstance(t, torch.Tensor) or t.dim() != 0 or not t.is_cpu \
                or t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"state['step'] of {self._param_name(gi, group, i)} must be a "
                            f"0-d float32 or float64 CPU tensor, got {t!r}")
        v.step = (t, t.data_ptr(), t.detach().numpy())
        return v.step
