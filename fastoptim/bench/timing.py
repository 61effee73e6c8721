"""Timing: other processes' load, the timing profiles, the interleaved measurement and
the rows (medians and their ratios) made from it."""
import gc
import os
import time

import numpy as np


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
