"""Output: the legend, each case's table, the summary, the run's notes, the developers'
targets, the plot and the progress bar."""
import sys
import textwrap
import time

from .cases import CEILING_SLACK, _fmt_size, _row_name, case_name
from .rules import RULES

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
    w = max([13] + [len(c["title"]) + 1 for c in cases])     # (AdamWScheduleFree: 17)
    lines = [f"{'rule':<{w}}{'dtype':<8}{'size':>12}{cols}{'GB/s':>8}{'x numpy':>9}"
             f"{'x torch':>9}  fastest torch"]
    for c in cases:
        fo = _fo_rows(c)
        best = fo.get(max(fo)) if fo else None
        torch_rows = [r for r in c["rows"] if r["impl"] == "torch"]
        fastest = min(torch_rows, key=lambda r: r["time_s"]) if torch_rows else None
        size = c["label"] or _fmt_size(c["size"])
        line = f"{c['title']:<{w}}{c['dtype']:<8}{size:>12}"
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
