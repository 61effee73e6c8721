"""bfloat16 optimizer state for Adam/AdamW: kernel == reference, rounding facts,
checkpoints, convergence."""
import itertools

import numpy as np
import pytest

import fastoptim
from fastoptim import functional as F, reference as R


def _run(module, opts, shapes, nsteps, seed=0, order="C"):
    rng = np.random.default_rng(seed)
    params = [np.asarray(rng.standard_normal(s), np.float32, order=order) for s in shapes]
    ms = [np.zeros(p.shape, np.uint16, order=order) for p in params]
    vs = [np.zeros(p.shape, np.uint16, order=order) for p in params]
    xs = [np.zeros(p.shape, np.uint16, order=order) for p in params]
    steps = np.zeros(len(params), np.int64)
    for k in range(nsteps):
        grads = [None if (k + i) % 5 == 4 else
                 np.asarray(rng.standard_normal(p.shape), np.float32, order=order)
                 for i, p in enumerate(params)]
        module.adam_(params, grads, ms, vs, xs if opts["amsgrad"] else None, steps,
                     state_dtype="bfloat16", **opts)
    return params, ms, vs, xs, steps


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_kernel_equals_reference_bit_for_bit(rounding):
    shapes = [(), (0,), (1,), (17,), (3, 5), (4099,), (40000,)]
    for amsgrad, maximize, wd, decoupled, order in itertools.product(
            [False, True], [False, True], [0.0, 0.05], [False, True], ["C", "F"]):
        opts = dict(lr=0.01, betas=(0.9, 0.99), amsgrad=amsgrad, maximize=maximize,
                    weight_decay=wd, decoupled_weight_decay=decoupled, rounding=rounding,
                    seed=1234)
        got = _run(F, opts, shapes, 12, order=order)
        want = _run(R, opts, shapes, 12, order=order)
        for a, b in zip(got, want):
            for x, y in zip(a, b) if isinstance(a, list) else [(a, b)]:
                np.testing.assert_array_equal(x, y)


def test_stochastic_rounding_is_thread_independent_and_seeded():
    shapes = [(fastoptim.get_serial_threshold() * 3 + 5,)]
    opts = dict(lr=0.01, amsgrad=False, rounding="stochastic", seed=7)
    results = []
    try:
        for n in (1, 2):
            fastoptim.set_num_threads(n)
            results.append(_run(F, opts, shapes, 4))
    finally:
        fastoptim.set_num_threads(None)
    for a, b in zip(results[0][:3], results[1][:3]):
        np.testing.assert_array_equal(a[0], b[0])
    other = _run(F, dict(opts, seed=8), shapes, 4)
    assert not np.array_equal(other[1][0], results[0][1][0])


def test_round_to_nearest_even_and_nan_inf():
    # 1 + 2^-8 is a tie between bf16 1.0 and 1.0078125: ties go to even (1.0)
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, np.inf, -np.inf, np.nan, -0.0, 3e38],
                 np.float32)
    bits = R.float32_to_bfloat16(x)
    back = R.bfloat16_to_float32(bits)
    assert back[0] == 1.0 and back[1] == 1.0 and back[2] == 1 + 4 * 2**-8
    assert back[3] == np.inf and back[4] == -np.inf and np.isnan(back[5])
    assert back[6] == 0 and np.signbit(back[6])
    assert np.isfinite(back[7])
    # a signalling-looking NaN whose payload sits in the dropped bits stays a NaN
    snan = np.array([0x7F800001], np.uint32).view(np.float32)
    assert np.isnan(R.bfloat16_to_float32(R.float32_to_bfloat16(snan)))[0]
    rounded_up = R.float32_to_bfloat16(snan, np.array([0xFFFF], np.uint32))
    assert np.isnan(R.bfloat16_to_float32(rounded_up))[0]


def test_kernel_keeps_nan_state_nan():
    p = np.ones(32, np.float32); g = np.ones(32, np.float32); g[5] = np.nan
    m, v = np.zeros(32, np.uint16), np.zeros(32, np.uint16)
    F.adam_(p, g, m, v, None, np.zeros(1, np.int64), state_dtype="bfloat16")
    assert np.isnan(R.bfloat16_to_float32(m)[5]) and np.isnan(p[5])
    assert np.all(np.isfinite(np.delete(p, 5)))


def test_stochastic_rounding_is_unbiased():
    x = np.full(200_000, 1 + 2**-10, np.float32)     # a quarter of the way to the next bf16
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, x.size, dtype=np.uint32)
    mean = R.bfloat16_to_float32(R.float32_to_bfloat16(x, bits)).astype(np.float64).mean()
    assert abs(mean - (1 + 2**-10)) < 2e-5           # nearest would give exactly 1.0
    assert R.bfloat16_to_float32(R.float32_to_bfloat16(x[:1]))[0] == 1.0


def test_bfloat16_state_refuses_bad_input():
    p = np.ones(4); g = np.ones(4)
    with pytest.raises(TypeError, match="bfloat16 state is for float32 parameters"):
        F.adam_(p, g, np.zeros(4, np.uint16), np.zeros(4, np.uint16), None,
                np.zeros(1, np.int64), state_dtype="bfloat16")
    p = np.ones(4, np.float32); g = np.ones(4, np.float32)
    with pytest.raises(TypeError, match=r"exp_avgs\[0\] must have dtype uint16"):
        F.adam_(p, g, np.zeros(4, np.float32), np.zeros(4, np.uint16), None,
                np.zeros(1, np.int64), state_dtype="bfloat16")
    with pytest.raises(ValueError, match="state_dtype must be"):
        F.adam_(p, g, np.zeros(4, np.float32), np.zeros(4, np.float32), None,
                np.zeros(1, np.int64), state_dtype="float16")
    with pytest.raises(ValueError, match="rounding must be"):
        fastoptim.Adam([p], state_dtype="bfloat16", rounding="up")
    before = p.copy()
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[0\] has shape"):
        F.adam_(p, g, np.zeros(4, np.uint16), np.zeros(5, np.uint16), None,
                np.zeros(1, np.int64), state_dtype="bfloat16")
    np.testing.assert_array_equal(p, before)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_optimizer_checkpoint_round_trip_and_conversion(rounding):
    rng = np.random.default_rng(3)
    grads = [[rng.standard_normal(50).astype(np.float32)] for _ in range(10)]
    a = [np.ones(50, np.float32)]
    opt = fastoptim.AdamW(a, lr=0.01, state_dtype="bfloat16", rounding=rounding, seed=5)
    for g in grads[:5]:
        opt.step(g)
    assert opt.state[0]["exp_avg"].dtype == np.uint16
    sd = opt.state_dict()
    b = [a[0].copy()]
    resumed = fastoptim.AdamW(b, lr=0.01, state_dtype="bfloat16", rounding=rounding, seed=5)
    resumed.load_state_dict(sd)
    for g in grads[5:]:
        opt.step(g)
        resumed.step(g)
    np.testing.assert_array_equal(a[0], b[0])
    # bf16 state loads into a float32-state group (values widened exactly); loading
    # restores the saved group options, as in torch, so the checkpoint's group says so
    c = [a[0].copy()]
    wide = fastoptim.AdamW(c, lr=0.01)
    sd = opt.state_dict()
    sd["param_groups"][0]["state_dtype"] = None
    wide.load_state_dict(sd)
    assert wide.state[0]["exp_avg"].dtype == np.float32
    np.testing.assert_array_equal(wide.state[0]["exp_avg"],
                                  R.bfloat16_to_float32(opt.state[0]["exp_avg"]))


def test_bfloat16_state_converges_like_float32():
    """Least squares with Adam: bf16 state (both roundings) reaches the fp32 loss."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((512, 64)).astype(np.float32)
    w_true = rng.standard_normal(64).astype(np.float32)
    y = X @ w_true + 0.01 * rng.standard_normal(512).astype(np.float32)
    losses = {}
    for label, kw in {"fp32": {}, "bf16-nearest": dict(state_dtype="bfloat16"),
                      "bf16-stochastic": dict(state_dtype="bfloat16",
                                              rounding="stochastic")}.items():
        w = np.zeros(64, np.float32)
        opt = fastoptim.Adam([w], lr=0.05, **kw)
        for _ in range(400):
            r = X @ w - y
            opt.step([(X.T @ r / len(y)).astype(np.float32)])
        losses[label] = float(np.mean((X @ w - y) ** 2))
    assert losses["fp32"] < 1e-3
    for label in ("bf16-nearest", "bf16-stochastic"):
        assert losses[label] < 2 * losses["fp32"] + 1e-4, losses


#: rules with bfloat16 state besides Adam: their state arguments in order, option mixes
OTHER_RULES = {
    "sgd_": (("momentum_buffers",),
             [dict(momentum=0.9), dict(momentum=0.5, dampening=0.2, weight_decay=0.01),
              dict(momentum=0.9, nesterov=True, maximize=True), dict(momentum=0.0)]),
    "adagrad_": (("state_sums",), [dict(), dict(lr_decay=0.01, weight_decay=0.02,
                                               maximize=True)]),
    "rmsprop_": (("square_avgs", "grad_avgs", "momentum_buffers"),
                 [dict(), dict(centered=True), dict(momentum=0.9),
                  dict(centered=True, momentum=0.5, weight_decay=0.01, maximize=True)]),
    "adamax_": (("exp_avgs", "exp_infs"),
                [dict(), dict(betas=(0.4, 0.9), eps=1e-3, weight_decay=0.02, maximize=True)]),
    "adadelta_": (("square_avgs", "acc_deltas"),
                  [dict(), dict(rho=0.4, eps=1e-3, weight_decay=0.02, maximize=True)]),
    "radam_": (("exp_avgs", "exp_avg_sqs"),
               [dict(), dict(betas=(0.4, 0.9), weight_decay=0.02, decoupled_weight_decay=True,
                             maximize=True)]),
    "rprop_": (("prevs", "step_size_arrays"),
               [dict(), dict(etas=(0.3, 1.5), step_sizes=(1e-3, 0.5), maximize=True)]),
    "nadam_": (("exp_avgs", "exp_avg_sqs"),
               [dict(), dict(betas=(0.4, 0.9), weight_decay=0.02, momentum_decay=0.01,
                             decoupled_weight_decay=True, maximize=True)]),
    "asgd_": (("axs",), [dict(t0=2.0), dict(t0=2.0, lambd=1e-2, weight_decay=0.02,
                                         maximize=True)]),
    "lion_": (("exp_avgs",), [dict(), dict(betas=(0.5, 0.9), weight_decay=0.1,
                                           maximize=True)]),
    "adopt_": (("exp_avgs", "exp_avg_sqs"), [dict(), dict(betas=(0.4, 0.9), weight_decay=0.1,
                                                          eps=1e-3, maximize=True)]),
    "ademamix_": (("exp_avgs", "exp_avg_sqs", "exp_avg_slows"),
                  [dict(), dict(betas=(0.4, 0.9, 0.99), t_alpha_beta3=5.0, weight_decay=0.1,
                                weight_decouple=True, maximize=True)]),
}


def _run_rule(module, name, opts, shapes, nsteps, seed=0, order="C"):
    rng = np.random.default_rng(seed)
    params = [np.asarray(rng.standard_normal(s), np.float32, order=order) for s in shapes]
    states = [[np.zeros(p.shape, np.uint16, order=order) for p in params]
              for _ in OTHER_RULES[name][0]]
    if name == "nadam_":                    # its per-parameter float32 mu_product
        states.append([np.ones((), np.float32) for _ in params])
    if name == "asgd_":                     # its eta (the lr the tests use) and mu
        states.append([np.full((), 0.01, np.float32) for _ in params])
        states.append([np.ones((), np.float32) for _ in params])
    steps = np.zeros(len(params), np.int64)
    for k in range(nsteps):
        grads = [None if (k + i) % 5 == 4 else
                 np.asarray(rng.standard_normal(p.shape), np.float32, order=order)
                 for i, p in enumerate(params)]
        getattr(module, name)(params, grads, *states, steps, lr=0.01,
                              state_dtype="bfloat16", **opts)
    return [params] + states + [[steps]]


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("name", list(OTHER_RULES))
def test_every_rule_with_state_takes_bfloat16_state_bit_for_bit(name, rounding):
    """SGD (momentum), Adagrad and RMSprop keep bfloat16 state through the same loops as
    float state (storage.pxi): the kernel equals the reference bit for bit, each
    option mix, both memory orders, both roundings."""
    shapes = [(), (1,), (17,), (3, 5), (4099,), (40000,)]
    for opts, order in itertools.product(OTHER_RULES[name][1], ["C", "F"]):
        opts = dict(opts, rounding=rounding, seed=99)
        got = _run_rule(F, name, opts, shapes, 12, order=order)
        want = _run_rule(R, name, opts, shapes, 12, order=order)
        for a, b in zip(got, want):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y, err_msg=f"{name} {opts} {order}")
        if opts.get("momentum", 1) != 0:
            assert any(np.any(s) for s in got[1]), "the state was written"


CLASS_CASES = {
    "SGD": ("sgd_", ("momentum_buffers",), ("momentum_buffer",),
            dict(lr=0.01, momentum=0.9, nesterov=True)),
    "Adagrad": ("adagrad_", ("state_sums",), ("sum",),
                dict(lr=0.05, initial_accumulator_value=0.3)),
    "RMSprop": ("rmsprop_", ("square_avgs", "grad_avgs", "momentum_buffers"),
                ("square_avg", "grad_avg", "momentum_buffer"),
                dict(lr=0.01, centered=True, momentum=0.5)),
    "Adamax": ("adamax_", ("exp_avgs", "exp_infs"), ("exp_avg", "exp_inf"),
               dict(lr=0.01, weight_decay=0.01)),
    "Adadelta": ("adadelta_", ("square_avgs", "acc_deltas"), ("square_avg", "acc_delta"),
                 dict(lr=0.5, weight_decay=0.01)),
    "RAdam": ("radam_", ("exp_avgs", "exp_avg_sqs"), ("exp_avg", "exp_avg_sq"),
              dict(lr=0.01, weight_decay=0.01)),
    "Lion": ("lion_", ("exp_avgs",), ("exp_avg",), dict(lr=0.01, weight_decay=0.1)),
    "ADOPT": ("adopt_", ("exp_avgs", "exp_avg_sqs"), ("exp_avg", "exp_avg_sq"),
              dict(lr=0.01, weight_decay=0.01)),
    "AdEMAMix": ("ademamix_", ("exp_avgs", "exp_avg_sqs", "exp_avg_slows"),
                 ("exp_avg", "exp_avg_sq", "exp_avg_slow"),
                 dict(lr=0.01, weight_decay=0.01, t_alpha_beta3=4.0)),
}


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("cls", list(CLASS_CASES))
def test_classes_keep_bfloat16_state_for_every_rule(cls, rounding):
    """The NumPy classes of SGD, Adagrad and RMSprop take state_dtype="bfloat16": their
    steps are the reference's on bfloat16 state, a checkpoint resumes bit for bit, and
    it loads into a float32-state optimizer with its values widened exactly."""
    fn, args, names, opts = CLASS_CASES[cls]
    rng = np.random.default_rng(4)
    grads = [[rng.standard_normal(30).astype(np.float32),
              rng.standard_normal((4, 3)).astype(np.float32)] for _ in range(8)]
    params = [np.ones(30, np.float32), np.full((4, 3), 0.5, np.float32)]
    opt = getattr(fastoptim, cls)(params, state_dtype="bfloat16", rounding=rounding,
                                  seed=11, **opts)
    ref = [p.copy() for p in params]
    init = opts.get("initial_accumulator_value", 0.0)
    state = [[np.full(p.shape, R.float32_to_bfloat16(np.float32(init)), np.uint16)
              for p in ref] for _ in args]
    steps = np.zeros(2, np.int64)
    kw = {k: v for k, v in opts.items() if k != "initial_accumulator_value"}
    for g in grads[:4]:
        opt.step(g)
        getattr(R, fn)(ref, g, *state, steps, state_dtype="bfloat16", rounding=rounding,
                       seed=11, **kw)
    for a, b in zip(params, ref):
        np.testing.assert_array_equal(a, b)
    for name, lists in zip(names, state):
        for i in range(2):
            assert opt.state[i][name].dtype == np.uint16
            np.testing.assert_array_equal(opt.state[i][name], lists[i])
    sd = opt.state_dict()
    twin = [p.copy() for p in params]
    resumed = getattr(fastoptim, cls)(twin, state_dtype="bfloat16", rounding=rounding,
                                      seed=11, **opts)
    resumed.load_state_dict(sd)
    for g in grads[4:]:
        opt.step(g)
        resumed.step(g)
    for a, b in zip(params, twin):
        np.testing.assert_array_equal(a, b)
    sd = opt.state_dict()
    sd["param_groups"][0]["state_dtype"] = None
    wide = getattr(fastoptim, cls)([p.copy() for p in params], **opts)
    wide.load_state_dict(sd)
    for name in names:
        assert wide.state[0][name].dtype == np.float32
        np.testing.assert_array_equal(wide.state[0][name],
                                      R.bfloat16_to_float32(opt.state[0][name]))
