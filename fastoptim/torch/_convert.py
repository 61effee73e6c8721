"""Adam/AdamW checkpoints to and from bitsandbytes' and torchao's 8-bit optimizers.

All three keep 8-bit Adam state in one format (blockwise dynamic quantization: uint8
codes shaped like the parameter, one float32 absmax per 256 elements in memory order,
bitsandbytes' dynamic maps), so codes and scales move as they are; only the containers
differ:

* fastoptim.torch (``state_dtype="8bit"``): ``exp_avg`` (uint8) beside
  ``exp_avg_absmax`` (float32), plain tensors;
* bitsandbytes ``Adam8bit``/``AdamW8bit``: ``state[i] = {"step": int,
  "__bnb_optimizer_quant_state__": {"state1": codes, "absmax1", "qmap1", "state2",
  "absmax2", "qmap2"}}`` (float32 ``state1``/``state2`` for small parameters);
* torchao ``optim.Adam8bit``/``AdamW8bit``: ``exp_avg`` an ``OptimState8bit`` tensor
  subclass holding ``codes``, ``scale`` and ``qmap``; ``lr`` a tensor.

``fastoptim.torch.Adam``/``AdamW``'s ``load_state_dict`` reads all three (and float32 or
bfloat16 state), converting to the optimizer's own format; :func:`to_bitsandbytes` and
:func:`to_torchao` write the other two from a fastoptim.torch state dict.
"""
import numbers

import numpy as np
import torch

from ..formats import BLOCK, dynamic_map
from ._compressed import ABSMAX, BNB_KEY, MIN_8BIT_SIZE, dequantized

_NAMES = (("exp_avg", True, "1"), ("exp_avg_sq", False, "2"))
_ADAM_KEYS = ("lr", "betas", "eps", "weight_decay")


def _float32(entry, name, signed, where):
    """State ``name`` of an entry as a float32 tensor (8-bit codes dequantized, bfloat16
    widened: exact)."""
    t = entry[name]
    if t.dtype is torch.uint8:
        scales = entry.get(name + ABSMAX)
        if not isinstance(scales, torch.Tensor):
            raise ValueError(f"{where}[{name!r}] holds 8-bit codes but "
                             f"{name + ABSMAX!r} is missing")
        return dequantized(t, scales, signed)
    return t.detach().to(torch.float32)


def _entries(state_dict):
    if not (isinstance(state_dict, dict) and isinstance(state_dict.get("state"), dict)
            and isinstance(state_dict.get("param_groups"), list)):
        raise TypeError("state_dict must be an optimizer state dict (a dict with 'state' "
                        "and 'param_groups')")
    for key, entry in state_dict["state"].items():
        where = f"state_dict['state'][{key!r}]"
        if not isinstance(entry, dict) or not all(
                isinstance(entry.get(n), torch.Tensor) for n, _, _ in _NAMES):
            raise ValueError(f"{where} is not Adam state (exp_avg and exp_avg_sq tensors)")
        if entry.get("max_exp_avg_sq") is not None:
            raise ValueError(f"{where} has max_exp_avg_sq (amsgrad=True), which the 8-bit "
                             f"optimizers of bitsandbytes and torchao do not keep")
        yield key, entry, where


def _step_count(entry, where):
    step = entry.get("step")
    value = float(step) if isinstance(step, (torch.Tensor, numbers.Number)) else None
    if value is None or value != int(value) or value < 0:
        raise ValueError(f"{where}['step'] must be a whole number >= 0, got {step!r}")
    return int(value)


def to_bitsandbytes(state_dict):
    """A ``fastoptim.torch.Adam``/``AdamW`` state dict (state in any format) as
    bitsandbytes' ``Adam8bit``/``AdamW8bit`` load it: 8-bit codes and scales as they
    are, with the maps; other state as float32 (dequantized exactly from bfloat16).
    Groups keep ``lr``, ``betas``, ``eps``, ``weight_decay`` and ``params``. Note that
    bitsandbytes' ``Adam8bit`` decays weights decoupled on the CPU, as AdamW does."""
    state = {}
    for key, entry, where in _entries(state_dict):
        inner = {}
        for name, signed, n in _NAMES:
            t = entry[name]
            if t.dtype is torch.uint8 and t.numel() >= MIN_8BIT_SIZE:  # (bnb's default)
                inner[f"state{n}"] = t.detach().cpu().clone()
                inner[f"absmax{n}"] = entry[name + ABSMAX].detach().cpu().clone()
                inner[f"qmap{n}"] = torch.from_numpy(dynamic_map(signed).copy())
            else:
                inner[f"state{n}"] = _float32(entry, name, signed, where)
        state[key] = {"step": _step_count(entry, where), BNB_KEY: inner}
    groups = [{k: g[k] for k in _ADAM_KEYS + ("params",) if k in g}
              for g in state_dict["param_groups"]]
    return {"state": state, "param_groups": groups}


def to_torchao(state_dict):
    """A ``fastoptim.torch.Adam``/``AdamW`` state dict as torchao's ``optim.Adam8bit``/
    ``AdamW8bit`` load it (torchao must be installed): 8-bit state of whole blocks
    (a multiple of 256 elements) becomes an ``OptimState8bit`` of the same codes and
    scales; other state float32, as torchao keeps it for small parameters. ``lr``
    becomes a tensor, as torchao keeps it; groups keep ``lr``, ``betas``, ``eps``,
    ``weight_decay`` and ``params`` (and ``amsgrad=False``)."""
    try:
        from torchao.optim.subclass_8bit import OptimState8bit
    except ImportError:
        raise ImportError("to_torchao needs torchao (pip install torchao)") from None
    state = {}
    for key, entry, where in _entries(state_dict):
        out = {"step": torch.tensor(float(_step_count(entry, where)))}
        for name, signed, _ in _NAMES:
            t = entry[name]
            if t.dtype is torch.uint8 and t.numel() % BLOCK == 0 and t.is_contiguous():
                out[name] = OptimState8bit(
                    t.detach().cpu().clone(), entry[name + ABSMAX].detach().cpu().clone(),
                    torch.from_numpy(dynamic_map(signed).copy()), signed)
            else:
                out[name] = _float32(entry, name, signed, where)
        state[key] = out
    groups = []
    for g in state_dict["param_groups"]:
        group = {k: g[k] for k in _ADAM_KEYS + ("params",) if k in g}
        if "lr" in group and not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]))
        group["amsgrad"] = False
        groups.append(group)
    return {"state": state, "param_groups": groups}


def from_torchao(value, where):
    """A torchao ``OptimState8bit`` as (codes, absmax), or None when ``value`` is not
    one; ValueError for one in another block size or map."""
    codes = getattr(value, "codes", None)
    scale = getattr(value, "scale", None)
    qmap = getattr(value, "qmap", None)
    if not (isinstance(codes, torch.Tensor) and isinstance(scale, torch.Tensor)
            and isinstance(qmap, torch.Tensor)):
        return None
    signed = bool(getattr(value, "signed", True))
    if (codes.dtype is torch.uint8 and scale.dtype is torch.float32
            and codes.numel() == BLOCK * scale.numel() and qmap.numel() == 256
            and np.array_equal(qmap.detach().cpu().numpy(), dynamic_map(signed))):
        return codes.detach().cpu().reshape(value.shape), scale.detach().cpu()
    raise ValueError(f"{where} is a torchao 8-bit state with blocks of "
                     f"{codes.numel() // max(scale.numel(), 1)} or another map; fastoptim "
                     f"reads blocks of {BLOCK} with the dynamic maps")
