"""Endurance: many steps with flat memory and no reference leaks.

By default 100,000 small steps (a few microseconds each) and 1,000 large ones
(2^20-element arrays, a few milliseconds each), a few seconds in all; the tests marked
slow repeat them ten times longer (``pytest -m slow``). Memory is the process's
resident set (VmRSS, Linux), read after a warm-up and at the end; references are
``sys.getrefcount`` of every input object, and the count of objects the garbage
collector tracks.
"""
import gc
import os
import pickle
import sys

import numpy as np
import pytest

import fastoptim
from fastoptim import functional as F

MiB = 1 << 20


def rss_bytes():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    pytest.skip("resident set size needs /proc/self/status (Linux)")


def refcounts(objs):
    return [sys.getrefcount(o) for o in objs]


class Budget:
    """Measure RSS, references and tracked objects around a loop (after warm-up)."""

    def __init__(self, objs):
        self.objs = objs

    def __enter__(self):
        gc.collect()
        self.refs = refcounts(self.objs)
        self.n_objects = len(gc.get_objects())
        self.rss = rss_bytes()
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return False
        gc.collect()
        self.rss_after = rss_bytes()
        self.growth = self.rss_after - self.rss
        self.refs_after = refcounts(self.objs)
        self.objects_growth = len(gc.get_objects()) - self.n_objects
        return False

    def check(self, max_growth, label):
        print(f"{label}: RSS {self.rss / MiB:.1f} MiB -> {self.rss_after / MiB:.1f} MiB "
              f"({self.growth / 1024:+.0f} KiB), gc objects {self.objects_growth:+d}")
        assert self.refs_after == self.refs, "a step leaked references to its inputs"
        assert self.objects_growth < 100, f"{self.objects_growth} more tracked objects"
        if os.environ.get("FASTOPTIM_SANITIZED"):
            return       # scripts/sanitize.sh: ASan's quarantine holds freed memory
        assert self.growth < max_growth, (
            f"{label}: resident memory grew by {self.growth / MiB:.2f} MiB")


SMALL = [pytest.param(100_000, id="100k"),
         pytest.param(1_000_000, id="1M", marks=pytest.mark.slow)]
LARGE = [pytest.param(1_000, id="1k"),
         pytest.param(10_000, id="10k", marks=pytest.mark.slow)]


def _small_problem():
    params = [np.ones(16, np.float32), np.ones((4, 8)), np.ones(3, np.float32),
              np.ones((), np.float64)]
    grads = [np.full(p.shape, 1e-3, p.dtype) for p in params]
    grads[1] = np.asfortranarray(np.full((4, 8), 1e-3))    # another order: copied
    return params, grads


@pytest.mark.parametrize("nsteps", SMALL)
def test_small_steps_of_every_optimizer_keep_memory_flat(nsteps):
    params, grads = _small_problem()
    opts = [fastoptim.SGD([params[0]], lr=1e-3, momentum=0.9),
            fastoptim.Adagrad([params[1]], lr=1e-3),
            fastoptim.RMSprop([params[2]], lr=1e-3, centered=True),
            fastoptim.AdamW([params[3]], lr=1e-3)]
    group_grads = [[g] for g in grads]
    for _ in range(2000):                                     # warm-up
        for opt, g in zip(opts, group_grads):
            opt.step(g)
    state_arrays = [a for opt in opts for st in opt.state.values()
                    for a in st.values() if isinstance(a, np.ndarray)]
    with Budget(params + grads + state_arrays + opts) as b:
        for _ in range(nsteps // len(opts)):
            for opt, g in zip(opts, group_grads):
                opt.step(g)
        for k in range(1000):
            opts[1].step([None])                              # skipped parameter
    b.check(2 * MiB, f"{nsteps} small optimizer steps")
    assert opts[3].state[0]["step"] == 2000 + nsteps // len(opts)
    assert all(np.isfinite(p).all() for p in params)


@pytest.mark.parametrize("nsteps", SMALL)
def test_small_functional_calls_keep_memory_flat(nsteps):
    params, grads = _small_problem()
    ms = [np.zeros_like(p) for p in params]
    vs = [np.zeros_like(p) for p in params]
    steps = np.zeros(len(params), np.int64)
    lr, betas = 1e-3, (0.9, 0.999)
    for _ in range(2000):
        F.adam_(params, grads, ms, vs, None, steps, lr=lr, betas=betas)
    with Budget(params + grads + ms + vs + [steps, lr, betas, params, grads]) as b:
        for _ in range(nsteps):
            F.adam_(params, grads, ms, vs, None, steps, lr=lr, betas=betas)
    b.check(2 * MiB, f"{nsteps} adam_ calls")
    assert (steps == 2000 + nsteps).all()


def test_refused_calls_leak_nothing():
    params, grads = _small_problem()
    ms = [np.zeros_like(p) for p in params]
    vs = [np.zeros_like(p) for p in params]
    steps = np.zeros(len(params), np.int64)
    bad = list(grads)
    bad[2] = params[2]                                        # overlaps: refused
    opt = fastoptim.Adam(params, lr=1e-3)
    opt.step(grads)
    for _ in range(100):
        for fn in (lambda: F.adam_(params, bad, ms, vs, None, steps),
                   lambda: opt.step(bad), lambda: F.adam_(params, grads, ms, vs, None,
                                                            steps, lr=float("nan"))):
            with pytest.raises(ValueError):
                fn()
    with Budget(params + grads + bad + ms + vs + [steps, opt]) as b:
        for _ in range(20_000):
            for fn in (lambda: F.adam_(params, bad, ms, vs, None, steps),
                       lambda: opt.step(bad), lambda: F.adam_(params, grads, ms, vs, None,
                                                                steps, lr=float("nan"))):
                try:
                    fn()
                except ValueError:
                    pass
    b.check(2 * MiB, "60,000 refused calls")
    assert (steps == 0).all()


@pytest.mark.parametrize("nsteps", LARGE)
def test_large_steps_keep_memory_flat(nsteps):
    # 2^20 elements per step: 3/4 in a C-ordered parameter, 1/4 in an F-ordered one
    # whose C-ordered gradient is copied at every step
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(3 << 18).astype(np.float32),
              np.asfortranarray(rng.standard_normal((256, 1024)).astype(np.float32))]
    grads = [np.full(3 << 18, 1e-3, np.float32),
             np.ascontiguousarray(np.full((256, 1024), -1e-3, np.float32))]
    opt = fastoptim.Adam(params, lr=1e-4)
    for _ in range(20):
        opt.step(grads)
    state_arrays = [a for st in opt.state.values() for a in st.values()
                    if isinstance(a, np.ndarray)]
    with Budget(params + grads + state_arrays + [opt]) as b:
        for _ in range(nsteps):
            opt.step(grads)
    # a leaked gradient copy would be 1 MiB per step
    b.check(8 * MiB, f"{nsteps} steps of 2^20 elements")
    assert opt.state[1]["step"] == 20 + nsteps


def test_state_dict_round_trips_keep_memory_flat():
    params = [np.ones(1 << 16, np.float32), np.ones((64, 64))]
    opt = fastoptim.Adam(params, lr=1e-3, amsgrad=True)
    grads = [np.full(p.shape, 1e-3, p.dtype) for p in params]
    opt.step(grads)
    for _ in range(50):
        opt.load_state_dict(pickle.loads(pickle.dumps(opt.state_dict())))
    with Budget(params + grads + [opt]) as b:
        for _ in range(1000):
            opt.load_state_dict(pickle.loads(pickle.dumps(opt.state_dict())))
            opt.step(grads)
    b.check(4 * MiB, "1,000 state-dict round trips")
