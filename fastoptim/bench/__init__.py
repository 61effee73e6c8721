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

Layout: ``rules`` (the rules as the benchmark runs them), ``threads`` (the serial
threshold: threads a row really used), ``arrays`` (the shared arrays and their
layout), ``contenders``, ``timing`` (measuring, the rows), ``cases`` (one case
measured), ``report`` (tables, notes, targets, plot), ``runner`` (the cases of a run,
:func:`run`), ``cli`` (the command line, :func:`main`). The names other code uses are
re-exported here.

This package is not imported by ``import fastoptim``; torch and matplotlib are imported
only when used.
"""
# the names code and tests use as fastoptim.bench.<name> (the submodules are their homes)
from .arrays import STAGGER_BYTES, STAGGER_SLOTS, Arrays, carve_arrays  # noqa: F401
from .cases import BUSY_WARN, CEILING_SLACK, case_name, transformer_shapes  # noqa: F401
from .cli import Options, main, parse_options, parse_size  # noqa: F401
from .contenders import Contender, build_contenders  # noqa: F401
from .report import (LEGEND, TARGET_IN_CACHE_ADAM, TARGET_MEMORY_BOUND,  # noqa: F401
                     _fmt_threads, check_targets, format_case, format_summary,
                     format_targets, plot, run_notes)
from .rules import RULES, Rule, bytes_per_element  # noqa: F401
from .runner import (DEFAULT_DTYPES, DEFAULT_SIZES, FULL_DTYPES, FULL_SIZES,  # noqa: F401
                     OVERHEAD_SIZE, QUICK_DTYPES, QUICK_SIZES, WARM_FULL_MAX, cpu_model,
                     plan_cases, run)
from .threads import SerialPolicy  # noqa: F401
from .timing import PROFILES, OtherLoad, Profile, measure, summarize  # noqa: F401

__all__ = ["main", "run", "carve_arrays", "RULES", "bytes_per_element", "parse_size",
           "parse_options", "plan_cases", "measure", "summarize"]
