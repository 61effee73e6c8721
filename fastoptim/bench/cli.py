"""The command line: ``python -m fastoptim.bench`` and the ``fastoptim-bench`` script
(options parsed and checked, the header, :func:`main`)."""
import argparse
import json
import os
import platform
import re
import sys
import time

import numpy as np

from .. import _config
from .report import LEGEND, _fmt_size, _wrap, format_summary, format_targets, plot
from .rules import RULES
from .runner import (DEFAULT_DTYPES, DEFAULT_SIZES, FULL_DTYPES, FULL_SIZES, QUICK_DTYPES,
                     QUICK_SIZES, cpu_model, plan_cases, run)
from .timing import PROFILES, Profile

_kernels = _config._kernels


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


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m fastoptim.bench",
        description="Time fastoptim's update rules against the NumPy reference, "
                    "torch.optim and a same-traffic memory ceiling measured in the "
                    "same run. The default run (about two and a half minutes on an idle 2-core "
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
        w = max([13] + [len(RULES[key].title) + 1 for _, key, _, _ in plan])
        for kind, key, dtype, n in plan:
            size = "transformer" if kind == "model" else (
                f"{n} elem" if kind == "overhead" else _fmt_size(n))
            print(f"  {kind:<9}{RULES[key].title:<{w}}{dtype:<8}{size}")
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
