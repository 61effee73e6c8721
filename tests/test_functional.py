"""The compiled functions equal the NumPy reference (the specification)."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

import fastoptim
from fastoptim import functional as F, reference as R

from rules import ISAS, RULES, assert_close, call, kernel_module, make_state, prepare, valid

DTYPES = [np.float32, np.float64]


def _random_params(rng, shapes, dtype, order="C"):
    return [np.asarray(rng.standard_normal(s), dtype=dtype, order=order) for s in shapes]


def _run_both(rule, opts, shapes, dtype, nsteps, seed, skip_prob=0.0, order="C"):
    rng = np.random.default_rng(seed)
    params = _random_params(rng, shapes, dtype, order)
    ref_params = [p.copy(order="K") for p in params]
    init = 0.1 if rule == "adagrad" else 0.0
    state, steps = make_state(rule, opts, params, init)
    ref_state, ref_steps = make_state(rule, opts, ref_params, init)
    for _ in range(nsteps):
        grads = [np.asarray(rng.standard_normal(p.shape), dtype=dtype, order=order)
                 if rng.random() >= skip_prob else None for p in params]
        call(F, rule, params, grads, state, steps, opts)
        call(R, rule, ref_params, grads, ref_state, ref_steps, opts)
    return params, ref_params, state, ref_state, steps, ref_steps


def _assert_close(rule, dtype, nsteps, got, want, state, ref_state, steps, ref_steps):
    for a, b in zip(got, want):
        assert_close(a, b, dtype, nsteps)
    for name in state:
        for a, b in zip(state[name], ref_state[name]):
            assert_close(a, b, dtype, nsteps, err_msg=name)
    np.testing.assert_array_equal(steps, ref_steps)


def _all_option_combos(rule):
    options = RULES[rule]["options"]
    keys = list(options)
    for values in itertools.product(*(options[k] for k in keys)):
        opts = dict(zip(keys, values))
        if valid(rule, opts):
            yield opts


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("rule", list(RULES))
def test_every_option_combination_matches_reference(rule, dtype):
    """Full factorial of every option of every rule, 30 steps, odd sizes."""
    shapes = [(), (0,), (1,), (17,), (3, 5), (1000 + 3,)]
    for opts in _all_option_combos(rule):
        got, want, s, rs, k, rk = _run_both(rule, opts, shapes, dtype, 30, seed=1,
                                            skip_prob=0.2)
        _assert_close(rule, dtype, 30, got, want, s, rs, k, rk)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rule=st.sampled_from(list(RULES)),
    dtype=st.sampled_from(DTYPES),
    shapes=st.lists(st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple),
                    min_size=1, max_size=5),
    order=st.sampled_from(["C", "F"]),
    nsteps=st.integers(1, 60),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_random_shapes_and_hyperparameters(rule, dtype, shapes, order, nsteps, seed, data):
    opts = {}
    for key, values in RULES[rule]["options"].items():
        if isinstance(values[0], bool):
            opts[key] = data.draw(st.booleans(), label=key)
        elif callable(values[0]):           # (ADOPT's clip_lambda: a function or None)
            opts[key] = data.draw(st.sampled_from(values), label=key)
        elif key == "betas" and len(values[0]) == 3:     # (AdEMAMix: its logs need > 0)
            opts[key] = (data.draw(st.floats(0.01, 0.99), label="beta1"),
                         data.draw(st.floats(0.0, 0.9999), label="beta2"),
                         data.draw(st.floats(0.01, 1.0), label="beta3"))
        elif key == "betas":
            opts[key] = (data.draw(st.floats(0.0, 0.99), label="beta1"),
                         data.draw(st.floats(0.0, 0.9999), label="beta2"))
        elif key == "t_alpha_beta3":
            opts[key] = data.draw(st.one_of(st.none(), st.floats(1.0, 50.0)), label=key)
        elif key == "etas":
            opts[key] = (data.draw(st.floats(0.05, 0.95), label="etaminus"),
                         data.draw(st.floats(1.01, 2.0), label="etaplus"))
        elif key == "step_sizes":
            low = data.draw(st.floats(0.0, 1e-2), label="step_size_min")
            opts[key] = (low, low + data.draw(st.floats(0.0, 1.0), label="step_size_range"))
        elif key in ("lr",):
            opts[key] = data.draw(st.floats(1e-5, 0.5), label=key)
        elif key in ("alpha",):
            opts[key] = data.draw(st.floats(0.0, 0.999), label=key)
        elif key in ("momentum_decay",):
            opts[key] = data.draw(st.floats(0.0, 0.05), label=key)
        elif key in ("eps",):
            opts[key] = data.draw(st.floats(1e-10, 1e-3), label=key)
        elif key in ("momentum",):
            opts[key] = data.draw(st.sampled_from([0.0, 0.5, 0.9, 0.99]), label=key)
        else:
            opts[key] = data.draw(st.floats(0.0, 0.2), label=key)
    if rule == "sgd" and opts["nesterov"]:
        opts["momentum"] = max(opts["momentum"], 0.5)
        opts["dampening"] = 0.0
    got, want, s, rs, k, rk = _run_both(rule, opts, shapes, dtype, nsteps, seed,
                                        skip_prob=0.1, order=order)
    _assert_close(rule, dtype, nsteps, got, want, s, rs, k, rk)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rule", list(RULES))
def test_every_built_instruction_set_matches_reference(rule, isa):
    """Each per-ISA kernel module this process may run (not only the one chosen)."""
    kernels = kernel_module(isa)
    for dtype in DTYPES:
        opts = {k: v[-1] for k, v in RULES[rule]["options"].items()}
        if not valid(rule, opts):
            opts["dampening"] = 0.0
        rng = np.random.default_rng(7)
        params = _random_params(rng, [(5,), (1000 + 7,), (40000,)], dtype)
        ref = [p.copy() for p in params]
        state, steps = make_state(rule, opts, params)
        rstate, rsteps = make_state(rule, opts, ref)
        for _ in range(10):
            grads = _random_params(rng, [p.shape for p in params], dtype)
            prepare(kernels, rule, params, grads, state, steps, opts).run(2)
            call(R, rule, ref, grads, rstate, rsteps, opts)
        _assert_close(rule, dtype, 10, params, ref, state, rstate, steps, rsteps)


def test_hand_checked_adam_first_step():
    """Adam's first step moves each coordinate by lr * sign(g) (bias corrections cancel):
    m = 0.1 g, v = 0.001 g^2, m/bc1 = g, sqrt(v/bc2) = |g|."""
    p = np.array([1.0, -2.0, 0.5], dtype=np.float64)
    g = np.array([0.3, -4.0, 1e-3])
    m, v, steps = np.zeros(3), np.zeros(3), np.zeros(1, np.int64)
    F.adam_([p], [g], [m], [v], None, steps, lr=0.1, eps=0.0)
    np.testing.assert_allclose(p, [0.9, -1.9, 0.4], rtol=1e-14)
    np.testing.assert_allclose(m, 0.1 * g, rtol=1e-15)
    np.testing.assert_allclose(v, 0.001 * g * g, rtol=1e-14)
    assert steps[0] == 1


def test_hand_checked_sgd_momentum_and_nesterov():
    p = np.array([1.0]); g = np.array([2.0]); buf = np.zeros(1); steps = np.zeros(1, np.int64)
    F.sgd_([p], [g], [buf], steps, lr=0.1, momentum=0.5)         # buf = g = 2
    assert buf[0] == 2.0 and p[0] == pytest.approx(0.8)
    F.sgd_([p], [g], [buf], steps, lr=0.1, momentum=0.5)         # buf = 0.5*2 + 2 = 3
    assert buf[0] == 3.0 and p[0] == pytest.approx(0.5)
    q = np.array([1.0]); qb = np.zeros(1); qs = np.zeros(1, np.int64)
    F.sgd_([q], [g], [qb], qs, lr=0.1, momentum=0.5, nesterov=True)  # g + 0.5*2 = 3
    assert q[0] == pytest.approx(0.7)


def test_hand_checked_adagrad_and_rmsprop():
    p = np.array([1.0]); g = np.array([2.0]); s = np.array([0.0]); k = np.zeros(1, np.int64)
    F.adagrad_([p], [g], [s], k, lr=0.5, eps=0.0)     # sum = 4, step = 0.5*2/2
    assert s[0] == 4.0 and p[0] == pytest.approx(0.5)
    F.adagrad_([p], [g], [s], k, lr=0.5, lr_decay=1.0, eps=0.0)  # clr = 0.25, sum 8
    assert p[0] == pytest.approx(0.5 - 0.25 * 2 / np.sqrt(8))
    p = np.array([1.0]); sq = np.array([0.0])
    F.rmsprop_([p], [g], [sq], lr=0.1, alpha=0.75, eps=0.0)   # sq = 0.25*4 = 1
    assert sq[0] == 1.0 and p[0] == pytest.approx(1.0 - 0.1 * 2 / 1)


def test_single_array_form_equals_list_form():
    rng = np.random.default_rng(3)
    p1 = rng.standard_normal(50); g = rng.standard_normal(50)
    p2 = p1.copy()
    m1, v1, m2, v2 = (np.zeros(50) for _ in range(4))
    s1, s2 = np.zeros(1, np.int64), np.zeros(1, np.int64)
    F.adamw_(p1, g, m1, v1, None, s1)
    F.adamw_([p1.copy()], [g], [m2], [v2], None, s2)
    F.adamw_([p2], [g], [np.zeros(50)], [np.zeros(50)], None, np.zeros(1, np.int64))
    np.testing.assert_array_equal(p1, p2)


def test_nan_gradients_propagate_like_torch():
    p = np.ones(20, np.float32); g = np.ones(20, np.float32); g[3] = np.nan; g[5] = np.inf
    m, v = np.zeros_like(p), np.zeros_like(p)
    F.adam_(p, g, m, v, None, np.zeros(1, np.int64))
    assert np.isnan(p[3]) and np.isnan(m[3])
    assert np.isnan(p[5])        # inf/inf
    assert np.all(np.isfinite(np.delete(p, [3, 5])))


def test_amsgrad_max_propagates_nan():
    p = np.ones(4); g = np.ones(4); m = np.zeros(4); v = np.zeros(4)
    vmax = np.array([np.nan, 0.0, 0.0, 0.0])
    F.adam_(p, g, m, v, vmax, np.zeros(1, np.int64), amsgrad=True)
    assert np.isnan(vmax[0]) and np.isnan(p[0]) and np.all(np.isfinite(p[1:]))
