"""Optimizer classes: torch.optim's shape over the compiled kernels."""
import io
import json
import pickle

import numpy as np
import pytest

import fastoptim
from fastoptim import reference as R

from rules import assert_close

CLASSES = {
    "sgd": (fastoptim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "sgd-plain": (fastoptim.SGD, dict(lr=0.05)),
    "adagrad": (fastoptim.Adagrad, dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.2)),
    "rmsprop": (fastoptim.RMSprop, dict(lr=0.01, momentum=0.5, centered=True)),
    "adam": (fastoptim.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    "adamw": (fastoptim.AdamW, dict(lr=0.01, maximize=True)),
    "adamax": (fastoptim.Adamax, dict(lr=0.01, weight_decay=0.1, betas=(0.4, 0.95))),
    "adadelta": (fastoptim.Adadelta, dict(lr=0.5, weight_decay=0.1, rho=0.4)),
    "radam": (fastoptim.RAdam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    "rprop": (fastoptim.Rprop, dict(lr=0.05, etas=(0.3, 1.5))),
    "nadam": (fastoptim.NAdam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    "asgd": (fastoptim.ASGD, dict(lr=0.05, t0=4.0, weight_decay=0.1)),
    "lion": (fastoptim.Lion, dict(lr=0.01, weight_decay=0.1, betas=(0.5, 0.95))),
    "adopt": (fastoptim.ADOPT, dict(lr=0.01, weight_decay=0.1, betas=(0.5, 0.95))),
    "ademamix": (fastoptim.AdEMAMix, dict(lr=0.01, weight_decay=0.1, t_alpha_beta3=20.0)),
}

SHAPES = [(), (0,), (7,), (3, 4), (1000 + 5,)]


def _params(seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    out = [np.asarray(rng.standard_normal(s), dtype=dtype) for s in SHAPES]
    out.append(np.asfortranarray(rng.standard_normal((5, 6)).astype(dtype)))
    return out


def _grads(rng, params, skip=()):
    return [None if i in skip else np.asarray(rng.standard_normal(p.shape), p.dtype)
            for i, p in enumerate(params)]


def _reference_state(name, params, kw):
    """The reference's state lists, as the class would create them."""
    if name.startswith("sgd"):
        return dict(momentum_buffers=[np.zeros_like(p) for p in params])
    if name == "adagrad":
        return dict(state_sums=[np.full_like(p, kw["initial_accumulator_value"])
                                for p in params])
    if name == "rmsprop":
        return dict(square_avgs=[np.zeros_like(p) for p in params],
                    grad_avgs=[np.zeros_like(p) for p in params],
                    momentum_buffers=[np.zeros_like(p) for p in params])
    if name == "adamax":
        return dict(exp_avgs=[np.zeros_like(p) for p in params],
                    exp_infs=[np.zeros_like(p) for p in params])
    if name == "adadelta":
        return dict(square_avgs=[np.zeros_like(p) for p in params],
                    acc_deltas=[np.zeros_like(p) for p in params])
    if name == "radam":
        return dict(exp_avgs=[np.zeros_like(p) for p in params],
                    exp_avg_sqs=[np.zeros_like(p) for p in params])
    if name == "lion":
        return dict(exp_avgs=[np.zeros_like(p) for p in params])
    if name == "adopt":
        return dict(exp_avgs=[np.zeros_like(p) for p in params],
                    exp_avg_sqs=[np.zeros_like(p) for p in params])
    if name == "ademamix":
        return dict(exp_avgs=[np.zeros_like(p) for p in params],
                    exp_avg_sqs=[np.zeros_like(p) for p in params],
                    exp_avg_slows=[np.zeros_like(p) for p in params])
    if name == "asgd":
        return dict(axs=[np.zeros_like(p) for p in params],
                    etas=[np.full((), kw["lr"], np.float32) for p in params],
                    mus=[np.ones((), np.float32) for p in params])
    if name == "nadam":
        return dict(exp_avgs=[np.zeros_like(p) for p in params],
                    exp_avg_sqs=[np.zeros_like(p) for p in params],
                    mu_products=[np.ones((), np.float32) for p in params])
    if name == "rprop":
        return dict(prevs=[np.zeros_like(p) for p in params],
                    step_size_arrays=[np.full_like(p, kw["lr"]) for p in params])
    return dict(exp_avgs=[np.zeros_like(p) for p in params],
                exp_avg_sqs=[np.zeros_like(p) for p in params],
                max_exp_avg_sqs=[np.zeros_like(p) for p in params])


def _reference_step(name, params, grads, state, steps, kw):
    fn = {"sgd": R.sgd_, "sgd-plain": R.sgd_, "adagrad": R.adagrad_, "rmsprop": R.rmsprop_,
          "adam": R.adam_, "adamw": R.adamw_, "adamax": R.adamax_,
          "adadelta": R.adadelta_, "radam": R.radam_, "rprop": R.rprop_,
          "nadam": R.nadam_, "asgd": R.asgd_, "lion": R.lion_,
          "adopt": R.adopt_, "ademamix": R.ademamix_}[name]
    kw = {k: v for k, v in kw.items() if k != "initial_accumulator_value"}
    fn(params, grads, *state.values(), steps, **kw)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(CLASSES))
def test_class_equals_reference_over_many_steps(name, dtype):
    """Two groups (second with its own lr), skipped grads, an lr schedule."""
    cls, kw = CLASSES[name]
    params, ref = _params(0, dtype), _params(0, dtype)
    split = 3
    opt = cls([{"params": params[:split]}, {"params": params[split:], "lr": 0.003}], **kw)
    kw2 = dict(kw, lr=0.003)
    states = [_reference_state(name, ref[:split], kw), _reference_state(name, ref[split:], kw2)]
    steps = [np.zeros(split, np.int64), np.zeros(len(ref) - split, np.int64)]
    rng = np.random.default_rng(1)
    for k in range(60):
        grads = _grads(rng, params, skip={k % 7} if k % 3 else ())
        if k == 30:
            opt.param_groups[0]["lr"] *= 0.5
            kw = dict(kw, lr=kw["lr"] * 0.5)
        opt.step(grads)
        _reference_step(name, ref[:split], grads[:split], states[0], steps[0], kw)
        _reference_step(name, ref[split:], grads[split:], states[1], steps[1], kw2)
        if cls._rule.group_step:            # (ADOPT: one count per group, every step)
            for s in steps:
                s[:] = k + 1
    for a, b in zip(params, ref):
        assert_close(a, b, dtype, 60)
    if name != "sgd-plain":
        flat_steps = np.concatenate(steps)
        for idx, st in opt.state.items():
            if "step" in st:
                assert st["step"] == flat_steps[idx]


@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("via", ["object", "pickle", "npz"])
def test_state_dict_round_trip_continues_bit_identically(name, via):
    cls, kw = CLASSES[name]
    rng = np.random.default_rng(2)
    grads = [_grads(rng, _params(0), skip={1} if k == 2 else ()) for k in range(20)]

    p_straight = _params(0)
    straight = cls(p_straight, **kw)
    for g in grads:
        straight.step(g)

    p_first = _params(0)
    first = cls(p_first, **kw)
    for g in grads[:10]:
        first.step(g)
    sd = first.state_dict()
    if via == "pickle":
        sd = pickle.loads(pickle.dumps(sd))
    elif via == "npz":
        sd = _npz_round_trip(sd)
    resumed_params = [p.copy(order="K") for p in p_first]
    resumed = cls(resumed_params, **kw)
    resumed.load_state_dict(sd)
    for g in grads[10:]:
        resumed.step(g)
    for a, b in zip(resumed_params, p_straight):
        np.testing.assert_array_equal(a, b)
    assert _state_equal(resumed.state_dict(), straight.state_dict())


def _npz_round_trip(sd):
    """Flatten a state dict into np.savez arrays and rebuild it."""
    flat = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            flat[f"{idx}/{key}"] = np.asarray(value)
    buf = io.BytesIO()
    np.savez(buf, **flat)
    buf.seek(0)
    loaded = np.load(buf)
    state = {}
    for name in loaded.files:
        idx, key = name.split("/")
        value = loaded[name]
        state.setdefault(int(idx), {})[key] = value if value.ndim else value[()]
    return {"state": state, "param_groups": sd["param_groups"]}


def _state_equal(a, b):
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    for idx in a["state"]:
        x, y = a["state"][idx], b["state"][idx]
        if x.keys() != y.keys():
            return False
        for key in x:
            if not np.array_equal(x[key], y[key], equal_nan=True):
                return False
    return True


def test_state_layout_matches_torch_names():
    p = [np.zeros(3), np.zeros(2)]
    opt = fastoptim.Adam(p, amsgrad=True)
    assert opt.state_dict() == {"state": {}, "param_groups": [dict(
        lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=True,
        maximize=False, state_dtype=None, rounding="nearest", seed=0, params=[0, 1])]}
    opt.step([np.ones(3), None])
    sd = opt.state_dict()
    assert list(sd["state"]) == [0]
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert sd["state"][0]["step"] == 1
    sgd = fastoptim.SGD(p, lr=0.1)
    sgd.step([np.ones(3), np.ones(2)])
    assert sgd.state_dict()["state"] == {}          # plain SGD keeps no state, as torch's
    ada = fastoptim.Adagrad(p, initial_accumulator_value=0.5)
    assert ada.state[0]["step"] == 0 and np.all(ada.state[0]["sum"] == 0.5)
    rms = fastoptim.RMSprop(p, momentum=0.1, centered=True)
    rms.step([np.ones(3), np.ones(2)])
    assert set(rms.state[1]) == {"step", "square_avg", "momentum_buffer", "grad_avg"}


def test_none_grad_leaves_state_and_step_alone():
    a, b = np.ones(4), np.ones(4)
    opt = fastoptim.Adam([a, b], lr=0.1)
    opt.step([np.ones(4), np.ones(4)])
    before = opt.state[1]["exp_avg"].copy(), b.copy()
    opt.step([np.ones(4), None])
    assert opt.state[0]["step"] == 2 and opt.state[1]["step"] == 1
    np.testing.assert_array_equal(opt.state[1]["exp_avg"], before[0])
    np.testing.assert_array_equal(b, before[1])


def test_add_param_group_and_zero_state():
    a, b = np.ones(3), np.ones(2, np.float32)
    opt = fastoptim.SGD([a], lr=0.1, momentum=0.9)
    opt.add_param_group({"params": [b], "lr": 0.5})
    assert opt.param_groups[1]["momentum"] == 0.9 and opt.param_groups[1]["lr"] == 0.5
    opt.step([np.ones(3), np.ones(2, np.float32)])
    assert b[0] == np.float32(0.5) and a[0] == 0.9
    opt.zero_state()
    assert opt.state == {}
    opt.step([np.ones(3), np.ones(2, np.float32)])      # buffer starts again from g
    assert a[0] == pytest.approx(0.8)


def test_mixed_dtypes_and_layouts_in_one_group():
    rng = np.random.default_rng(5)
    ps = [rng.standard_normal(100).astype(np.float32), rng.standard_normal((8, 9)),
          np.asfortranarray(rng.standard_normal((6, 7)).astype(np.float32))]
    ref = [p.copy(order="K") for p in ps]
    opt = fastoptim.Adam(ps, lr=0.01)
    states = [[np.zeros_like(p) for p in ref] for _ in range(2)]
    steps = np.zeros(3, np.int64)
    for _ in range(5):
        # grads in C order even for the F-ordered parameter: copied into its order
        grads = [np.ascontiguousarray(rng.standard_normal(p.shape).astype(p.dtype))
                 for p in ps]
        opt.step(grads)
        R.adam_(ref, grads, states[0], states[1], None, steps, lr=0.01)
    for a, b in zip(ps, ref):
        np.testing.assert_array_equal(a, b)


def test_strided_grad_is_read_correctly():
    p = np.ones((4, 5))
    big = np.arange(40.0).reshape(8, 5)
    opt = fastoptim.SGD([p], lr=0.1)
    opt.step([big[::2]])
    np.testing.assert_array_equal(p, 1 - 0.1 * big[::2])


def test_repr_and_pickle_of_optimizer():
    opt = fastoptim.AdamW([np.ones(3)], lr=0.02)
    assert "AdamW" in repr(opt) and "lr: 0.02" in repr(opt)
    opt.step([np.ones(3)])
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.state_dict()["state"][0]["step"] == 1


def test_threads_do_not_change_results():
    """1 and 2 threads, sizes whose split points fall mid-vector: bit-identical."""
    rng = np.random.default_rng(9)
    sizes = [fastoptim.get_serial_threshold() * 2 + 13, 3, 50_001, 17]
    results = []
    try:
        for n_threads in (1, 2):
            fastoptim.set_num_threads(n_threads)
            assert fastoptim.get_num_threads() == (n_threads if fastoptim.config()["openmp"]
                                                   else 1)
            params = [np.random.default_rng(1).standard_normal(n).astype(np.float32)
                      for n in sizes]
            for cls, kw in CLASSES.values():
                opt = cls(params, **kw)
                g_rng = np.random.default_rng(2)
                for _ in range(3):
                    opt.step([g_rng.standard_normal(n).astype(np.float32) for n in sizes])
            results.append([p.copy() for p in params])
    finally:
        fastoptim.set_num_threads(None)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_thread_settings():
    with pytest.raises(ValueError, match="nonzero"):
        fastoptim.set_num_threads(0)
    with pytest.raises(TypeError, match="int or None"):
        fastoptim.set_num_threads(1.5)
    try:
        fastoptim.set_num_threads(-1)
        assert fastoptim.get_num_threads() >= 1
    finally:
        fastoptim.set_num_threads(None)


def test_show_config_names_the_kernel_path(capsys):
    fastoptim.show_config()
    out = capsys.readouterr().out
    assert "kernel_path" in out and fastoptim.config()["kernel_path"] in out
    assert "openmp" in out


def test_serial_threshold_calibrates_per_rule_at_first_use():
    if not fastoptim.config()["openmp"] or fastoptim.get_num_threads() < 2:
        pytest.skip("needs OpenMP and two threads")
    p = np.ones(6000, np.float32)
    opt = fastoptim.Adagrad([p])
    for _ in range(4):
        opt.step([np.ones(6000, np.float32)])
    cal = fastoptim.config()["calibration"]
    entry = cal["rules"]["adagrad/float32"]
    json.dumps(fastoptim.config())          # a JSON-able report (the benchmark saves it)
    assert 2048 <= entry["threshold"] <= 1 << 20 and entry["ns_per_element"] > 0
    assert cal["region_ns"] > 0
    try:
        fastoptim.set_serial_threshold(10)
        assert fastoptim.get_serial_threshold() == 10
    finally:
        fastoptim.set_serial_threshold(None)
    with pytest.raises(ValueError, match="non-negative int or None"):
        fastoptim.set_serial_threshold(-1)


def test_large_state_arrays_are_placed_off_the_parameter_page_offset():
    p = np.asfortranarray(np.random.default_rng(0).standard_normal((300, 200)))
    opt = fastoptim.Adam([p], amsgrad=True)
    opt.step([np.ones_like(p)])
    addr = lambda a: a.__array_interface__["data"][0]
    offsets = sorted((addr(opt.state[0][k]) - addr(p)) % 4096
                     for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))
    assert offsets == [1088, 2176, 3264]
    for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert opt.state[0][k].flags.f_contiguous and opt.state[0][k].shape == p.shape
    q = p.copy(order="F")
    ref = fastoptim.Adam([np.ascontiguousarray(q)], amsgrad=True)
    # same numbers as unplaced state (placement changes addresses, not values)
    r = np.ascontiguousarray(np.asfortranarray(np.random.default_rng(0).standard_normal(
        (300, 200))))
    ref = fastoptim.Adam([r], amsgrad=True)
    ref.step([np.ones_like(r)])
    np.testing.assert_array_equal(np.ascontiguousarray(p), r)
