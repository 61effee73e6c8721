"""Cases: one case measured (and re-measured once when a row beats its ceiling), the
transformer's parameter shapes, and the names of cases and rows."""
import time

import numpy as np

from .contenders import build_contenders
from .rules import bytes_per_element
from .threads import _CALIBRATION_MAX, SerialPolicy
from .timing import OtherLoad, Profile, measure, summarize

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


def _row_name(r):
    ran = f" (ran on {r['threads_used']})" if r["threads_used"] != r["threads"] else ""
    return f"{r['label']} {r['threads']} thr{ran}"


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
