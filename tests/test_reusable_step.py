"""A prepared Step made reusable (what fastoptim.torch keeps between steps): each run
after set_grads() equals a fresh prepare_* with those gradients, bit for bit; refusals
change nothing; the gradients given to prepare_* are let go."""
import gc
import weakref

import numpy as np
import pytest

from fastoptim import _config, reference as R

K = _config._kernels


def _arrays(seed=0, shapes=((7,), (1000,), (33, 5))):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def _adam(params, grads, m, v, steps, **kw):
    opts = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                amsgrad=False, maximize=False, decoupled=True)
    opts.update(kw)
    return K.prepare_adam(params, grads, m, v, [] if opts["amsgrad"] else None, steps,
                          opts["lr"], opts["betas"],
                          opts["eps"], opts["weight_decay"], opts["amsgrad"],
                          opts["maximize"], opts["decoupled"])


def _adam_twins():
    """(params, exp_avgs, exp_avg_sqs, steps) twice, equal: for the kernel and the
    reference."""
    out = []
    for _ in range(2):
        params = _arrays()
        out += [params, [np.zeros_like(p) for p in params],
                [np.zeros_like(p) for p in params], np.zeros(3, np.int64)]
    return out


def test_reused_step_equals_fresh_steps_and_takes_new_hyperparameters():
    params, m, v, steps, ref, rm, rv, rsteps = _adam_twins()
    step = _adam(params, _arrays(1), m, v, steps)
    step.run(2)
    R.adamw_(ref, _arrays(1), rm, rv, None, rsteps, lr=1e-2, weight_decay=0.01)
    step.make_reusable()
    with pytest.raises(RuntimeError, match="set_grads"):
        step.run(2)                               # the old gradients were let go
    for k in range(2, 6):
        lr = 1e-2 / k
        assert step.take_hyperparameters(_adam([], [], [], [], np.zeros(0, np.int64), lr=lr))
        grads = _arrays(k)
        step.set_grads([g.ctypes.data for g in grads])
        step.run(2)
        R.adamw_(ref, grads, rm, rv, None, rsteps, lr=lr, weight_decay=0.01)
    for a, b in zip(params + m + v, ref + rm + rv):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(steps, rsteps)
    # a flag that selects another loop is not taken over
    assert not step.take_hyperparameters(
        _adam([], [], [], [], np.zeros(0, np.int64), amsgrad=True))


def test_set_grads_refuses_overlap_misalignment_and_bad_counts_and_changes_nothing():
    params = _arrays()
    m, v = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    # the step counters at the start of a buffer longer than grads[1]: a gradient placed
    # on them overlaps them and nothing else (a bare 3-element array has other arrays of
    # the test right after it, now and then, which the error may name instead)
    steps = np.zeros(2000, np.int64)[:3]
    step = _adam(params, _arrays(1), m, v, steps)
    step.make_reusable()
    good = _arrays(2)
    step.set_grads([g.ctypes.data for g in good])
    for bad, match in (([good[0].ctypes.data, v[1].ctypes.data, good[2].ctypes.data],
                        r"grads\[1\] overlaps"),
                       ([good[0].ctypes.data, good[1].ctypes.data + 1, good[2].ctypes.data],
                        r"grads\[1\] is not aligned"),
                       ([good[0].ctypes.data, steps.ctypes.data, good[2].ctypes.data],
                        r"grads\[1\] overlaps steps"),
                       ([good[0].ctypes.data], "expected 3"),
                       ([good[0].ctypes.data, -1, good[2].ctypes.data], "address must be")):
        with pytest.raises(ValueError, match=match):
            step.set_grads(bad)
    before = [a.copy() for a in params + m + v]
    step.run(1)                                   # still the good gradients
    twin_p, twin_m, twin_v = ([a.copy() for a in before[i * 3:(i + 1) * 3]]
                              for i in range(3))
    R.adamw_(twin_p, good, twin_m, twin_v, None, np.zeros(3, np.int64), lr=1e-2,
             weight_decay=0.01)
    for a, b in zip(params + m + v, twin_p + twin_m + twin_v):
        np.testing.assert_array_equal(a, b)


def test_the_gradients_given_to_prepare_are_let_go():
    params = _arrays()
    m, v = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    grads = _arrays(1)
    ref = weakref.ref(grads[1])
    step = _adam(params, grads, m, v, np.zeros(3, np.int64))
    step.make_reusable()
    del grads
    gc.collect()
    assert ref() is None


def test_a_step_with_other_inputs_than_gradients_is_not_reusable():
    p = _arrays()[:1]
    step = K.prepare_adahessian(p, _arrays(1)[:1], _arrays(2)[:1], [np.zeros_like(p[0])],
                                [np.zeros_like(p[0])], np.zeros(1, np.int64), 0.1,
                                (0.9, 0.999), 1e-4, 0.0, 1.0, False)
    with pytest.raises(ValueError, match="cannot be reused"):
        step.make_reusable()


def test_a_sophiah_step_is_reusable_on_the_steps_without_hessians():
    def prepare(hessians):
        p = _arrays()
        m, h = [np.zeros_like(a) for a in p], [np.zeros_like(a) for a in p]
        return K.prepare_sophiah(p, _arrays(1), hessians, m, h,
                                 np.zeros(3, np.int64), 0.1, (0.9, 0.99), 0.0, True, False,
                                 0.01, 1e-12, False)
    prepare(None).make_reusable()
    with pytest.raises(ValueError, match="cannot be reused"):
        prepare(_arrays(2)).make_reusable()


def test_set_grads_takes_an_int64_array_and_refuses_other_arrays():
    params, m, v, steps, ref, rm, rv, rsteps = _adam_twins()
    s = _adam(params, _arrays(1), m, v, steps)
    s.make_reusable()
    g2 = _arrays(2)
    s.set_grads(np.array([g.ctypes.data for g in g2], dtype=np.int64))
    s.run(1)
    R.adamw_(ref, g2, rm, rv, None, rsteps, lr=1e-2, weight_decay=0.01)
    for a, b in zip(params, ref):
        np.testing.assert_array_equal(a, b)
    addrs = [g.ctypes.data for g in g2]
    with pytest.raises(TypeError, match="int64"):
        s.set_grads(np.array(addrs, dtype=np.uint64))
    with pytest.raises(TypeError, match="list of ints"):
        s.set_grads(tuple(addrs))
    with pytest.raises(ValueError, match="3 entries|expected 3"):
        s.set_grads(np.array(addrs[:2], dtype=np.int64))


def test_a_reused_adopt_step_takes_its_clips_anew_from_the_step_counts():
    # ADOPT's clip is a function of each array's step: a kept step works it out again
    # (adopt_set_clips) after its counts moved, and then equals a fresh step
    clip = lambda step: 0.5 * step ** 0.5          # noqa: E731 (small: it clips here)
    params = _arrays()
    m, v = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    steps = np.array([0, 3, 7], np.int64)            # one count per array, unequal
    ref = [p.copy() for p in params]
    rm, rv, rsteps = [a.copy() for a in m], [a.copy() for a in v], steps.copy()
    opts = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0, weight_decouple=False,
                fixed_decay=False, eps=1e-6, maximize=False)
    args = list(opts.values())
    step = K.prepare_adopt(params, _arrays(1), m, v, steps, opts["lr"], opts["betas"],
                           clip, *args[2:])
    step.run(1)
    R.adopt_(ref, _arrays(1), rm, rv, rsteps, clip_lambda=clip, **opts)
    step.make_reusable()
    for k in range(2, 6):
        K.adopt_set_clips(step, clip)
        grads = [g * 10 for g in _arrays(k)]
        step.set_grads([g.ctypes.data for g in grads])
        step.run(2)
        R.adopt_(ref, grads, rm, rv, rsteps, clip_lambda=clip, **opts)
        for a, b in zip(params + m + v, ref + rm + rv):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(steps, rsteps)
    # a bad clip or function is refused with the clips as they were (counts now
    # 5, 8, 12: the next steps 6, 9, 13)
    with pytest.raises(ValueError, match=r"clip_lambda\(9\)"):
        K.adopt_set_clips(step, lambda s: -1.0 if s == 9 else 1.0)
    with pytest.raises(TypeError, match="clip_lambda must be a function"):
        K.adopt_set_clips(step, 3.0)
    with pytest.raises(TypeError, match="prepare_adopt"):
        K.adopt_set_clips(_adam(_arrays(), _arrays(1), [np.zeros_like(p) for p in params],
                                [np.zeros_like(p) for p in params], np.zeros(3, np.int64)),
                          clip)
    # so this run clips as the last step did: at clip(its step - 1)
    grads = [g * 10 for g in _arrays(9)]
    step.set_grads([g.ctypes.data for g in grads])
    step.run(1)
    R.adopt_(ref, grads, rm, rv, rsteps, clip_lambda=lambda s: clip(s - 1), **opts)
    for a, b in zip(params + m + v, ref + rm + rv):
        np.testing.assert_array_equal(a, b)


def _adafactor_problem(dtype, seed=0):
    """A matrix, a batch of matrices, a vector and a 0-d parameter, with Adafactor's
    state (factors for the first two, a full second moment for the others)."""
    rng = np.random.default_rng(seed)
    shapes = [(40, 9), (3, 5, 7), (300,), ()]
    params = [np.asarray(rng.standard_normal(s), dtype) for s in shapes]
    rows = [np.zeros(s[:-1] + (1,), dtype) if len(s) >= 2 else None for s in shapes]
    cols = [np.zeros(s[:-2] + (1,) + s[-1:], dtype) if len(s) >= 2 else None
            for s in shapes]
    var = [np.zeros(s, dtype) if len(s) < 2 else None for s in shapes]
    return params, rows, cols, var, np.zeros(len(shapes), np.int64)


def _af(params, grads, rows, cols, var, steps, lr=1e-2, eps=(None, 1e-3)):
    return K.prepare_adafactor(params, grads, rows, cols, var, steps, lr, -0.8, eps, 1.0,
                               0.01, False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_reused_adafactor_step_equals_fresh_steps(dtype):
    got, ref = _adafactor_problem(dtype), _adafactor_problem(dtype)

    def grads(k):
        rng = np.random.default_rng(100 + k)
        return [np.asarray(rng.standard_normal(p.shape), dtype) for p in got[0]]
    step = _af(got[0], grads(0), *got[1:])
    step.run(1)
    _af(ref[0], grads(0), *ref[1:]).run(1)
    step.make_reusable()
    with pytest.raises(RuntimeError, match="set_grads"):
        step.run(1)
    for k in range(1, 6):
        lr, eps = 1e-2 / k, ((None, 1e-3) if k % 2 else (1e-20, 1e-3))
        assert step.take_hyperparameters(_af([], [], [], [], [], np.zeros(0, np.int64),
                                             lr=lr, eps=eps))
        g = grads(k)
        step.set_grads(np.array([a.ctypes.data for a in g], np.int64))
        step.run(2)
        _af(ref[0], g, *ref[1:], lr=lr, eps=eps).run(2)
        for a, b in zip(got, ref):
            for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list)
                            else [b]):
                if x is not None:
                    np.testing.assert_array_equal(x, y)


def test_a_reused_adafactor_step_refuses_bad_gradients_and_copies():
    params, rows, cols, var, steps = _adafactor_problem(np.float32)
    g = [np.ones_like(p) for p in params]
    step = _af(params, g, rows, cols, var, steps)
    step.make_reusable()
    good = np.array([a.ctypes.data for a in g], np.int64)
    for i, addr, match in ((1, cols[1].ctypes.data, r"grads\[1\] overlaps col_vars\[1\]"),
                           (2, good[2] + 2, r"grads\[2\] is not aligned"),
                           (0, steps.ctypes.data, r"grads\[0\] overlaps steps")):
        bad = good.copy()
        bad[i] = addr
        with pytest.raises(ValueError, match=match):
            step.set_grads(bad)
    with pytest.raises(ValueError, match="expected 4"):
        step.set_grads(good[:3].copy())
    with pytest.raises(TypeError, match="int64"):
        step.set_grads(good.astype(np.int32))
    before = [a.copy() for a in params]
    step.set_grads(good)
    step.run(1)
    assert not all(np.array_equal(a, b) for a, b in zip(params, before))
    # a gradient the step had to copy to C order cannot be pointed at again
    gt = [np.ones((9, 40), np.float32).T] + g[1:]
    copied = _af(params, gt, rows, cols, var, steps)
    with pytest.raises(ValueError, match="cannot be reused"):
        copied.make_reusable()
