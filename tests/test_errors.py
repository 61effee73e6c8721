"""Bad input is refused with a TypeError/ValueError naming the argument, and a refused
call changes no array, no step counter and no optimizer state."""
import pickle

import numpy as np
import pytest

import fastoptim
from fastoptim import functional as F


def _snapshot(*objs):
    out = []
    for o in objs:
        if isinstance(o, np.ndarray):
            out.append(o.tobytes())
        elif isinstance(o, (list, tuple)):
            out.append(_snapshot(*o))
        elif isinstance(o, fastoptim.Optimizer):
            out.append(pickle.dumps(o.state_dict()))
            out.append([p.tobytes() for g in o.param_groups for p in g["params"]])
        else:
            out.append(repr(o))
    return out


def _adam_args(n=2, size=8, dtype=np.float32):
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(size).astype(dtype) for _ in range(n)]
    grads = [rng.standard_normal(size).astype(dtype) for _ in range(n)]
    ms = [np.full(size, 0.5, dtype) for _ in range(n)]
    vs = [np.full(size, 0.25, dtype) for _ in range(n)]
    steps = np.full(n, 3, np.int64)
    return params, grads, ms, vs, steps


def _expect_refused(exc, match, fn, *arrays):
    before = _snapshot(*arrays)
    with pytest.raises(exc, match=match):
        fn()
    assert _snapshot(*arrays) == before, "a refused call changed an array"


# --- functional: arrays ----------------------------------------------------------------

ARRAY_CASES = {
    # name: (mutate(params, grads, ms, vs, steps) -> args, exception, message)
    "grad of wrong dtype": (lambda p, g, m, v, s: (p, [g[0], g[1].astype(np.float64)], m, v, s),
                            TypeError, r"grads\[1\] has dtype float64 but params\[1\]"),
    "grad of wrong shape": (lambda p, g, m, v, s: (p, [g[0], g[1][:5]], m, v, s),
                            ValueError, r"grads\[1\] has shape \(5,\) but params\[1\]"),
    "integer param": (lambda p, g, m, v, s: ([p[0], np.arange(8)], g, m, v, s),
                      TypeError, r"params\[1\] must have dtype float32 or float64"),
    "float16 param": (lambda p, g, m, v, s: ([p[0], p[1].astype(np.float16)], g, m, v, s),
                      TypeError, r"params\[1\] must have dtype float32 or float64"),
    "big-endian param": (lambda p, g, m, v, s: ([p[0], p[1].astype(">f4")], g, m, v, s),
                         TypeError, r"params\[1\] must be in native byte order"),
    "list as param": (lambda p, g, m, v, s: ([p[0], list(p[1])], g, m, v, s),
                      TypeError, r"params\[1\] must be a numpy.ndarray, got list"),
    "read-only param": (lambda p, g, m, v, s: ([p[0], _readonly(p[1])], g, m, v, s),
                        ValueError, r"params\[1\] is read-only"),
    "read-only state": (lambda p, g, m, v, s: (p, g, [m[0], _readonly(m[1])], v, s),
                        ValueError, r"exp_avgs\[1\] is read-only"),
    "strided param": (lambda p, g, m, v, s: ([p[0], np.zeros(16, np.float32)[::2]], g, m, v, s),
                      ValueError, r"params\[1\] is not contiguous"),
    "state of other dtype": (lambda p, g, m, v, s: (p, g, m, [v[0], v[1].astype(np.float64)], s),
                             TypeError, r"exp_avg_sqs\[1\] has dtype float64"),
    "state of other shape": (lambda p, g, m, v, s: (p, g, m, [v[0], v[1].reshape(2, 4)], s),
                             ValueError, r"exp_avg_sqs\[1\] has shape \(2, 4\)"),
    "too few grads": (lambda p, g, m, v, s: (p, g[:1], m, v, s),
                      ValueError, r"grads has 1 entries, expected 2"),
    "too many states": (lambda p, g, m, v, s: (p, g, m + m[:1], v, s),
                        ValueError, r"exp_avgs has 3 entries, expected 2"),
    "missing state for a grad": (lambda p, g, m, v, s: (p, g, [m[0], None], v, s),
                                 ValueError, r"exp_avgs\[1\] is None but grads\[1\] is not"),
    "param listed twice": (lambda p, g, m, v, s: ([p[0], p[0]], g, m, v, np.zeros(2, np.int64)),
                           ValueError, r"params\[\d\] (appears twice|overlaps)"),
    "state is the param": (lambda p, g, m, v, s: (p, g, [m[0], p[1]], v, s),
                           ValueError, r"overlaps"),
    "grad overlaps a param": (lambda p, g, m, v, s: (p, [g[0], p[1]], m, v, s),
                              ValueError, r"grads\[1\] overlaps params\[1\]"),
    "partial overlap of states": (lambda p, g, m, v, s: _partial_overlap(p, g, m, v, s),
                                  ValueError, r"overlaps"),
    "steps of wrong dtype": (lambda p, g, m, v, s: (p, g, m, v, s.astype(np.int32)),
                             TypeError, r"steps must have dtype int64"),
    "steps of wrong length": (lambda p, g, m, v, s: (p, g, m, v, np.zeros(3, np.int64)),
                              ValueError, r"steps must have shape \(2,\)"),
    "steps not an array": (lambda p, g, m, v, s: (p, g, m, v, [0, 0]),
                           TypeError, r"steps must be a numpy.ndarray"),
    "negative step": (lambda p, g, m, v, s: (p, g, m, v, np.array([1, -1], np.int64)),
                      ValueError, r"steps\[1\] is -1"),
    "params not a list": (lambda p, g, m, v, s: ({"a": 1}, g, m, v, s),
                          TypeError, r"params must be an ndarray or a list"),
}


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def _partial_overlap(p, g, m, v, s):
    buf = np.zeros(12, np.float32)
    return p, g, [m[0], buf[:8]], [v[0], buf[4:]], s


@pytest.mark.parametrize("case", list(ARRAY_CASES))
def test_functional_refuses_bad_arrays_and_changes_nothing(case):
    mutate, exc, match = ARRAY_CASES[case]
    params, grads, ms, vs, steps = _adam_args()
    args = mutate(params, grads, ms, vs, steps)
    _expect_refused(exc, match, lambda: F.adam_(*args[:4], None, args[4]),
                    params, grads, ms, vs, steps, args)


HYPER_CASES = [
    ("adam_", dict(lr=-1.0), ValueError, "Invalid learning rate"),
    ("adam_", dict(lr=float("nan")), ValueError, "learning rate must be finite"),
    ("adam_", dict(lr="0.1"), TypeError, "learning rate must be a real number"),
    ("adam_", dict(eps=-1e-8), ValueError, "Invalid epsilon value"),
    ("adam_", dict(betas=(1.0, 0.999)), ValueError, "beta parameter at index 0"),
    ("adam_", dict(betas=(0.9, -0.1)), ValueError, "beta parameter at index 1"),
    ("adam_", dict(betas=0.9), TypeError, "betas must be a pair"),
    ("adam_", dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value"),
    ("adam_", dict(weight_decay=float("inf")), ValueError, "weight_decay value must be finite"),
    ("adam_", dict(amsgrad=1), TypeError, "amsgrad must be a bool"),
    ("adam_", dict(amsgrad=True), ValueError, "max_exp_avg_sqs is required"),
    ("adam_", dict(maximize="yes"), TypeError, "maximize must be a bool"),
]


@pytest.mark.parametrize("fn,kwargs,exc,match", HYPER_CASES)
def test_functional_refuses_bad_hyperparameters(fn, kwargs, exc, match):
    params, grads, ms, vs, steps = _adam_args()
    _expect_refused(exc, match, lambda: getattr(F, fn)(params, grads, ms, vs, None, steps,
                                                         **kwargs),
                    params, grads, ms, vs, steps)


def test_functional_refuses_bad_hyperparameters_of_every_rule():
    p, g = np.ones(4), np.ones(4)
    b, s = np.zeros(4), np.zeros(1, np.int64)
    cases = [
        (lambda: F.sgd_(p, g, lr=-1), ValueError, "Invalid learning rate"),
        (lambda: F.sgd_(p, g, b, s, momentum=-0.5), ValueError, "Invalid momentum value"),
        (lambda: F.sgd_(p, g, b, s, momentum=0.9, nesterov=True, dampening=0.1), ValueError,
         "Nesterov momentum requires a momentum and zero dampening"),
        (lambda: F.sgd_(p, g, nesterov=True), ValueError, "Nesterov momentum requires"),
        (lambda: F.sgd_(p, g, momentum=0.9), ValueError, "momentum_buffers and steps"),
        (lambda: F.adagrad_(p, g, b, s, lr_decay=-1), ValueError, "Invalid lr_decay value"),
        (lambda: F.adagrad_(p, g, b, None), ValueError, "steps is required"),
        (lambda: F.rmsprop_(p, g, b, alpha=-0.1), ValueError, "Invalid alpha value"),
        (lambda: F.rmsprop_(p, g, b, centered=True), ValueError, "grad_avgs is required"),
        (lambda: F.rmsprop_(p, g, b, momentum=0.5), ValueError, "momentum_buffers is required"),
        (lambda: F.adamw_(p, g, b, b.copy(), None, None), ValueError, "steps is required"),
    ]
    for fn, exc, match in cases:
        _expect_refused(exc, match, fn, p, g, b, s)


# --- optimizer classes ------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(lr=-0.1), ValueError, "Invalid learning rate"),
    (dict(lr=float("nan")), ValueError, "finite"),
    (dict(betas=(0.9, 1.5)), ValueError, "beta parameter at index 1"),
    (dict(eps=None), TypeError, "epsilon value must be a real number"),
    (dict(weight_decay=-1), ValueError, "Invalid weight_decay value"),
])
def test_constructor_refuses_bad_hyperparameters(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastoptim.Adam([np.zeros(3)], **kwargs)


def test_constructor_refuses_bad_parameter_lists():
    a = np.zeros(3)
    with pytest.raises(ValueError, match="empty parameter list"):
        fastoptim.SGD([])
    with pytest.raises(TypeError, match="iterable of arrays or dicts"):
        fastoptim.SGD(a)
    with pytest.raises(ValueError, match="more than once"):
        fastoptim.SGD([a, a])
    with pytest.raises(ValueError, match="more than once"):
        fastoptim.SGD([{"params": [a]}, {"params": [a]}])
    with pytest.raises(ValueError, match="share memory"):
        base = np.zeros(10)
        fastoptim.SGD([base[:6], base[4:]])
    with pytest.raises(TypeError, match=r"params\[0\] must have dtype"):
        fastoptim.Adam([np.zeros(3, np.int32)])
    with pytest.raises(ValueError, match=r"params\[0\] is read-only"):
        fastoptim.Adam([_readonly(a)])
    with pytest.raises(ValueError, match=r"params\[0\] is not contiguous"):
        fastoptim.Adam([np.zeros((4, 4))[:, 1]])
    with pytest.raises(ValueError, match="unknown options"):
        fastoptim.Adam([{"params": [a], "lrr": 0.1}])
    with pytest.raises(TypeError, match="ordered collections"):
        fastoptim.Adam([{"params": {1, 2}}])
    with pytest.raises(ValueError, match="Nesterov"):
        fastoptim.SGD([a], nesterov=True)
    with pytest.raises(ValueError, match="initial_accumulator_value"):
        fastoptim.Adagrad([a], initial_accumulator_value=-1)


def _trained_optimizer(cls=fastoptim.Adam, **kw):
    rng = np.random.default_rng(1)
    params = [rng.standard_normal(6).astype(np.float32), rng.standard_normal((2, 3))]
    opt = cls([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.01}], **kw)
    for _ in range(3):
        opt.step([rng.standard_normal(6).astype(np.float32), rng.standard_normal((2, 3))])
    return opt, params


@pytest.mark.parametrize("grads_fn,exc,match", [
    (lambda p: [p[0].copy()], ValueError, "grads has 1 entries, expected 2"),
    (lambda p: [p[0].copy(), p[1].astype(np.float32)], TypeError, r"grads\[0\] has dtype"),
    (lambda p: [p[0].copy(), np.zeros(5)], ValueError, r"grads\[0\] has shape"),
    (lambda p: [p[0].copy(), "x"], TypeError, r"grads\[0\] must be a numpy.ndarray"),
    (lambda p: p[0].copy(), TypeError, "a single array is accepted only for one parameter"),
    (lambda p: {0: p[0]}, TypeError, "grads must be a list"),
])
def test_refused_step_changes_nothing_and_next_step_is_exact(grads_fn, exc, match):
    opt, params = _trained_optimizer()
    twin, twin_params = _trained_optimizer()
    _expect_refused(exc, match, lambda: opt.step(grads_fn(params)), opt, params)
    g = [np.full(6, 0.1, np.float32), np.full((2, 3), -0.2)]
    opt.step(g)
    twin.step([x.copy() for x in g])
    for a, b in zip(params, twin_params):
        np.testing.assert_array_equal(a, b)


def test_refused_step_in_second_group_does_not_update_first_group():
    opt, params = _trained_optimizer()
    opt.param_groups[1]["lr"] = -1.0
    _expect_refused(ValueError, "Invalid learning rate",
                    lambda: opt.step([np.ones(6, np.float32), np.ones((2, 3))]), opt, params)


def test_refused_first_step_creates_no_state():
    a, b = np.ones(4, np.float32), np.ones(3, np.float32)
    opt = fastoptim.Adam([a, b])
    with pytest.raises(TypeError):
        opt.step([np.ones(4, np.float32), np.ones(3)])
    assert opt.state == {} and opt.state_dict()["state"] == {}


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda sd: sd.pop("state"), ValueError, "missing the key 'state'"),
    (lambda sd: sd["param_groups"].pop(), ValueError, "different number of parameter groups"),
    (lambda sd: sd["param_groups"][0]["params"].append(7), ValueError, "doesn't match the size"),
    (lambda sd: sd["state"][0].pop("exp_avg"), ValueError, r"missing 'exp_avg'"),
    (lambda sd: sd["state"][0].pop("step"), ValueError, r"missing 'step'"),
    (lambda sd: sd["state"][0].update(step=-1), ValueError, "non-negative whole number"),
    (lambda sd: sd["state"][0].update(step=2.5), ValueError, "non-negative whole number"),
    (lambda sd: sd["state"][0].update(step="3"), TypeError, "must be a number"),
    (lambda sd: sd["state"][0].update(exp_avg=np.zeros(5)), ValueError, "has shape"),
    (lambda sd: sd["state"][0].update(exp_avg=np.array(["a"] * 6)), TypeError, "real numbers"),
    (lambda sd: sd["state"].update({9: {}}), ValueError, "which no parameter group lists"),
    (lambda sd: sd["param_groups"][1].update(lr=-3.0), ValueError, "Invalid learning rate"),
    (lambda sd: sd["state"].update({0: [1, 2]}), TypeError, "must be a dict"),
])
def test_malformed_state_dict_is_refused_and_changes_nothing(mutate, exc, match):
    opt, params = _trained_optimizer()
    sd = opt.state_dict()
    mutate(sd)
    _expect_refused(exc, match, lambda: opt.load_state_dict(sd), opt, params)
