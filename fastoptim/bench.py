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
  the whole list of arrays, on 1 thread and on all threads.

Every row reports GB/s (the rule's bytes per element times the elements, over the time),
the fraction of the ceiling on the same number of threads, and the speed-up over NumPy
and over the fastest torch variant. Two more cases: the parameter list of a small
transformer (~200 arrays, ~9 M values), and the per-call overhead of a 16-element step.

Measuring discipline (see the design notes; this 2-core VM needs all of it):

* Contenders run interleaved: each repetition runs every contender's block once, in an
  order rotated by one from the previous repetition.
* Before each timed block: a short pause, then one untimed warm-up call (waking a halted
  vCPU after >= 30 ms idle costs milliseconds; the warm-up absorbs it). For sizes far
  beyond the caches the warm-up runs the same contender on a prefix of the same arrays.
* A block runs ``k`` back-to-back calls (``k`` chosen once per contender so a block
  lasts about ``--block-ms``); the number of repetitions is chosen so that the case
  takes about its time budget. Results are medians over repetitions of per-repetition
  values; ratios (fraction of ceiling, speed-ups) are medians of per-repetition ratios.
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
import time

import numpy as np

from . import _config, functional, reference

__all__ = ["main", "run", "carve_arrays", "RULES", "bytes_per_element", "parse_size"]

_kernels = _config._kernels


# ----------------------------------------------------------------------------------
# Rules: hyperparameters and how each implementation is called
# ----------------------------------------------------------------------------------

class Rule:
    """One update rule as the benchmark runs it.

    ``call(module, params, grads, states, steps)`` runs one step through
    :mod:`fastoptim.functional` or :mod:`fastoptim.reference` (same signatures);
    ``states`` is a list of ``n_state`` lists of arrays. ``torch_state`` names torch's
    state entries in the same order as ``states``.
    """

    def __init__(self, key, title, n_state, call, torch_name, torch_kwargs,
                 torch_state, torch_fused):
        self.key = key
        self.title = title
        self.n_state = n_state
        self.call = call
        self.torch_name = torch_name
        self.torch_kwargs = torch_kwargs
        self.torch_state = torch_state
        self.torch_fused = torch_fused

    def __repr__(self):
        return f"Rule({self.key!r})"


RULES = {r.key: r for r in (
    Rule("sgd", "SGD", 0,
         lambda m, P, G, S, st: m.sgd_(P, G, None, None, lr=1e-3),
         "SGD", dict(lr=1e-3), (), True),
    Rule("sgd_momentum", "SGD-momentum", 1,
         lambda m, P, G, S, st: m.sgd_(P, G, S[0], st, lr=1e-3, momentum=0.9),
         "SGD", dict(lr=1e-3, momentum=0.9), ("momentum_buffer",), True),
    Rule("adagrad", "Adagrad", 1,
         lambda m, P, G, S, st: m.adagrad_(P, G, S[0], st, lr=1e-2),
         "Adagrad", dict(lr=1e-2), ("sum",), True),
    Rule("rmsprop", "RMSprop", 1,
         lambda m, P, G, S, st: m.rmsprop_(P, G, S[0], None, None, st, lr=1e-2),
         "RMSprop", dict(lr=1e-2), ("square_avg",), False),
    Rule("adam", "Adam", 2,
         lambda m, P, G, S, st: m.adam_(P, G, S[0], S[1], None, st, lr=1e-3),
         "Adam", dict(lr=1e-3), ("exp_avg", "exp_avg_sq"), True),
    Rule("adamw", "AdamW", 2,
         lambda m, P, G, S, st: m.adamw_(P, G, S[0], S[1], None, st, lr=1e-3,
                                         weight_decay=1e-2),
         "AdamW", dict(lr=1e-3, weight_decay=1e-2), ("exp_avg", "exp_avg_sq"), True),
)}


def bytes_per_element(rule, itemsize):
    """Bytes a step moves per element: read p, g and each state; write p and each state.

    fp32: plain SGD 12, one state array (SGD-momentum, Adagrad, RMSprop) 20, Adam 28."""
    return (3 + 2 * rule.n_state) * itemsize


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
    global state the call depends on (fastoptim's thread count); ``settle(calls,
    warms)``, after a block of that many calls and warm-ups, puts the arrays back as
    they were (the ceiling loop)."""

    def __init__(self, impl, variant, threads, call, warm=None, before=None,
                 settle=None, period=1):
        self.impl = impl            # "numpy", "fastoptim", "torch", "ceiling"
        self.variant = variant      # "", "optimizer class", "single-tensor", "foreach", "fused"
        self.threads = threads
        self.call = call
        self.warm = warm if warm is not None else call
        self.before = before
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


def _ceiling_contender(P, G, S, threads, warm=None):
    """The same-traffic loop on 1..``threads`` threads over P, G, S (``warm``: prefix
    views for the warm-up). Each call moves every value one step around the cycle
    p <- s0 <- s1 ... <- p (1 + len(S) arrays); ``settle`` completes the cycle."""
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

    return Contender("ceiling", "", threads, call, warm_call if warm else None,
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
                     with_optimizer_class=False, notes=None):
    """Every contender for ``rule`` on ``arrays``; ``threads`` is the list of thread
    counts for fastoptim and the ceiling (torch runs on the largest)."""
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
        out.append(_ceiling_contender(P, G, S, n, warm))
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
    "default": Profile(block_s=0.02, case_s=0.8, min_reps=3, max_reps=15, pause_s=0.005),
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
            c.warm()
            t = []
            while len(t) < 2 and sum(t) < profile.block_s:
                t0 = time.perf_counter_ns()
                c.call()
                t.append((time.perf_counter_ns() - t0) * 1e-9)
            if c.settle:
                c.settle(len(t), 1)
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
                time.sleep(profile.pause_s)
                t = _time_block(c, k[c.key])
                times[c.key].append(t)
                if c.settle:
                    c.settle(k[c.key], 1)
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


def summarize(contenders, times, nbytes):
    """Rows with medians and median per-repetition ratios."""
    reps = len(next(iter(times.values())))
    numpy_t = next((times[c.key] for c in contenders if c.impl == "numpy"), None)
    torch_keys = [c.key for c in contenders if c.impl == "torch"]
    best_torch = ([min(times[k][r] for k in torch_keys) for r in range(reps)]
                  if torch_keys else None)
    ceilings = {c.threads: times[c.key] for c in contenders if c.impl == "ceiling"}
    rows = []
    for c in contenders:
        t = times[c.key]
        med = _median(t)
        ceil_t = ceilings.get(c.threads)

        def ratio(ref):
            if ref is None:
                return None
            return _median([a / b for a, b in zip(ref, t)])
        rows.append({
            "impl": c.impl, "variant": c.variant, "threads": c.threads,
            "label": c.label,
            "time_s": med,
            "gbps": nbytes / med / 1e9,
            "frac_ceiling": ratio(ceil_t) if c.impl != "ceiling" else 1.0,
            "speedup_vs_numpy": ratio(numpy_t),
            "speedup_vs_torch": ratio(best_torch),
            "times_s": [float(x) for x in t],
        })
    return rows


# ----------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------

def transformer_shapes(vocab=8192, context=512, d=192, layers=16, mlp=4):
    """The parameter shapes of a small GPT-style transformer: 198 arrays, 8.8 M values,
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


def _run_case(kind, rule, arrays, threads, torch, profile, progress, warm_prefix=None,
              with_optimizer_class=False, label=""):
    notes = []
    arrays.reset_state()
    contenders = build_contenders(rule, arrays, threads, torch, warm_prefix,
                                  with_optimizer_class, notes)
    nbytes = bytes_per_element(rule, arrays.dtype.itemsize) * arrays.size
    load = OtherLoad()
    t0 = time.perf_counter()
    times, reps, k = measure(contenders, profile, progress)
    wall = time.perf_counter() - t0
    if not all(np.isfinite(a).all() for lst in [arrays.params] + arrays.states
               for a in lst):
        notes.append("some parameter or state values became non-finite during the "
                     "case; timings on such data may not be representative")
    other = load.cores()
    if other is not None and other >= BUSY_WARN:
        notes.append(f"other processes kept {other:.1f} cores busy during this case: "
                     f"multi-threaded timings are unreliable")
    rows = summarize(contenders, times, nbytes)
    for row, c in zip(rows, contenders):
        row["calls_per_block"] = k[c.key]
    ceiling = {str(r["threads"]): {"time_s": r["time_s"], "gbps": r["gbps"]}
               for r in rows if r["impl"] == "ceiling"}
    del contenders
    return {
        "kind": kind, "rule": rule.key, "title": rule.title, "dtype": arrays.dtype.name,
        "size": int(arrays.size), "n_arrays": len(arrays.params),
        "bytes_per_element": bytes_per_element(rule, arrays.dtype.itemsize),
        "bytes_per_step": int(nbytes), "reps": reps, "label": label,
        "other_load_cores": other, "wall_s": wall,
        "ceiling": ceiling, "rows": [r for r in rows if r["impl"] != "ceiling"],
        "notes": notes,
    }


# ----------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------

def _fmt_time(s):
    if s != s:
        return "-"
    for unit, f in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= f:
            return f"{s / f:7.2f} {unit}"
    return f"{s / 1e-9:7.0f} ns"


def _fmt_x(v, width=8, digits=2):
    return f"{'-':>{width}}" if v is None or v != v else f"{v:>{width}.{digits}f}"


def format_case(case):
    """The case's block of the table."""
    head = (f"{case['title']} {case['dtype']}  {case['label'] or _fmt_size(case['size'])}"
            f"  ({case['size']:,} elements in {case['n_arrays']} array"
            f"{'s' if case['n_arrays'] != 1 else ''}, {case['bytes_per_element']} B/element,"
            f" {case['bytes_per_step'] / 1e6:,.2f} MB/step, {case['reps']} reps)")
    ceil = ", ".join(f"{t} thr {c['gbps']:.1f} GB/s ({_fmt_time(c['time_s']).strip()})"
                     for t, c in case["ceiling"].items())
    lines = [head, f"  ceiling: {ceil}",
             f"  {'implementation':<28}{'thr':>4}{'time/step':>12}{'GB/s':>9}"
             f"{'of ceil':>9}{'x numpy':>9}{'x torch':>9}"]
    for r in case["rows"]:
        lines.append(f"  {r['label']:<28}{r['threads']:>4}{_fmt_time(r['time_s']):>12}"
                     f"{r['gbps']:>9.2f}{_fmt_x(r['frac_ceiling'], 9)}"
                     f"{_fmt_x(r['speedup_vs_numpy'], 9)}{_fmt_x(r['speedup_vs_torch'], 9)}")
    for note in case.get("notes", ()):
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def _fo_rows(case):
    return {r["threads"]: r for r in case["rows"]
            if r["impl"] == "fastoptim" and r["variant"] == ""}


def format_summary(cases):
    """One line per case: fastoptim on every thread count against the ceiling, NumPy
    and the fastest torch variant."""
    threads = sorted({t for c in cases for t in _fo_rows(c)})
    cols = "".join(f"{f'fo{t} GB/s':>11}{f'fo{t} ceil':>10}" for t in threads)
    lines = [f"{'rule':<13}{'dtype':<8}{'size':>12}{cols}{'x numpy':>9}{'x torch':>9}"
             f"  fastest torch"]
    for c in cases:
        fo = _fo_rows(c)
        best = fo.get(max(fo)) if fo else None
        torch_rows = [r for r in c["rows"] if r["impl"] == "torch"]
        fastest = min(torch_rows, key=lambda r: r["time_s"]) if torch_rows else None
        size = c["label"] or _fmt_size(c["size"])
        line = f"{c['title']:<13}{c['dtype']:<8}{size:>12}"
        for t in threads:
            r = fo.get(t)
            line += (f"{r['gbps']:>11.2f}{_fmt_x(r['frac_ceiling'], 10)}" if r
                     else f"{'-':>11}{'-':>10}")
        line += (_fmt_x(best["speedup_vs_numpy"] if best else None, 9)
                 + _fmt_x(best["speedup_vs_torch"] if best else None, 9))
        if fastest:
            line += f"  {fastest['variant']} {_fmt_time(fastest['time_s']).strip()}"
        lines.append(line)
    return "\n".join(lines)


def check_targets(cases):
    """The project's goals, checked against fastoptim on all threads: >= 0.95 of the
    ceiling at 2^25 elements and more, >= 0.7 for Adam at 2^14 and 2^18; and the
    16-element step's time next to torch's fastest and the kernel-module floor."""
    out = []
    for c in cases:
        fo = _fo_rows(c)
        if not fo:
            continue
        r = fo[max(fo)]
        frac = r["frac_ceiling"]
        what = f"{c['title']} {c['dtype']} {c['label'] or _fmt_size(c['size'])}"
        if c["kind"] == "sweep" and c["size"] >= 1 << 25:
            out.append({"what": what, "measure": "fraction of ceiling", "value": frac,
                        "goal": 0.95, "met": frac >= 0.95})
        elif (c["kind"] == "sweep" and c["rule"] == "adam"
              and c["size"] in (1 << 14, 1 << 18)):
            out.append({"what": what, "measure": "fraction of ceiling", "value": frac,
                        "goal": 0.7, "met": frac >= 0.7})
        elif c["kind"] == "overhead":
            torch_rows = [x for x in c["rows"] if x["impl"] == "torch"]
            ceil = c["ceiling"].get(str(r["threads"]))
            out.append({"what": what, "measure": "time per step (s)",
                        "value": r["time_s"],
                        "torch_fastest_s": min((x["time_s"] for x in torch_rows),
                                               default=None),
                        "kernel_floor_s": ceil["time_s"] if ceil else None,
                        "goal": None, "met": None})
    return out


def format_targets(targets):
    lines = []
    for t in targets:
        if t["goal"] is None:
            extra = []
            if t.get("torch_fastest_s"):
                extra.append(f"fastest torch {_fmt_time(t['torch_fastest_s']).strip()}")
            if t.get("kernel_floor_s"):
                extra.append(f"traffic-loop call {_fmt_time(t['kernel_floor_s']).strip()}")
            lines.append(f"  {t['what']:<34} {_fmt_time(t['value']).strip():>10} per step"
                         f"  ({', '.join(extra)})")
        else:
            lines.append(f"  {t['what']:<34} {t['value']:>10.2f} of ceiling"
                         f"  (goal >= {t['goal']})  {'ok' if t['met'] else 'SHORT'}")
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

#: other processes' load (in cores) above which a case gets a warning
BUSY_WARN = 0.25

DEFAULT_SIZES = (1 << 14, 1 << 18, 1 << 22, 1 << 25)
QUICK_SIZES = (1 << 14, 1 << 18, 1 << 24)
OVERHEAD_SIZE = 16
#: sweep sizes above this warm up on a prefix of the arrays instead of a full call
WARM_FULL_MAX = 1 << 22


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


def run(rules, sizes, dtypes, threads, profile, torch=None, model=True, overhead=True,
        out=sys.stdout, progress=False):
    """Run every case and return the results dict (what ``--json`` writes).

    ``model``: True for the transformer case of every rule, False for none, or a list
    of rule keys."""
    t_start = time.perf_counter()
    whole_run = OtherLoad()
    rules = [RULES[k] for k in rules]
    plan = [("sweep", r, dt, n) for dt in dtypes for n in sizes for r in rules]
    if model:
        plan += [("model", r, "float32", None) for r in rules
                 if model is True or r.key in model]
    if overhead:
        plan += [("overhead", r, "float32", OVERHEAD_SIZE) for r in rules]
    bar = _Progress(len(plan), progress)
    saved_fo = _config._num_threads
    saved_torch = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(max(threads))
    cases = []
    max_state = max(r.n_state for r in rules)
    try:
        cache_key, arrays = None, None
        for kind, rule, dtype, n in plan:
            key = (kind, dtype, n)
            if key != cache_key:
                arrays = None
                gc.collect()
                shapes = transformer_shapes() if kind == "model" else [(n,)]
                arrays = Arrays(shapes, dtype, max_state)
                cache_key = key
            label = ("transformer" if kind == "model"
                     else f"{n} elem" if kind == "overhead" else "")
            bar.start(f"{rule.title} {np.dtype(dtype).name} "
                      f"{label or _fmt_size(n)}")
            warm_prefix = (min(1 << 18, n) if kind == "sweep" and n > WARM_FULL_MAX
                           else None)
            case = _run_case(kind, rule, arrays, threads, torch, profile, bar.draw,
                             warm_prefix=warm_prefix,
                             with_optimizer_class=(kind in ("overhead", "model")),
                             label=label)
            cases.append(case)
            bar.finish_case()
            bar.clear()
            print(format_case(case) + "\n", file=out, flush=True)
        arrays = None
    finally:
        bar.clear()
        _config._num_threads = saved_fo
        if torch is not None:
            torch.set_num_threads(saved_torch)
        gc.collect()
    results = {
        "meta": _meta(threads, torch, profile),
        "cases": cases,
    }
    results["targets"] = check_targets(cases)
    results["meta"]["runtime_s"] = time.perf_counter() - t_start
    results["meta"]["other_load_cores"] = whole_run.cores()
    return results


def _meta(threads, torch, profile):
    cfg = _config.config()
    return {
        "fastoptim": cfg,
        "numpy": np.__version__,
        "torch": torch.__version__ if torch is not None else None,
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "profile": vars(profile),
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
                    "same run.")
    p.add_argument("--rules", default=",".join(RULES),
                   help=f"comma-separated rules (default: all: {','.join(RULES)})")
    p.add_argument("--sizes", default=None,
                   help="comma-separated element counts, e.g. 2^14,2^18,1e6 "
                        "(default 2^14,2^18,2^22,2^25; --quick: 2^14,2^18,2^24)")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated: float32,float64 (default both; --quick: "
                        "float32)")
    p.add_argument("--threads", default="1,all",
                   help="thread counts for fastoptim and the ceiling, e.g. 1,2 or "
                        "1,all (default); torch runs on the largest")
    p.add_argument("--quick", action="store_true",
                   help="shorter blocks, fewer repetitions, sizes and cases (~20 s "
                        "on an idle 2-core machine)")
    p.add_argument("--no-torch", action="store_true", help="leave torch out")
    p.add_argument("--no-model", action="store_true",
                   help="skip the small-transformer parameter list (--quick runs it "
                        "for Adam only)")
    p.add_argument("--no-overhead", action="store_true",
                   help="skip the 16-element per-call overhead case")
    p.add_argument("--block-ms", type=float, default=None,
                   help="target duration of one timed block (default 20; quick 4)")
    p.add_argument("--case-s", type=float, default=None,
                   help="target duration of one case (default 0.8; quick 0.2)")
    p.add_argument("--pause-ms", type=float, default=None,
                   help="pause before each block's warm-up (default 5; quick 3)")
    p.add_argument("--json", metavar="PATH", help="write all results as JSON")
    p.add_argument("--plot", metavar="PATH",
                   help="draw a PNG: fraction of ceiling and speed-ups against size")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    err = sys.stderr
    try:
        rules = [r.strip().lower().replace("-", "_") for r in args.rules.split(",")
                 if r.strip()]
        for r in rules:
            if r not in RULES:
                raise ValueError(f"unknown rule {r!r}; choose from {', '.join(RULES)}")
        if args.sizes:
            sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
        else:
            sizes = list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
        dtypes = [np.dtype({"fp32": "float32", "fp64": "float64"}.get(d.strip().lower(),
                                                                      d.strip().lower())).name
                  for d in (args.dtypes or ("float32" if args.quick
                                            else "float32,float64")).split(",")]
        for d in dtypes:
            if d not in ("float32", "float64"):
                raise ValueError(f"dtype {d!r} is not float32 or float64")
        threads = _parse_threads(args.threads, max(1, _kernels.omp_num_procs()))
        if not rules or not sizes or not dtypes:
            raise ValueError("nothing to run: --rules, --sizes and --dtypes must be "
                             "non-empty")
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=err)
        return 2
    base = PROFILES["quick" if args.quick else "default"]
    profile = Profile(
        block_s=(args.block_ms / 1e3 if args.block_ms is not None else base.block_s),
        case_s=args.case_s if args.case_s is not None else base.case_s,
        min_reps=base.min_reps, max_reps=base.max_reps,
        pause_s=(args.pause_ms / 1e3 if args.pause_ms is not None else base.pause_s))
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib (pip install matplotlib, or "
                  "fastoptim[plot])", file=err)
            return 2
    for path in (args.json, args.plot):
        if path:
            d = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(d):
                print(f"error: directory {d} does not exist", file=err)
                return 2
    torch = None if args.no_torch else _import_torch()

    cfg = _config.config()
    print(f"fastoptim {cfg['version']}: kernels {cfg['kernel_path']} "
          f"(cpu {cfg['cpu_level']}), OpenMP {'on' if cfg['openmp'] else 'off'}, "
          f"threads {threads}, serial threshold {cfg['serial_threshold']}; "
          f"numpy {np.__version__}; "
          + (f"torch {torch.__version__} on {max(threads)} threads"
             if torch is not None else "torch not "
             + ("used" if args.no_torch else "installed"))
          + f"\nfraction of ceiling = same-traffic loop time / time, on the same "
          f"threads; x numpy, x torch = their time / this time (fastest torch "
          f"variant); medians of per-rep values\n", flush=True)
    model = not args.no_model
    if model and args.quick:    # the transformer case once, for Adam (or the first rule)
        model = ["adam"] if "adam" in rules else rules[:1]
    results = run(rules, sizes, dtypes, threads, profile, torch=torch,
                  model=model, overhead=not args.no_overhead,
                  progress=not args.no_progress and err.isatty())
    print("Summary (fastoptim = one functional call; foN = N threads)")
    print(format_summary(results["cases"]))
    if results["targets"]:
        print("\nTargets (fastoptim on all threads)")
        print(format_targets(results["targets"]))
    other = results["meta"]["other_load_cores"]
    print(f"\ntotal {results['meta']['runtime_s']:.1f} s"
          + (f"; other processes kept {other:.2f} cores busy on average" if other is not None
             else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, allow_nan=True)
        print(f"wrote {args.json}")
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
