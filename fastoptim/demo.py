"""Every optimizer from the same start on each landscape: pictures and a summary.

    python -m fastoptim.demo --out demo-figures      # or: fastoptim-demo --out ...
    python -m fastoptim.demo --no-plots              # the text summary only

writes, for each landscape of :mod:`fastoptim.landscapes`, ``<name>.png`` (contours
with every optimizer's path, and loss against step), an ``overview.png`` with all
the paths, and ``summary.txt`` (also printed): per optimizer, the steps it took to
reach the tolerance (or to escape the saddle), the final loss, the distance to the
saddle, and how often it reversed direction (zig-zag).

The settings below are chosen to tell the story of why plain gradient steps
struggle, and the tests (tests/test_second_order.py) assert its facts from them:

* near a saddle the gradient vanishes: plain SGD started near the ridge creeps
  into the saddle and stalls, while momentum and the adaptive methods (whose steps do
  not shrink with the gradient) escape; plain Newton jumps *into* the saddle (it seeks
  any stationary point) and saddle-free Newton, using |H|, is repelled by it;
* in a narrow valley a constant step overshoots across it: SGD zig-zags, Newton
  (the quadratic model is exact) lands on the minimum in one step.

Every run uses the compiled optimizers (``fastoptim.SGD``, ``Adam``, ...) on one
float64 parameter of two elements. AdaHessian gets its Hessian diagonal from one
Hutchinson sample per step (a fixed seed), as it would in training.
matplotlib is needed for the figures only (``pip install fastoptim[plot]``).
"""
import argparse
import math
import os
import sys

import numpy as np

from . import landscapes as _landscapes
from .hessian import hutchinson_diag
from .optim import (SGD, Adadelta, AdaHessian, Adagrad, Adam, Adamax, Lion, Newton, RAdam,
                    RMSprop, Rprop, SophiaH)

__all__ = ["CONTENDERS", "SETTINGS", "Contender", "Run", "run", "run_all", "summary",
           "plot_landscape", "plot_overview", "main"]


class Contender:
    """An optimizer of the demo: a label, a plot colour, what its step needs
    (``"grad"``, ``"hessian_diag"`` or ``"hessian"``) and how to build it from a
    landscape's settings."""

    def __init__(self, label, color, needs, make):
        self.label, self.color, self.needs, self.make = label, color, needs, make

    def __repr__(self):
        return f"Contender({self.label!r})"


#: the optimizers, in plotting order; ``make(params, settings)`` builds one
CONTENDERS = [
    Contender("SGD", "#d62728", "grad",
              lambda p, s: SGD(p, lr=s["lr_sgd"])),
    Contender("SGD momentum 0.9", "#ff7f0e", "grad",
              lambda p, s: SGD(p, lr=s["lr_sgd"], momentum=0.9)),
    Contender("Adagrad", "#8c564b", "grad",
              lambda p, s: Adagrad(p, lr=s["lr_adagrad"])),
    Contender("RMSprop", "#e377c2", "grad",
              lambda p, s: RMSprop(p, lr=s["lr_adaptive"], alpha=0.9)),
    Contender("Adam", "#1f77b4", "grad",
              lambda p, s: Adam(p, lr=s["lr_adaptive"])),
    Contender("Adamax", "#aec7e8", "grad",
              lambda p, s: Adamax(p, lr=s["lr_adaptive"])),
    Contender("RAdam", "#393b79", "grad",
              lambda p, s: RAdam(p, lr=s["lr_adaptive"])),
    Contender("Adadelta", "#bcbd22", "grad",
              lambda p, s: Adadelta(p, lr=1.0)),
    Contender("Rprop", "#7f7f7f", "grad",
              lambda p, s: Rprop(p, lr=s["lr_adaptive"])),
    Contender("Lion", "#f7b6d2", "grad",
              lambda p, s: Lion(p, lr=s["lr_adaptive"])),
    Contender("AdaHessian", "#17becf", "hessian_diag",
              lambda p, s: AdaHessian(p, lr=s["lr_adahessian"])),
    # (an estimate at every step; the clip rho = 1 lets a step be a full lr per element)
    Contender("SophiaH", "#8c6d31", "hessian_diag",
              lambda p, s: SophiaH(p, lr=s["lr_adaptive"], p=1.0, update_period=1)),
    Contender("Newton", "#2ca02c", "hessian",
              lambda p, s: Newton(p, lr=s["lr_newton"], damping=s["damping"])),
    Contender("saddle-free Newton", "#9467bd", "hessian",
              lambda p, s: Newton(p, lr=s["lr_newton"], damping=s["damping"],
                                  saddle_free=True)),
]

# AdaHessian's step with lr=1 would be a (momentum-averaged) diagonal Newton step;
# 0.3 (the paper uses 0.15 for stochastic training) keeps its momentum from
# overshooting where the Hessian is not diagonal, and the curved valleys get 1.
_COMMON = dict(tol=1e-6, escape_radius=None, damping=1e-3, lr_newton=1.0,
               lr_adahessian=0.3)

#: per landscape: number of steps, learning rates, the loss tolerance counted as
#: "reached", and for saddles the distance from the saddle counted as "escaped"
SETTINGS = {
    # SGD with lr 0.01 grows y by 2% a step; momentum and the adaptive methods escape
    "saddle": dict(_COMMON, steps=150, lr_sgd=0.01, lr_adagrad=0.1, lr_adaptive=0.05,
                   escape_radius=1.4),
    "monkey": dict(_COMMON, steps=300, lr_sgd=0.01, lr_adagrad=0.1, lr_adaptive=0.02,
                   escape_radius=1.4),
    "plateau": dict(_COMMON, steps=300, lr_sgd=0.1, lr_adagrad=0.3, lr_adaptive=0.05),
    # lr_sgd * (largest curvature at the start, ~1500) = 3: SGD overshoots at first
    "rosenbrock": dict(_COMMON, steps=2000, lr_sgd=2e-3, lr_adagrad=0.5,
                       lr_adaptive=0.05, lr_adahessian=1.0),
    # lr_sgd * 25 = 1.875 (stable below 2): the steep coordinate flips sign each step
    "quadratic": dict(_COMMON, steps=200, lr_sgd=0.075, lr_adagrad=0.5, lr_adaptive=0.1,
                      damping=0.0),
    "beale": dict(_COMMON, steps=1000, lr_sgd=2e-3, lr_adagrad=1.0, lr_adaptive=0.05,
                  lr_adahessian=1.0, damping=1.0),
}


class Run:
    """One optimizer's path on one landscape.

    ``path`` (steps+1, 2) and ``losses`` (steps+1,) include the start. ``status`` is
    ``"ran"`` (all steps), ``"escaped"`` (went farther than the escape radius from the
    saddle; the run stops there), ``"diverged"`` (non-finite, or far outside the
    window) or ``"failed: ..."`` (the optimizer refused, e.g. a singular Hessian)."""

    def __init__(self, landscape, contender, path, losses, status, settings):
        self.landscape, self.contender = landscape, contender
        self.path, self.losses, self.status = path, losses, status
        self.settings = settings

    @property
    def label(self):
        return self.contender.label

    @property
    def steps(self):
        return len(self.path) - 1

    @property
    def final_loss(self):
        return float(self.losses[-1])

    def gap(self):
        """f - f_min along the path (None for landscapes unbounded below)."""
        fmin = self.landscape.f_min
        return None if fmin is None else self.losses - fmin

    def reached(self):
        """First step at which f - f_min <= tol, or None."""
        gap = self.gap()
        if gap is None:
            return None
        hit = np.nonzero(gap <= self.settings["tol"])[0]
        return int(hit[0]) if hit.size else None

    def saddle_distance(self):
        """Distance from the (first) saddle along the path, or None."""
        if not self.landscape.saddles:
            return None
        return np.linalg.norm(self.path - np.asarray(self.landscape.saddles[0]), axis=1)

    def escaped(self):
        """Step at which the path left the escape radius around the saddle, or None."""
        r = self.settings.get("escape_radius")
        d = self.saddle_distance()
        if r is None or d is None:
            return None
        hit = np.nonzero(d > r)[0]
        return int(hit[0]) if hit.size else None

    def reversals(self):
        """Steps that turn back by more than 90 degrees from the previous step
        (zig-zag), among steps longer than 1e-12."""
        d = np.diff(self.path, axis=0)
        d = d[np.linalg.norm(d, axis=1) > 1e-12]
        if len(d) < 2:
            return 0
        return int(np.sum(np.einsum("ij,ij->i", d[1:], d[:-1]) < 0))


def run(landscape, contender, settings=None, *, steps=None, start=None, seed=0):
    """Run one contender on one landscape; return a :class:`Run`."""
    if isinstance(landscape, str):
        landscape = _landscapes.get(landscape)
    if isinstance(contender, str):
        contender = _contender(contender)
    s = dict(SETTINGS.get(landscape.name, _COMMON) if settings is None else settings)
    nsteps = s["steps"] if steps is None else int(steps)
    p = np.array(landscape.start if start is None else start, dtype=np.float64)
    opt = contender.make([p], s)
    rng = np.random.default_rng(seed)
    (x0, x1), (y0, y1) = landscape.bounds
    far = 10 * max(x1 - x0, y1 - y0)
    path, losses = [p.copy()], [float(landscape.f(p))]
    status = "ran"
    r = s.get("escape_radius")
    saddle = np.asarray(landscape.saddles[0]) if landscape.saddles else None
    for _ in range(nsteps):
        g = landscape.grad(p)
        try:
            if contender.needs == "grad":
                opt.step([g])
            elif contender.needs == "hessian_diag":
                d = hutchinson_diag(lambda z: landscape.hvp(p, z), p, rng=rng)
                opt.step([g], [d])
            else:
                opt.step([g], [landscape.hessian(p)])
        except (ValueError, np.linalg.LinAlgError) as e:
            status = f"failed: {e}"
            break
        path.append(p.copy())
        losses.append(float(landscape.f(p)))
        if not np.all(np.isfinite(p)) or np.max(np.abs(p)) > far:
            status = "diverged"
            break
        if r is not None and np.linalg.norm(p - saddle) > r:
            status = "escaped"
            break
    return Run(landscape, contender, np.array(path), np.array(losses), status, s)


def _contender(label):
    for c in CONTENDERS:
        if c.label == label:
            return c
    raise ValueError(f"unknown optimizer {label!r}; known: "
                     f"{', '.join(c.label for c in CONTENDERS)}")


def run_all(names=None, contenders=None, seed=0):
    """{landscape name: [Run per contender]} for the given (default: all) landscapes."""
    names = list(_landscapes.LANDSCAPES) if names is None else list(names)
    contenders = CONTENDERS if contenders is None else contenders
    return {name: [run(_landscapes.get(name), c, seed=seed) for c in contenders]
            for name in names}


# --- the text summary -------------------------------------------------------------

def _fmt(x):
    if x is None:
        return "-"
    if isinstance(x, (int, np.integer)):
        return str(x)
    if x == 0:
        return "0"
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


def summary(results):
    """The text table for :func:`run_all`'s results."""
    lines = []
    for name, runs in results.items():
        ls = runs[0].landscape
        s = runs[0].settings
        lines.append(f"== {ls.title}")
        lines.append(f"   start {tuple(float(v) for v in ls.start)}, {s['steps']} steps")
        if ls.f_min is not None:
            lines.append(f"   minimum {ls.f_min:g} at "
                         f"{', '.join(str(tuple(m)) for m in ls.minima)}; "
                         f"'reached' = first step with f - f_min <= {s['tol']:g}")
        if s.get("escape_radius") is not None:
            lines.append(f"   saddle at {ls.saddles[0]}; 'escaped' = first step farther "
                         f"than {s['escape_radius']:g} from it (the run stops there)")
        head = f"   {'optimizer':<20}{'steps':>6}  "
        if ls.f_min is not None:
            head += f"{'reached':>8}  {'final f - f_min':>15}"
        else:
            head += f"{'escaped':>8}  {'final f':>10}  {'min dist':>9}  {'final dist':>10}"
        head += f"  {'zig-zag':>7}  status"
        lines.append(head)
        for r in runs:
            row = f"   {r.label:<20}{r.steps:>6}  "
            if ls.f_min is not None:
                gap = r.gap()[-1]
                row += f"{_fmt(r.reached()):>8}  {_fmt(float(gap)):>15}"
            else:
                d = r.saddle_distance()
                row += (f"{_fmt(r.escaped()):>8}  {_fmt(r.final_loss):>10}  "
                        f"{_fmt(float(d.min())):>9}  {_fmt(float(d[-1])):>10}")
            row += f"  {r.reversals():>7}  {r.status}"
            lines.append(row)
        lines.append("")
    lines.append("zig-zag: steps that turned back by more than 90 degrees from the "
                 "previous one.")
    return "\n".join(lines) + "\n"


# --- figures ----------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the figures need matplotlib: pip install 'fastoptim[plot]' "
                          "(or run with --no-plots for the text summary only)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _contours(ax, ls, n=300):
    (x0, x1), (y0, y1) = ls.bounds
    xs, ys = np.linspace(x0, x1, n), np.linspace(y0, y1, n)
    grid = np.stack(np.meshgrid(xs, ys))
    z = ls.f(grid)
    if ls.log_contours:
        fmin = ls.f_min or 0.0
        z = np.log10(z - fmin + 1e-3)
    ax.contourf(xs, ys, z, levels=30, cmap="Greys_r", alpha=0.55)
    ax.contour(xs, ys, z, levels=30, colors="k", linewidths=0.3, alpha=0.5)
    for m in ls.minima:
        ax.plot(*m, marker="*", color="gold", markersize=14, markeredgecolor="k", zorder=5)
    for sp in ls.saddles:
        ax.plot(*sp, marker="X", color="white", markersize=9, markeredgecolor="k", zorder=5)
    ax.plot(*ls.start, marker="o", color="k", markersize=6, zorder=6)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal")


def _paths(ax, runs, lw=1.6):
    # earlier contenders (plain SGD first) are drawn on top of later ones
    for k, r in enumerate(runs):
        z = 3 + (len(runs) - k) / (len(runs) + 1)
        ax.plot(r.path[:, 0], r.path[:, 1], "-", color=r.contender.color, lw=lw,
                label=r.label, alpha=0.9, zorder=z)
        ax.plot(r.path[-1, 0], r.path[-1, 1], "o", color=r.contender.color, ms=6,
                markeredgecolor="k", markeredgewidth=0.6, zorder=z + 4)
    radius = runs[0].settings.get("escape_radius")
    if radius is not None and runs[0].landscape.saddles:
        t = np.linspace(0, 2 * np.pi, 200)
        cx, cy = runs[0].landscape.saddles[0]
        ax.plot(cx + radius * np.cos(t), cy + radius * np.sin(t), ":", color="k",
                lw=0.9, zorder=2)


def plot_landscape(runs, path):
    """Contours with every path, and loss against step, for one landscape; for a
    saddle also the distance from the saddle against step (log scale)."""
    plt = _pyplot()
    ls = runs[0].landscape
    saddle = runs[0].settings.get("escape_radius") is not None and bool(ls.saddles)
    ncol = 3 if saddle else 2
    fig, axes = plt.subplots(1, ncol, figsize=(6.2 * ncol, 5.6),
                             gridspec_kw=dict(width_ratios=[1.1] + [1] * (ncol - 1)))
    ax0, ax1 = axes[0], axes[1]
    _contours(ax0, ls)
    _paths(ax0, runs)
    ax0.set_title(ls.title)
    ax0.set_xlabel("x")
    ax0.set_ylabel("y")
    for r in runs:
        steps = np.arange(len(r.losses))
        gap = r.gap()
        if gap is None:
            ax1.plot(steps, r.losses, color=r.contender.color, label=r.label, lw=1.6)
        else:
            ax1.semilogy(steps, np.maximum(gap, 1e-16), color=r.contender.color,
                         label=r.label, lw=1.6)
    if ls.f_min is None:
        ax1.set_ylabel("f (a run stops when it escapes)")
    else:
        ax1.set_ylabel("f - f_min")
        ax1.axhline(runs[0].settings["tol"], color="k", ls=":", lw=0.8)
    ax1.set_xlabel("step")
    ax1.set_title("loss against step")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8, loc="best")
    if saddle:
        ax2 = axes[2]
        floor = 1e-4      # a path that lands on the saddle is drawn at this floor
        for r in runs:
            ax2.semilogy(np.arange(len(r.path)), np.maximum(r.saddle_distance(), floor),
                         color=r.contender.color, label=r.label, lw=1.6)
        ax2.axhline(runs[0].settings["escape_radius"], color="k", ls=":", lw=0.8)
        ax2.set_ylim(floor / 2, 4 * runs[0].settings["escape_radius"])
        ax2.set_xlabel("step")
        ax2.set_ylabel(f"distance from the saddle (floor {floor:g})")
        ax2.set_title("escaping (up) or stalling (flat) at the saddle")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_overview(results, path):
    """All landscapes' contour plots with the paths, in one figure."""
    plt = _pyplot()
    names = list(results)
    ncol = 3 if len(names) > 4 else len(names)
    nrow = math.ceil(len(names) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 5.0 * nrow + 0.6),
                             squeeze=False)
    for ax, name in zip(axes.flat, names):
        runs = results[name]
        _contours(ax, runs[0].landscape, n=200)
        _paths(ax, runs, lw=1.4)
        ax.set_title(runs[0].landscape.title, fontsize=10)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    # (two rows: one row of 14 labels runs off the figure)
    fig.legend(handles, labels, loc="lower center", ncol=-(-len(labels) // 2), fontsize=9,
               frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --- command line -----------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="fastoptim-demo",
        description="Run every fastoptim optimizer from the same start on each test "
                    "landscape; write PNG figures and a text summary.")
    parser.add_argument("--out", default="fastoptim-demo",
                        help="output directory (created if needed; default: %(default)s)")
    parser.add_argument("--no-plots", action="store_true",
                        help="write only summary.txt (no matplotlib needed)")
    parser.add_argument("--landscape", action="append", metavar="NAME",
                        choices=list(_landscapes.LANDSCAPES),
                        help="only this landscape (repeatable; default: all of "
                             f"{', '.join(_landscapes.LANDSCAPES)})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of AdaHessian's Hutchinson samples (default: 0)")
    args = parser.parse_args(argv)

    plt = None
    if not args.no_plots:
        try:
            plt = _pyplot()
        except ImportError as e:
            parser.exit(2, f"fastoptim-demo: error: {e}\n")
    os.makedirs(args.out, exist_ok=True)
    results = run_all(args.landscape, seed=args.seed)
    text = summary(results)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write(text)
    sys.stdout.write(text)
    written = ["summary.txt"]
    if plt is not None:
        for name, runs in results.items():
            plot_landscape(runs, os.path.join(args.out, f"{name}.png"))
            written.append(f"{name}.png")
        plot_overview(results, os.path.join(args.out, "overview.png"))
        written.append("overview.png")
    print(f"wrote {', '.join(written)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
