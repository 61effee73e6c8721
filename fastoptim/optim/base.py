"""The optimizer base class: parameter groups, the hooks a rule's class fills, the
step, and where new state arrays go (the state and state dicts are in state_dict.py)."""
import numbers

import numpy as np

from .. import _config, _placement, functional as F
from ..formats import quantize_blockwise
from ..reference import float32_to_bfloat16
from .state_dict import _GroupState, _StateDict

_k = _config._kernels


class Optimizer(_StateDict):
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
            cls._scalar_state = dict(cls._rule.scalar_state)
            cls._all_state_names = cls._rule.state + tuple(cls._scalar_state)
            cls._has_step = cls._rule.counts_steps
            cls._kernel_call = staticmethod(F.caller(cls._rule))
            if cls._rule.state_formats:
                cls._storage_options = ("state_dtype", "rounding", "seed")

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
        """The state arrays this group keeps, in the rule's order (fastoptim.rules),
        then its per-parameter scalars (0-d arrays: NAdam's mu_product)."""
        if self._rule is None:
            return ()
        return self._rule.state_names(group) + tuple(self._scalar_state)

    #: per-parameter scalar state and its initial value (fastoptim.rules)
    _scalar_state = {}

    def _prepare(self, group, grads, arrays, steps, *inputs):
        """The group's prepared step (the registry maps state and options to the rule's
        ``functional.prepare_*``); 8-bit state adds its block scales. ``inputs``: the
        rule's read-only inputs (the registry's ``inputs``; None each when not given)."""
        if group.get("state_dtype") == "8bit":
            none = [None] * len(group["params"])
            arrays = dict(arrays, absmaxes=tuple(arrays.get(n + "_absmax") or none
                                                 for n in self._rule.kernel_state))
        if len(inputs) < len(self._rule.inputs):
            inputs = (None,) * len(self._rule.inputs)
        return self._kernel_call(group["params"], grads, arrays, steps, group, *inputs)

    def _init_state(self, group, state):
        """State that exists before any step (Adagrad's accumulators)."""

    def _state_bf16(self, group):
        """Whether the group keeps its state in bfloat16 (uint16 bits)."""
        return group.get("state_dtype") == "bfloat16"

    #: with state_dtype="8bit", parameters with fewer elements keep float32 state, as
    #: bitsandbytes' optimizers do (an optimizer setting, not a group option: state
    #: dicts keep torch's group layout)
    min_8bit_size = 4096

    def _take_min_8bit_size(self, size):
        if isinstance(size, (bool, np.bool_)) or not isinstance(size, numbers.Integral):
            raise TypeError(f"min_8bit_size must be an int, got {type(size).__name__}")
        if size < 0:
            raise ValueError(f"min_8bit_size must be >= 0, got {size}")
        self.min_8bit_size = int(size)

    def _state_8bit(self, group, p):
        """Whether parameter p keeps 8-bit state (float32, at least min_8bit_size
        elements: smaller ones keep float32 state)."""
        return (group.get("state_dtype") == "8bit" and p.dtype == np.float32
                and p.size >= self.min_8bit_size)

    def _initial_state_value(self, group, name):
        """What a new state array ``name`` holds (Adagrad: its initial accumulator
        value; Rprop: its step sizes start at lr)."""
        return 0

    def _new_state_entry(self, name, group, p):
        """A parameter's new state array ``name``, in the group's format, holding
        ``_initial_state_value``: ``{name: array}``, and for 8-bit state also
        ``{name + "_absmax": block scales}``; ``{}`` for state this parameter does not
        keep (the registry's ``state_shape``: Adafactor's factors of a vector). A
        scalar state (NAdam's mu_product) is a 0-d float32 array, as torch keeps it."""
        if name in self._scalar_state:
            value = dict(self._rule.scalar_values(group))[name]
            return {name: np.full((), value, np.float32)}
        if self._rule.factored:          # (Adafactor: a matrix's factors, a vector's V)
            shape = self._rule.state_shape(name, p.shape)
            if shape is None:
                return {}
            if shape != p.shape:
                return {name: np.zeros(shape, p.dtype)}
        slot = self._all_state_names.index(name) + 1
        value = self._initial_state_value(group, name)
        if self._state_8bit(group, p):
            codes, absmax = quantize_blockwise(
                np.full(p.shape, value, np.float32, order="F" if _f_order(p) else "C"),
                name not in self._rule.unsigned_state)
            arr = _placed_zeros(p, slot, np.uint8)
            arr[...] = codes
            return {name: arr, name + "_absmax": absmax}
        dtype = np.uint16 if self._state_bf16(group) else p.dtype
        arr = _placed_zeros(p, slot, dtype)
        if name in self._rule.param_copies:           # (Schedule-Free's z)
            arr[...] = p
        elif value != 0:
            # (bfloat16 state: the value rounded to nearest even, as its bits)
            arr[...] = float32_to_bfloat16(np.float32(value)) if dtype == np.uint16 else value
        return {name: arr}

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
        n = len(group["params"])
        for name in names:
            arrays[name] = list(state.arrays.get(name) or [None] * n)
            for i, (p, g) in enumerate(zip(group["params"], grads)):
                if arrays[name][i] is None:
                    if g is not None:
                        for key, arr in self._new_state_entry(name, group, p).items():
                            if key not in arrays:
                                arrays[key] = list(state.arrays.get(key) or [None] * n)
                            arrays[key][i] = arr
                    else:
                        complete = False
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
        group_step = self._rule is not None and self._rule.group_step
        if group_step:          # (one count per group: every parameter's, advanced)
            after = [int(s.steps[0]) + 1 if len(s.steps) else 0 for s in self._gstate]
        for prepared, state, arrays, complete in plans:
            prepared.run(n_threads)
            if arrays is not state.arrays:
                state.arrays = arrays
                state.complete_for = complete
        if group_step:
            for group, state, count in zip(self.param_groups, self._gstate, after):
                state.steps[:] = count
                group[self._rule.group_step] = count       # (where the oracle shows it)
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
                "nonfinite": self.nonfinite, "skipped_steps": self.skipped_steps,
                "min_8bit_size": self.min_8bit_size}

    def __setstate__(self, d):
        self.min_8bit_size = d.get("min_8bit_size", type(self).min_8bit_size)
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
