"""The run: the cases a run measures (:func:`plan_cases`), each measured and printed in
order (:func:`run`), and the facts about the machine recorded with them."""
import gc
import os
import platform
import sys
import time

import numpy as np

from .. import _config
from .arrays import _BASE_ALIGN, STAGGER_BYTES, STAGGER_SLOTS, Arrays
from .cases import (BUSY_WARN, CEILING_SLACK, _fmt_size, _run_case, case_name,
                    transformer_shapes)
from .report import _Progress, check_targets, format_case, run_notes
from .rules import RULES
from .threads import SerialPolicy
from .timing import OtherLoad


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
