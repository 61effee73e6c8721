"""NaN/Inf gradients: propagate (as torch, the default), skip the whole step, or raise."""
import pickle

import numpy as np
import pytest

import fastoptim

CLASSES = [
    (fastoptim.SGD, dict(lr=0.1, momentum=0.9)),
    (fastoptim.Adagrad, {}),
    (fastoptim.RMSprop, dict(centered=True)),
    (fastoptim.Adam, dict(amsgrad=True)),
    (fastoptim.AdamW, dict(state_dtype="bfloat16")),
]


def _make(cls, kw, nonfinite, dtype=np.float32, n=10):
    params = [np.linspace(-1, 1, n).astype(dtype), np.ones((3, 4), dtype)]
    return params, cls(params, nonfinite=nonfinite, **kw)


def _snapshot(opt, params):
    return pickle.dumps((opt.state_dict(), [p.tobytes() for p in params]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("cls,kw", CLASSES, ids=lambda x: getattr(x, "__name__", ""))
def test_skip_changes_nothing_and_counts(cls, kw, bad):
    params, opt = _make(cls, kw, "skip")
    good = [np.full(10, 0.5, np.float32), np.full((3, 4), 0.25, np.float32)]
    assert opt.step(good) is True
    before = _snapshot(opt, params)
    grads = [g.copy() for g in good]
    grads[1][2, 3] = bad
    assert opt.step(grads) is False
    assert opt.skipped_steps == 1
    after_sd = opt.state_dict()
    assert after_sd.pop("skipped_steps") == 1
    assert pickle.dumps((after_sd, [p.tobytes() for p in params])) == before
    # the next good step is exactly the step the optimizer would have taken
    twin_params, twin = _make(cls, kw, "skip")
    twin.step(good)
    opt.step(good)
    twin.step(good)
    for a, b in zip(params, twin_params):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cls,kw", CLASSES, ids=lambda x: getattr(x, "__name__", ""))
def test_raise_names_the_gradient_and_changes_nothing(cls, kw):
    params, opt = _make(cls, kw, "raise")
    good = [np.full(10, 0.5, np.float32), np.full((3, 4), 0.25, np.float32)]
    opt.step(good)
    before = _snapshot(opt, params)
    with pytest.raises(ValueError, match=r"grads\[1\] contains NaN or Inf"):
        opt.step([good[0], np.full((3, 4), np.nan, np.float32)])
    assert _snapshot(opt, params) == before


def test_propagate_is_the_default_and_matches_torch_semantics():
    params, opt = _make(fastoptim.Adam, {}, "propagate")
    assert fastoptim.Adam([np.ones(2)]).nonfinite == "propagate"
    g = [np.full(10, 0.5, np.float32), np.full((3, 4), 0.25, np.float32)]
    g[0][4] = np.nan
    assert opt.step(g) is True
    assert np.isnan(params[0][4]) and np.isfinite(np.delete(params[0], 4)).all()


def test_large_strided_and_float64_gradients_are_checked():
    n = (1 << 20) + 3                       # the parallel check path
    p = np.zeros(n)
    opt = fastoptim.SGD([p], lr=1.0, nonfinite="skip")
    g = np.zeros(n)
    g[-1] = np.inf
    assert opt.step([g]) is False and not p.any()
    big = np.zeros(2 * n)
    big[2 * (n - 1)] = np.nan               # a strided view's last element
    assert opt.step([big[::2]]) is False and not p.any()
    g[-1] = 1.0
    assert opt.step([g]) is True and p[-1] == -1.0
    assert opt.skipped_steps == 2


def test_none_grads_are_ignored_by_the_check_and_counter_round_trips():
    a, b = np.ones(3), np.ones(3)
    opt = fastoptim.Adam([a, b], nonfinite="skip")
    assert opt.step([None, np.ones(3)]) is True
    opt.step([np.array([np.nan, 0, 0]), None])
    clone = fastoptim.Adam([a.copy(), b.copy()], nonfinite="skip")
    clone.load_state_dict(opt.state_dict())
    assert clone.skipped_steps == 1
    assert pickle.loads(pickle.dumps(opt)).skipped_steps == 1
    with pytest.raises(ValueError, match="nonfinite must be"):
        fastoptim.SGD([a], nonfinite="ignore")
    sd = opt.state_dict()
    sd["skipped_steps"] = -1
    with pytest.raises(ValueError, match="skipped_steps"):
        clone.load_state_dict(sd)


def test_second_order_optimizers_honour_nonfinite():
    w = np.array([1.0, 2.0])
    opt = fastoptim.Newton([w], nonfinite="skip")
    assert opt.step([np.array([np.nan, 1.0])], [np.eye(2)]) is False
    np.testing.assert_array_equal(w, [1.0, 2.0])
    ah = fastoptim.AdaHessian([w], nonfinite="raise")
    with pytest.raises(ValueError, match="contains NaN or Inf"):
        ah.step([np.array([np.inf, 0.0])], [np.ones(2)])
