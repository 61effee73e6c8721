"""Stateful optimizers shaped like ``torch.optim``, for NumPy arrays.

Each class only holds state and calls one function of :mod:`fastoptim.functional` per
parameter group and step; the formulas are in :mod:`fastoptim.reference`.

    opt = fastoptim.Adam([w, b], lr=1e-3)
    for batch in data:
        gw, gb = gradients(w, b, batch)
        opt.step([gw, gb])            # w and b change in place

* ``params`` is a sequence of arrays, or of dicts (parameter groups) with per-group
  hyperparameter overrides, as in torch. ``opt.param_groups[k]["lr"]`` may be changed
  between steps (learning-rate schedules).
* ``step(grads)`` takes one gradient per parameter, across all groups in order;
  ``None`` skips that parameter (its state and step counter stay as they are).
* State is created on a parameter's first step (Adagrad's accumulator at
  construction, as in torch). ``opt.state`` maps the parameter's position (across all
  groups) to its state; ``state_dict()`` / ``load_state_dict()`` use torch's layout
  (``{"state": {index: {...}}, "param_groups": [{..., "params": [indices]}]}``), with
  copies of the arrays, so a saved and reloaded optimizer continues bit-identically.
  ``load_state_dict`` also takes ``torch.optim``'s state dicts of the same rule
  (tensors included, e.g. from ``torch.load(path, weights_only=True)``); see there.
* A refused call (bad gradient, bad hyperparameter, malformed state dict) raises
  before anything changes: every array and every step counter keep their values.
"""
import copy
import inspect
import numbers
import sys

import numpy as np

from . import _config, _placement, functional as F
from .reference import bfloat16_to_float32, float32_to_bfloat16
from .rules import spec

__all__ = ["Optimizer", "SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "AdaHessian", "Newton"]

_k = _config._kernels


class _GroupState:
    """Per-group state: a step counter per parameter and per-name lists of arrays."""
    __slots__ = ("steps", "arrays", "complete_for")

    def __init__(self, n):
        self.steps = np.zeros(n, dtype=np.int64)
        self.arrays = {}
        self.complete_for = None   # state names for which every parameter has arrays


class Optimizer:
    """Base class: parameter groups, state bookkeeping, state dicts.

    Subclasses define ``_state_names(group)``, ``_prepare(group, grads, arrays,
    steps)`` (one call into :mod:`fastoptim.functional`), and optionally
    ``_init_state`` for state that exists before the first step.
    """

    #: whether ``state[i]`` carries a ``"step"`` entry (torch's SGD has none)
    _has_step = True
    #: the rule's entry in fastoptim.rules (state names, whether it counts steps); None
    #: for a rule without per-element state (Newton)
    _rule = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("_rule") is not None:
            cls._all_state_names = cls._rule.state
            cls._has_step = cls._rule.counts_steps
            cls._kernel_call = staticmethod(F.caller(cls._rule))

    def __init__(self, params, defaults, nonfinite="propagate"):
        if nonfinite not in ("propagate", "skip", "raise"):
            raise ValueError("nonfinite must be 'propagate', 'skip' or 'raise', got "
                             f"{nonfinite!r}")
        #: what a step does when a gradient holds NaN or Inf: "propagate" (as torch),
        #: "skip" (change nothing, count it in ``skipped_steps``) or "raise" (ValueError)
        self.nonfinite = nonfinite
        #: steps skipped because of non-finite gradients (nonfinite="skip")
        self.skipped_steps = 0
        self.defaults = dict(defaults)
        self.param_groups = []
        self._gstate = []
        if isinstance(params, np.ndarray) or isinstance(params, dict):
            raise TypeError("params argument given to the optimizer should be an iterable "
                            f"of arrays or dicts, but got {type(params).__name__}")
        try:
            params = list(params)
        except TypeError:
            raise TypeError("params argument given to the optimizer should be an iterable "
                            f"of arrays or dicts, but got {type(params).__name__}") from None
        if len(params) == 0:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(params[0], dict):
            params = [{"params": params}]
        for group in params:
            self.add_param_group(group)

    # --- groups ----------------------------------------------------------------------

    def add_param_group(self, param_group):
        """Add a group of parameters (a dict with ``"params"`` and optional overrides)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError("param_group must have a 'params' entry")
        group = dict(param_group)
        params = group["params"]
        if isinstance(params, np.ndarray):
            params = [params]
        elif isinstance(params, (set, frozenset)):
            raise TypeError("optimizer parameters need to be organized in ordered "
                            "collections, but the ordering of a set changes between runs")
        else:
            params = list(params)
        if not params:
            raise ValueError("param_group has an empty 'params' list")
        for i, p in enumerate(params):
            _k.check_array(p, "params", i)
        unknown = set(group) - set(self.defaults) - {"params"}
        if unknown:
            raise ValueError(f"param_group has unknown options {sorted(unknown)}; "
                             f"known: {sorted(self.defaults)}")
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        group["params"] = params
        self._check_no_shared_memory(params)
        self._check_hyperparameters(group)
        state = _GroupState(len(params))
        self._init_state(group, state)
        self.param_groups.append(group)
        self._gstate.append(state)

    def _check_no_shared_memory(self, new_params):
        """No parameter may appear twice, in one group or across groups, nor overlap."""
        spans = []
        for gi, group in enumerate(self.param_groups + [{"params": new_params}]):
            for i, p in enumerate(group["params"]):
                if p.size:
                    start = p.__array_interface__["data"][0]
                    spans.append((start, start + p.nbytes, gi, i))
        spans.sort()
        for a, b in zip(spans, spans[1:]):
            if b[0] < a[1]:
                raise ValueError("some parameters appear more than once, in one group or "
                                 "in more than one group, or share memory "
                                 f"(group {a[2]} index {a[3]} and group {b[2]} index {b[3]})")

    def _check_hyperparameters(self, group):
        """Validate a group's options by preparing an update of no arrays."""
        names = self._state_names(group)
        self._prepare(dict(group, params=[]), [], {n: [] for n in names},
                      np.zeros(0, dtype=np.int64))

    # --- subclass hooks --------------------------------------------------------------

    def _state_names(self, group):
        """The state arrays this group keeps, in the rule's order (fastoptim.rules)."""
        return self._rule.state_names(group) if self._rule is not None else ()

    def _prepare(self, group, grads, arrays, steps):
        """The group's prepared step (the registry maps state and options to the rule's
        ``functional.prepare_*``)."""
        return self._kernel_call(group["params"], grads, arrays, steps, group)

    def _init_state(self, group, state):
        """State that exists before any step (Adagrad's accumulators)."""

    def _state_bf16(self, group):
        """Whether the group keeps its state in bfloat16 (uint16 bits)."""
        return False

    def _new_state_array(self, name, group, p):
        dtype = np.uint16 if self._state_bf16(group) else p.dtype
        return _placed_zeros(p, self._all_state_names.index(name) + 1, dtype)

    # --- the step --------------------------------------------------------------------

    def _split_grads(self, grads):
        return self._split_per_param(grads, "grads", "array",
                                     lambda v: isinstance(v, np.ndarray))

    def _split_per_param(self, values, name, what, is_single):
        """One entry per parameter across all groups in order -> one list per group.
        A single entry (``is_single``) is accepted when there is one parameter."""
        total = sum(len(g["params"]) for g in self.param_groups)
        if is_single(values):
            if total != 1:
                raise TypeError(f"{name} must be a list with one entry per parameter "
                                f"({total}); a single {what} is accepted only for one "
                                "parameter")
            values = [values]
        elif isinstance(values, tuple):
            values = list(values)
        elif not isinstance(values, list):
            raise TypeError(f"{name} must be a list with one entry per parameter (None to "
                            f"skip one), got {type(values).__name__}")
        if len(values) != total:
            raise ValueError(f"{name} has {len(values)} entries, expected {total} (one per "
                             "parameter, across all groups in order)")
        if len(self.param_groups) == 1:
            return [values]
        out, start = [], 0
        for group in self.param_groups:
            n = len(group["params"])
            out.append(values[start:start + n])
            start += n
        return out

    def _arrays_for_step(self, group, state, grads):
        """State arrays for this step; new arrays for parameters seen the first time.

        Returns (arrays, complete): the caller stores them only after the step ran, so
        a refused step leaves the optimizer state as it was."""
        names = self._state_names(group)
        if state.complete_for == names:
            return state.arrays, None
        arrays = {}
        complete = True
        for name in names:
            lst = list(state.arrays.get(name) or [None] * len(group["params"]))
            for i, (p, g) in enumerate(zip(group["params"], grads)):
                if lst[i] is None:
                    if g is not None:
                        lst[i] = self._new_state_array(name, group, p)
                    else:
                        complete = False
            arrays[name] = lst
        for name, lst in state.arrays.items():
            arrays.setdefault(name, lst)
        return arrays, (names if complete else None)

    def step(self, grads):
        """Update every parameter in place from its gradient (``None`` skips it).

        Returns True when the step was applied, False when ``nonfinite="skip"`` skipped
        it."""
        return self._step(self._split_grads(grads))

    def _step(self, per_group, per_extra=None):
        """Prepare (check) every group, then run them all: a refused step changes
        nothing. ``per_extra``: one more per-parameter input per group (curvature)."""
        plans = []
        for k, (group, state, g) in enumerate(zip(self.param_groups, self._gstate,
                                                  per_group)):
            arrays, complete = self._arrays_for_step(group, state, g)
            extra = () if per_extra is None else (per_extra[k],)
            plans.append((self._prepare(group, g, arrays, state.steps, *extra), state,
                          arrays, complete))
        if len(per_group) > 1:
            self._check_across_groups(per_group, per_extra)
        n_threads = _config.get_num_threads()
        if self.nonfinite != "propagate":
            flat = per_group[0] if len(per_group) == 1 else [g for gs in per_group
                                                              for g in gs]
            bad = _k.first_nonfinite(flat, n_threads)
            if bad >= 0:
                if self.nonfinite == "raise":
                    raise ValueError(f"grads[{bad}] contains NaN or Inf (nonfinite='raise'"
                                     "); nothing was changed")
                self.skipped_steps += 1
                return False
        for prepared, state, arrays, complete in plans:
            prepared.run(n_threads)
            if arrays is not state.arrays:
                state.arrays = arrays
                state.complete_for = complete
        return True

    def _check_across_groups(self, per_group, per_extra):
        """Each group's kernel call checks memory overlap within the group; here, no
        input of one group (gradient, curvature) may share memory with what another
        group updates (parameters, state), which that group may already have changed."""
        written = [g["params"] for g in self.param_groups]
        labels = [("params", gi) for gi in range(len(written))]
        for gi, state in enumerate(self._gstate):
            for name, lst in state.arrays.items():
                written.append(lst)
                labels.append((f"state {name!r}", gi))
        read = list(per_group) + (list(per_extra) if per_extra is not None else [])
        labels += [("grads", gi) for gi in range(len(per_group))]
        if per_extra is not None:
            labels += [(self._curvature_name, gi) for gi in range(len(per_extra))]
        hit = _k.first_overlap(written, read)          # (callables are skipped)
        if hit is not None:
            (la, ia, _wa, lb, ib, _wb) = hit
            (na, ga), (nb, gb) = labels[la], labels[lb]
            raise ValueError(f"{na}[{ia}] of group {ga} overlaps {nb}[{ib}] of group {gb} "
                             "in memory; what one group reads must not share memory with "
                             "what another updates")

    def zero_state(self):
        """Forget all optimizer state, as if the optimizer had just been made."""
        for gi, group in enumerate(self.param_groups):
            state = _GroupState(len(group["params"]))
            self._init_state(group, state)
            self._gstate[gi] = state

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
        if self._has_step and (state.steps[i] > 0 or any(
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
            if key in _OTHER_RULES_OPTIONS and key not in self.defaults:
                raise ValueError(f"{where} has the option {key!r}, which {name} does not "
                                 "have: is this another optimizer's state dict?")
        if any(key in saved for key in _TORCH_IMPLEMENTATION_OPTIONS):
            for key in self.defaults:        # a group saved by torch.optim.<name>
                if key not in saved and key not in self._storage_options:
                    raise ValueError(f"{where} has torch.optim's keys but not the option "
                                     f"{key!r}, which torch.optim.{name}'s groups have: is "
                                     "this another optimizer's state dict?")
        return {key: copy.deepcopy(_option_from_tensor(saved[key], f"{where}[{key!r}]"))
                for key in self.defaults if key in saved and key != "state_dtype"}

    def _load_entry(self, group, gstate, i, key, entry):
        if not isinstance(entry, dict):
            raise TypeError(f"state_dict['state'][{key!r}] must be a dict, got "
                            f"{type(entry).__name__}")
        p = group["params"][i]
        names = self._state_names(group)
        for name in entry:
            if name in _OTHER_RULES_STATE and name not in self._all_state_names:
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
            if value.dtype.kind != "f" and value.dtype != np.uint16:
                raise TypeError(f"{where} has dtype {value.dtype}: state arrays hold "
                                "floating-point values, or bfloat16 bits as uint16")
            if value.shape != p.shape:
                raise ValueError(f"{where} has shape {value.shape}, but the parameter has "
                                 f"shape {p.shape}")
            arr = self._new_state_array(name, group, p)
            if arr.dtype == np.uint16:            # bfloat16 state
                arr[...] = value if value.dtype == np.uint16 else float32_to_bfloat16(value)
            elif value.dtype == np.uint16:        # bfloat16 bits -> the parameter's dtype
                arr[...] = bfloat16_to_float32(value)
            else:
                arr[...] = value
            gstate.arrays.setdefault(name, [None] * len(group["params"]))[i] = arr
        if not self._has_step and self._step_from_state(entry):
            gstate.steps[i] = 1

    #: state names that a state entry may lack (SGD's buffer before a momentum step)
    _optional_state = ()
    #: every state name the class may hold
    _all_state_names = ()

    def _step_from_state(self, entry):
        return False

    def __repr__(self):
        lines = [type(self).__name__ + " ("]
        for gi, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {gi}")
            for key in sorted(k for k in group if k != "params"):
                lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)

    def __getstate__(self):
        return {"defaults": self.defaults, "param_groups": self.param_groups,
                "_gstate": [(s.steps, s.arrays, s.complete_for) for s in self._gstate],
                "nonfinite": self.nonfinite, "skipped_steps": self.skipped_steps}

    def __setstate__(self, d):
        self.nonfinite = d.get("nonfinite", "propagate")
        self.skipped_steps = d.get("skipped_steps", 0)
        self.defaults = d["defaults"]
        self.param_groups = d["param_groups"]
        self._gstate = []
        for steps, arrays, complete in d["_gstate"]:
            s = _GroupState(len(steps))
            s.steps, s.arrays, s.complete_for = steps, arrays, complete
            self._gstate.append(s)


def _f_order(p):
    return p.flags.f_contiguous and not p.flags.c_contiguous


def _placed_zeros(p, slot, dtype):
    """A zeroed state array shaped like ``p`` (in its memory order), placed as
    :mod:`fastoptim._placement` says: ``slot * 1088`` bytes further round the 4 KiB
    page than ``p``, when it is large."""
    dtype = np.dtype(dtype)
    order = "F" if _f_order(p) else "C"
    nbytes = p.size * dtype.itemsize
    if nbytes < _placement.MIN_BYTES:
        return np.zeros(p.shape, dtype, order=order)
    buf = _placement.placed_buffer(p.__array_interface__["data"][0], nbytes, slot)
    return buf.view(dtype).reshape(p.shape, order=order)


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


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum.

    Same options and defaults as ``torch.optim.SGD``; formulas in
    :func:`fastoptim.reference.sgd_`. State: ``momentum_buffer`` (momentum != 0 only).
    """
    _rule = spec("sgd")
    _optional_state = ("momentum_buffer",)

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, nonfinite="propagate"):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      maximize=maximize), nonfinite)

    def _step_from_state(self, entry):
        return entry.get("momentum_buffer") is not None



class Adagrad(Optimizer):
    """AdaGrad. Same options and defaults as ``torch.optim.Adagrad``; formulas in
    :func:`fastoptim.reference.adagrad_`. State: ``step``, ``sum``."""
    _rule = spec("adagrad")

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                 initial_accumulator_value=0.0, eps=1e-10, *, maximize=False,
                 nonfinite="propagate"):
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value,
                                      eps=eps, maximize=maximize), nonfinite)

    def _check_hyperparameters(self, group):
        value = group["initial_accumulator_value"]
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise TypeError("initial_accumulator_value must be a real number, got "
                            f"{type(value).__name__}")
        if not 0.0 <= value < float("inf"):
            raise ValueError(f"Invalid initial_accumulator_value value: {value}")
        super()._check_hyperparameters(group)

    def _new_state_array(self, name, group, p):
        arr = super()._new_state_array(name, group, p)
        arr[...] = group["initial_accumulator_value"]
        return arr

    def _init_state(self, group, state):
        state.arrays["sum"] = [self._new_state_array("sum", group, p)
                               for p in group["params"]]
        state.complete_for = ("sum",)



class RMSprop(Optimizer):
    """RMSProp. Same options and defaults as ``torch.optim.RMSprop``; formulas in
    :func:`fastoptim.reference.rmsprop_`. State: ``step``, ``square_avg``,
    ``momentum_buffer`` (momentum > 0), ``grad_avg`` (centered)."""
    _rule = spec("rmsprop")

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
                 momentum=0.0, centered=False, *, maximize=False, nonfinite="propagate"):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps,
                                      weight_decay=weight_decay, momentum=momentum,
                                      centered=centered, maximize=maximize), nonfinite)



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
    _storage_options = ("state_dtype", "rounding", "seed")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, maximize=False, state_dtype=None, rounding="nearest",
                 seed=0, nonfinite="propagate"):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps,
                                      weight_decay=weight_decay, amsgrad=amsgrad,
                                      maximize=maximize, state_dtype=state_dtype,
                                      rounding=rounding, seed=seed), nonfinite)

    def _state_bf16(self, group):
        return group["state_dtype"] == "bfloat16"

    def _options_to_load(self, saved, gi):
        decoupled = saved.get("decoupled_weight_decay", False)    # torch.optim's
        where = f"state_dict['param_groups'][{gi}]['decoupled_weight_decay']"
        if not isinstance(decoupled, (bool, np.bool_)):
            raise TypeError(f"{where} must be a bool, got {type(decoupled).__name__}")
        if decoupled and not self._decoupled:
            raise ValueError(f"{where} is True (AdamW's rule), which Adam does not "
                             "follow: load it into fastoptim.AdamW")
        options = super()._options_to_load(
            {k: v for k, v in saved.items() if k != "decoupled_weight_decay"}, gi)
        if not (isinstance(saved.get("state_dtype"), str)
                and saved["state_dtype"] == "bfloat16"):     # they shaped nothing there
            options.pop("rounding", None)
            options.pop("seed", None)
        return options



class AdamW(Adam):
    """AdamW (decoupled weight decay, default 1e-2). Same options and defaults as
    ``torch.optim.AdamW``; formulas in :func:`fastoptim.reference.adamw_`. Takes
    Adam's ``state_dtype``, ``rounding`` and ``seed`` too."""
    _rule = spec("adamw")
    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, state_dtype=None, rounding="nearest",
                 seed=0, nonfinite="propagate"):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, state_dtype=state_dtype,
                         rounding=rounding, seed=seed, nonfinite=nonfinite)


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


def _rule_options(cls):
    return set(inspect.signature(cls.__init__).parameters) - {"self", "params", "nonfinite"}


#: every option and state name of the rules here and in torch.optim: a state dict that
#: has one the loading optimizer does not is another rule's
_OTHER_RULES_OPTIONS = frozenset().union(
    _TORCH_OTHER_OPTIONS, *(_rule_options(c) for c in (SGD, Adagrad, RMSprop, Adam,
                                                       AdaHessian, Newton)))
_OTHER_RULES_STATE = frozenset().union(
    _TORCH_OTHER_STATE, *(c._all_state_names for c in (SGD, Adagrad, RMSprop, Adam,
                                                       AdaHessian, Newton)))
