"""The benchmark: ``python -m fastoptim.bench`` (or the ``fastoptim-bench`` script).

What it measures, for each update rule (SGD, SGD-momentum, Adagrad, RMSprop, Adam,
AdamW), dtype and size:

* the time per step of the NumPy reference (:mod:`fastoptim.reference`), of fastoptim
  (:mod:`fastoptim.functional`, one compiled call) on 1 thread and on all threads, and of
  ``torch.optim`` (single-tensor, ``foreach``, ``fused`` where torch has it) when torch
  is installed;
* in the same run, over the very same arrays, the *ceiling*: a compiled loop with
  exactly the rule's memory traffic and no arithmetic
  (``fastoptim._config._kernels.prepare_traffic``), one call and one parallel region for
  the whole list of arrays, on exactly 1 thread and on exactly N threads.

What runs (:func:`plan_cases`). The default, under a minute on an idle 2-core machine:
every rule in float32 at 2^16 elements (in cache) and 2^24 (far beyond the caches:
memory-bound), and for every rule the parameter list of a small transformer (196
arrays, 8.8 M values) and the per-call overhead of a 16-element step. ``--full``: sizes
2^14, 2^18, 2^22 and 2^25 in float32 and float64 (several minutes). ``--quick``: a
smoke test. ``--targets`` adds the developers' performance targets, each with what it
means.

What it prints. Each row: the median time per step, GB/s (the rule's bytes per element
times the elements, over that time), the fraction of the ceiling (ceiling time / time),
and the speed-ups over NumPy and over the fastest torch variant (their time / this
time). Every ratio is a ratio of the medians printed, so it can be recomputed from the
table. A row is compared with the ceiling run on the number of threads the row really
used: fastoptim keeps a step below its serial threshold (calibrated per rule, see
``fastoptim._config``) on one thread whatever it is given, so such a row is compared
with the 1-thread ceiling, and the N-thread ceiling always runs an N-thread team (the
traffic loop's own threshold is switched off while it runs). At 16 elements a step is
call overhead, not memory traffic: no fraction of the ceiling is reported there.

Measuring discipline (see the design notes; this 2-core VM needs all of it):

* Contenders run interleaved: each repetition runs every contender's block once, in an
  order rotated by one from the previous repetition.
* Before each timed block: a short pause, then one untimed warm-up call (waking a halted
  vCPU after >= 30 ms idle costs milliseconds; the warm-up absorbs it). For sizes far
  beyond the caches the warm-up runs the same contender on a prefix of the same arrays.
  Before the first block, fastoptim's kernels finish calibrating their serial threshold
  for the rule (untimed calls), so no timed block contains a calibration step.
* A block runs ``k`` back-to-back calls (``k`` chosen once per contender so a block
  lasts about ``--block-ms``; a quarter of that for the 16-element step, whose calls
  take microseconds); the number of repetitions (at least 5; 3 with ``--quick``) is
  chosen so that the case takes about its time budget (``--case-s``). Results are
  medians over repetitions of the time per step; every ratio is the ratio of two such
  medians.
* A contender above 1.05 of its ceiling (a loop with the same traffic and no
  arithmetic should not be beaten) means a mis-measured ceiling: the case's blocks are
  run once more, and a row still above is flagged ("ceil?") and its fraction not
  reported.
* Other processes' CPU use is recorded for every case (:class:`OtherLoad`); the cases it
  disturbed are named once, at the end of the run, and in the JSON.
* Every contender works on the very same arrays, placed by :func:`carve_arrays` at
  staggered, non-colliding offsets. torch contenders get them through
  ``torch.from_numpy``, their optimizer state re-pointed at them. The ceiling loop
  moves values around between a parameter and its state arrays (a cycle of length
  1 + number of states); after each of its blocks it runs untimed until the cycle
  closes, so every other contender finds the values it left. (A second set of arrays
  with the same layout read 5% slower here, consistently for the allocation's life:
  the physical pages behind an allocation matter too.)

This module is not imported by ``import fastoptim``; torch and matplotlib are imported
only when used.
"""
import argparse
import gc
import json
import os
import platform
import re
import sys
import textwrap
import time

import numpy as np

from . import _config, _dispatch, functional, reference
from .rules import spec

__all__ = ["main", "run", "carve_arrays", "RULES", "bytes_per_element", "parse_size",
           "parse_options", "plan_cases", "measure", "summarize"]

_kernels = _config._kernels


# ----------------------------------------------------------------------------------
# Rules: hyperparameters and how each implementation is called
# ----------------------------------------------------------------------------------

class Rule:
    """One update rule as the benchmark runs it: a registry entry (fastoptim.rules) and
    the options it is run with.

    ``call(module, params, grads, states, steps)`` runs one step through
    :mod:`fastoptim.functional` or :mod:`fastoptim.reference` (same signatures);
    ``states`` is a list of ``n_state`` lists of arrays, the state the registry says
    ``options`` keep, in its order (``torch_state``: torch's names for them). ``kernel``
    is the kernel family that runs it (the name its serial threshold is calibrated
    under, ``_kernels.calibration``).
    """

    def __init__(self, key, title, call, name, options, torch_fused, kernel):
        entry = spec(name)
        self.key = key
        self.title = title
        self.call = call
        self.torch_name = entry.title
        self.torch_kwargs = options
        self.torch_state = entry.state_names(dict(entry.defaults, **options))
        self.n_state = len(self.torch_state)
        self.torch_fused = torch_fused
        self.kernel = kernel

    def __repr__(self):
        return f"Rule({self.key!r})"


RULES = {r.key: r for r in (
    Rule("sgd", "SGD",
         lambda m, P, G, S, st: m.sgd_(P, G, None, None, lr=1e-3),
         "sgd", dict(lr=1e-3), True, "sgd"),
    Rule("sgd_momentum", "SGD-momentum",
         lambda m, P, G, S, st: m.sgd_(P, G, S[0], st, lr=1e-3, momentum=0.9),
         "sgd", dict(lr=1e-3, momentum=0.9), True, "sgd"),
    Rule("adagrad", "Adagrad",
         lambda m, P, G, S, st: m.adagrad_(P, G, S[0], st, lr=1e-2),
         "adagrad", dict(lr=1e-2), True, "adagrad"),
    Rule("rmsprop", "RMSprop",
         lambda m, P, G, S, st: m.rmsprop_(P, G, S[0], None, None, st, lr=1e-2),
         "rmsprop", dict(lr=1e-2), False, "rmsprop"),
    Rule("adam", "Adam",
         lambda m, P, G, S, st: m.adam_(P, G, S[0], S[1], None, st, lr=1e-3),
         "adam", dict(lr=1e-3), True, "adam"),
    Rule("adamw", "AdamW",
         lambda m, P, G, S, st: m.adamw_(P, G, S[0], S[1], None, st, lr=1e-3,
                                         weight_decay=1e-2),
         "adamw", dict(lr=1e-3, weight_decay=1e-2), True, "adam"),
)}


def bytes_per_element(rule, itemsize):
    """Bytes a step moves per element: read p, g and each state; write p and each state.

    fp32: plain SGD 12, one state array (SGD-momentum, Adagrad, RMSprop) 20, Adam 28."""
    return (3 + 2 * rule.n_state) * itemsize


# ----------------------------------------------------------------------------------
# Threads: which thread count a row really used, and a ceiling on exactly that many
# ----------------------------------------------------------------------------------

#: the kernels calibrate a rule's serial threshold on its first steps of this many
#: elements at most (CALIBRATION_MAX in _kernels/runtime.pxi); larger steps never calibrate
_CALIBRATION_MAX = 1 << 18


class SerialPolicy:
    """fastoptim's serial threshold as the benchmark found it, and the two things the
    benchmark does with it.

    * :meth:`threads_used`: how many threads a fastoptim step of a rule really uses when
      given ``n``: 1 below the threshold in force (the rule's calibrated one, or the
      user's), else ``n``. Rows are compared with the ceiling on that many threads.
    * :meth:`force_exact` / :meth:`restore`: around the N-thread ceiling's blocks, the
      threshold of the running kernel module is set to 0 so that the traffic loop runs
      an N-thread team at every size (its own calibrated threshold differs from the
      rule's: ~23,000 elements against ~5,000 for Adam here), then put back as found.

    ``user`` is the threshold the user set (None: each rule calibrates its own), as
    ``fastoptim._dispatch`` keeps it; :meth:`restore` sets it back."""

    def __init__(self):
        self.user = _dispatch.serial_threshold()

    def restore(self):
        _config.set_serial_threshold(self.user)

    @staticmethod
    def force_exact():
        _config.set_serial_threshold(0)

    def threshold(self, rule, dtype):
        """Elements from which a step of ``rule`` in ``dtype`` runs a thread team."""
        if self.user is not None:
            return self.user
        cal = _kernels.calibration()["rules"].get(f"{rule.kernel}/{dtype}")
        return int(cal["threshold"]) if cal else int(_kernels.get_serial_threshold())

    def calibrated(self, rule, dtype):
        return self.user is not None or (f"{rule.kernel}/{dtype}"
                                         in _kernels.calibration()["rules"])

    def threads_used(self, rule, dtype, size, n):
        if n <= 1 or not _kernels.openmp_enabled() or _config._forked_child:
            return 1
        return n if size >= self.threshold(rule, dtype) else 1


# ----------------------------------------------------------------------------------
# Array layout
# ----------------------------------------------------------------------------------

#: Arrays start on a 4 KiB page plus (k mod 7) * 576 bytes, k counting arrays in order.
STAGGER_BYTES = 576
STAGGER_SLOTS = 7
_PAGE = 4096
_BASE_ALIGN = 2 << 20


def carve_arrays(shapes, dtype, n_roles):
    """Carve ``n_roles`` arrays per shape out of one buffer, at non-colliding offsets.

    Returns ``roles``: a list of ``n_roles`` lists, ``roles[r][i]`` of shape
    ``shapes[i]`` (role 0 the parameters, 1 the gradients, then the state arrays),
    uninitialized.

    The choice: one buffer, aligned to 2 MiB (so transparent huge pages, where the
    kernel uses them, cover every layout alike), in which the arrays of a parameter
    follow each other (p, g, state...; then the next parameter). Array number k starts
    on a 4 KiB boundary plus ``(k mod 7) * 576`` bytes (9 cache lines). So every array
    is 64-byte aligned, and no two arrays streamed together are a multiple of 4 KiB
    (or of any larger power of two) apart. Allocated back to back, glibc maps large
    arrays exactly 2^27 + 4 KiB apart for 2^25 float32 elements; on this machine a
    fused torch Adam step took 17 ms there, 17 ms at exactly 2^27 or 2^27 + 4 KiB
    spacing, 15.5 ms with 64-byte staggers and 14 ms with staggers of 320-1088 bytes
    (fastoptim: 16.6 -> 12.5-13.5 ms), measured interleaved in one process.
    """
    dtype = np.dtype(dtype)
    shapes = [tuple(int(d) for d in s) if isinstance(s, (tuple, list)) else (int(s),)
              for s in shapes]
    offsets = []
    cursor, k = 0, 0
    for shape in shapes:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        per = []
        for _r in range(n_roles):
            start = -(-cursor // _PAGE) * _PAGE + (k % STAGGER_SLOTS) * STAGGER_BYTES
            per.append((start, nbytes))
            cursor = start + nbytes
            k += 1
        offsets.append(per)
    raw = np.empty(cursor + _BASE_ALIGN, dtype=np.uint8)
    base = (-raw.ctypes.data) % _BASE_ALIGN
    roles = [[None] * len(shapes) for _ in range(n_roles)]
    for i, (shape, per) in enumerate(zip(shapes, offsets)):
        for r, (start, nbytes) in enumerate(per):
            roles[r][i] = raw[base + start: base + start + nbytes].view(dtype).reshape(shape)
    return roles


def _fill_normal(arrays, rng, scale=1.0):
    for a in arrays:
        flat = a.reshape(-1)
        if a.dtype == np.float32:
            rng.standard_normal(flat.size, dtype=np.float32, out=flat)
        else:
            rng.standard_normal(flat.size, out=flat)
        if scale != 1.0:
            flat *= scale


class Arrays:
    """The arrays of one case: parameters, gradients and state lists, shared by every
    contender (the ceiling loop included)."""

    def __init__(self, shapes, dtype, n_state, seed=0):
        rng = np.random.default_rng(seed)
        self.shapes = shapes
        self.dtype = np.dtype(dtype)
        self.n_state = n_state
        roles = carve_arrays(shapes, dtype, 2 + n_state)
        self.params, self.grads, self.states = roles[0], roles[1], roles[2:]
        _fill_normal(self.params, rng)
        _fill_normal(self.grads, rng, 1e-2)
        self.reset_state()          # also touches every page now, not in a timed block

    @property
    def size(self):
        return sum(a.size for a in self.params)

    def reset_state(self):
        for role in self.states:
            for a in role:
                a.fill(0)

    def view(self, n_state, prefix=None):
        """(params, grads, states) for a rule with ``n_state`` state arrays; with
        ``prefix``, views of the first elements of the first array only (used for
        warm-up calls)."""
        def cut(lst):
            if prefix is None:
                return list(lst)
            return [lst[0].reshape(-1)[:prefix]]
        return cut(self.params), cut(self.grads), [cut(s) for s in self.states[:n_state]]


# ----------------------------------------------------------------------------------
# Contenders
# ----------------------------------------------------------------------------------

class Contender:
    """One implementation in one configuration.

    ``call()`` is timed; ``warm()`` runs untimed before each block; ``before()`` sets
    global state the call depends on (fastoptim's thread count, the ceiling's exact
    thread team) and ``after()`` undoes what must not outlive the block; ``settle(calls,
    warms)``, after a block of that many calls and warm-ups, puts the arrays back as
    they were (the ceiling loop). ``threads_used`` is filled in by the case: the
    threads the calls really ran on (``threads`` unless fastoptim stayed serial)."""

    def __init__(self, impl, variant, threads, call, warm=None, before=None,
                 settle=None, period=1, after=None):
        self.impl = impl            # "numpy", "fastoptim", "torch", "ceiling"
        self.variant = variant      # "", "optimizer class", "single-tensor", "foreach", "fused"
        self.threads = threads
        self.threads_used = threads
        self.call = call
        self.warm = warm if warm is not None else call
        self.before = before
        self.after = after
        self.settle = settle
        self.period = period        # settle is free after blocks of a multiple of this

    @property
    def label(self):
        name = {"numpy": "numpy reference", "ceiling": "ceiling (traffic)"}.get(
            self.impl, self.impl)
        return f"{name} {self.variant}".strip()

    @property
    def key(self):
        return f"{self.impl}:{self.variant}:{self.threads}"


def _numpy_call(rule, P, G, S):
    steps = np.zeros(len(P), dtype=np.int64)
    return lambda: rule.call(reference, P, G, S, steps)


def _fastoptim_call(rule, P, G, S):
    steps = np.zeros(len(P), dtype=np.int64)
    return lambda: rule.call(functional, P, G, S, steps)


def _ceiling_contender(P, G, S, threads, warm=None, policy=None):
    """The same-traffic loop on exactly ``threads`` threads over P, G, S (``warm``:
    prefix views for the warm-up). Each call moves every value one step around the
    cycle p <- s0 <- s1 ... <- p (1 + len(S) arrays); ``settle`` completes the cycle.
    With more than one thread, ``before``/``after`` switch the kernels' serial
    threshold off and back (``policy``, a :class:`SerialPolicy`), so the loop runs a
    team of ``threads`` at every size."""
    prepare = _kernels.prepare_traffic
    period = 1 + len(S)

    def call():
        prepare(P, G, S).run(threads)

    def warm_call():
        prepare(*warm).run(threads)

    def settle(calls, warms):
        if warm is None:
            calls, warms = calls + warms, 0
        for _ in range(-calls % period):
            call()
        for _ in range(-warms % period):
            warm_call()

    exact = threads > 1 and policy is not None
    return Contender("ceiling", "", threads, call, warm_call if warm else None,
                     before=policy.force_exact if exact else None,
                     after=policy.restore if exact else None,
                     settle=settle, period=period)


def _set_fo_threads(n):
    return lambda: _config.set_num_threads(n)


def _torch_call(torch, rule, P, G, S, variant):
    """A torch.optim step over ``torch.from_numpy`` views of P, with p.grad set once and
    every state tensor living in the arrays of S.

    The state's structure (names, the step counter's dtype) comes from one step of the
    same optimizer on a one-element tensor; each parameter then gets that state with
    its tensors replaced by views of S, so torch never allocates state of its own (and
    no full-size step is spent on setting up)."""
    kw = {"single-tensor": dict(foreach=False), "foreach": dict(foreach=True),
          "fused": dict(fused=True)}[variant]
    dtype = torch.from_numpy(P[0][:0].reshape(-1)).dtype
    probe = torch.zeros(1, dtype=dtype)
    probe.grad = torch.ones(1, dtype=dtype)
    probe_opt = getattr(torch.optim, rule.torch_name)([probe], **rule.torch_kwargs, **kw)
    probe_opt.step()
    template = probe_opt.state[probe]
    if set(template) - {"step"} != set(rule.torch_state):
        raise RuntimeError(f"torch.optim.{rule.torch_name} keeps state "
                           f"{sorted(template)}, expected {list(rule.torch_state)}")
    tp = [torch.from_numpy(p) for p in P]
    for t, g in zip(tp, G):
        t.grad = torch.from_numpy(g)
    opt = getattr(torch.optim, rule.torch_name)(tp, **rule.torch_kwargs, **kw)
    for i, t in enumerate(tp):
        state = {name: value.clone() for name, value in template.items()}
        for slot, name in enumerate(rule.torch_state):
            state[name] = torch.from_numpy(S[slot][i])
        opt.state[t] = state
    return opt.step


def _dropin_call(torch, rule, P, G):
    """fastoptim.torch's optimizer (the drop-in for torch.optim) on nn.Parameters copied
    from P, with .grad set once: what a PyTorch user's step() costs."""
    from . import torch as fot
    params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in P]
    for t, g in zip(params, G):
        t.grad = torch.from_numpy(g.copy())
    opt = getattr(fot, rule.torch_name)(params, **rule.torch_kwargs)
    return opt.step


def _torch_variants(rule):
    return ("single-tensor", "foreach") + (("fused",) if rule.torch_fused else ())


def build_contenders(rule, arrays, threads, torch=None, warm_prefix=None,
                     with_optimizer_class=False, notes=None, policy=None):
    """Every contender for ``rule`` on ``arrays``; ``threads`` is the list of thread
    counts for fastoptim and the ceiling (torch runs on the largest). ``policy``: the
    run's :class:`SerialPolicy` (a new one by default)."""
    policy = policy if policy is not None else SerialPolicy()
    P, G, S = arrays.view(rule.n_state)
    warm = arrays.view(rule.n_state, warm_prefix) if warm_prefix else None
    out = [Contender("numpy", "", 1, _numpy_call(rule, P, G, S),
                     _numpy_call(rule, *warm) if warm else None)]
    for n in threads:
        out.append(Contender("fastoptim", "", n, _fastoptim_call(rule, P, G, S),
                             _fastoptim_call(rule, *warm) if warm else None,
                             before=_set_fo_threads(n)))
    if with_optimizer_class:
        n = max(threads)
        from . import optim
        cls = getattr(optim, rule.torch_name)
        opt = cls([p.copy() for p in P], **rule.torch_kwargs)
        grads = [g.copy() for g in G]
        out.append(Contender("fastoptim", "optimizer class", n, lambda: opt.step(grads),
                             before=_set_fo_threads(n)))
        if torch is not None:
            out.append(Contender("fastoptim", "torch drop-in", n,
                                 _dropin_call(torch, rule, P, G), before=_set_fo_threads(n)))
    for n in sorted(set(threads) | {1}):     # 1 thread: the NumPy reference's ceiling
        out.append(_ceiling_contender(P, G, S, n, warm, policy))
    if torch is not None:
        n = torch.get_num_threads()
        for variant in _torch_variants(rule):
            try:
                call = _torch_call(torch, rule, P, G, S, variant)
                wcall = _torch_call(torch, rule, *warm, variant) if warm else None
            except Exception as exc:   # a variant this torch build lacks
                if notes is not None:
                    notes.append(f"torch {rule.torch_name} {variant}: skipped "
                                 f"({type(exc).__name__}: {exc})")
                continue
            out.append(Contender("torch", variant, n, call, wcall))
    return out


# ----------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------

class OtherLoad:
    """CPU time that other processes used while we measured, in cores (Linux only).

    The machine's busy time from /proc/stat (steal included: a vCPU the hypervisor
    gave away is not ours either) minus this process's own CPU time, over the wall
    time. On a 2-core machine, 0.5 cores of other load make thread-team timings
    unreliable: a team of two waits for whichever thread the scheduler parked."""

    def __init__(self):
        self.t0 = self._snapshot()

    @staticmethod
    def _snapshot():
        try:
            with open("/proc/stat") as f:
                fields = f.readline().split()[1:]
        except OSError:
            return None
        v = [int(x) for x in fields[:8]] + [0] * max(0, 8 - len(fields))
        busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]   # user nice system irq softirq steal
        own = os.times()
        return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system

    def cores(self):
        """Average number of cores other processes kept busy since construction."""
        t1 = self._snapshot()
        if self.t0 is None or t1 is None or t1[0] - self.t0[0] <= 0:
            return None
        wall = t1[0] - self.t0[0]
        other = (t1[1] - self.t0[1]) - (t1[2] - self.t0[2])
        return max(0.0, other / wall)


class Profile:
    """How long blocks and cases last."""

    def __init__(self, block_s, case_s, min_reps, max_reps, pause_s):
        self.block_s = block_s
        self.case_s = case_s
        self.min_reps = min_reps
        self.max_reps = max_reps
        self.pause_s = pause_s


PROFILES = {
    # default and --full: at least 5 repetitions per case (the memory-bound cases reach
    # only that in their budget), 10 ms blocks (hundreds of calls in cache)
    "default": Profile(block_s=0.01, case_s=0.9, min_reps=5, max_reps=15, pause_s=0.005),
    "quick": Profile(block_s=0.004, case_s=0.2, min_reps=3, max_reps=7, pause_s=0.003),
}


def _time_block(c, k):
    c.warm()
    call = c.call
    t0 = time.perf_counter_ns()
    for _ in range(k):
        call()
    return (time.perf_counter_ns() - t0) / k * 1e-9


def _calls_per_block(c, target):
    """About ``target`` calls; for the ceiling, a count after which (with the warm-up)
    its value cycle is closed, so that settling costs nothing."""
    k = max(1, min(100000, round(target)))
    if c.period > 1:
        lead = 1 if c.warm is c.call else 0
        k += -(k + lead) % c.period
    return k


def measure(contenders, profile, progress=None):
    """Time every contender, interleaved. Returns ({key: [seconds per step, one per
    repetition]}, reps, {key: calls per block}).

    The number of repetitions is planned from a calibration call so that the case
    lasts about ``profile.case_s`` (at least ``min_reps``); when other processes slow
    the machine down, a case stops early after ``2 * case_s`` once it has
    ``min_reps`` repetitions."""
    gc_was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        est = {}
        for c in contenders:                     # calibration, untimed for the results
            if c.before:
                c.before()
            try:
                c.warm()
                t = []
                while len(t) < 2 and sum(t) < profile.block_s:
                    t0 = time.perf_counter_ns()
                    c.call()
                    t.append((time.perf_counter_ns() - t0) * 1e-9)
                if c.settle:
                    c.settle(len(t), 1)
            finally:
                if c.after:
                    c.after()
            est[c.key] = max(min(t), 1e-8)
        k = {c.key: _calls_per_block(c, profile.block_s / est[c.key])
             for c in contenders}
        warm_cost = {c.key: (est[c.key] if c.warm is c.call else 0.0) for c in contenders}
        per_rep = sum(k[c.key] * est[c.key] + warm_cost[c.key] + profile.pause_s
                      for c in contenders)
        reps = int(max(profile.min_reps, min(profile.max_reps, profile.case_s // per_rep)))
        times = {c.key: [] for c in contenders}
        n = len(contenders)
        t_start = time.perf_counter()
        r = 0
        while r < reps:
            order = contenders[r % n:] + contenders[:r % n]
            for c in order:
                if c.before:
                    c.before()
                try:
                    time.sleep(profile.pause_s)
                    t = _time_block(c, k[c.key])
                    times[c.key].append(t)
                    if c.settle:
                        c.settle(k[c.key], 1)
                finally:
                    if c.after:
                        c.after()
                if k[c.key] > 1 and t * k[c.key] > 4 * profile.block_s:
                    # far slower than calibrated (another process took the CPU):
                    # shorter blocks from now on; the per-call time stays comparable
                    k[c.key] = _calls_per_block(c, profile.block_s / t)
            r += 1
            if progress:
                progress(r, reps)
            if r >= profile.min_reps and time.perf_counter() - t_start > 2 * profile.case_s:
                break
        return times, r, k
    finally:
        if gc_was:
            gc.enable()


def _median(xs):
    return float(np.median(np.asarray(xs, dtype=float))) if len(xs) else float("nan")


def _ratio(num, den):
    if num is None or den is None or not den > 0:
        return None
    return num / den


def summarize(contenders, times, nbytes, fraction=True):
    """One row per contender (the ceilings included), from the times of
    :func:`measure`.

    ``time_s`` is the median over repetitions. Every ratio is a ratio of two such
    medians, the ones printed: ``frac_ceiling`` = the median time of the ceiling on
    the row's ``threads_used`` / the row's, ``speedup_vs_numpy`` = NumPy's /
    the row's, ``speedup_vs_torch`` = the fastest torch variant's (smallest median,
    named in ``torch_reference``) / the row's. ``fraction=False`` (the 16-element
    step: call overhead, not traffic) leaves ``frac_ceiling`` out (None)."""
    med = {c.key: _median(times[c.key]) for c in contenders}
    numpy_t = next((med[c.key] for c in contenders if c.impl == "numpy"), None)
    torch_rows = [c for c in contenders if c.impl == "torch"]
    fastest = min(torch_rows, key=lambda c: med[c.key]) if torch_rows else None
    torch_t = med[fastest.key] if fastest else None
    ceilings = {c.threads: med[c.key] for c in contenders if c.impl == "ceiling"}
    rows = []
    for c in contenders:
        t = med[c.key]
        used = c.threads_used
        ceil_t = ceilings.get(used)
        if c.impl == "ceiling":
            frac = 1.0
        else:
            frac = _ratio(ceil_t, t) if fraction else None
        rows.append({
            "impl": c.impl, "variant": c.variant, "threads": c.threads,
            "threads_used": used,
            "label": c.label,
            "time_s": t,
            "gbps": nbytes / t / 1e9,
            "ceiling_threads": used if ceil_t is not None else None,
            "ceiling_time_s": ceil_t,
            "frac_ceiling": frac,
            "speedup_vs_numpy": _ratio(numpy_t, t),
            "speedup_vs_torch": _ratio(torch_t, t),
            "torch_reference": fastest.variant if fastest else None,
            "ceiling_suspect": False,
            "times_s": [float(x) for x in times[c.key]],
        })
    return rows


# ----------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------

#: a contender above this fraction of its ceiling means a mis-measured ceiling
CEILING_SLACK = 1.05
#: other processes' load (in cores) from which a case counts as disturbed
BUSY_WARN = 0.25


def transformer_shapes(vocab=8192, context=512, d=192, layers=16, mlp=4):
    """The parameter shapes of a small GPT-style transformer: 196 arrays, 8.8 M values,
    from 192 to 1.57 M elements each."""
    shapes = [(vocab, d), (context, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (d, mlp * d), (mlp * d,), (mlp * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def _fmt_size(n):
    if n > 0 and n & (n - 1) == 0:
        return f"2^{n.bit_length() - 1}"
    return f"{n:,}"


def case_name(case):
    """'Adam float32 2^24', 'Adam float32 transformer', 'Adam float32 16 elem'."""
    return f"{case['title']} {case['dtype']} {case['label'] or _fmt_size(case['size'])}"


def _prime(contenders, policy, rule, dtype, size):
    """Untimed fastoptim steps on the largest thread count until the kernels have
    calibrated this rule's serial threshold (their first steps of a mid size run
    serially and are timed by the kernels: they must not land in a timed block)."""
    if size > _CALIBRATION_MAX:
        return
    fo = [c for c in contenders if c.impl == "fastoptim" and c.threads > 1]
    if not fo:
        return
    c = max(fo, key=lambda x: x.threads)
    if c.before:
        c.before()
    for _ in range(8):
        if policy.calibrated(rule, dtype):
            break
        c.call()


def _above_ceiling(rows):
    return [r for r in rows if r["impl"] != "ceiling" and r["frac_ceiling"] is not None
            and r["frac_ceiling"] > CEILING_SLACK]


def _brief(r):
    return {"label": r["label"], "threads": r["threads_used"],
            "frac_ceiling": r["frac_ceiling"]}


def _run_case(kind, rule, arrays, threads, torch, profile, progress, warm_prefix=None,
              with_optimizer_class=False, label="", policy=None):
    """Measure one case; re-measure it once if a row beats its ceiling by more than
    CEILING_SLACK, and flag the rows that still do."""
    notes = []
    policy = policy if policy is not None else SerialPolicy()
    arrays.reset_state()
    contenders = build_contenders(rule, arrays, threads, torch, warm_prefix,
                                  with_optimizer_class, notes, policy)
    dtype = arrays.dtype.name
    nbytes = bytes_per_element(rule, arrays.dtype.itemsize) * arrays.size
    fraction = kind != "overhead"
    load = OtherLoad()
    t0 = time.perf_counter()
    _prime(contenders, policy, rule, dtype, arrays.size)
    if not fraction:    # calls of microseconds: short blocks still hold hundreds
        profile = Profile(profile.block_s / 4, profile.case_s / 3, profile.min_reps,
                          profile.max_reps, profile.pause_s)
    attempts = []
    while True:
        times, reps, k = measure(contenders, profile, progress)
        for c in contenders:
            if c.impl == "fastoptim":
                c.threads_used = policy.threads_used(rule, dtype, arrays.size, c.threads)
        rows = summarize(contenders, times, nbytes, fraction=fraction)
        above = _above_ceiling(rows)
        attempts.append({"reps": reps, "above_ceiling": [_brief(r) for r in above]})
        if not above or len(attempts) == 2:
            break
    wall = time.perf_counter() - t0
    other = load.cores()
    for r in above:
        r["ceiling_suspect"] = True
        r["frac_ceiling_measured"] = r["frac_ceiling"]
        r["frac_ceiling"] = None
    if above:
        rows_text = ", ".join(f"{_row_name(r)} at {r['frac_ceiling_measured']:.2f}"
                              for r in above)
        why = (f"machine busy: other processes kept {other:.1f} cores busy"
               if other is not None and other >= BUSY_WARN else
               "machine busy? (it looked idle: then block-to-block noise, or the "
               "traffic loop itself is slower than this kernel at this size)")
        notes.append(f"ceiling mis-measured: {rows_text} of the ceiling, measured and "
                     f"re-measured, but a loop with the same traffic and no arithmetic "
                     f"should not be beaten; {why}. No fraction of ceiling reported "
                     f"for {'this row' if len(above) == 1 else 'these rows'}.")
    if not all(np.isfinite(a).all() for lst in [arrays.params] + arrays.states
               for a in lst):
        notes.append("some parameter or state values became non-finite during the "
                     "case; timings on such data may not be representative")
    for row, c in zip(rows, contenders):
        row["calls_per_block"] = k[c.key]
    ceiling = {str(r["threads"]): {"time_s": r["time_s"], "gbps": r["gbps"],
                                   "times_s": r["times_s"]}
               for r in rows if r["impl"] == "ceiling"}
    del contenders
    return {
        "kind": kind, "rule": rule.key, "title": rule.title, "dtype": dtype,
        "size": int(arrays.size), "n_arrays": len(arrays.params),
        "bytes_per_element": bytes_per_element(rule, arrays.dtype.itemsize),
        "bytes_per_step": int(nbytes), "reps": reps, "label": label,
        "other_load_cores": other,
        "disturbed": other is not None and other >= BUSY_WARN,
        "wall_s": wall,
        "remeasured": len(attempts) > 1, "attempts": attempts,
        "serial_threshold": policy.threshold(rule, dtype),
        "ceiling": ceiling, "rows": [r for r in rows if r["impl"] != "ceiling"],
        "notes": notes,
    }


# ----------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------

#: width the notes are wrapped to
_WIDTH = 92

#: how to read the tables; printed once, before the first case
LEGEND = """\
How to read the tables (every ratio is a ratio of the medians printed; recompute it
from the table, up to rounding):
  time/step  median over the repetitions of the time per step
  GB/s       bytes the rule moves per step / time/step
  of ceil    ceiling time / time/step. The ceiling: a loop with the same memory
             traffic and no arithmetic, over the same arrays, in this run, on the
             same number of threads (thr) as the row. "1*": given more threads,
             fastoptim ran this step on one (below its serial threshold), so it is
             compared with the 1-thread ceiling. "ceil?": above 1.05 of the ceiling
             twice, the ceiling was mis-measured; no fraction reported. Not reported
             for the 16-element step (call overhead, not memory traffic).
  x numpy    the NumPy reference's time/step / this row's
  x torch    the fastest torch variant's time/step (the row showing 1.00) / this
             row's"""


def _fmt_time(s):
    if s is None or s != s:
        return "-"
    for unit, f in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= f:
            return f"{s / f:7.2f} {unit}"
    return f"{s / 1e-9:7.0f} ns"


def _fmt_x(v, width=8, digits=2):
    return f"{'-':>{width}}" if v is None or v != v else f"{v:>{width}.{digits}f}"


def _fmt_frac(r, width=9):
    if r.get("ceiling_suspect"):
        return f"{'ceil?':>{width}}"
    return _fmt_x(r["frac_ceiling"], width)


def _fmt_threads(r):
    return f"{r['threads_used']}*" if r["threads_used"] != r["threads"] else str(r["threads"])


def format_case(case):
    """The case's block of the table."""
    head = (f"{case['title']} {case['dtype']}  {case['label'] or _fmt_size(case['size'])}"
            f"  ({case['size']:,} elements in {case['n_arrays']} array"
            f"{'s' if case['n_arrays'] != 1 else ''}, {case['bytes_per_element']} B/element,"
            f" {case['bytes_per_step'] / 1e6:,.2f} MB/step, {case['reps']} reps"
            f"{', re-measured' if case.get('remeasured') else ''})")
    if case["kind"] == "overhead":
        ceil = ", ".join(f"{t} thr {_fmt_time(c['time_s']).strip()}"
                         for t, c in case["ceiling"].items())
        ceil = f"  traffic-loop call (no arithmetic), for scale: {ceil}"
    else:
        ceil = ", ".join(f"{t} thr {_fmt_time(c['time_s']).strip()} "
                         f"({c['gbps']:.1f} GB/s)" for t, c in case["ceiling"].items())
        ceil = f"  ceiling: {ceil}"
    lines = [head, ceil,
             f"  {'implementation':<28}{'thr':>4}{'time/step':>12}{'GB/s':>9}"
             f"{'of ceil':>9}{'x numpy':>9}{'x torch':>9}"]
    for r in case["rows"]:
        lines.append(f"  {r['label']:<28}{_fmt_threads(r):>4}{_fmt_time(r['time_s']):>12}"
                     f"{r['gbps']:>9.2f}{_fmt_frac(r)}"
                     f"{_fmt_x(r['speedup_vs_numpy'], 9)}{_fmt_x(r['speedup_vs_torch'], 9)}")
    for note in case.get("notes", ()):
        lines.append(_wrap(note, "  note: ", "        "))
    return "\n".join(lines)


def _wrap(text, first="", rest=""):
    return textwrap.fill(text, width=_WIDTH, initial_indent=first,
                         subsequent_indent=rest, break_on_hyphens=False)


def _fo_rows(case):
    return {r["threads"]: r for r in case["rows"]
            if r["impl"] == "fastoptim" and r["variant"] == ""}


def format_summary(cases):
    """One line per case: fastoptim (one functional call) on every thread count, its
    time and fraction of the ceiling; for the most threads also GB/s and the speed-ups
    over NumPy and the fastest torch variant, whose time ends the line."""
    threads = sorted({t for c in cases for t in _fo_rows(c)})
    cols = "".join(f"{f'fo{t} time':>11}{'of ceil':>9}" for t in threads)
    lines = [f"{'rule':<13}{'dtype':<8}{'size':>12}{cols}{'GB/s':>8}{'x numpy':>9}"
             f"{'x torch':>9}  fastest torch"]
    for c in cases:
        fo = _fo_rows(c)
        best = fo.get(max(fo)) if fo else None
        torch_rows = [r for r in c["rows"] if r["impl"] == "torch"]
        fastest = min(torch_rows, key=lambda r: r["time_s"]) if torch_rows else None
        size = c["label"] or _fmt_size(c["size"])
        line = f"{c['title']:<13}{c['dtype']:<8}{size:>12}"
        for t in threads:
            r = fo.get(t)
            if r is None:
                line += f"{'-':>11}{'-':>9}"
                continue
            frac = _fmt_frac(r, 8) + ("*" if r["threads_used"] != r["threads"] else " ")
            line += f"{_fmt_time(r['time_s']):>11}{frac}"
        line += (f"{best['gbps']:>8.2f}" if best else f"{'-':>8}")
        line += (_fmt_x(best["speedup_vs_numpy"] if best else None, 9)
                 + _fmt_x(best["speedup_vs_torch"] if best else None, 9))
        if fastest:
            line += f"  {fastest['variant']} {_fmt_time(fastest['time_s']).strip()}"
        lines.append(line)
    return "\n".join(lines)


#: a note names at most this many cases or rows, then counts the rest (the JSON has all)
_NOTE_NAMES = 8


def _some(names):
    if len(names) <= _NOTE_NAMES:
        return ", ".join(names)
    return (", ".join(names[:_NOTE_NAMES])
            + f" and {len(names) - _NOTE_NAMES} more (every one in --json)")


def _row_name(r):
    ran = f" (ran on {r['threads_used']})" if r["threads_used"] != r["threads"] else ""
    return f"{r['label']} {r['threads']} thr{ran}"


def run_notes(cases):
    """The run's measurement problems, each named once: the cases other processes
    disturbed, and the rows whose ceiling was mis-measured."""
    out = []
    busy = [c for c in cases if c.get("disturbed")]
    if busy:
        loads = [c["other_load_cores"] for c in busy]
        which = _some([f"{case_name(c)} ({c['other_load_cores']:.1f} cores)"
                       for c in busy])
        rerun = ""
        sweep = [c for c in busy if c["kind"] == "sweep"]
        if sweep and len(busy) < len(cases):
            rules = ",".join(dict.fromkeys(c["rule"] for c in sweep))
            sizes = ",".join(dict.fromkeys(_fmt_size(c["size"]) for c in sweep))
            dtypes = ",".join(dict.fromkeys(c["dtype"] for c in sweep))
            rerun = (f" (those cases only: fastoptim-bench --rules {rules} --sizes "
                     f"{sizes} --dtypes {dtypes})")
        out.append(f"DISTURBED RUN: other processes kept {min(loads):.1f}"
                   + (f"-{max(loads):.1f}" if max(loads) - min(loads) >= 0.05 else "")
                   + f" cores busy during {len(busy)} of {len(cases)} cases: {which}. "
                   f"Numbers from these cases are unreliable (a thread team waits for "
                   f"whichever thread the scheduler parked). Close other programs and "
                   f"rerun{rerun}.")
    suspect = [(c, r) for c in cases for r in c["rows"] if r.get("ceiling_suspect")]
    if suspect:
        which = _some([f"{case_name(c)}: {_row_name(r)}" for c, r in suspect])
        out.append(f"CEILING MIS-MEASURED in {len(suspect)} row"
                   f"{'s' if len(suspect) != 1 else ''} (above {CEILING_SLACK} of the "
                   f"ceiling when measured and re-measured; shown as 'ceil?', no "
                   f"fraction reported): {which}. Usually the machine was busy: "
                   f"rerun when it is idle; if it persists on an idle machine, the "
                   f"traffic loop is no ceiling for that rule and size.")
    return out


#: the developers' targets (``--targets``): fastoptim on the most threads
TARGET_MEMORY_BOUND = 0.95      # of the ceiling, sweep sizes >= 2^24
TARGET_IN_CACHE_ADAM = 0.7      # of the ceiling, Adam at 2^14 .. 2^18


def check_targets(cases):
    """The project's goals, checked against fastoptim on all threads, each with what
    it means: >= 0.95 of the ceiling at 2^24 elements and more, >= 0.7 for Adam from
    2^14 to 2^18 elements; and the 16-element step's time next to torch's fastest and
    the traffic loop's call (no goal)."""
    out = []
    for c in cases:
        fo = _fo_rows(c)
        if not fo:
            continue
        r = fo[max(fo)]
        frac = r["frac_ceiling"]
        thr = r["threads_used"]
        what = f"{case_name(c)} on {thr} thr"
        base = {"what": what, "case": case_name(c), "threads": thr,
                "disturbed": bool(c.get("disturbed")),
                "ceiling_suspect": bool(r.get("ceiling_suspect"))}
        if c["kind"] == "sweep" and c["size"] >= 1 << 24:
            goal = TARGET_MEMORY_BOUND
            means = (f"{what} at >= {goal} of the same-traffic ceiling: far beyond the "
                     f"caches the kernel streams at memory bandwidth; its arithmetic "
                     f"hides behind the loads")
        elif (c["kind"] == "sweep" and c["rule"] == "adam"
              and 1 << 14 <= c["size"] <= 1 << 18):
            goal = TARGET_IN_CACHE_ADAM
            means = (f"{what} at >= {goal} of the same-traffic ceiling: in cache the "
                     f"limit is arithmetic; the sqrt/div/multiply-add loop runs on the "
                     f"CPU's widest vector units and the thread team pays off")
        elif c["kind"] == "overhead":
            torch_rows = [x for x in c["rows"] if x["impl"] == "torch"]
            ceil = c["ceiling"].get(str(thr))
            out.append(dict(base, measure="time per step (s)", value=r["time_s"],
                            torch_fastest_s=min((x["time_s"] for x in torch_rows),
                                                default=None),
                            kernel_floor_s=ceil["time_s"] if ceil else None,
                            goal=None, met=None,
                            means=(f"{what}: the fixed cost of one call (argument "
                                   f"checks, one GIL release), no goal; lower is better. "
                                   f"For scale: torch's fastest step and a bare "
                                   f"traffic-loop call")))
            continue
        else:
            continue
        out.append(dict(base, measure="fraction of ceiling", value=frac, goal=goal,
                        met=None if frac is None else frac >= goal, means=means))
    return out


def format_targets(targets):
    lines = []
    for t in targets:
        flag = "  (disturbed run: unreliable)" if t.get("disturbed") else ""
        if t["goal"] is None:
            extra = []
            if t.get("torch_fastest_s"):
                extra.append(f"fastest torch {_fmt_time(t['torch_fastest_s']).strip()}")
            if t.get("kernel_floor_s"):
                extra.append(f"traffic-loop call {_fmt_time(t['kernel_floor_s']).strip()}")
            lines.append(f"  {t['what']:<40} {_fmt_time(t['value']).strip():>10} per step"
                         f"  ({', '.join(extra)}){flag}")
        elif t["value"] is None:
            lines.append(f"  {t['what']:<40} {'?':>10} of ceiling  (goal >= {t['goal']})"
                         f"  no verdict: ceiling mis-measured{flag}")
        else:
            lines.append(f"  {t['what']:<40} {t['value']:>10.2f} of ceiling"
                         f"  (goal >= {t['goal']})  {'ok' if t['met'] else 'SHORT'}{flag}")
        lines.append(_wrap(t["means"], "      means: ", "             "))
    return "\n".join(lines)


def _series_label(row):
    return f"{row['label']} {row['threads']}t"


def plot(results, path):
    """Draw fraction of ceiling and speed-ups against size: one row of panels per
    rule, one line per implementation (colour), float32 solid and float64 dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    sweep = [c for c in results["cases"] if c["kind"] == "sweep"]
    rules = [k for k in RULES if any(c["rule"] == k for c in sweep)]
    if not rules:
        raise ValueError("no size sweep in the results to plot")
    has_torch = any(r["impl"] == "torch" for c in sweep for r in c["rows"])
    panels = [("frac_ceiling", "fraction of ceiling", False),
              ("speedup_vs_numpy", "speed-up over NumPy", True)]
    if has_torch:
        panels.append(("speedup_vs_torch", "speed-up over fastest torch", True))
    styles = {"float32": "-", "float64": "--"}
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = []
    for c in sweep:
        for r in c["rows"]:
            if _series_label(r) not in names:
                names.append(_series_label(r))
    colors = {name: cycle[i % len(cycle)] for i, name in enumerate(names)}
    dtypes = [d for d in styles if any(c["dtype"] == d for c in sweep)]
    n_legend = len(names) + len(dtypes)
    legend_rows = -(-n_legend // 4)
    height = 3.2 * len(rules) + 0.3 * legend_rows + 0.3
    fig, axes = plt.subplots(len(rules), len(panels), squeeze=False,
                             figsize=(5.2 * len(panels), height))
    for ri, rule in enumerate(rules):
        top = {key: 0.0 for key, _, _ in panels}
        for dtype in dtypes:
            cases = sorted((c for c in sweep if c["rule"] == rule and c["dtype"] == dtype),
                           key=lambda c: c["size"])
            series = {}
            for c in cases:
                for r in c["rows"]:
                    series.setdefault(_series_label(r), []).append((c["size"], r))
            for name, pts in series.items():
                for pi, (key, title, logy) in enumerate(panels):
                    xy = [(n, r[key]) for n, r in pts if r[key] is not None]
                    if not xy:
                        continue
                    top[key] = max(top[key], max(y for _, y in xy))
                    axes[ri][pi].plot(*zip(*xy), styles[dtype], marker="o", ms=3,
                                      color=colors[name])
        for pi, (key, title, logy) in enumerate(panels):
            ax = axes[ri][pi]
            ax.set_xscale("log", base=2)
            ax.axhline(1.0, color="gray", lw=0.8)
            if logy:
                ax.set_yscale("log")
            else:   # above 1 is noise: keep the scale where the information is
                ax.set_ylim(0, max(1.1, min(2.0, top[key] * 1.05)))
            ax.set_title(f"{RULES[rule].title}: {title}", fontsize=10)
            ax.set_xlabel("elements")
            ax.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], color=colors[n], marker="o", ms=3) for n in names]
    handles += [Line2D([], [], color="black", ls=styles[d]) for d in dtypes]
    fig.legend(handles, names + dtypes, loc="lower center", ncol=4, fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, (0.3 * legend_rows + 0.2) / height, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal)."""

    def __init__(self, total, enabled):
        self.total = total
        self.done = 0
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.label = ""

    def start(self, label):
        self.label = label
        self.draw(0, 1)

    def draw(self, rep, reps):
        if not self.enabled:
            return
        frac = (self.done + rep / max(reps, 1)) / max(self.total, 1)
        width = 28
        fill = int(round(frac * width))
        elapsed = time.perf_counter() - self.t0
        sys.stderr.write(f"\r\033[K[{'#' * fill}{'.' * (width - fill)}] "
                         f"{self.done}/{self.total} {self.label} rep {rep}/{reps}"
                         f"  {elapsed:5.0f} s")
        sys.stderr.flush()

    def finish_case(self):
        self.done += 1

    def clear(self):
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


# ----------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------

def parse_size(text):
    """'16384', '2^14', '2**14', '1e6' or '4M'/'16k' (powers of 1024) -> an int > 0."""
    s = text.strip().lower().replace("_", "")
    m = re.fullmatch(r"2(\^|\*\*)(\d+)", s)
    if m:
        n = 1 << int(m.group(2))
    else:
        m = re.fullmatch(r"(\d+)([kmg])", s)
        if m:
            n = int(m.group(1)) * 1024 ** "kmg".index(m.group(2)) * 1024
        else:
            try:
                v = float(s)
            except ValueError:
                raise ValueError(f"bad size {text!r}: use e.g. 16384, 2^14, 1e6 or 16k") \
                    from None
            if not v.is_integer():
                raise ValueError(f"bad size {text!r}: not a whole number")
            n = int(v)
    if n <= 0:
        raise ValueError(f"bad size {text!r}: must be positive")
    return n


def _parse_threads(text, n_procs):
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part in ("all", "max", "-1"):
            n = n_procs
        else:
            try:
                n = int(part)
            except ValueError:
                raise ValueError(f"bad thread count {part!r}: use integers or 'all'") \
                    from None
            if n <= 0:
                raise ValueError(f"bad thread count {part!r}: must be positive")
        if n not in out:
            out.append(n)
    return sorted(out)


def _import_torch():
    try:
        import torch as _torch
    except ImportError:
        return None
    return _torch


def cpu_model():
    """The CPU's name: /proc/cpuinfo's "model name" (Linux), else platform.processor(),
    else the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("model name", "cpu model", "hardware") \
                        and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


#: the default run: every rule at one in-cache and one memory-bound size, float32
DEFAULT_SIZES = (1 << 16, 1 << 24)
DEFAULT_DTYPES = ("float32",)
#: --full: the whole matrix
FULL_SIZES = (1 << 14, 1 << 18, 1 << 22, 1 << 25)
FULL_DTYPES = ("float32", "float64")
#: --quick: a smoke test
QUICK_SIZES = (1 << 14, 1 << 18, 1 << 24)
QUICK_DTYPES = ("float32",)
OVERHEAD_SIZE = 16
#: sweep sizes above this warm up on a prefix of the arrays instead of a full call
WARM_FULL_MAX = 1 << 22


def plan_cases(rules, sizes, dtypes, model=True, overhead=True):
    """The cases a run measures, in order: (kind, rule key, dtype, elements) with kind
    "sweep" (one array), "model" (the transformer's parameter list, elements None) or
    "overhead" (one 16-element array). ``model``: True for every rule, False for none,
    or a list of rule keys."""
    plan = [("sweep", r, np.dtype(dt).name, int(n))
            for dt in dtypes for n in sizes for r in rules]
    if model:
        plan += [("model", r, "float32", None) for r in rules
                 if model is True or r in model]
    if overhead:
        plan += [("overhead", r, "float32", OVERHEAD_SIZE) for r in rules]
    return plan


def run(rules, sizes, dtypes, threads, profile, torch=None, model=True, overhead=True,
        out=None, progress=False, targets=False):
    """Run every case of :func:`plan_cases` and return the results dict (what
    ``--json`` writes). Each case's block of the table is printed to ``out`` (default
    sys.stdout) as it completes. ``targets``: also check the developers' targets."""
    out = sys.stdout if out is None else out
    t_start = time.perf_counter()
    whole_run = OtherLoad()
    plan = plan_cases(rules, sizes, dtypes, model, overhead)
    bar = _Progress(len(plan), progress)
    saved_fo = _config._num_threads
    saved_torch = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(max(threads))
    policy = SerialPolicy()
    cases = []
    max_state = max(RULES[r].n_state for r in rules)
    try:
        cache_key, arrays = None, None
        for kind, key, dtype, n in plan:
            rule = RULES[key]
            if (kind, dtype, n) != cache_key:
                arrays = None
                gc.collect()
                shapes = transformer_shapes() if kind == "model" else [(n,)]
                arrays = Arrays(shapes, dtype, max_state)
                cache_key = (kind, dtype, n)
            label = ("transformer" if kind == "model"
                     else f"{n} elem" if kind == "overhead" else "")
            bar.start(f"{rule.title} {dtype} {label or _fmt_size(n)}")
            warm_prefix = (min(1 << 18, n) if kind == "sweep" and n > WARM_FULL_MAX
                           else None)
            case = _run_case(kind, rule, arrays, threads, torch, profile, bar.draw,
                             warm_prefix=warm_prefix,
                             with_optimizer_class=(kind in ("overhead", "model")),
                             label=label, policy=policy)
            cases.append(case)
            bar.finish_case()
            bar.clear()
            print(format_case(case) + "\n", file=out, flush=True)
        arrays = None
    finally:
        bar.clear()
        policy.restore()
        _config._num_threads = saved_fo
        if torch is not None:
            torch.set_num_threads(saved_torch)
        gc.collect()
    results = {
        "meta": _meta(threads, torch, profile),
        "cases": cases,
        "targets": check_targets(cases) if targets else None,
        "notes": run_notes(cases),
        "disturbed_cases": [case_name(c) for c in cases if c["disturbed"]],
    }
    results["meta"]["runtime_s"] = time.perf_counter() - t_start
    results["meta"]["other_load_cores"] = whole_run.cores()
    return results


def _meta(threads, torch, profile):
    cfg = _config.config()
    return {
        "fastoptim": cfg,
        "cpu_model": cpu_model(),
        "numpy": np.__version__,
        "torch": torch.__version__ if torch is not None else None,
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "profile": vars(profile),
        "ratios": "ratio of the medians shown (time_s of one row over another's)",
        "ceiling_slack": CEILING_SLACK,
        "busy_warn_cores": BUSY_WARN,
        "layout": {"stagger_bytes": STAGGER_BYTES, "stagger_slots": STAGGER_SLOTS,
                   "base_align": _BASE_ALIGN},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "timer": "time.perf_counter_ns",
    }


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m fastoptim.bench",
        description="Time fastoptim's update rules against the NumPy reference, "
                    "torch.optim and a same-traffic memory ceiling measured in the "
                    "same run. The default run (about a minute on an idle 2-core "
                    "machine) measures every rule at 2^16 and 2^24 float32 elements, "
                    "the parameter list of a small transformer and a 16-element step; "
                    "--full measures the whole matrix.")
    p.add_argument("--full", action="store_true",
                   help="the whole matrix: sizes 2^14,2^18,2^22,2^25 in float32 and "
                        "float64 (several minutes)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: shorter blocks, fewer repetitions, sizes "
                        "2^14,2^18,2^24, the transformer for Adam only (~20 s)")
    p.add_argument("--rules", default=",".join(RULES),
                   help=f"comma-separated rules (default: all: {','.join(RULES)})")
    p.add_argument("--sizes", default=None,
                   help="comma-separated element counts, e.g. 2^14,2^18,1e6 "
                        "(default 2^16,2^24; --full: 2^14,2^18,2^22,2^25; --quick: "
                        "2^14,2^18,2^24)")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated: float32,float64 (default float32; --full: "
                        "both)")
    p.add_argument("--threads", default="1,all",
                   help="thread counts for fastoptim and the ceiling, e.g. 1,2 or "
                        "1,all (default); torch runs on the largest")
    p.add_argument("--targets", action="store_true",
                   help="also check the developers' performance targets and say what "
                        "each one means")
    p.add_argument("--no-torch", action="store_true", help="leave torch out")
    p.add_argument("--no-model", action="store_true",
                   help="skip the small-transformer parameter list (--quick runs it "
                        "for Adam only)")
    p.add_argument("--no-overhead", action="store_true",
                   help="skip the 16-element per-call overhead case")
    p.add_argument("--block-ms", type=float, default=None,
                   help="target duration of one timed block (default 10; quick 4)")
    p.add_argument("--case-s", type=float, default=None,
                   help="target duration of one case (default 0.9; quick 0.2)")
    p.add_argument("--pause-ms", type=float, default=None,
                   help="pause before each block's warm-up (default 5; quick 3)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the cases the run would measure, and exit")
    p.add_argument("--json", metavar="PATH", help="write all results as JSON")
    p.add_argument("--plot", metavar="PATH",
                   help="draw a PNG: fraction of ceiling and speed-ups against size")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


class Options:
    """The checked command line: what to run and how to report it."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def plan(self):
        return plan_cases(self.rules, self.sizes, self.dtypes, self.model, self.overhead)


def parse_options(argv=None):
    """The command line -> :class:`Options` (ValueError for bad values)."""
    args = _parser().parse_args(argv)
    if args.full and args.quick:
        raise ValueError("--full and --quick exclude each other")
    matrix = "full" if args.full else "quick" if args.quick else "default"
    rules = [r.strip().lower().replace("-", "_") for r in args.rules.split(",")
             if r.strip()]
    for r in rules:
        if r not in RULES:
            raise ValueError(f"unknown rule {r!r}; choose from {', '.join(RULES)}")
    if args.sizes:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    else:
        sizes = list({"full": FULL_SIZES, "quick": QUICK_SIZES,
                      "default": DEFAULT_SIZES}[matrix])
    names = (args.dtypes.split(",") if args.dtypes else
             {"full": FULL_DTYPES, "quick": QUICK_DTYPES, "default": DEFAULT_DTYPES}[matrix])
    dtypes = []
    for d in names:
        d = d.strip().lower()
        d = {"fp32": "float32", "fp64": "float64"}.get(d, d)
        if d not in ("float32", "float64"):
            raise ValueError(f"dtype {d!r} is not float32 or float64")
        dtypes.append(d)
    threads = _parse_threads(args.threads, max(1, _kernels.omp_num_procs()))
    if not rules or not sizes or not dtypes:
        raise ValueError("nothing to run: --rules, --sizes and --dtypes must be "
                         "non-empty")
    base = PROFILES["quick" if args.quick else "default"]
    profile = Profile(
        block_s=(args.block_ms / 1e3 if args.block_ms is not None else base.block_s),
        case_s=args.case_s if args.case_s is not None else base.case_s,
        min_reps=base.min_reps, max_reps=base.max_reps,
        pause_s=(args.pause_ms / 1e3 if args.pause_ms is not None else base.pause_s))
    model = not args.no_model
    if model and args.quick:    # the transformer case once, for Adam (or the first rule)
        model = ["adam"] if "adam" in rules else rules[:1]
    return Options(matrix=matrix, rules=rules, sizes=sizes, dtypes=dtypes,
                   threads=threads, profile=profile, model=model,
                   overhead=not args.no_overhead, targets=args.targets,
                   use_torch=not args.no_torch, json=args.json, plot=args.plot,
                   progress=not args.no_progress, dry_run=args.dry_run)


def _header(opts, torch):
    cfg = _config.config()
    what = {"default": "default run: every rule at 2^16 (in cache) and 2^24 (memory-"
                       "bound) float32 elements, the transformer parameter list, the "
                       "16-element step (--full: the whole matrix, several minutes)",
            "full": "--full: the whole matrix",
            "quick": "--quick: a smoke test (short blocks, few repetitions)"}[opts.matrix]
    custom = [flag for flag, on in (("--sizes", opts.sizes != list(
        {"full": FULL_SIZES, "quick": QUICK_SIZES, "default": DEFAULT_SIZES}[opts.matrix])),
        ("--rules", opts.rules != list(RULES))) if on]
    if custom:
        what += f" (narrowed by {', '.join(custom)})"
    return (f"fastoptim {cfg['version']} benchmark on {cpu_model()} "
            f"({os.cpu_count()} logical CPUs, {platform.machine()})\n"
            f"kernel path {cfg['kernel_path']} (CPU level {cfg['cpu_level']}), OpenMP "
            f"{'on' if cfg['openmp'] else 'off'}, fastoptim threads "
            f"{','.join(map(str, opts.threads))}; numpy {np.__version__}; "
            + (f"torch {torch.__version__} on {max(opts.threads)} threads"
               if torch is not None else "torch not "
               + ("used" if not opts.use_torch else "installed"))
            + f"\n{_wrap(what, '', '  ')}\n\n{LEGEND}\n")


def main(argv=None):
    t0 = time.perf_counter()
    err = sys.stderr
    try:
        opts = parse_options(argv)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=err)
        return 2
    if opts.dry_run:
        plan = opts.plan()
        print(f"{opts.matrix} run: {len(plan)} cases")
        for kind, key, dtype, n in plan:
            size = "transformer" if kind == "model" else (
                f"{n} elem" if kind == "overhead" else _fmt_size(n))
            print(f"  {kind:<9}{RULES[key].title:<13}{dtype:<8}{size}")
        return 0
    if opts.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib (pip install matplotlib, or "
                  "fastoptim[plot])", file=err)
            return 2
    for path in (opts.json, opts.plot):
        if path:
            d = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(d):
                print(f"error: directory {d} does not exist", file=err)
                return 2
    torch = _import_torch() if opts.use_torch else None
    print(_header(opts, torch), flush=True)
    results = run(opts.rules, opts.sizes, opts.dtypes, opts.threads, opts.profile,
                  torch=torch, model=opts.model, overhead=opts.overhead,
                  progress=opts.progress and err.isatty(), targets=opts.targets)
    threads = max(opts.threads)
    print(_wrap(f"Summary: fastoptim = one functional call; foN = on N threads; GB/s, "
                f"x numpy and x torch for fo{threads}; * = ran on one thread (below its "
                f"serial threshold)", "", "  "))
    print(format_summary(results["cases"]))
    if opts.targets:
        print(f"\nTargets (developers' goals, fastoptim on {threads} threads)")
        print(format_targets(results["targets"]))
    for note in results["notes"]:
        print("\n" + _wrap(note, "", "  "))
    wall = time.perf_counter() - t0
    results["meta"]["wall_s"] = wall
    other = results["meta"]["other_load_cores"]
    print(f"\nwall time {wall:.1f} s"
          + (f"; other processes kept {other:.2f} cores busy on average"
             if other is not None else ""))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=1, allow_nan=True)
        print(f"wrote {opts.json}")
    if opts.plot:
        plot(results, opts.plot)
        print(f"wrote {opts.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
