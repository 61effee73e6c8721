"""Compressed optimizer state (bfloat16, 8-bit): speed past the fp32 ceiling, and convergence.

    python bench/bf16_state.py [--plot docs/images/bf16.png] [--size 25] [--reps 15]

1. Speed: Adam at 2^size float32 elements, all threads. Contenders run interleaved, rep
   by rep in rotated order, each after an untimed call, on arrays carved from one
   buffer at staggered offsets (the same layout for everyone): fastoptim with float32
   state, with bfloat16 state (nearest and stochastic rounding) and with 8-bit blockwise
   state; the same-traffic ceilings of each (a compiled loop moving exactly the bytes
   the rule moves, no arithmetic: 28 B/element with float32 state, 20 with bfloat16,
   16 with 8-bit); torch's fused Adam, and bitsandbytes' and torchao's 8-bit Adam
   where installed. Each is given against the fp32 ceiling and against its own. Also
   the 196-array transformer list of the benchmark command.
2. Convergence: a two-layer MLP on scikit-learn's digits (bundled, no download), plain
   NumPy forward/backward, trained with fastoptim.Adam with float32, bfloat16 and 8-bit
   state (8-bit for the 64x128 weight, float32 for the arrays under 4096 values); the
   loss curves go to the plot.
"""
import argparse
import time

import numpy as np

import fastoptim
from fastoptim import _config, formats as FM
from fastoptim.bench import transformer_shapes

_k = _config._kernels


def carve(sizes, dtype, stagger=576):
    """Arrays of the given sizes from one buffer, each starting 4 KiB-aligned plus
    (k mod 7) * stagger bytes: no two at a large power-of-two distance."""
    itemsize = np.dtype(dtype).itemsize
    offsets, pos = [], 0
    for k, n in enumerate(sizes):
        pos = -(-pos // 4096) * 4096 + (k % 7) * stagger
        offsets.append(pos)
        pos += n * itemsize
    buf = np.zeros(pos + 4096, np.uint8)
    base = (-buf.ctypes.data) % 4096
    out = []
    for off, n in zip(offsets, sizes):
        out.append(buf[base + off: base + off + n * itemsize].view(dtype))
    return out


def interleave(contenders, reps):
    times = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn = contenders[name]
            fn()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def speed(shapes, reps, torch):
    sizes = [int(np.prod(s)) for s in shapes]
    n = len(sizes)
    rng = np.random.default_rng(0)
    f32 = carve(sizes * 4, np.float32)               # p, g, m, v (float32 state)
    p, g, m, v = f32[:n], f32[n:2 * n], f32[2 * n:3 * n], f32[3 * n:]
    for a in p + g:
        a[...] = rng.standard_normal(a.size)
    b16 = carve(sizes * 2, np.uint16)
    bm, bv = b16[:n], b16[n:]
    q8 = carve(sizes * 2, np.uint8)                   # 8-bit codes, and block scales
    qm, qv = q8[:n], q8[n:]
    zero = int(np.flatnonzero(FM.dynamic_map(True) == 0)[0])
    for a in qm:
        a[...] = zero
    am = [np.zeros(-(-k // FM.BLOCK), np.float32) for k in sizes]
    av = [np.zeros(-(-k // FM.BLOCK), np.float32) for k in sizes]
    steps = [np.zeros(n, np.int64) for _ in range(4)]
    threads = _config.get_num_threads()
    F = fastoptim.functional
    c = {
        "fp32 state": lambda: F.adam_(p, g, m, v, None, steps[0]),
        "bf16 state, nearest": lambda: F.adam_(
            p, g, bm, bv, None, steps[1], state_dtype="bfloat16"),
        "bf16 state, stochastic": lambda: F.adam_(
            p, g, bm, bv, None, steps[2], state_dtype="bfloat16", rounding="stochastic"),
        "8-bit state": lambda: F.adam_(p, g, qm, qv, None, steps[3], state_dtype="8bit",
                                       absmaxes=[am, av, None]),
        "fp32 ceiling (28 B/el)": lambda: _k.prepare_traffic(p, g, [m, v]).run(threads),
        "bf16 ceiling (20 B/el)": lambda: _k.prepare_traffic(p, g, [bm, bv]).run(threads),
        "8-bit ceiling (16 B/el)": lambda: _k.prepare_traffic(
            p, g, [qm, qv], [am, av]).run(threads),
    }
    own = {"fp32 state": "fp32 ceiling (28 B/el)",
           "bf16 state, nearest": "bf16 ceiling (20 B/el)",
           "bf16 state, stochastic": "bf16 ceiling (20 B/el)",
           "8-bit state": "8-bit ceiling (16 B/el)"}
    if torch is not None:
        tp = [torch.from_numpy(x) for x in p]
        for t, x in zip(tp, g):
            t.grad = torch.from_numpy(x)
        opt = torch.optim.Adam(tp, fused=True)
        opt.step()
        for t, x, y in zip(tp, m, v):               # same layout as ours
            opt.state[t]["exp_avg"] = torch.from_numpy(x)
            opt.state[t]["exp_avg_sq"] = torch.from_numpy(y)
        c["torch fused (fp32)"] = opt.step
        for label, make in _others(torch):
            # their own copies of the parameters (they allocate their own state)
            theirs = [torch.from_numpy(x.copy()).requires_grad_() for x in p]
            for t, x in zip(theirs, g):
                t.grad = torch.from_numpy(x)
            c[label] = make(theirs).step
    t = interleave(c, reps)
    base = np.median(t["fp32 ceiling (28 B/el)"])
    total = sum(sizes)
    print(f"  {'contender':26s} {'time/step':>11s} {'x fp32 ceiling':>15s} "
          f"{'x own ceiling':>14s} {'x torch fused':>14s}")
    for name, ts in t.items():
        med = np.median(ts)
        vs_torch = (np.median(t["torch fused (fp32)"]) / med) if torch is not None else float("nan")
        mine = f"{np.median(t[own[name]]) / med:14.2f}" if name in own else f"{'':14s}"
        print(f"  {name:26s} {med * 1e3:9.2f} ms {base / med:15.2f} {mine} {vs_torch:14.2f}")
    return total


def _others(torch):
    """The other CPU 8-bit Adams, where installed: (label, optimizer factory)."""
    out = []
    try:
        import bitsandbytes as bnb
        out.append(("bitsandbytes Adam8bit", lambda ps: bnb.optim.Adam8bit(ps)))
    except ImportError:
        print("  (bitsandbytes not installed: pip install bitsandbytes==0.50.2)")
    try:
        from torchao.optim import Adam8bit as AoAdam8bit
        out.append(("torchao Adam8bit", lambda ps: AoAdam8bit(ps)))
    except ImportError:
        print("  (torchao not installed: pip install torchao)")
    return out


def mlp_digits(state_kw, epochs=60, seed=0):
    from sklearn.datasets import load_digits
    d = load_digits()
    X = (d.data / 16.0).astype(np.float32)
    y = d.target
    rng = np.random.default_rng(seed)
    W1 = (rng.standard_normal((64, 128)) / 8).astype(np.float32)
    b1 = np.zeros(128, np.float32)
    W2 = (rng.standard_normal((128, 10)) / 11).astype(np.float32)
    b2 = np.zeros(10, np.float32)
    opt = fastoptim.Adam([W1, b1, W2, b2], lr=3e-3, **state_kw)
    losses = []
    order = np.random.default_rng(1)
    for _ in range(epochs):
        idx = order.permutation(len(X))
        for s in range(0, len(X), 64):
            xb, yb = X[idx[s:s + 64]], y[idx[s:s + 64]]
            h = np.maximum(xb @ W1 + b1, 0)
            z = h @ W2 + b2
            z -= z.max(1, keepdims=True)
            pr = np.exp(z)
            pr /= pr.sum(1, keepdims=True)
            losses.append(float(-np.log(pr[np.arange(len(yb)), yb] + 1e-12).mean()))
            dz = pr
            dz[np.arange(len(yb)), yb] -= 1
            dz /= len(yb)
            dh = (dz @ W2.T) * (h > 0)
            opt.step([(xb.T @ dh).astype(np.float32), dh.sum(0), (h.T @ dz).astype(np.float32),
                      dz.sum(0)])
    acc = float(((np.maximum(X @ W1 + b1, 0) @ W2 + b2).argmax(1) == y).mean())
    return np.array(losses), acc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=25, help="log2 of the element count")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    try:
        import torch
        torch.set_num_threads(_config.get_num_threads())
    except ImportError:
        torch = None
    print(f"Adam float32, one array of 2^{args.size} elements, "
          f"{_config.get_num_threads()} threads")
    speed([(1 << args.size,)], args.reps, torch)
    shapes = transformer_shapes()
    print(f"Adam float32, transformer list ({len(shapes)} arrays, "
          f"{sum(int(np.prod(s)) for s in shapes):,} values)")
    speed(shapes, args.reps, torch)
    curves = {}
    for label, kw in [("fp32 state", {}), ("bf16 state, nearest", dict(state_dtype="bfloat16")),
                      ("bf16 state, stochastic", dict(state_dtype="bfloat16",
                                                      rounding="stochastic")),
                      # (W1, 8192 values, keeps 8-bit state; the smaller arrays float32)
                      ("8-bit state", dict(state_dtype="8bit"))]:
        losses, acc = mlp_digits(kw)
        curves[label] = losses
        print(f"digits MLP, {label:24s}: final loss (last 100 steps) "
              f"{losses[-100:].mean():.4f}, train accuracy {acc:.4f}")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, losses in curves.items():
            smooth = np.convolve(losses, np.ones(50) / 50, mode="valid")
            ax.plot(smooth, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (50-step mean)")
        ax.set_title("Adam on a digits MLP: float32, bfloat16 and 8-bit optimizer state")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
