"""Train a small MLP on scikit-learn's bundled digits data (8x8 images, no download)
with ``torch.optim.Adam`` and ``fastoptim.torch.Adam`` side by side.

    python examples/mlp_digits.py                 # loss curves, accuracy, timings
    python examples/mlp_digits.py --hidden 1024   # a bigger model: a memory-bound step
    python examples/mlp_digits.py --layers 12     # many tensors: one call vs one per tensor
    python examples/mlp_digits.py --plot loss.png # and a picture of the loss curves

Both runs start from the same weights and see the same mini-batches, so their loss
curves and accuracies agree (to rounding). Then every optimizer (torch's for-loop,
foreach and fused Adam, fastoptim.torch's, and the NumPy class fastoptim.Adam on views
of the same tensors, which runs the same kernels) trains its own copy of the model in
alternating blocks of steps, and the script reports per training step the median time
of forward+backward, of ``optimizer.step()`` and of the whole step: the forward and
backward time, against a control that makes no step at all, shows whether an
optimizer slows the torch work around it.

Needs torch and scikit-learn (``pip install torch scikit-learn``).
"""
import argparse
import copy
import statistics
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import fastoptim
import fastoptim.torch as fot


def data(seed=0):
    digits = load_digits()
    x = digits.data.astype(np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    xtr, xte, ytr, yte = train_test_split(x, digits.target, test_size=0.2,
                                          random_state=seed, stratify=digits.target)
    return (torch.from_numpy(xtr), torch.from_numpy(ytr).long(),
            torch.from_numpy(xte), torch.from_numpy(yte).long())


def mlp(hidden, layers=2, seed=0):
    """64 -> hidden -> ... (``layers`` hidden layers) -> 10, ReLU between."""
    torch.manual_seed(seed)
    sizes = [64] + [hidden] * layers
    mods = []
    for a, b in zip(sizes, sizes[1:]):
        mods += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*mods, torch.nn.Linear(sizes[-1], 10))


def batches(n, batch, epochs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield perm[i:i + batch]


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def side_by_side(args, xtr, ytr, xte, yte):
    """Same start, same batches: torch.optim.Adam vs fastoptim.torch.Adam."""
    runs = {}
    for label, cls in (("torch.optim.Adam", torch.optim.Adam),
                       ("fastoptim.torch.Adam", fot.Adam)):
        model = mlp(args.hidden, args.layers)
        opt = cls(model.parameters(), lr=args.lr)
        losses, epoch_loss, steps = [], [], 0
        per_epoch = len(xtr) // args.batch
        for idx in batches(len(xtr), args.batch, args.epochs):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
            epoch_loss.append(loss.item())
            steps += 1
            if steps % per_epoch == 0:
                losses.append(statistics.fmean(epoch_loss))
                epoch_loss = []
        runs[label] = dict(model=model, losses=losses, acc=accuracy(model, xte, yte))
    (ta, a), (tb, b) = runs.items()
    print(f"MLP 64-{'-'.join([str(args.hidden)] * args.layers)}-10 "
          f"({sum(p.numel() for p in a['model'].parameters())} parameters), "
          f"Adam lr={args.lr}, batch {args.batch}, {args.epochs} epochs")
    print(f"{'epoch':>5}  {ta:>18}  {tb:>20}")
    for e, (la, lb) in enumerate(zip(a["losses"], b["losses"]), 1):
        print(f"{e:>5}  {la:>18.6f}  {lb:>20.6f}")
    print(f"test accuracy: {ta} {a['acc']:.4f}, {tb} {b['acc']:.4f}")
    diff = max((p - q).abs().max().item() for p, q in
               zip(a["model"].parameters(), b["model"].parameters()))
    print(f"largest weight difference after training: {diff:.3g}")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(range(1, len(a["losses"]) + 1), a["losses"], "o-", label=ta)
        ax.plot(range(1, len(b["losses"]) + 1), b["losses"], "x--", label=tb)
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss (cross-entropy)")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title("digits MLP: the same run, two optimizers")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"loss curves written to {args.plot}")
    return runs


class _NoStep(torch.optim.Optimizer):
    """The control: zero_grad and a step that does nothing."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


class _NumpyClass:
    """``fastoptim.Adam`` (the NumPy class) on zero-copy NumPy views of the parameters
    and their gradients: the very kernels under fastoptim.torch, with the NumPy class's
    cost per step instead of the drop-in's (what fastoptim.torch aims to match)."""

    def __init__(self, params, lr):
        self.params = list(params)
        self.inner = fastoptim.Adam([p.detach().numpy() for p in self.params], lr=lr)

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        self.inner.step([None if p.grad is None else p.grad.numpy() for p in self.params])


def timings(args, xtr, ytr):
    """Median times per training step, contenders interleaved in blocks."""
    makers = {
        "no optimizer (fwd+bwd alone)": lambda ps: _NoStep(ps),
        "torch.optim.Adam (for-loop)": lambda ps: torch.optim.Adam(ps, lr=args.lr, foreach=False),
        "torch.optim.Adam foreach": lambda ps: torch.optim.Adam(ps, lr=args.lr, foreach=True),
        "torch.optim.Adam fused": lambda ps: torch.optim.Adam(ps, lr=args.lr, fused=True),
        "fastoptim.torch.Adam": lambda ps: fot.Adam(ps, lr=args.lr),
        "fastoptim.Adam (NumPy class)": lambda ps: _NumpyClass(ps, args.lr),
    }
    base = mlp(args.hidden, args.layers)
    runs = {}
    for label, make in makers.items():
        model = copy.deepcopy(base)
        runs[label] = dict(model=model, opt=make(model.parameters()), fb=[], step=[],
                           whole=[])
    order = list(batches(len(xtr), args.batch, 1000))
    pos = 0
    clock = time.perf_counter
    for block in range(args.blocks + 1):            # block 0 is a warm-up
        for label, r in runs.items():
            model, opt = r["model"], r["opt"]
            for _ in range(args.block_steps):
                idx = order[pos % len(order)]
                pos += 1
                t0 = clock()
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
                loss.backward()
                t1 = clock()
                opt.step()
                t2 = clock()
                if block:
                    r["fb"].append(t1 - t0)
                    r["step"].append(t2 - t1)
                    r["whole"].append(t2 - t0)
    n = sum(p.numel() for p in base.parameters())
    print(f"\ntimes per training step, median of {args.blocks * args.block_steps} steps "
          f"in {args.blocks} interleaved blocks ({n} parameters in "
          f"{len(list(base.parameters()))} tensors, batch {args.batch}, "
          f"torch threads {torch.get_num_threads()}, fastoptim threads "
          f"{fot._threads()}, kernel path {fastoptim.config()['kernel_path']})")
    print(f"{'optimizer':<30} {'fwd+bwd':>10} {'step()':>10} {'whole step':>11}")
    ref = statistics.median(runs["torch.optim.Adam fused"]["step"])
    for label, r in runs.items():
        med = {k: statistics.median(r[k]) * 1e6 for k in ("fb", "step", "whole")}
        speed = (f"   (step {ref * 1e6 / med['step']:.2f}x fused's speed)"
                 if not isinstance(r["opt"], _NoStep) else "")
        print(f"{label:<30} {med['fb']:>8.0f}us {med['step']:>8.0f}us {med['whole']:>9.0f}us"
              f"{speed}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256, help="width of the hidden layers")
    ap.add_argument("--layers", type=int, default=2, help="number of hidden layers")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--blocks", type=int, default=10, help="interleaved timing blocks")
    ap.add_argument("--block-steps", type=int, default=20, help="steps per timing block")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (fastoptim follows it)")
    ap.add_argument("--plot", default=None, help="save the loss curves to this file")
    ap.add_argument("--no-timing", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    xtr, ytr, xte, yte = data()
    side_by_side(args, xtr, ytr, xte, yte)
    if not args.no_timing:
        timings(args, xtr, ytr)


if __name__ == "__main__":
    main()
