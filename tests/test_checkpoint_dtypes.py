"""Checkpoints across state dtypes, the public bfloat16 converters, and refused loads.

* An optimizer's own ``state_dtype`` wins over the checkpoint's: float32 state loads
  into bfloat16 state rounded to nearest even (float64 values rounded once), bfloat16
  state into float32 state widened exactly; the continuation is held, bit for bit, to
  ``fastoptim.reference`` started from the converted state.
* ``fastoptim.bfloat16_to_float32`` / ``float32_to_bfloat16`` (the converters of
  ``fastoptim.reference``, not copies) and ``state_dict(bfloat16="float32")``.
* A refused load (bad shape, another rule's state dict, a wrong dtype) raises naming
  the entry and changes nothing: options, state bits, step counters.
No torch needed (tests/test_checkpoint_torch.py has the torch.optim side).
"""
import copy
import pickle

import numpy as np
import pytest

import fastoptim
from fastoptim import functional as F, reference as R

SHAPES = [(9,), (3, 4), ()]
K, N = 5, 6


def make_grads(seed=1, steps=K + N, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [[None if (k + i) % 4 == 3 else np.asarray(rng.standard_normal(s), np.float32)
             for i, s in enumerate(shapes)] for k in range(steps)]


def make_params(seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [np.asarray(rng.standard_normal(s), np.float32, order="F" if len(s) == 2 else "C")
            for s in shapes]


def adamw(params, **kw):
    return fastoptim.AdamW([{"params": params[:2]}, {"params": params[2:], "lr": 0.02}],
                           lr=0.01, amsgrad=True, weight_decay=0.05, **kw)


def run(opt, grads):
    for g in grads:
        opt.step([None if x is None else x.copy() for x in g])


def reference_continuation(params, sd, grads, state_dtype, rounding="nearest", seed=0):
    """fastoptim.reference.adamw_ from the loaded state: what the optimizer must give."""
    params = [p.copy(order="K") for p in params]
    groups = [(0.01, [0, 1]), (0.02, [2])]
    names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    state = {n: [sd["state"][i][n].copy(order="K") if i in sd["state"] else
                 np.zeros(params[i].shape, np.uint16 if state_dtype else np.float32)
                 for i in range(len(params))] for n in names}
    steps = np.array([sd["state"][i]["step"] if i in sd["state"] else 0
                      for i in range(len(params))], np.int64)
    for g in grads:
        for lr, idx in groups:
            sub = steps[idx]
            R.adamw_([params[i] for i in idx], [g[i] for i in idx],
                     *[[state[n][i] for i in idx] for n in names], sub, lr=lr,
                     amsgrad=True, weight_decay=0.05, state_dtype=state_dtype,
                     rounding=rounding, seed=seed)
            steps[idx] = sub
    return params, state, steps


def assert_matches_reference(opt, params, want):
    want_params, want_state, want_steps = want
    for a, b in zip(params, want_params):
        np.testing.assert_array_equal(a, b)
    for i in range(len(params)):
        assert opt.state[i]["step"] == want_steps[i]
        for name, arrays in want_state.items():
            assert opt.state[i][name].dtype == arrays[i].dtype
            np.testing.assert_array_equal(opt.state[i][name], arrays[i], err_msg=name)


# --- the optimizer's own state_dtype wins -------------------------------------------------

def test_float32_checkpoint_into_bfloat16_optimizer():
    grads = make_grads()
    params = make_params()
    saver = adamw(params)
    run(saver, grads[:K])
    sd = saver.state_dict()
    assert sd["state"][0]["exp_avg"].dtype == np.float32
    mine = [p.copy(order="K") for p in params]
    opt = adamw(mine, state_dtype="bfloat16", rounding="stochastic", seed=9)
    opt.load_state_dict(pickle.loads(pickle.dumps(sd)))
    # the optimizer's storage options stay; the checkpoint's (float32: its rounding and
    # seed shaped nothing) do not replace them
    for group in opt.param_groups:
        assert (group["state_dtype"], group["rounding"], group["seed"]) == \
            ("bfloat16", "stochastic", 9)
    loaded = opt.state_dict()
    for i, entry in sd["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            got = loaded["state"][i][name]
            assert got.dtype == np.uint16
            np.testing.assert_array_equal(got, R.float32_to_bfloat16(entry[name]))
            # nearest even: the widened value is the float32 one's nearest bfloat16
            wide = fastoptim.bfloat16_to_float32(got).astype(np.float64)
            assert np.all(np.abs(wide - entry[name]) <= np.abs(entry[name]) * 2.0 ** -8)
    # nearest, not stochastic, on load
    assert not np.array_equal(
        loaded["state"][1]["exp_avg_sq"],
        R.float32_to_bfloat16(sd["state"][1]["exp_avg_sq"],
                              np.full((3, 4), 0xFFFF, np.uint32)))
    want = reference_continuation(mine, loaded, grads[K:], "bfloat16", "stochastic", 9)
    run(opt, grads[K:])
    assert_matches_reference(opt, mine, want)


def test_bfloat16_checkpoint_into_float32_optimizer():
    grads = make_grads()
    params = make_params()
    saver = adamw(params, state_dtype="bfloat16", rounding="stochastic", seed=4)
    run(saver, grads[:K])
    sd = saver.state_dict()
    assert sd["state"][0]["exp_avg"].dtype == np.uint16
    mine = [p.copy(order="K") for p in params]
    opt = adamw(mine)
    opt.load_state_dict(sd)
    assert all(g["state_dtype"] is None for g in opt.param_groups)
    loaded = opt.state_dict()
    for i, entry in sd["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            got = loaded["state"][i][name]
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, fastoptim.bfloat16_to_float32(entry[name]))
            # widening is exact: back to the same bits
            np.testing.assert_array_equal(fastoptim.float32_to_bfloat16(got), entry[name])
    want = reference_continuation(mine, loaded, grads[K:], None)
    run(opt, grads[K:])
    assert_matches_reference(opt, mine, want)


def test_bfloat16_checkpoint_keeps_its_rounding_and_seed():
    """Where the checkpoint had bfloat16 state, its rounding and seed shaped the run:
    loading them continues exactly as never stopping."""
    grads = make_grads()
    params = make_params()
    straight = [p.copy(order="K") for p in params]
    never_stopped = adamw(straight, state_dtype="bfloat16", rounding="stochastic", seed=4)
    run(never_stopped, grads)
    saver = adamw(params, state_dtype="bfloat16", rounding="stochastic", seed=4)
    run(saver, grads[:K])
    opt = adamw(params, state_dtype="bfloat16")          # nearest, seed 0
    opt.load_state_dict(saver.state_dict())
    assert (opt.param_groups[0]["rounding"], opt.param_groups[0]["seed"]) == ("stochastic", 4)
    run(opt, grads[K:])
    for a, b in zip(params, straight):
        np.testing.assert_array_equal(a, b)


def test_float64_values_round_once_into_bfloat16_state():
    params = [np.ones(3, np.float32)]
    opt = fastoptim.Adam(params, state_dtype="bfloat16")
    tie_plus = 1 + 2 ** -8 + 2 ** -30   # just above a bfloat16 tie; float32 rounds it onto it
    sd = {"state": {0: {"step": 2, "exp_avg": [tie_plus, 1.0, -tie_plus],
                        "exp_avg_sq": np.array([1.0, 2.0, 3.0])}},
          "param_groups": [{"params": [0]}]}
    opt.load_state_dict(sd)
    np.testing.assert_array_equal(opt.state[0]["exp_avg"],
                                  np.array([0x3F81, 0x3F80, 0xBF81], np.uint16))
    assert R.float32_to_bfloat16(np.float32(tie_plus)) == 0x3F80   # (twice: wrong)


@pytest.mark.parametrize("src,dst", [(None, "bfloat16"), ("bfloat16", None),
                                     ("bfloat16", "bfloat16")])
def test_round_trip_through_the_float32_view(src, dst):
    """state_dict(bfloat16="float32") loads back to the very bits."""
    grads = make_grads()
    params = make_params()
    a = adamw(params, state_dtype=src)
    run(a, grads[:K])
    b = adamw([p.copy(order="K") for p in params], state_dtype=dst)
    b.load_state_dict(a.state_dict(bfloat16="float32"))
    c = adamw([p.copy(order="K") for p in params], state_dtype=dst)
    c.load_state_dict(a.state_dict())
    for i in b.state:
        for name, v in b.state[i].items():
            if isinstance(v, np.ndarray):
                assert v.dtype == (np.uint16 if dst else np.float32)
                np.testing.assert_array_equal(v, c.state[i][name])


# --- the public converters and the float32 view ---------------------------------------------

def test_public_converters_are_the_reference_ones():
    assert fastoptim.bfloat16_to_float32 is R.bfloat16_to_float32
    assert fastoptim.float32_to_bfloat16 is R.float32_to_bfloat16
    assert {"bfloat16_to_float32", "float32_to_bfloat16"} <= set(fastoptim.__all__)


def test_bfloat16_to_float32_values():
    bits = np.array([0x3F80, 0xC000, 0x7F80, 0xFF80, 0x0001, 0x8000, 0x7F7F, 0x7FC0],
                    np.uint16)
    got = fastoptim.bfloat16_to_float32(bits)
    assert got.dtype == np.float32
    assert list(got[:6]) == [1.0, -2.0, np.inf, -np.inf, 2.0 ** -133, 0.0]
    assert np.signbit(got[5]) and got[6] == np.float32(3.3895313892515355e38)
    assert np.isnan(got[7])
    # shape and memory order kept; int16 (torch's view of bfloat16) read as the same bits
    f = np.asfortranarray(np.arange(12, dtype=np.uint16).reshape(3, 4) + 0x3F80)
    wide = fastoptim.bfloat16_to_float32(f)
    assert wide.shape == (3, 4) and wide.flags.f_contiguous
    np.testing.assert_array_equal(fastoptim.bfloat16_to_float32(bits.view(np.int16)), got)
    np.testing.assert_array_equal(fastoptim.bfloat16_to_float32(bits.astype(np.int64)), got)
    assert fastoptim.bfloat16_to_float32(np.uint16(0x4040)).shape == ()
    with pytest.raises(TypeError, match="bits must hold bfloat16 bits .*got dtype float32"):
        fastoptim.bfloat16_to_float32(np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"integers in \[0, 65535\]"):
        fastoptim.bfloat16_to_float32(np.array([70000]))


def test_float32_to_bfloat16_rounds_to_nearest_even_and_round_trips_every_value():
    x = np.array([1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, -1 - 2 ** -8,
                  3.3963e38, np.inf, np.nan], np.float32)
    got = fastoptim.float32_to_bfloat16(x)
    assert list(got[:7]) == [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0xBF80, 0x7F80, 0x7F80]
    assert np.isnan(fastoptim.bfloat16_to_float32(got[7]))
    every = np.arange(65536, dtype=np.uint16)
    wide = fastoptim.bfloat16_to_float32(every)
    back = fastoptim.float32_to_bfloat16(wide)
    keep = ~np.isnan(wide)
    np.testing.assert_array_equal(back[keep], every[keep])
    assert np.all(np.isnan(fastoptim.bfloat16_to_float32(back[~keep])))
    # float64 input, each bfloat16 value +- a quarter ulp and exact midpoints: one rounding
    finite = every[(every & 0x7FFF) < 0x7F7F]           # finite, and so is the next
    lo = fastoptim.bfloat16_to_float32(finite).astype(np.float64)
    hi = fastoptim.bfloat16_to_float32(finite + 1).astype(np.float64)   # next magnitude
    mid = (lo + hi) / 2
    np.testing.assert_array_equal(fastoptim.float32_to_bfloat16(lo + (hi - lo) / 4), finite)
    np.testing.assert_array_equal(fastoptim.float32_to_bfloat16(hi - (hi - lo) / 4),
                                  finite + 1)
    np.testing.assert_array_equal(fastoptim.float32_to_bfloat16(mid),
                                  np.where(finite % 2 == 0, finite, finite + 1))
    above = mid + (hi - mid) * 2.0 ** -20     # off the tie by less than float32 resolves
    np.testing.assert_array_equal(fastoptim.float32_to_bfloat16(above), finite + 1)


def test_state_dict_float32_view_of_bfloat16_state():
    grads = make_grads()
    params = make_params()
    opt = adamw(params, state_dtype="bfloat16")
    run(opt, grads[:K])
    live = opt.state
    bits = opt.state_dict()
    wide = opt.state_dict(bfloat16="float32")
    assert bits["param_groups"] == wide["param_groups"]
    for i, entry in wide["state"].items():
        assert entry["step"] == bits["state"][i]["step"]
        for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert live[i][name].dtype == np.uint16 and entry[name].dtype == np.float32
            assert entry[name].flags.f_contiguous == live[i][name].flags.f_contiguous
            np.testing.assert_array_equal(entry[name],
                                          fastoptim.bfloat16_to_float32(live[i][name]))
            assert not np.shares_memory(entry[name], live[i][name])
    # float32 state: the same either way
    plain = adamw(make_params())
    run(plain, grads[:K])
    a, b = plain.state_dict(), plain.state_dict(bfloat16="float32")
    for i in a["state"]:
        for name, v in a["state"][i].items():
            np.testing.assert_array_equal(v, b["state"][i][name])
    with pytest.raises(ValueError, match="bfloat16 must be 'bits' or 'float32', got 'f32'"):
        opt.state_dict(bfloat16="f32")


# --- refused loads change nothing -----------------------------------------------------------

def snapshot(opt):
    """Options, step counters, live state arrays (identity and bits), params."""
    return [repr([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
            [(id(p), p.tobytes(order="A")) for g in opt.param_groups for p in g["params"]],
            [(s.steps.tobytes(), s.complete_for,
              sorted((k, [None if a is None else (id(a), a.dtype.str, a.tobytes(order="A"))
                          for a in v]) for k, v in s.arrays.items()))
             for s in opt._gstate],
            opt.skipped_steps]


def expect_refused(opt, sd, exc, match):
    before = snapshot(opt)
    with pytest.raises(exc, match=match):
        opt.load_state_dict(sd)
    assert snapshot(opt) == before, "a refused load changed the optimizer"


RULES = {
    "sgd": lambda ps: fastoptim.SGD(ps, lr=0.1),
    "sgd-momentum": lambda ps: fastoptim.SGD(ps, lr=0.1, momentum=0.9),
    "adagrad": lambda ps: fastoptim.Adagrad(ps),
    "rmsprop": lambda ps: fastoptim.RMSprop(ps, centered=True, momentum=0.5),
    "adam": lambda ps: fastoptim.Adam(ps, amsgrad=True),
    "adamw-bf16": lambda ps: fastoptim.AdamW(ps, state_dtype="bfloat16"),
    "adahessian": lambda ps: fastoptim.AdaHessian(ps),
    "newton": lambda ps: fastoptim.Newton(ps, damping=1.0),
}


def trained(rule, steps=3):
    rng = np.random.default_rng(2)
    params = [np.asarray(rng.standard_normal(s), np.float32) for s in [(4,), (2, 2)]]
    opt = RULES[rule](params)
    for _ in range(steps):
        grads = [np.asarray(rng.standard_normal(p.shape), np.float32) for p in params]
        if rule == "adahessian":
            opt.step(grads, [np.abs(g) for g in grads])
        elif rule == "newton":
            opt.step(grads, [np.eye(p.size, dtype=np.float32) * 2 for p in params])
        else:
            opt.step(grads)
    return opt


SAME_LAYOUT = {frozenset({"sgd", "sgd-momentum"}), frozenset({"adam", "adamw-bf16"})}


@pytest.mark.parametrize("src", list(RULES))
@pytest.mark.parametrize("dst", list(RULES))
def test_another_rules_state_dict_is_refused(src, dst):
    """Every pair of rules: refused naming the entry (Adam <-> AdamW and SGD with or
    without momentum share their layout and load: the class decides the rule, as
    torch.optim.AdamW does)."""
    if src == dst or frozenset({src, dst}) in SAME_LAYOUT:
        opt = trained(dst)
        opt.load_state_dict(trained(src).state_dict())
        return
    opt = trained(dst)
    sd = trained(src).state_dict()
    expect_refused(opt, sd, ValueError,
                   r"state_dict\['(param_groups|state)'\]\[0\] (has|is missing) .*"
                   r"(another optimizer's state dict|'step')")


def _spoil_last(name, value):
    def spoil(sd):
        sd["param_groups"][0]["lr"] = 0.5        # a partial load would show this
        sd["state"][1][name] = value
        return sd
    return spoil


@pytest.mark.parametrize("rule,spoil,exc,match", [
    ("adamw-bf16", _spoil_last("exp_avg_sq", np.zeros(5, np.float32)), ValueError,
     r"\['state'\]\[1\]\['exp_avg_sq'\] has shape \(5,\), but the parameter has shape "
     r"\(2, 2\)"),
    ("adamw-bf16", _spoil_last("exp_avg", np.zeros((2, 2), np.int64)), TypeError,
     r"\['state'\]\[1\]\['exp_avg'\] has dtype int64: state arrays hold floating-point"),
    ("adam", _spoil_last("max_exp_avg_sq", np.zeros((2, 2), np.uint8)), TypeError,
     r"\['max_exp_avg_sq'\] has dtype uint8"),
    ("adagrad", _spoil_last("sum", np.zeros((2, 2), np.int32)), TypeError,
     r"\['sum'\] has dtype int32"),
    ("rmsprop", _spoil_last("grad_avg", np.zeros((2, 2), np.complex64)), TypeError,
     r"\['grad_avg'\] must hold real numbers, got dtype complex64"),
    ("sgd-momentum", _spoil_last("momentum_buffer", [[True, False]] * 2), TypeError,
     r"\['momentum_buffer'\] must hold real numbers, got dtype bool"),
    ("adam", _spoil_last("exp_avg_inf", np.zeros((2, 2))), None, None),  # unknown: ignored
    ("adam", _spoil_last("exp_inf", np.zeros((2, 2))), ValueError,
     r"\['state'\]\[1\] has 'exp_inf', which Adam does not keep"),
    ("sgd-momentum", _spoil_last("sum", np.zeros((2, 2))), ValueError,
     r"\['state'\]\[1\] has 'sum', which SGD does not keep"),
    ("adam", lambda sd: sd["param_groups"][0].update(decoupled_weight_decay=True) or sd,
     ValueError, r"\['decoupled_weight_decay'\] is True \(AdamW's rule\)"),
    ("adam", lambda sd: sd["param_groups"][0].update(decoupled_weight_decay="yes") or sd,
     TypeError, r"\['decoupled_weight_decay'\] must be a bool, got str"),
    ("rmsprop", lambda sd: sd["param_groups"][0].pop("alpha") and
     sd["param_groups"][0].update(foreach=None) or sd, ValueError,
     r"\]\[0\] has torch.optim's keys but not the option 'alpha'"),
], ids=["shape", "int64", "uint8", "int32", "complex", "bool", "unknown-name",
        "adamax-state", "adagrad-state", "decoupled", "decoupled-str", "torch-keys"])
def test_bad_entries_are_refused_and_change_nothing(rule, spoil, exc, match):
    opt = trained(rule)
    sd = spoil(copy.deepcopy(opt.state_dict()))
    if exc is None:
        opt.load_state_dict(sd)
        assert opt.param_groups[0]["lr"] == 0.5
        return
    expect_refused(opt, sd, exc, r"state_dict.*" + match)
    # and it still steps, from the state it had
    twin = trained(rule)
    grads = [np.full(p.shape, 0.1, np.float32) for g in opt.param_groups
             for p in g["params"]]
    run(opt, [grads])
    run(twin, [grads])
    for a, b in zip(opt.state_dict()["state"].values(), twin.state_dict()["state"].values()):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_uint16_state_is_read_as_bfloat16_bits_by_a_float_optimizer():
    opt = trained("adam")
    sd = opt.state_dict()
    bits = np.array([[0x3F80, 0xC000], [0x4040, 0x0000]], np.uint16)
    sd["state"][1]["exp_avg"] = bits
    opt.load_state_dict(sd)
    np.testing.assert_array_equal(opt.state[1]["exp_avg"], [[1.0, -2.0], [3.0, 0.0]])
