"""The state of the NumPy optimizers: ``opt.state``, ``state_dict()`` and
``load_state_dict()`` (torch's layout; torch.optim's own state dicts load too), as a
mixin of :class:`fastoptim.optim.Optimizer`."""
import copy
import functools
import inspect
import numbers
import sys

import numpy as np

from ..formats import BLOCK, dequantize_blockwise, quantize_blockwise
from ..reference import bfloat16_to_float32, float32_to_bfloat16


def _float32_values(value):
    """A state array's values as float32 (bfloat16 bits widened exactly)."""
    if value.dtype == np.uint16:
        return bfloat16_to_float32(value)
    return np.asarray(value, np.float32)


class _GroupState:
    """Per-group state: a step counter per parameter and per-name lists of arrays."""
    __slots__ = ("steps", "arrays", "complete_for")

    def __init__(self, n):
        self.steps = np.zeros(n, dtype=np.int64)
        self.arrays = {}
        self.complete_for = None   # state names for which every parameter has arrays


class _StateDict:
    """State, state dicts and their loading, for :class:`Optimizer` (which gives
    ``param_groups``, ``_gstate``, ``defaults`` and the per-rule hooks)."""

    # --- state -----------------------------------------------------------------------

    def _entries(self):
        """(global index, group, state, local index) for every parameter."""
        idx = 0
        for group, state in zip(self.param_groups, self._gstate):
            for i in range(len(group["params"])):
                yield idx, group, state, i
                idx += 1

    def _entry_state(self, state, i, copy_arrays):
        entry = {}
        # (bfloat16 state keeps its step even where torch's rule has none, SGD: the
        # stochastic rounding draws from it, so a resumed run needs it)
        counted = self._has_step or any(lst[i] is not None and lst[i].dtype == np.uint16
                                        for lst in state.arrays.values())
        if counted and (state.steps[i] > 0 or any(
                lst[i] is not None for lst in state.arrays.values())):
            entry["step"] = int(state.steps[i])
        for name, lst in state.arrays.items():
            if lst[i] is not None:
                entry[name] = lst[i].copy(order="K") if copy_arrays else lst[i]
        return entry

    @property
    def state(self):
        """{parameter index: {"step": int, name: array}} for parameters with state.

        The arrays are the live ones the optimizer updates."""
        out = {}
        for idx, _group, state, i in self._entries():
            entry = self._entry_state(state, i, copy_arrays=False)
            if entry:
                out[idx] = entry
        return out

    def state_dict(self, *, bfloat16="bits"):
        """torch.optim's layout, with copies of the state arrays.

        ``bfloat16``: how bfloat16 state (``state_dtype="bfloat16"``) is given:
        ``"bits"`` (the default) as kept, uint16 arrays of bfloat16 bits (half the
        bytes); ``"float32"`` as float32 arrays of the same values (exact), e.g. to
        read them or to load them into ``torch.optim`` (``torch.from_numpy``). Either
        loads back to the same bits. Other state is given as kept.
        """
        if bfloat16 not in ("bits", "float32"):
            raise ValueError(f"bfloat16 must be 'bits' or 'float32', got {bfloat16!r}")
        state = {}
        groups = []
        idx = 0
        for group, gstate in zip(self.param_groups, self._gstate):
            saved = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
            saved["params"] = list(range(idx, idx + len(group["params"])))
            if self._rule is not None and self._rule.group_step:
                saved[self._rule.group_step] = (int(gstate.steps[0]) if len(gstate.steps)
                                                else 0)
            groups.append(saved)
            for i in range(len(group["params"])):
                entry = self._entry_state(gstate, i, copy_arrays=bfloat16 == "bits")
                if bfloat16 != "bits":
                    entry = {k: (bfloat16_to_float32(v) if v.dtype == np.uint16
                                 else v.copy(order="K"))
                             if isinstance(v, np.ndarray) else v for k, v in entry.items()}
                if entry:
                    state[idx + i] = entry
            idx += len(group["params"])
        out = {"state": state, "param_groups": groups}
        if self.skipped_steps:
            out["skipped_steps"] = self.skipped_steps
        return out

    def load_state_dict(self, state_dict):
        """Load a state dict made by :meth:`state_dict` (or pickled/np.savez'd and
        rebuilt), or by ``torch.optim``'s optimizer of the same rule.

        * Group options (``lr``, ``betas``, ...) are taken from the state dict, as torch
          does, except ``state_dtype``: the optimizer keeps its own (Adam, AdamW), and
          ``rounding``/``seed``, which are taken only from a group saved with bfloat16
          state (where they shaped the run).
        * State arrays are copied into the optimizer's state dtype and the parameters'
          memory order: floating-point values are cast to the parameter's dtype (as
          torch does); uint16 arrays are bfloat16 bits, widened exactly. Into bfloat16
          state (``state_dtype="bfloat16"``), values are rounded to nearest even
          (float64 once, directly) and bfloat16 bits are copied as they are. So a
          bfloat16 optimizer loading a float32 checkpoint keeps bfloat16 state, and a
          float32 one loading a bfloat16 checkpoint keeps float32 state.
        * torch tensors are read wherever arrays or numbers go (``step`` as a 0-d float
          tensor, ``exp_avg``..., a tensor ``lr``; bfloat16 tensors as their bits),
          through ``.detach().cpu()`` and ``.numpy()``; torch is never imported here.
          torch's group keys that only choose its implementation or autograd and
          device handling, not the numbers (``foreach``, ``fused``, ``capturable``,
          ``differentiable``), and keys fastoptim does not know (a scheduler's
          ``initial_lr``, ``param_names``, your own) are ignored. Adam refuses
          ``decoupled_weight_decay=True`` (AdamW's rule: load it into AdamW); AdamW
          ignores it (torch's AdamW always sets it).
        * Refused, with ``TypeError``/``ValueError`` naming the entry: a malformed
          dict, arrays of the wrong shape or of a non-floating dtype (integers other
          than uint16 bfloat16 bits, bool, complex, ...), and another rule's state dict
          (an option or a state name of another optimizer, here or in torch.optim; a
          torch group lacking one of this rule's options). A refused load changes
          nothing: state, step counters and param_groups stay as they were.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"state_dict is missing the key {key!r}")
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        if not isinstance(saved_groups, (list, tuple)):
            raise TypeError("state_dict['param_groups'] must be a list")
        if not isinstance(saved_state, dict):
            raise TypeError("state_dict['state'] must be a dict")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups "
                             f"({len(saved_groups)}) than the optimizer "
                             f"({len(self.param_groups)})")
        new_groups, new_states, index_of = [], [], {}
        idx = 0
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if not isinstance(saved, dict) or "params" not in saved:
                raise ValueError(f"state_dict['param_groups'][{gi}] must be a dict with "
                                 "a 'params' entry")
            ids = saved["params"]
            if not isinstance(ids, (list, tuple)) or not all(
                    isinstance(k, numbers.Integral) and not isinstance(k, (bool, np.bool_))
                    for k in ids):
                raise TypeError(f"state_dict['param_groups'][{gi}]['params'] must be a "
                                "list of integer parameter indices")
            ids = [int(k) for k in ids]
            if len(ids) != len(group["params"]):
                raise ValueError("loaded state dict contains a parameter group that "
                                 "doesn't match the size of optimizer's group "
                                 f"(group {gi}: {len(ids)} vs {len(group['params'])})")
            new_group = dict(group)
            new_group.update(self._options_to_load(saved, gi))
            self._check_hyperparameters(new_group)
            for i, saved_id in enumerate(ids):
                if saved_id in index_of:
                    raise ValueError(f"state_dict['param_groups'] lists parameter "
                                     f"{saved_id} more than once")
                index_of[saved_id] = (gi, i)
            new_groups.append(new_group)
            gstate = _GroupState(len(group["params"]))
            self._init_state(new_group, gstate)
            key = self._rule.group_step if self._rule is not None else ""
            if key and key in saved:
                where = f"state_dict['param_groups'][{gi}][{key!r}]"
                gstate.steps[:] = _as_step(_from_tensor(saved[key], where), where)
                new_group[key] = int(gstate.steps[0]) if len(gstate.steps) else 0
            new_states.append(gstate)
            idx += len(ids)
        for key, entry in saved_state.items():
            if key not in index_of:
                raise ValueError(f"state_dict['state'] has an entry for parameter {key!r}, "
                                 "which no parameter group lists")
            gi, i = index_of[key]
            self._load_entry(new_groups[gi], new_states[gi], i, key, entry)
        skipped = state_dict.get("skipped_steps", 0)
        if isinstance(skipped, bool) or not isinstance(skipped, numbers.Integral) or skipped < 0:
            raise ValueError(f"state_dict['skipped_steps'] must be a non-negative int, "
                             f"got {skipped!r}")
        self.param_groups[:] = new_groups
        self._gstate[:] = new_states
        self.skipped_steps = int(skipped)

    #: options that are the optimizer's own choice of storage: a state dict does not
    #: set them (see _options_to_load), and torch's groups need not have them
    _storage_options: "tuple[str, ...]" = ()

    def _options_to_load(self, saved, gi):
        """The options a saved group sets: this rule's, read from torch tensors where
        needed. Refuses a group of another rule."""
        where = f"state_dict['param_groups'][{gi}]"
        name = type(self).__name__
        for key in saved:
            if key in _other_rules()[0] and key not in self.defaults:
                raise ValueError(f"{where} has the option {key!r}, which {name} does not "
                                 "have: is this another optimizer's state dict?")
        if any(key in saved for key in _TORCH_IMPLEMENTATION_OPTIONS):
            attributes = self._rule.attributes if self._rule is not None else ()
            for key in self.defaults:        # a group saved by torch.optim.<name>
                if (key not in saved and key not in self._storage_options
                        and key not in attributes):
                    raise ValueError(f"{where} has torch.optim's keys but not the option "
                                     f"{key!r}, which torch.optim.{name}'s groups have: is "
                                     "this another optimizer's state dict?")
        options = {key: copy.deepcopy(_option_from_tensor(saved[key], f"{where}[{key!r}]"))
                   for key in self.defaults if key in saved and key != "state_dtype"}
        if not (isinstance(saved.get("state_dtype"), str)
                and saved["state_dtype"] == "bfloat16"):     # they shaped nothing there
            options.pop("rounding", None)
            options.pop("seed", None)
        return options

    def _load_entry(self, group, gstate, i, key, entry):
        if not isinstance(entry, dict):
            raise TypeError(f"state_dict['state'][{key!r}] must be a dict, got "
                            f"{type(entry).__name__}")
        p = group["params"][i]
        names = self._state_names(group)
        if self._rule is not None and self._rule.factored:
            # (Adafactor: a matrix keeps its factors, a vector its second moment)
            names = tuple(n for n in names if self._rule.state_shape(n, p.shape) is not None)
            for name in entry:
                if name in self._all_state_names and name not in names:
                    raise ValueError(f"state_dict['state'][{key!r}] has {name!r}, which "
                                     f"a parameter of shape {p.shape} does not keep")
        for name in entry:
            if name in _other_rules()[1] and name not in self._all_state_names:
                raise ValueError(f"state_dict['state'][{key!r}] has {name!r}, which "
                                 f"{type(self).__name__} does not keep: is this another "
                                 "optimizer's state dict?")
        if self._has_step:
            if "step" not in entry:
                raise ValueError(f"state_dict['state'][{key!r}] is missing 'step'")
            where = f"state_dict['state'][{key!r}]['step']"
            gstate.steps[i] = _as_step(_from_tensor(entry["step"], where), where)
        present = {name for name in entry if name in self._all_state_names and not (
            entry[name] is None and name in self._optional_state)}   # (torch: None)
        for name in entry:                      # 8-bit state's block scales
            if (isinstance(name, str) and name.endswith("_absmax")
                    and name[:-len("_absmax")] not in entry):
                raise ValueError(f"state_dict['state'][{key!r}] has {name!r} without "
                                 f"{name[:-len('_absmax')]!r}")
        for name in names:
            if name not in present:
                if name in self._optional_state:
                    continue
                raise ValueError(f"state_dict['state'][{key!r}] is missing {name!r}")
        for name in sorted(present, key=self._all_state_names.index):
            where = f"state_dict['state'][{key!r}][{name!r}]"
            value = _from_tensor(entry[name], where)
            if not isinstance(value, np.ndarray):
                try:
                    value = np.asarray(value)
                except Exception:
                    raise TypeError(f"{where} must be an array, got "
                                    f"{type(value).__name__}") from None
            if value.dtype.kind not in "fiu":
                raise TypeError(f"{where} must hold real numbers, got dtype {value.dtype}")
            coded = value.dtype == np.uint8 and name + "_absmax" in entry
            if value.dtype.kind != "f" and value.dtype != np.uint16 and not coded:
                raise TypeError(f"{where} has dtype {value.dtype}: state arrays hold "
                                "floating-point values, bfloat16 bits as uint16, or 8-bit "
                                f"codes as uint8 beside their block scales ({name}_absmax)")
            if name in self._scalar_state:          # one number (NAdam's mu_product)
                if value.size != 1 or value.dtype.kind != "f":
                    raise ValueError(f"{where} must be one floating-point number, got "
                                     f"shape {value.shape} dtype {value.dtype}")
                gstate.arrays.setdefault(name, [None] * len(group["params"]))[i] = \
                    np.array(value.reshape(()), np.float32)
                continue
            shape = p.shape if self._rule is None else self._rule.state_shape(name, p.shape)
            if value.shape != shape:
                raise ValueError(f"{where} has shape {value.shape}, but the parameter has "
                                 f"shape {p.shape}" + ("" if shape == p.shape else
                                                       f" and keeps it of shape {shape}"))
            signed = name not in self._rule.unsigned_state
            scales = None
            if coded:                              # 8-bit codes: their block scales too
                w = f"state_dict['state'][{key!r}][{name + '_absmax'!r}]"
                scales = _from_tensor(entry.get(name + "_absmax"), w)
                if not isinstance(scales, np.ndarray) or scales.dtype != np.float32 or \
                        scales.shape != (-(-p.size // BLOCK),):
                    raise ValueError(f"{w} must be float32 block scales of shape "
                                     f"({-(-p.size // BLOCK)},), one per {BLOCK} values")
            made = self._new_state_entry(name, group, p)
            arr = made[name]
            if arr.dtype == np.uint8:             # 8-bit state
                if scales is not None:
                    arr[...] = value
                    made[name + "_absmax"][...] = scales
                else:
                    codes, absmax = quantize_blockwise(_float32_values(value), signed)
                    arr[...] = codes
                    made[name + "_absmax"][...] = absmax
            elif scales is not None:              # 8-bit codes -> this format
                wide = dequantize_blockwise(value, scales, signed)
                arr[...] = float32_to_bfloat16(wide) if arr.dtype == np.uint16 else wide
            elif arr.dtype == np.uint16:          # bfloat16 state
                arr[...] = value if value.dtype == np.uint16 else float32_to_bfloat16(value)
            elif value.dtype == np.uint16:        # bfloat16 bits -> the parameter's dtype
                arr[...] = bfloat16_to_float32(value)
            else:
                arr[...] = value
            for k, a in made.items():
                gstate.arrays.setdefault(k, [None] * len(group["params"]))[i] = a
        if not self._has_step and "step" in entry:      # (bfloat16 state's, see above)
            where = f"state_dict['state'][{key!r}]['step']"
            gstate.steps[i] = _as_step(_from_tensor(entry["step"], where), where)
        elif not self._has_step and self._step_from_state(entry):
            gstate.steps[i] = 1

    #: state names that a state entry may lack (SGD's buffer before a momentum step)
    _optional_state = ()
    #: every state name the class may hold
    _all_state_names = ()

    def _step_from_state(self, entry):
        return False


def _as_step(value, where):
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise ValueError(f"{where} must be a single number, got shape {value.shape}")
        value = value.reshape(()).item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} must be a number, got {type(value).__name__}")
    # (NaN and Inf fail the first test; 2**63 - 1 cannot be incremented in int64)
    if not 0 <= value < _STEP_LIMIT or int(value) != value:
        raise ValueError(f"{where} must be a non-negative whole number below 2**63 - 1, "
                         f"got {value}")
    return int(value)


_STEP_LIMIT = 2 ** 63 - 1


def _torch_tensor_type():
    """torch.Tensor if torch has been imported (nothing else can make a tensor)."""
    torch = sys.modules.get("torch")
    tensor = getattr(torch, "Tensor", None)
    return tensor if isinstance(tensor, type) else None


def _from_tensor(value, where):
    """A torch tensor (of a state dict) -> a NumPy array of its values on the CPU;
    bfloat16 as uint16 bits (the bfloat16 state format). Anything else as it is."""
    tensor = _torch_tensor_type()
    if tensor is None or not isinstance(value, tensor):
        return value
    torch = sys.modules["torch"]
    try:
        t = value.detach().cpu().resolve_conj().resolve_neg()
        if t.dtype == torch.bfloat16:
            return t.contiguous().view(torch.int16).numpy().view(np.uint16)
        return t.numpy()
    except Exception as e:
        raise TypeError(f"{where} is a torch tensor that cannot be read as a NumPy array "
                        f"({type(e).__name__}: {e})") from None


def _option_from_tensor(value, where):
    """A group option given as a one-element torch tensor (torch allows a tensor lr,
    and betas of tensors) -> its Python number; anything else as it is."""
    tensor = _torch_tensor_type()
    if tensor is None:
        return value
    if isinstance(value, (tuple, list)) and any(isinstance(v, tensor) for v in value):
        return type(value)(_option_from_tensor(v, f"{where}[{k}]")
                           for k, v in enumerate(value))
    if not isinstance(value, tensor):
        return value
    if value.numel() != 1:
        raise ValueError(f"{where} must be a number or a one-element tensor, got a "
                         f"tensor of shape {tuple(value.shape)}")
    try:
        return value.detach().cpu().item()
    except Exception as e:
        raise TypeError(f"{where} is a torch tensor that cannot be read as a number "
                        f"({type(e).__name__}: {e})") from None


#: torch.optim group keys that choose its implementation, or autograd and device
#: handling, but not the numbers a step computes: ignored on load
_TORCH_IMPLEMENTATION_OPTIONS = ("foreach", "fused", "capturable", "differentiable")
#: options of torch.optim's other rules (NAdam, RAdam and Adam's decoupled_weight_decay,
#: Adadelta, ASGD, Rprop, LBFGS, Adafactor), besides those of this module's classes
_TORCH_OTHER_OPTIONS = ("decoupled_weight_decay", "momentum_decay", "rho", "lambd", "t0",
                        "etas", "step_sizes", "max_iter", "max_eval", "tolerance_grad",
                        "tolerance_change", "history_size", "line_search_fn",
                        "beta2_decay")
#: state names of torch.optim's other rules (Adamax, NAdam, Adadelta, ASGD, Rprop,
#: Adafactor), besides those of this module's classes
_TORCH_OTHER_STATE = ("exp_inf", "mu_product", "acc_delta", "eta", "mu", "ax", "prev",
                      "step_size", "row_var", "col_var", "variance")


def _rule_options(cls):
    return set(inspect.signature(cls.__init__).parameters) - {"self", "params", "nonfinite"}


@functools.lru_cache(maxsize=None)
def _other_rules():
    """Every option and every state name of the rules here and in torch.optim: a state
    dict that has one the loading optimizer does not is another rule's. (Read from the
    classes, at the first load: they are defined after this module.)"""
    from .classes import SGD, AdaHessian, Adagrad, Adam, Newton, RMSprop
    classes = (SGD, Adagrad, RMSprop, Adam, AdaHessian, Newton)
    return (frozenset().union(_TORCH_OTHER_OPTIONS, *map(_rule_options, classes)),
            frozenset().union(_TORCH_OTHER_STATE, *(c._all_state_names for c in classes)))
