"""Drop-in ``torch.optim`` optimizers whose update runs fastoptim's compiled kernels.

    import fastoptim.torch as fot

    opt = fot.AdamW(model.parameters(), lr=1e-3)    # instead of torch.optim.AdamW
    for x, y in data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

``SGD``, ``Adagrad``, ``RMSprop``, ``Adam`` and ``AdamW`` subclass
``torch.optim.Optimizer`` with torch 2.13's constructor signatures, defaults, parameter
group keys, argument errors and ``state`` / ``state_dict()`` layout, so checkpoints,
schedulers, ``GradScaler``, hooks, DDP and ``ZeroRedundancyOptimizer`` work unchanged
and state moves between these classes and torch's in both directions.

How a step runs, point by point:

* The state is torch's: ``self.state[p]`` holds real tensors (``step`` a 0-d float
  tensor, ``exp_avg``... shaped like the parameter), created as torch creates them.
  The kernels write the tensors' memory through zero-copy NumPy views; a complex
  parameter (and its gradient and state) is seen as its ``view_as_real`` twin.
* Every parameter group is checked and prepared (one ``fastoptim.functional.prepare_*``
  call each) before any group runs, so a refused step (CUDA or float16 parameter,
  sparse gradient, bad hyperparameter, ...) raises naming the parameter and changes
  nothing: no parameter, no state tensor, no step counter, no new state entry. Then
  each group runs as one compiled call for all its parameters.
* The kernels update arrays whose elements lie in one memory order. A parameter that
  is dense in any order (C, Fortran, channels_last, ...) is updated in place through a
  flat view of its memory; its state tensors (created like the parameter, as torch's
  ``zeros_like`` does) are viewed the same way. A strided (non-dense) parameter is
  copied into a contiguous buffer right before its group runs and copied back right
  after, in the same step. State in another order than its parameter (possible after
  loading a state dict) gets the same treatment; a gradient in another order is copied
  into the parameter's order (read only: ``p.grad`` is never written).
* Step counters: the kernel counts in an ``int64`` array built from the ``step``
  tensors (``state["step"]``, 0-d float32 as in torch) at each step; after the run
  the new counts are written back into the same tensors through cached NumPy views
  (about 40 ns a parameter, against ~1.4 us for ``torch._foreach_add_``).
  ``state["step"]`` stays the single source of truth, so a loaded or hand-edited
  counter is always honoured.
* The NumPy views of a parameter and its state are cached between steps: a
  parameter's are remade when its data pointer, shape, strides or dtype change
  (``p.data = ...``, as ``module.to()`` and ZeRO's bucket views do), a state tensor's
  when it is another object or at another address (a loaded state dict,
  ``share_memory_()``). A view keeps its storage alive, so a new tensor cannot take
  over a cached address. Gradients are viewed afresh at every step.
* A group's prepared kernel call is kept from one step to the next while nothing it
  depends on changed (see ``_Reuse``); a kept step only checks each parameter's and
  gradient's shape, strides and dtype and every tensor's data address, and points the
  kernel at the new gradients. The addresses are read in a compiled loop through
  torch's C reader of a tensor's data pointer (the one inductor's compiled wrappers
  call; ``data_ptr()`` where this torch has none), about 0.5 us a parameter in all.
* Numerics: the kernels do torch's default (for-loop) operations in the same order,
  but round a*b+c twice where torch's vectorized CPU ops may use one fused
  multiply-add, so results agree with torch.optim's to rounding (over hundreds of
  steps, relative differences of ~1e-5 in float32 and ~1e-13 in float64). Step
  scalars (bias corrections, ...) are computed in double; torch computes them in the
  dtype of a tensor ``lr``/``betas``, so float32 tensor hyperparameters on float64
  parameters differ more (~1e-8).
* After the kernels write, the autograd version counter of every written parameter
  and state tensor is bumped (``torch.autograd.graph.increment_version``), as an
  in-place torch op would: backward through a graph that saved a parameter before
  the step raises instead of silently using the new values.
* Hyperparameters are read from the group at every step (``lr`` and Adam's ``betas``
  may be 1-element tensors), so ``torch.optim.lr_scheduler`` works.
* ``foreach`` and ``fused`` are accepted and change nothing (the compiled kernel
  always runs). ``differentiable=True`` and ``capturable=True`` are refused: the
  kernels work outside autograd and on CPU memory. No class claims
  ``_step_supports_amp_scaling``, so ``GradScaler`` unscales the gradients (and skips
  steps with infs) itself before calling ``step()``.
* Threads: the kernels use ``fastoptim.set_num_threads(n)`` when it was called, else
  ``torch.get_num_threads()``. On Linux, torch's wheel and fastoptim both load
  ``libgomp.so.1``; the dynamic linker loads it once, so both share one OpenMP runtime
  and thread pool (no oversubscription).
"""
import functools
import math
import operator
import re
from collections import defaultdict
from collections.abc import Mapping
from itertools import compress, repeat

import numpy as np
import torch
from torch.optim import optimizer as _torch_optimizer
from torch.optim.optimizer import Optimizer as _TorchOptimizer

from . import _config, _placement
from . import functional as F
from .rules import spec

__all__ = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW"]

_FLOAT_DTYPES = frozenset((torch.float32, torch.float64))
_COMPLEX_DTYPES = frozenset((torch.complex64, torch.complex128))
_DTYPES = _FLOAT_DTYPES | _COMPLEX_DTYPES
_STRIDED = torch.strided

# the kernels' names for their array lists, as they appear in their error messages
_KERNEL_NAME = re.compile(r"\b(params|grads|momentum_buffers|state_sums|square_avgs|"
                          r"grad_avgs|exp_avgs|exp_avg_sqs|max_exp_avg_sqs)\[(\d+)\]")


# --- helpers ------------------------------------------------------------------------

def _check_fused(fused, differentiable, foreach):
    """torch.optim's own checks of the fused flag (same messages)."""
    if fused:
        if differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        if foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def _scalar_dtype(is_fused=None):
    """torch.optim's dtype for ``state["step"]`` (optimizer._get_scalar_dtype)."""
    if is_fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


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

    def __iter__(self):
        return iter(self.group)

    def __len__(self):
        return len(self.group)


def _threads():
    """fastoptim.set_num_threads(n) when it was called, else torch's thread count."""
    if _config._num_threads is not None or not _config._kernels.openmp_enabled():
        return _config.get_num_threads()
    return max(1, torch.get_num_threads())


def _meta(p):
    """What must not change for a cached view of a parameter's memory to stay valid
    (the view keeps the old storage alive, so no new tensor can take its address).
    Inlined in _Optimizer._plan."""
    return p.data_ptr(), p.shape, p.stride(), p.dtype


def _dense(a):
    """Whether the array's elements fill its memory span exactly (any axis order)."""
    flags = a.flags
    if flags.c_contiguous or flags.f_contiguous:
        return True
    expected = a.itemsize
    for stride, n in sorted((s, n) for s, n in zip(a.strides, a.shape) if n != 1):
        if stride != expected:
            return False
        expected *= n
    return True


def _same_order(a, b):
    """For arrays of one shape and dtype, ``b`` dense: whether ``a`` is dense too with
    element i of both at the same offset of their memory (their flat views match)."""
    fa, fb = a.flags, b.flags
    if (fa.c_contiguous and fb.c_contiguous) or (fa.f_contiguous and fb.f_contiguous):
        return True
    if a.size == 0:
        return True
    return ([s for s, n in zip(a.strides, a.shape) if n != 1]
            == [s for s, n in zip(b.strides, b.shape) if n != 1])


def _like(layout):
    """(1-D buffer, view of it with the dense ``layout`` array's shape and strides)."""
    buf = np.empty(layout.size, dtype=layout.dtype)
    return buf, np.lib.stride_tricks.as_strided(buf, layout.shape, layout.strides)


def _shares_memory(a, b):
    if not np.may_share_memory(a, b):
        return False
    try:
        return bool(np.shares_memory(a, b, max_work=100000))
    except np.exceptions.TooHardError:
        return True


_NUMPY_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}

try:                                     # FSDP2's sharded parameters and state
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:                      # torch built without distributed
    _DTensor = None


def _local(t):
    """A DTensor's local shard (what the kernels update: each rank steps its own
    shard, as torch.optim does on FSDP2's parameters); any other tensor as it is."""
    if _DTensor is not None and isinstance(t, _DTensor):
        return t.to_local()
    return t


def _dense_strides(shape, strides):
    """Whether a tensor of this shape and strides fills its memory span exactly (in
    any axis order)."""
    expected = 1
    for stride, n in sorted((s, n) for s, n in zip(strides, shape) if n != 1):
        if stride != expected:
            return False
        expected *= n
    return True


def _placeable(p):
    """Whether state shaped like ``p`` is placed (see _state_like): not a DTensor,
    whose state is a DTensor sharded like it, as torch makes it."""
    return (p.dtype in _NUMPY_DTYPE and p.is_cpu and _local(p) is p
            and p.numel() * p.element_size() >= _placement.MIN_BYTES
            and _dense_strides(p.shape, p.stride()))


def _state_like(p, slot, fill=0):
    """``torch.full_like(p, fill, memory_format=torch.preserve_format)`` for state
    ``slot`` (1, 2, 3: its place in the rule's state), placed as the NumPy classes
    place theirs (:mod:`fastoptim._placement`) when it is large: a dense real tensor
    with ``p``'s shape and strides whose storage holds exactly its elements (so
    ``torch.save`` writes no more), in NumPy-allocated memory. Otherwise torch's own
    allocation, as torch.optim makes it."""
    if not _placeable(p):
        return torch.full_like(p, fill, memory_format=torch.preserve_format)
    nbytes = p.numel() * p.element_size()
    flat = torch.from_numpy(_placement.placed_buffer(p.data_ptr(), nbytes, slot)
                            .view(_NUMPY_DTYPE[p.dtype]))
    t = torch.empty(0, dtype=p.dtype).set_(flat.untyped_storage(), 0, p.shape, p.stride())
    if fill != 0:
        t.fill_(fill)
    return t




def _new_step(group, p):
    """Adam's (and fused Adagrad's) initial ``step`` tensor, as torch makes it."""
    fused = group.get("fused")
    if group.get("capturable") or fused:
        return torch.zeros((), dtype=_scalar_dtype(is_fused=fused), device=p.device)
    return torch.tensor(0.0, dtype=_scalar_dtype(), device="cpu")


def _step_to_tensor(group, p, p_state, fused):
    """Older checkpoints kept ``step`` as a number; torch turns it into a tensor."""
    if len(p_state) != 0 and not torch.is_tensor(p_state["step"]):
        step_val = float(p_state["step"])
        p_state["step"] = (
            torch.tensor(step_val, dtype=_scalar_dtype(is_fused=fused), device=p.device)
            if group.get("capturable") or group.get("fused")
            else torch.tensor(step_val, dtype=_scalar_dtype()))


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
        self.states = {}          # name -> (tensor, data_ptr, kernel array, fill or None)
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


_GRAD = operator.attrgetter("grad")
_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")
_STRIDE = torch.Tensor.stride

# A kept step (_Reuse) reads the data addresses of every parameter, state tensor and
# gradient at each step. ``t.data_ptr()`` costs ~40 ns from Python; torch exposes the C
# function behind it (for inductor's compiled wrappers), which the kernel module's
# ``addresses`` calls in a C loop (~5 ns) on tensors of exactly these types. _READER is
# its address, or 0 (then ``data_ptr()`` is called) when this torch lacks it or it
# disagrees with ``data_ptr()`` on the probes below.
_EXACT = (torch.Tensor, torch.nn.Parameter)


def _address_reader():
    try:
        from torch._C._dynamo.guards import (
            _torchinductor_pyobject_tensor_data_ptr as addr)
    except (ImportError, AttributeError):
        return 0
    if not isinstance(addr, int) or isinstance(addr, bool) or addr <= 0:
        return 0
    base = torch.arange(24.0)
    probes = [base, base[5:], base.view(4, 6).t(), base[:0], torch.tensor(1.5),
              torch.nn.Parameter(torch.ones(2, 3, dtype=torch.float64)),
              torch.zeros(3, dtype=torch.complex64)]
    try:
        got = _config._kernels.addresses(probes, addr, _EXACT).tolist()
    except Exception:                        # pragma: no cover - a torch that changed
        return 0
    return addr if got == [t.data_ptr() for t in probes] else 0


_READER = _address_reader()


# A kept step also checks that every parameter and gradient keeps its exact type, dtype,
# device, dispatch keys (so: no conjugate/negative bit, dense), shape and strides.
# From Python that is five attribute reads per tensor (~0.4 us a parameter); torch's
# dynamo has the same check compiled (``TensorGuards``, ~60 ns a tensor), built from
# example tensors with their sizes and strides given. _LAYOUT_GUARD makes one for a list
# of tensors, or is None (then the Python reads run) when this torch lacks it or it does
# not tell the changes below apart on probe tensors.
def _layout_guard():
    try:
        from torch._C._dynamo.guards import TensorGuards
    except (ImportError, AttributeError):
        return None

    def guard(tensors):
        return TensorGuards(*tensors,
                            dynamic_dims_sizes=[list(t.shape) for t in tensors],
                            dynamic_dims_strides=[list(t.stride()) for t in tensors])

    base = torch.zeros(4, 3)
    kept = [base, torch.nn.Parameter(torch.zeros(5, dtype=torch.float64)), torch.tensor(1.0)]
    changed = [
        [torch.zeros(3, 4).t(), kept[1], kept[2]],                           # strides
        [torch.zeros(4, 2), kept[1], kept[2]],                               # shape
        [base, torch.zeros(5, dtype=torch.float64), kept[2]],                # type
        [base, torch.nn.Parameter(torch.zeros(5)), kept[2]],                 # dtype
        [base, kept[1], torch.zeros(1)],                                     # 0-d vs 1-d
        [base, kept[1], torch.tensor(1.0).to_sparse()],                      # layout
        [base, kept[1], None],                                               # not a tensor
        [base._neg_view(), kept[1], kept[2]],                                # negative bit
    ]
    try:
        with torch.no_grad():
            g = guard(kept)
            same = g.check(*kept) and g.check(torch.ones(4, 3), torch.nn.Parameter(
                torch.ones(5, dtype=torch.float64)), torch.tensor(2.0))
            if not same or any(g.check(*c) for c in changed):
                return None
    except Exception:                        # pragma: no cover - a torch that changed
        return None
    return guard


_LAYOUT_GUARD = _layout_guard()


def _by_value(group):
    """Whether an option of the group can change without being replaced: a tensor
    (a scheduler may change a tensor ``lr`` in place) or a list (``betas``)."""
    return any(isinstance(v, (torch.Tensor, list, dict)) or (isinstance(v, tuple) and any(
        isinstance(x, (torch.Tensor, list)) for x in v))
        for k, v in group.items() if k != "params")


def _snapshot(group, by_value):
    """A group's options (its values, ``params`` included), to see whether any changed
    since the last step; ``by_value`` (see _by_value): tensors and lists by value."""
    if not by_value:
        return list(group.values())
    return [v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else
            tuple(x.item() if isinstance(x, torch.Tensor) and x.numel() == 1 else x
                  for x in v)
            if isinstance(v, (tuple, list)) else v
            for k, v in group.items() if k != "params"]


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


class _State(defaultdict):
    """``optimizer.state`` as torch makes it (a ``defaultdict(dict)`` keyed by parameter),
    counting the changes of its entries in ``version``: a kept step (_Reuse) checks
    that one number instead of looking every parameter up (a tensor's hash is a Python
    call). The per-parameter dicts inside are plain dicts, checked entry by entry."""

    def __init__(self, default_factory=dict, *args, **kwargs):
        super().__init__(default_factory, *args, **kwargs)
        self.version = 0

    def _changed(name):
        method = getattr(defaultdict, name)

        def changed(self, *args, **kwargs):
            self.version += 1
            return method(self, *args, **kwargs)
        changed.__name__ = name
        return changed

    for _name in ("__setitem__", "__delitem__", "__ior__", "clear", "pop", "popitem",
                  "setdefault", "update"):
        locals()[_name] = _changed(_name)
    del _name, _changed


class _Reuse:
    """A group's prepared kernel call, kept from one step to the next (the per-step
    cost is then a few attribute reads per parameter). Valid while the group has the
    same parameters, the same ones have gradients, each parameter and gradient keeps its
    address, shape and strides (grads: their address may change), ``self.state`` and
    each parameter's state dict and state tensors are the same objects, and no option
    that adds or removes a state array changed. Whatever else changed is caught by
    :meth:`_Optimizer._reused`, which then plans the group afresh."""
    __slots__ = ("params", "mask", "all_used", "used", "pptrs", "shapes", "pstrides",
                 "gstrides", "dtypes", "state", "state_version", "by_value", "dicts_rep",
                 "keys", "flat", "names", "options", "kernel", "counts", "step_addrs",
                 "step_doubles", "written", "layout")

    def run(self, n_threads):
        # The versions are bumped first, while the tensors' metadata that _reused just
        # read is still in cache (after the kernel has streamed the arrays through it,
        # the same bumps cost ~0.1 us a tensor more); the kernel cannot fail.
        torch._C._increment_version(self.written)
        self.kernel.run(n_threads)
        if self.step_addrs is not None:
            _config._kernels.scatter_counts(self.step_addrs, self.step_doubles, self.counts)


class _Optimizer(_TorchOptimizer):
    """What the five classes share: checks, cached views, the planned step.

    A subclass names its rule (``_rule``, a registry entry: the state names, their
    order and the kernel call come from it) and gives torch's constructor, argument
    checks and ``__setstate__`` defaults; where torch's lazy state differs from zeros
    in the registry's order, ``_new_state(group, p)`` or ``_step_tensor(group, p)``."""

    #: whether the state carries a "step" counter (torch's SGD has none)
    _has_step = True

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

    @_step_hooks
    def step(self, closure=None):
        """Perform a single optimization step (one compiled call per parameter group).

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            # Plan every group before running any: a refused step changes nothing.
            plans = [self._reused(gi, group) or self._plan(gi, group)
                     for gi, group in enumerate(self.param_groups)]
            n_threads = _threads()
            for gi, plan in enumerate(plans):
                if plan.kernel is not None:
                    plan.run(n_threads)
                if isinstance(plan, _GroupPlan):
                    self._keep(gi, self.param_groups[gi], plan)
        return loss

    def _reused(self, gi, group):
        """The group's kept kernel call, pointed at this step's gradients, if nothing it
        depends on changed (see _Reuse); else None (the group is planned afresh, which
        also raises the errors a bad step deserves). Changes no tensor."""
        r = self.__dict__.get("_reuses", {}).get(gi)
        if r is None:
            return None
        params = group["params"]
        if len(params) != len(r.params) or not all(map(operator.is_, params, r.params)):
            return None
        grads = list(map(_GRAD, params))
        if list(map(operator.is_not, grads, repeat(None))) != r.mask:
            return None
        used = r.used
        if not r.all_used:
            grads = list(compress(grads, r.mask))
        if r.layout is not None:
            if not r.layout.check(*used, *grads):
                return None
        else:
            try:
                if (list(map(_SHAPE, used)) != r.shapes
                        or list(map(_SHAPE, grads)) != r.shapes
                        or list(map(_STRIDE, used)) != r.pstrides
                        or list(map(_STRIDE, grads)) != r.gstrides
                        or list(map(_DTYPE, grads)) != r.dtypes):
                    return None
            except RuntimeError:                 # a sparse gradient has no strides
                return None
        # (only now, every gradient known to be a dense tensor, are addresses read)
        kernels = _config._kernels
        if not kernels.addresses_equal(used, r.pptrs, _READER, _EXACT):
            return None
        state = self.state
        if state is not r.state or state.version != r.state_version:
            return None
        flat = r.flat
        if (not kernels.entries_are(r.dicts_rep, r.keys, flat[0])
                or not kernels.addresses_equal(flat[0], flat[1], _READER, _EXACT)):
            return None
        options = _snapshot(group, r.by_value)
        if options != r.options:
            r.by_value = _by_value(group)
            options = _snapshot(group, r.by_value)
            if (group.get("differentiable", False) or group.get("capturable", False)
                    or self._state_names(group) != r.names):
                return None
            fresh = self._prepare(group, [], [], {n: [] for n in r.names},
                                  np.zeros(0, dtype=np.int64))
            if not r.kernel.take_hyperparameters(fresh):
                return None
            r.options = options
        if r.step_addrs is not None and _config._kernels.gather_counts(
                r.step_addrs, r.step_doubles, r.counts) >= 0:
            return None                          # (the fresh plan names the bad count)
        try:
            r.kernel.set_grads(kernels.addresses(grads, _READER, _EXACT))
        except ValueError:
            return None                          # (the fresh plan names the overlap)
        return r

    def _keep(self, gi, group, plan):
        """After ``plan`` ran: keep its kernel call for the next steps (a _Reuse), when
        it has no buffer copies (strided or complex parameters, a gradient or state in
        another memory order) and made no new state tensors -- those steps are planned
        afresh each time."""
        reuses = self.__dict__.get("_reuses")
        if reuses is None:
            reuses = self._reuses = {}
        reuses.pop(gi, None)
        if (not plan.reusable or plan.kernel is None or plan.fills or plan.new_state
                or not isinstance(self.state, _State)):
            return
        r = _Reuse()
        r.params = list(group["params"])
        r.mask = [p.grad is not None for p in r.params]
        r.used = plan.used
        if [p for p, m in zip(r.params, r.mask) if m] != r.used or any(
                g is not p.grad for p, g in zip(r.used, plan.grads)):
            return                               # (a hook changed the gradients)
        r.all_used = all(r.mask)
        grads = plan.grads
        kernels = _config._kernels
        r.pptrs = kernels.addresses(r.used)
        r.shapes = list(map(_SHAPE, r.used))
        r.pstrides = list(map(_STRIDE, r.used))
        if list(map(_SHAPE, grads)) != r.shapes:
            return
        r.gstrides = list(map(_STRIDE, grads))
        r.dtypes = list(map(_DTYPE, grads))
        r.layout = None
        if _LAYOUT_GUARD is not None:
            try:
                r.layout = _LAYOUT_GUARD([*r.used, *grads])
            except Exception:                    # pragma: no cover - then the reads
                pass
        r.state = self.state
        r.state_version = self.state.version
        dicts = [self.state.get(p) for p in r.used]
        r.names = self._state_names(group)
        keys = r.names + (("step",) if self._has_step else ())
        r.keys = list(keys) * len(r.used)
        r.dicts_rep = [d for d in dicts for _ in keys]
        tensors = [d.get(k) for d in dicts for k in keys]
        if not all(isinstance(t, torch.Tensor) for t in tensors):
            return
        r.flat = (tensors, kernels.addresses(tensors))
        r.by_value = _by_value(group)
        r.options = _snapshot(group, r.by_value)
        r.kernel = plan.kernel
        r.kernel.make_reusable()
        r.counts = plan.steps
        if self._has_step:
            steps = [d["step"] for d in dicts]
            r.step_addrs = kernels.addresses(steps)
            r.step_doubles = np.array([t.dtype == torch.float64 for t in steps], np.int8)
        else:
            r.step_addrs = r.step_doubles = None
        r.written = plan.written
        reuses[gi] = r

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
        plan.steps = self._step_counts(gi, group, names, steps, fresh, where)
        if self._has_step:
            plan.step_views = steps
        try:
            plan.kernel = self._prepare(group, kparams, kgrads, kstates, plan.steps)
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
        for sname in names:
            t = state.get(sname)
            c = vstates.get(sname)
            # a state tensor is only ever replaced (load_state_dict, ZeRO) or moved
            # (share_memory_, .data = ...), which changes its identity or pointer
            if c is None or c[0] is not t or c[1] != t.data_ptr():
                c = self._state_views(gi, group, i, v, sname, state, t)
            kstates[sname].append(c[2])
            if c[3] is not None:
                plan.fills.append((c[3][0], c[3][1]))
                plan.backs.append((c[3][1], c[3][0]))
            plan.written.append(t)
        if not self._has_step:
            return is_new, None
        t = state.get("step")
        c = v.step
        if c is None or c[0] is not t or c[1] != t.data_ptr():
            c = self._step_view(gi, group, i, v, t)
        return is_new, c[2]

    def _step_counts(self, gi, group, names, steps, fresh, where):
        """The step counts the kernel takes (int64), from the state's step tensors."""
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

    def _state_views(self, gi, group, i, v, sname, state, t):
        """(tensor, data_ptr, kernel array, (buffer view, memory) or None) for one state
        tensor; state in another memory order than the parameter goes through a
        buffer that is filled before the run and copied back after."""
        p = v.p
        label = self._param_name(gi, group, i)
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
        v.states[sname] = c
        return c

    def _step_view(self, gi, group, i, v, t):
        """(tensor, data_ptr, 0-d NumPy view) of state["step"]: making the view costs
        ~0.5 us, reading or writing through it ~0.02 us (a torch in-place add ~1.4 us)."""
        if not isinstance(t, torch.Tensor) or t.dim() != 0 or not t.is_cpu \
                or t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"state['step'] of {self._param_name(gi, group, i)} must be a "
                            f"0-d float32 or float64 CPU tensor, got {t!r}")
        v.step = (t, t.data_ptr(), t.detach().numpy())
        return v.step

    # --- state memory ------------------------------------------------------------------

    #: the rule's entry in fastoptim.rules: its state tensors, in one order (a tensor's
    #: place, 1, 2, 3, decides where a large one goes in memory: fastoptim._placement)
    _rule = None

    def _state_tensor(self, p, name, fill=0):
        """A new state tensor ``name`` of ``p``, as torch makes it, placed when large."""
        return _state_like(p, self._rule.state.index(name) + 1, fill)

    def load_state_dict(self, state_dict):
        """torch's ``load_state_dict``; then each large state tensor is copied into
        placed memory (as a new state tensor would be): the loaded ones are torch's
        allocations, or the very tensors of ``state_dict``."""
        super().load_state_dict(state_dict)
        for p, st in self.state.items():
            if not isinstance(p, torch.Tensor) or not isinstance(st, dict) \
                    or not _placeable(p):
                continue
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
        then a zero tensor per state name, in the registry's order."""
        state = {"step": self._step_tensor(group, p)} if self._has_step else {}
        for name in self._state_names(group):
            state[name] = self._state_tensor(p, name)
        return state

    def _step_tensor(self, group, p):
        return _new_step(group, p)

    def _prepare(self, group, params, grads, states, steps):
        """The kernel call for ``params`` (their state lists by name), through the
        registry; options are read as plain numbers (see _Options)."""
        return F.prepare(self._kernel_rule(group), params, grads, states, steps,
                         _Options(group, self._rule.defaults))

    def _kernel_rule(self, group):
        return self._rule


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
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")

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
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= lr_decay:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= initial_accumulator_value:
            raise ValueError(
                f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")

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
                state["sum"] = self._state_tensor(p, "sum", init_value)

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
                "sum": self._state_tensor(p, "sum", init_value)}


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
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= alpha:
            raise ValueError(f"Invalid alpha value: {alpha}")

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
        for group in self.param_groups:
            group.setdefault("momentum", 0)
            group.setdefault("centered", False)
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("capturable", False)
            for p in group["params"]:
                p_state = self.state.get(p, [])
                if len(p_state) != 0 and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = torch.tensor(float(p_state["step"]),
                                                   dtype=_scalar_dtype())

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
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
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
