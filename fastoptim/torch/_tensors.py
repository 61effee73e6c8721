"""Tensors as the kernels see them: dtypes, local shards (DTensor), dense layouts
and their NumPy views, and state tensors made as torch makes them (placed when large)."""
import numpy as np
import torch

from .. import _placement

_FLOAT_DTYPES = frozenset((torch.float32, torch.float64))
_COMPLEX_DTYPES = frozenset((torch.complex64, torch.complex128))
_DTYPES = _FLOAT_DTYPES | _COMPLEX_DTYPES
_STRIDED = torch.strided
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


def _scalar_dtype(is_fused=None):
    """torch.optim's dtype for ``state["step"]`` (optimizer._get_scalar_dtype)."""
    if is_fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


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
