"""fastoptim.torch against torch.optim's fused Adam, and against the NumPy class on the
same kernels: optimizer steps alone, and whole training steps of a real model.

    python bench/dropin.py [--threads 1,2] [--reps 25]

1. ``step()`` alone, Adam, float32, on four parameter lists: the 196 tensors of the
   benchmark's GPT-style transformer (8.8 M values), 512 tensors of 64x64 (LoRA
   adapters, deep narrow nets), 196 tensors of 16 values (pure per-parameter cost) and
   one 16-value tensor. Contenders: torch.optim.Adam(fused=True), fastoptim.torch.Adam,
   and fastoptim.Adam (the NumPy class, on its own arrays of the same shapes). They run
   interleaved, block by block in rotated order, each block after one untimed step
   (and each contender first after three, which create its state and plan); the
   figures are medians of the blocks, the ratios ratios of those medians.
2. Whole training steps (zero_grad, forward, backward, step) of a small
   ``nn.TransformerEncoder`` language model (4 layers, d=256, vocabulary 4096, 16 x 32
   tokens a batch), torch fused Adam against fastoptim.torch.Adam, interleaved the
   same way, torch's own threads working alongside the optimizer's.

Each row runs on 1 and on 2 threads (``torch.set_num_threads``, which fastoptim.torch
follows). The machine (CPU, kernel path) is printed first.
"""
import argparse
import platform
import statistics
import time

import numpy as np
import torch

import fastoptim
import fastoptim.torch as fot
from fastoptim.bench import transformer_shapes


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def interleaved(fns, reps, target_s=0.02):
    """Median seconds per call of each function, blocks interleaved in rotated order.
    Each runs three untimed calls before the one that sizes its blocks: an optimizer's
    first steps create its state and plan its groups (fastoptim.torch keeps a plan from
    its second step on), and a block sized by such a step would hold one or two calls."""
    for f in fns.values():
        for _ in range(3):
            f()
    calls = {}
    for name, f in fns.items():
        t = time.perf_counter()
        f()
        calls[name] = max(1, int(target_s / max(time.perf_counter() - t, 1e-7)))
    times = {name: [] for name in fns}
    order = list(fns)
    for _ in range(reps):
        order = order[1:] + order[:1]
        for name in order:
            f, k = fns[name], calls[name]
            f()                                      # untimed: wakes the threads
            t = time.perf_counter()
            for _ in range(k):
                f()
            times[name].append((time.perf_counter() - t) / k)
    return {name: statistics.median(v) for name, v in times.items()}


CASES = {
    "GPT-style model, 196 tensors": lambda: transformer_shapes(),
    "512 tensors of 64x64": lambda: [(64, 64)] * 512,
    "196 tensors of 16": lambda: [(16,)] * 196,
    "one tensor of 16": lambda: [(16,)],
}


def step_case(shapes, reps):
    gen = torch.Generator().manual_seed(0)

    def model():
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        return ps
    fused, ours = model(), model()
    arrays = [p.detach().numpy().copy() for p in model()]
    grads = [np.random.default_rng(1).standard_normal(a.shape).astype(np.float32)
             for a in arrays]
    o_fused = torch.optim.Adam(fused, lr=1e-4, fused=True)
    o_ours = fot.Adam(ours, lr=1e-4)
    o_np = fastoptim.Adam(arrays, lr=1e-4)
    return interleaved({"torch fused": o_fused.step, "fastoptim.torch": o_ours.step,
                        "NumPy class": lambda: o_np.step(grads)}, reps)


class LM(torch.nn.Module):
    def __init__(self, vocab=4096, d=256, layers=4, heads=4):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        layer = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0,
                                                 batch_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = torch.nn.Linear(d, vocab)

    def forward(self, x):
        return self.out(self.enc(self.emb(x)))


def train_case(reps):
    torch.manual_seed(0)
    base = LM()
    x = torch.randint(0, 4096, (16, 32))
    y = torch.randint(0, 4096, (16, 32))
    runs = {}
    for name, make in (("torch fused", lambda ps: torch.optim.Adam(ps, lr=1e-4, fused=True)),
                       ("fastoptim.torch", lambda ps: fot.Adam(ps, lr=1e-4))):
        model = LM()
        model.load_state_dict(base.state_dict())
        opt = make(model.parameters())

        def train_step(model=model, opt=opt):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
            opt.step()
        runs[name] = train_step
    n = sum(p.numel() for p in base.parameters())
    return interleaved(runs, reps, target_s=0.1), n, len(list(base.parameters()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=25)
    args = ap.parse_args(argv)
    print(f"CPU {cpu_name()}, kernel path {fastoptim.config()['kernel_path']}, "
          f"torch {torch.__version__}")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        print(f"\n{threads} thread(s): Adam step() alone, median per step "
              f"(x fused = torch fused's time / this one's)")
        print(f"  {'case':<30} {'torch fused':>12} {'fastoptim.torch':>16} "
              f"{'NumPy class':>12}  {'x fused':>8} {'vs NumPy class':>15}")
        for label, shapes in CASES.items():
            t = step_case(shapes(), args.reps)
            f, o, c = t["torch fused"], t["fastoptim.torch"], t["NumPy class"]
            print(f"  {label:<30} {f * 1e6:>10.1f}us {o * 1e6:>14.1f}us {c * 1e6:>10.1f}us"
                  f"  {f / o:>7.2f}x {o / c:>14.2f}x")
        t, n, k = train_case(max(20, args.reps))
        f, o = t["torch fused"], t["fastoptim.torch"]
        print(f"  whole training step, TransformerEncoder LM ({n / 1e6:.1f} M values in {k} "
              f"tensors): torch fused {f * 1e3:.1f} ms, fastoptim.torch {o * 1e3:.1f} ms "
              f"({f / o:.2f}x)")


if __name__ == "__main__":
    main()
