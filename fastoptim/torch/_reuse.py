"""The kept step: a group's prepared kernel call, reused while nothing it depends on
changed (see _Reuse, _Keeping)."""
import operator
from collections import defaultdict

import numpy as np
import torch

from .. import _config
from . import _compressed, _probes


_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")
_STRIDE = torch.Tensor.stride


def _by_value(group):
    """Whether an option of the group can change without being replaced: a tensor
    (a scheduler may change a tensor ``lr`` in place) or a list (``betas``)."""
    return any(isinstance(v, (torch.Tensor, list, dict)) or (isinstance(v, tuple) and any(
        isinstance(x, (torch.Tensor, list)) for x in v))
        for k, v in group.items() if k != "params")


def _snapshot(group, by_value, count=None):
    """A group's options (its values, ``params`` included), to see whether any changed
    since the last step; ``by_value`` (see _by_value): tensors and lists by value;
    ``count``: the key of the group's step count (a rule's ``group_step``), left out:
    it changes every step, and the kept step reads it anew each time."""
    if not by_value:
        return ([v for k, v in group.items() if k != count] if count
                else list(group.values()))
    return [v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else
            tuple(x.item() if isinstance(x, torch.Tensor) and x.numel() == 1 else x
                  for x in v)
            if isinstance(v, (tuple, list)) else v
            for k, v in group.items() if k != "params" and k != count]


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
    each parameter's state dict and state tensors (8-bit block scales and per-parameter
    scalars included) are the same objects, and no option that adds or removes a state
    array or changes its format changed. A rule that counts steps per group takes the
    group's count anew at each step. Whatever else changed is caught by
    :meth:`_Optimizer._reused`, which then plans the group afresh."""
    __slots__ = ("params", "mask", "used", "pptrs", "shapes", "pstrides",
                 "gstrides", "dtypes", "state", "state_version", "by_value", "dicts_rep",
                 "keys", "flat", "names", "options", "formats", "kernel", "counts",
                 "step_addrs", "step_doubles", "written", "layout")

    def run(self, n_threads):
        # The versions are bumped first, while the tensors' metadata that _reused just
        # read is still in cache (after the kernel has streamed the arrays through it,
        # the same bumps cost ~0.1 us a tensor more); the kernel cannot fail.
        torch._C._increment_version(self.written)
        self.kernel.run(n_threads)
        if self.step_addrs is not None:
            _config._kernels.scatter_counts(self.step_addrs, self.step_doubles, self.counts)


def _threads():
    """fastoptim.set_num_threads(n) when it was called, else torch's thread count."""
    if _config._num_threads is not None or not _config._kernels.openmp_enabled():
        return _config.get_num_threads()
    return max(1, torch.get_num_threads())


class _Keeping:
    """The kept step of :class:`fastoptim.torch._base._Optimizer` (and of Adafactor): a
    group's prepared kernel call kept between steps while nothing it depends on changed
    (_Reuse). A class using it gives ``_plan(gi, group)`` (a fresh plan: ``kernel``,
    ``run(n_threads)`` and what :meth:`_keep` reads), ``_prepare``, ``_state_names``
    and keeps ``self.state`` a :class:`_State`."""

    def _step_groups(self):
        """Plan every group before running any (a refused step changes nothing), then
        run them. A step whose groups are all kept runs no torch op that autograd could
        record, so it skips torch.no_grad(), whose entry and exit cost ~4 us, as much as
        the rest of a small kept step; a group planned afresh makes tensors under it."""
        plans = [self._reused(gi, group) for gi, group in enumerate(self.param_groups)]
        if None in plans:
            with torch.no_grad():
                plans = [plan or self._plan(gi, group)
                         for gi, (plan, group) in enumerate(zip(plans, self.param_groups))]
                self._run_plans(plans)
        else:
            self._run_plans(plans)

    def _run_plans(self, plans):
        """Run each group's kernel call (all of them checked), keep the fresh ones for
        the next step, and count the step in each group where the rule counts per group."""
        n_threads = _threads()
        for gi, plan in enumerate(plans):
            if plan.kernel is not None:
                plan.run(n_threads)
            if not isinstance(plan, _Reuse):
                self._keep(gi, self.param_groups[gi], plan)
        key = self._rule.group_step
        if key:                             # (the oracle's count: every group, every step)
            for group in self.param_groups:
                group[key] = group.get(key, 0) + 1

    #: whether the kernel's hyperparameters are worked out anew at every step, changed
    #: options or not (a class whose _prepare reads a per-step schedule)
    _hyperparameters_per_step = False
    #: what a kept kernel call takes anew at every step, after its step counts: a
    #: method given the kernel call (ADOPT's clips, a function of the step), or None
    _kept_refresh = None

    def _options(self, group, by_value):
        """The options a kept step compares with the last step's (_snapshot), and those
        the rule keeps as attributes of the optimizer (``maximize`` of the oracle rules)."""
        options = _snapshot(group, by_value, self._rule.group_step)
        for k in self._rule.attributes:
            options.append(getattr(self, k, None))
        return options

    def _reused(self, gi, group):
        """The group's kept kernel call, pointed at this step's gradients, if nothing it
        depends on changed (see _Reuse); else None (the group is planned afresh, which
        also raises the errors a bad step deserves). Changes no tensor."""
        r = self.__dict__.get("_reuses", {}).get(gi)
        if r is None:
            return None
        if self._rule.inputs and self.__dict__.get("_step_inputs") is not None:
            return None          # (SophiaH's Hessian steps; its kept call reads none)
        kernels = _config._kernels
        grads = kernels.kept_grads(group["params"], r.params, r.mask)
        if grads is None:
            return None
        used = r.used
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
        if not kernels.addresses_equal(used, r.pptrs, _probes._READER, _probes._EXACT):
            return None
        state = self.state
        if state is not r.state or state.version != r.state_version:
            return None
        flat = r.flat
        if (not kernels.entries_are(r.dicts_rep, r.keys, flat[0])
                or not kernels.addresses_equal(flat[0], flat[1], _probes._READER, _probes._EXACT)):
            return None
        count = self._rule.group_step
        options = self._options(group, r.by_value)
        if options != r.options or self._hyperparameters_per_step:
            r.by_value = _by_value(group)
            options = self._options(group, r.by_value)
            if (group.get("differentiable", False) or group.get("capturable", False)
                    or self._state_names(group) != r.names
                    or tuple(map(group.get, _compressed.KEYS)) != r.formats):
                return None
            try:
                fresh = self._prepare(group, [], [], {n: [] for n in r.names},
                                      np.zeros(0, dtype=np.int64))
            except (TypeError, ValueError):
                return None                      # (the fresh plan names the bad option)
            if not r.kernel.take_hyperparameters(fresh):
                return None
            r.options = options
        if r.step_addrs is not None and _config._kernels.gather_counts(
                r.step_addrs, r.step_doubles, r.counts) >= 0:
            return None                          # (the fresh plan names the bad count)
        if count:
            n = group.get(count, 0)
            if type(n) is not int or n < 0:
                return None                      # (the fresh plan names the bad count)
            r.counts.fill(n)
        if self._kept_refresh is not None:
            try:
                self._kept_refresh(r.kernel)
            except ValueError:
                return None                      # (the fresh plan names the bad value)
        try:
            r.kernel.set_grads(kernels.addresses(grads, _probes._READER, _probes._EXACT))
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
        try:
            plan.kernel.make_reusable()
        except ValueError:                       # (a rule whose steps cannot be: ADOPT)
            return
        r = _Reuse()
        r.params = list(group["params"])
        r.mask = [p.grad is not None for p in r.params]
        r.used = plan.used
        if [p for p, m in zip(r.params, r.mask) if m] != r.used or any(
                g is not p.grad for p, g in zip(r.used, plan.grads)):
            return                               # (a hook changed the gradients)
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
        if _probes._LAYOUT_GUARD is not None:
            try:
                r.layout = _probes._LAYOUT_GUARD([*r.used, *grads])
            except Exception:                    # pragma: no cover - then the reads
                pass
        r.state = self.state
        r.state_version = self.state.version
        dicts = [self.state.get(p) for p in r.used]
        r.names = self._state_names(group)
        # each parameter's state tensors the kernel holds: its arrays, 8-bit block scales
        # (a parameter under min_8bit_size has none), per-parameter scalars, step
        keys = (*r.names, *(n for n, _ in self._rule.scalar_state),
                *(("step",) if self._has_step else ()))
        scales = tuple(n + _compressed.ABSMAX for n in r.names) \
            if group.get("state_dtype") == "8bit" else ()
        # (a rule whose state depends on the parameter's shape keeps some names only:
        # Adafactor's factors or full second moment)
        per_dict = [tuple(k for k in keys + scales if k in d) for d in dicts]
        r.keys = [k for ks in per_dict for k in ks]
        r.dicts_rep = [d for d, ks in zip(dicts, per_dict) for _ in ks]
        tensors = [d.get(k) for d, ks in zip(dicts, per_dict) for k in ks]
        if not all(isinstance(t, torch.Tensor) for t in tensors):
            return
        r.flat = (tensors, kernels.addresses(tensors))
        r.by_value = _by_value(group)
        r.options = self._options(group, r.by_value)
        r.formats = tuple(map(group.get, _compressed.KEYS))
        r.kernel = plan.kernel
        r.counts = plan.steps
        if self._has_step:
            steps = [d["step"] for d in dicts]
            r.step_addrs = kernels.addresses(steps)
            r.step_doubles = np.array([t.dtype == torch.float64 for t in steps], np.int8)
        else:
            r.step_addrs = r.step_doubles = None
        r.written = plan.written
        reuses[gi] = r
