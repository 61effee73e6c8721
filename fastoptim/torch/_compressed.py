"""Compressed optimizer state in the drop-in: bfloat16 and 8-bit blockwise.

torch's constructors are kept exactly, so the choice is made per parameter group, with
keys torch.optim lets any group carry::

    fastoptim.torch.Adam([{"params": model.parameters(), "state_dtype": "8bit"}], lr=1e-3)

* ``state_dtype``: None (the parameters' dtype, as torch), ``"bfloat16"`` (state
  tensors of dtype torch.bfloat16; float32 parameters) or ``"8bit"`` (bitsandbytes'
  blockwise format: ``exp_avg`` a uint8 tensor of codes shaped like the parameter,
  ``exp_avg_absmax`` a float32 tensor of one scale per 256 elements in the parameter's
  memory order; float32 parameters of at least ``min_8bit_size`` elements, smaller ones
  keep float32 state, as bitsandbytes does);
* ``rounding`` ("nearest" or "stochastic", bfloat16 state), ``seed``;
* ``min_8bit_size`` (default 4096).

Formats and their NumPy specification: :mod:`fastoptim.formats`. Loading a state dict
converts its state to the optimizer's own format (never through an upcast copy of
compressed state: torch's own ``load_state_dict`` casts every floating state tensor to
the parameter's dtype), and imports bitsandbytes' 8-bit optimizers' state dicts.
"""
import numbers

import numpy as np
import torch

from ..formats import BLOCK, dequantize_blockwise, quantize_blockwise

#: the group keys of compressed state (absent: the parameters' dtype)
KEYS = ("state_dtype", "rounding", "seed", "min_8bit_size")
MIN_8BIT_SIZE = 4096
ABSMAX = "_absmax"
#: bitsandbytes' nested state (Adam8bit/AdamW8bit): its names -> torch's
BNB_KEY = "__bnb_optimizer_quant_state__"
_BNB_NAMES = {"state1": "exp_avg", "state2": "exp_avg_sq"}


def compressed(group):
    """Whether a group keeps compressed state (one dict lookup: the common case)."""
    return group.get("state_dtype") is not None


def check(rule, group, label):
    """Refuse a group's compressed-state keys that no step could honour (the kernels
    check ``rounding`` and ``seed``)."""
    fmt = group.get("state_dtype")
    if fmt is not None and (not isinstance(fmt, str) or fmt not in rule.state_formats):
        allowed = ", ".join(repr(f) for f in rule.state_formats) or "none"
        raise ValueError(f"{label}: state_dtype must be None or one of {allowed} for "
                         f"this optimizer, got {fmt!r}")
    size = group.get("min_8bit_size", MIN_8BIT_SIZE)
    if isinstance(size, bool) or not isinstance(size, numbers.Integral):
        raise TypeError(f"{label}: min_8bit_size must be an int, got "
                        f"{type(size).__name__}")
    if size < 0:
        raise ValueError(f"{label}: min_8bit_size must be >= 0, got {size}")
    if fmt is not None:
        for i, p in enumerate(group["params"]):
            if p.dtype is not torch.float32:
                raise TypeError(f"{label}: state_dtype={fmt!r} is for float32 "
                                f"parameters; params[{i}] is {p.dtype}")


def param_format(group, p):
    """The format of ``p``'s state in this group: None (the parameter's dtype),
    "bfloat16" or "8bit"."""
    fmt = group.get("state_dtype")
    if fmt == "8bit" and p.numel() < group.get("min_8bit_size", MIN_8BIT_SIZE):
        return None
    return fmt


def state_dtype(fmt, p):
    """The torch dtype of a state tensor in format ``fmt``."""
    return torch.bfloat16 if fmt == "bfloat16" else torch.uint8 if fmt == "8bit" else p.dtype


def blocks(t):
    """How many 256-element blocks (one scale each) 8-bit state of ``t`` has."""
    return -(-t.numel() // BLOCK)


def _codes_like(p, codes):
    """A uint8 tensor shaped (and strided) like ``p`` holding ``codes`` in p's memory
    order."""
    t = torch.empty_like(p, dtype=torch.uint8, memory_format=torch.preserve_format)
    t.numpy().ravel("K")[...] = codes.reshape(-1)      # (a view: same memory order)
    return t


def new_entries(p, name, fill, fmt, signed, native):
    """A new state tensor ``name`` of ``p`` holding ``fill``, in format ``fmt``:
    ``{name: tensor}``, plus ``{name + "_absmax": scales}`` for 8-bit state; ``native()``
    makes it in the parameter's dtype."""
    if fmt is None:
        return {name: native()}
    if fmt == "bfloat16":
        t = torch.empty_like(p, dtype=torch.bfloat16, memory_format=torch.preserve_format)
        t.fill_(fill)                                   # (rounded to nearest even)
        return {name: t}
    values = np.full(p.numel(), fill, np.float32)
    codes, absmax = quantize_blockwise(values, signed)
    return {name: _codes_like(p, codes), name + ABSMAX: torch.from_numpy(absmax)}


def convert(entry, name, fmt, p, signed, where):
    """State ``name`` of ``p`` from a loaded entry (any of the formats) into format
    ``fmt``, in place in ``entry``. Exact where the target holds the values (bfloat16
    or 8-bit codes to float32); otherwise rounded to nearest (to bfloat16) or
    re-quantized (to 8-bit; 8-bit state already in the format is kept as it is)."""
    t = entry.get(name)
    if not isinstance(t, torch.Tensor):
        return
    absmax = entry.pop(name + ABSMAX, None)
    if t.dtype is torch.uint8:
        if absmax is None:
            raise ValueError(f"{where}[{name!r}] holds 8-bit codes (uint8) but "
                             f"{name + ABSMAX!r} is missing")
        if not isinstance(absmax, torch.Tensor) or absmax.dtype is not torch.float32 \
                or absmax.shape != (blocks(p),):
            raise ValueError(f"{where}[{name + ABSMAX!r}] must be a float32 tensor of "
                             f"{blocks(p)} block scales, got {absmax!r:.80}")
        if t.shape != p.shape:
            raise ValueError(f"{where}[{name!r}] has shape {tuple(t.shape)}, but the "
                             f"parameter has {tuple(p.shape)}")
        if fmt == "8bit" and _same_memory_order(t, p):
            entry[name], entry[name + ABSMAX] = t.cpu(), absmax.cpu().contiguous()
            return
        t = dequantized(t, absmax, signed)
    if fmt == "8bit":
        codes, scales = quantize_blockwise(
            _in_memory_order_of(t, p), signed)
        entry[name], entry[name + ABSMAX] = _codes_like(p, codes), torch.from_numpy(scales)
    elif fmt == "bfloat16":
        entry[name] = t.to(torch.bfloat16) if t.dtype is not torch.bfloat16 else t
    else:
        entry[name] = t.to(p.dtype)


def _same_memory_order(t, p):
    """Whether element i of ``t`` and ``p`` (one shape) sit at the same place of their
    memory order."""
    return t.stride() == p.stride() or (t.is_contiguous() and p.is_contiguous())


def dequantized(codes, absmax, signed):
    """8-bit state as a float32 tensor shaped and strided like ``codes`` (blocks in
    its memory order), exactly as fastoptim.formats decodes it."""
    t = torch.empty_like(codes, dtype=torch.float32, memory_format=torch.preserve_format)
    t.numpy().ravel("K")[...] = dequantize_blockwise(
        codes.detach().cpu().numpy().ravel("K"), absmax.detach().cpu().numpy(), signed)
    return t


def _in_memory_order_of(t, p):
    """``t``'s values (float32) in ``p``'s memory order, 1-D."""
    wide = t.detach().cpu().to(torch.float32)
    like = torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
    like.copy_(wide)
    return like.numpy().ravel("K")


def from_bitsandbytes(entry, key):
    """A bitsandbytes 8-bit Adam state entry (``step`` and the nested quant state:
    ``state1``/``state2`` codes or float32 values, ``absmax1``/``absmax2``, the maps
    ``qmap1``/``qmap2``, which must be the dynamic maps) as fastoptim's: ``exp_avg``,
    ``exp_avg_sq`` (and their ``_absmax``), ``step``."""
    from ..formats import dynamic_map
    inner = entry[BNB_KEY]
    where = f"state_dict['state'][{key!r}][{BNB_KEY!r}]"
    if not isinstance(inner, dict):
        raise TypeError(f"{where} must be a dict, got {type(inner).__name__}")
    out = {k: v for k, v in entry.items() if k != BNB_KEY}
    for n, (code, signed) in enumerate((("state1", True), ("state2", False)), 1):
        if code not in inner:
            continue
        name = _BNB_NAMES[code]
        out[name] = inner[code]
        qmap = inner.get(f"qmap{n}")
        if qmap is not None:
            if not (isinstance(qmap, torch.Tensor) and qmap.numel() == 256 and np.array_equal(
                    qmap.detach().cpu().to(torch.float32).numpy().ravel(),
                    dynamic_map(signed))):
                raise ValueError(f"{where}['qmap{n}'] is not bitsandbytes' "
                                 f"{'signed' if signed else 'unsigned'} dynamic map "
                                 f"(the only 8-bit map fastoptim reads)")
        if f"absmax{n}" in inner:
            out[name + ABSMAX] = inner[f"absmax{n}"]
    step = out.get("step")
    if isinstance(step, numbers.Number):
        out["step"] = torch.tensor(float(step), dtype=torch.float32)
    return out

#: keys of bitsandbytes' Adam8bit/AdamW8bit param groups that torch's Adam lacks
BNB_GROUP_KEYS = ("alpha", "t_alpha", "t_beta3")


def set_aside(state_dict, names):
    """(the state dict torch's ``load_state_dict`` gets, {saved key: entries set aside},
    whether it is bitsandbytes' or torchao's): compressed state tensors (bfloat16,
    uint8 codes and their ``_absmax`` scales) of the state ``names`` are set aside, so
    that torch does not cast them to the parameter's dtype; bitsandbytes' nested state
    and torchao's OptimState8bit tensors are unpacked first."""
    state = state_dict.get("state") if isinstance(state_dict, dict) else None
    if not isinstance(state, dict):
        return state_dict, {}, False
    kept, new_state, changed, bnb = {}, {}, False, False
    for key, entry in state.items():
        if isinstance(entry, dict) and BNB_KEY in entry:
            entry = from_bitsandbytes(entry, key)
            changed = bnb = True
        if isinstance(entry, dict) and any(isinstance(v, torch.Tensor) and hasattr(v, "codes")
                                           for v in entry.values()):
            from ._convert import from_torchao            # (it imports this module)
            entry = dict(entry)
            for n in list(entry):
                got = from_torchao(entry[n], f"state_dict['state'][{key!r}][{n!r}]") \
                    if isinstance(entry[n], torch.Tensor) else None
                if got is not None:
                    entry[n], entry[n + ABSMAX] = got
            changed = bnb = True
        if isinstance(entry, dict):
            aside = {n: v for n, v in entry.items() if isinstance(v, torch.Tensor) and (
                (n in names and v.dtype in (torch.bfloat16, torch.uint8))
                or (isinstance(n, str) and n.endswith(ABSMAX) and n[:-len(ABSMAX)] in names))}
            if aside:
                entry = {n: v for n, v in entry.items() if n not in aside}
                kept[key] = aside
                changed = True
        new_state[key] = entry
    if not changed:
        return state_dict, {}, False
    return dict(state_dict, state=new_state), kept, bnb
