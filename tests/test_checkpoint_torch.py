"""Checkpoints between torch.optim and fastoptim's NumPy optimizers, in both directions.

torch -> fastoptim: ``torch.optim.X`` runs K steps on tensors; its ``state_dict()``
(as it is, or saved with ``torch.save`` and read back with
``torch.load(..., weights_only=True)``) is loaded into ``fastoptim.X`` built, with
default options, on NumPy copies of the parameters (2-D ones in Fortran order). The
loaded options must be torch's and the loaded state torch's bit for bit; then both
continue N steps with the same gradients and a learning-rate change, and must agree to
rounding: TOL eps of the magnitude of each role (all parameters, all ``exp_avg``...),
the yardstick of test_torch_parity.py, which explains why the two are not
bit-identical (torch fuses multiply-adds, its sqrt is not correctly rounded).

fastoptim -> torch.optim: the same, the other way round, the arrays handed to torch
as tensors (``torch.from_numpy``).

The parameters cover two groups (the second with its own learning rate), a 0-d
array, a large one, one that skips steps (including the first, so its state starts
late) and one that never gets a gradient (so it has no state).
"""
import copy
import io
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the torch.optim "
                            "checkpoint tests need it")

import fastoptim  # noqa: E402

K, N = 5, 4                 # torch steps before the checkpoint, steps after it
LR_CHANGE = 2               # after this many steps past the checkpoint, lr *= 0.5
SHAPES = [(7,), (3, 4), (), (1003,), (5,)]
SPLIT = 3                   # params[:SPLIT] in group 0, the rest in group 1
NO_GRAD = 4                 # this parameter never gets a gradient
# Largest error measured here (torch 2.13 CPU on AVX2, both directions, every config,
# seeds 0-5): 1.5 eps of the role's magnitude, in float32 and in float64 alike. 8 eps
# leaves room for other CPUs' torch kernels and still rejects a 1e-9 relative change
# of one state element, or a step counter off by one (test_the_comparison_is_sharp).
TOL = 8.0

# name -> (torch.optim class name, fastoptim class, options)
CONFIGS = {
    "sgd": ("SGD", fastoptim.SGD, dict(lr=0.05)),
    "sgd-momentum": ("SGD", fastoptim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1,
                                                weight_decay=0.01)),
    "sgd-nesterov-maximize": ("SGD", fastoptim.SGD, dict(lr=0.05, momentum=0.9,
                                                         nesterov=True, maximize=True)),
    "sgd-momentum-foreach": ("SGD", fastoptim.SGD, dict(lr=0.05, momentum=0.8, foreach=True)),
    "adagrad": ("Adagrad", fastoptim.Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.01,
                                                   initial_accumulator_value=0.1)),
    "adagrad-maximize-foreach": ("Adagrad", fastoptim.Adagrad, dict(
        lr=0.1, eps=1e-6, maximize=True, foreach=True)),
    "rmsprop": ("RMSprop", fastoptim.RMSprop, dict(lr=0.01, alpha=0.9)),
    "rmsprop-centered": ("RMSprop", fastoptim.RMSprop, dict(lr=0.01, centered=True)),
    "rmsprop-momentum": ("RMSprop", fastoptim.RMSprop, dict(lr=0.01, momentum=0.5,
                                                            weight_decay=0.01)),
    "rmsprop-centered-momentum-maximize": ("RMSprop", fastoptim.RMSprop, dict(
        lr=0.01, alpha=0.95, eps=1e-6, centered=True, momentum=0.5, weight_decay=0.01,
        maximize=True)),
    "adam": ("Adam", fastoptim.Adam, dict(lr=0.01)),
    "adam-amsgrad-wd": ("Adam", fastoptim.Adam, dict(lr=0.01, amsgrad=True,
                                                     weight_decay=0.1)),
    "adam-maximize-foreach": ("Adam", fastoptim.Adam, dict(
        lr=0.01, betas=(0.8, 0.99), eps=1e-6, maximize=True, foreach=True)),
    "adam-fused": ("Adam", fastoptim.Adam, dict(lr=0.01, amsgrad=True, fused=True)),
    "adamw": ("AdamW", fastoptim.AdamW, dict(lr=0.01)),
    "adamw-amsgrad": ("AdamW", fastoptim.AdamW, dict(lr=0.01, amsgrad=True,
                                                     weight_decay=0.05)),
    "adamw-maximize": ("AdamW", fastoptim.AdamW, dict(lr=0.01, betas=(0.8, 0.99),
                                                      maximize=True)),
    "adamw-amsgrad-fused": ("AdamW", fastoptim.AdamW, dict(lr=0.01, amsgrad=True,
                                                           fused=True)),
}
#: torch.optim options that only choose torch's implementation
TORCH_ONLY = ("foreach", "fused", "capturable", "differentiable")
#: fastoptim options that torch's groups do not have
FASTOPTIM_ONLY = ("state_dtype", "rounding", "seed")
DTYPES = [np.float32, np.float64]


def fastoptim_kw(kw):
    return {k: v for k, v in kw.items() if k not in TORCH_ONLY}


def make_data(dtype, seed=0):
    """Initial parameter values and K + N steps of gradients (None: no gradient)."""
    rng = np.random.default_rng(seed)
    init = [np.asarray(rng.standard_normal(s), dtype) for s in SHAPES]
    grads = []
    for k in range(K + N):
        scale = 10.0 ** rng.uniform(-1, 1)
        grads.append([None if i == NO_GRAD or (i == 1 and k % 3 == 0) else
                      np.asarray(scale * rng.standard_normal(s), dtype)
                      for i, s in enumerate(SHAPES)])
    return init, grads


def torch_params(values):
    return [torch.tensor(np.array(v, order="C")).requires_grad_() for v in values]


def numpy_params(values):
    """Fresh NumPy copies; 2-D ones in Fortran order (the state must follow them)."""
    return [np.asfortranarray(v) if np.ndim(v) == 2 else np.array(v) for v in values]


def torch_groups(params):
    return [{"params": params[:SPLIT]}, {"params": params[SPLIT:], "lr": 0.02}]


def torch_step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else torch.tensor(g)
    opt.step()


def fastoptim_step(opt, grads):
    opt.step([None if g is None else g.copy() for g in grads])


def set_lr(opt, factor):
    for group in opt.param_groups:
        group["lr"] *= factor


def via_file(sd):
    """torch.save, then torch.load(weights_only=True): what a checkpoint file gives."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def to_torch(sd):
    """A fastoptim state dict as torch.optim's: tensors for arrays, a 0-d float32
    tensor for ``step``."""
    state = {}
    for idx, entry in sd["state"].items():
        state[idx] = {k: (torch.tensor(float(v), dtype=torch.float32) if k == "step" else
                          torch.from_numpy(np.array(v, order="C")))
                      for k, v in entry.items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def as_numpy(x):
    return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def errors_in_eps(got, want, dtype):
    """{role: max |got - want| in eps of the role's magnitude}. got, want: {role: list
    of arrays} (roles: "params", and each state name)."""
    eps = float(np.finfo(dtype).eps)
    out = {}
    for role in want:
        a, b = got[role], want[role]
        assert len(a) == len(b), role
        scale = max((float(np.abs(x).max()) for x in b if x.size), default=0.0)
        worst = 0.0
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and x.shape == y.shape, role
            if x.size:
                diff = float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max())
                worst = max(worst, diff / (eps * scale) if diff else 0.0)
        out[role] = worst
    return out


def assert_close(got, want, dtype):
    errs = errors_in_eps(got, want, dtype)
    bad = {role: e for role, e in errs.items() if not e <= TOL}
    assert not bad, f"off by more than {TOL} eps of the role's magnitude: {bad}"
    return errs


def roles_fastoptim(opt, params):
    roles = {"params": [np.asarray(p) for p in params]}
    for idx, entry in sorted(opt.state_dict()["state"].items()):
        for name, v in entry.items():
            if name != "step":
                roles.setdefault(name, []).append(v)
    return roles


def roles_torch(opt, params):
    roles = {"params": [as_numpy(p) for p in params]}
    for idx, entry in sorted(opt.state_dict()["state"].items()):
        for name, v in entry.items():
            if name != "step":
                roles.setdefault(name, []).append(as_numpy(v))
    return roles


def assert_loaded_exactly(fopt, tsd):
    """The fastoptim optimizer holds torch's options and state, bit for bit."""
    fsd = fopt.state_dict()
    for fg, tg in zip(fsd["param_groups"], tsd["param_groups"]):
        for key, value in fg.items():
            if key in ("params",) + FASTOPTIM_ONLY:
                continue
            want = tg[key]
            assert (tuple(value) if isinstance(value, (list, tuple)) else value) == \
                (tuple(want) if isinstance(want, (list, tuple)) else want), key
    assert fsd["state"].keys() == tsd["state"].keys()
    for idx, entry in tsd["state"].items():
        assert entry.keys() == fsd["state"][idx].keys(), idx
        for name, value in entry.items():
            got = fsd["state"][idx][name]
            if name == "step":
                assert isinstance(got, int) and got == float(value), idx
            else:
                want = as_numpy(value)
                assert got.dtype == want.dtype and got.shape == want.shape
                np.testing.assert_array_equal(got, want, err_msg=f"{idx}/{name}")


def torch_run(name, dtype, steps, seed=0):
    tname, _fcls, kw = CONFIGS[name]
    init, grads = make_data(dtype, seed)
    tp = torch_params(init)
    topt = getattr(torch.optim, tname)(torch_groups(tp), **kw)
    for g in grads[:steps]:
        torch_step(topt, tp, g)
    return topt, tp, grads


def continue_both(topt, tp, fopt, fp, grads):
    for k, g in enumerate(grads[K:]):
        if k == LR_CHANGE:
            set_lr(topt, 0.5)
            set_lr(fopt, 0.5)
        torch_step(topt, tp, g)
        fastoptim_step(fopt, g)


def load_torch_into_fastoptim(name, dtype, via=None, mutate=None, seed=0):
    """torch K steps -> state dict -> fastoptim (defaults) -> both N more steps."""
    _tname, fcls, _kw = CONFIGS[name]
    topt, tp, grads = torch_run(name, dtype, K, seed)
    sd = topt.state_dict()
    if via is not None:
        sd = via(sd)
    if mutate is not None:
        sd = copy.deepcopy(sd)          # (torch's state_dict() holds its live tensors)
        mutate(sd)
    fp = numpy_params([as_numpy(p) for p in tp])
    fopt = fcls([{"params": fp[:SPLIT]}, {"params": fp[SPLIT:], "lr": 123.0}])
    fopt.load_state_dict(sd)
    return topt, tp, fopt, fp, grads, sd


@pytest.mark.parametrize("via", [None, via_file], ids=["state_dict", "weights_only-file"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_torch_state_dict_loads_and_continues_as_torch(name, dtype, via):
    topt, tp, fopt, fp, grads, sd = load_torch_into_fastoptim(name, dtype, via)
    assert_loaded_exactly(fopt, topt.state_dict())
    for p in fp:                          # still the caller's arrays, order kept
        assert p.dtype == dtype
    assert fp[1].flags.f_contiguous and fopt.param_groups[0]["params"][1] is fp[1]
    continue_both(topt, tp, fopt, fp, grads)
    assert_close(roles_fastoptim(fopt, fp), roles_torch(topt, tp), dtype)
    # the step counters moved together
    for idx, entry in topt.state_dict()["state"].items():
        if "step" in entry:
            assert fopt.state[idx]["step"] == float(entry["step"])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fastoptim_state_dict_loads_into_torch_and_continues(name, dtype):
    tname, fcls, kw = CONFIGS[name]
    init, grads = make_data(dtype, seed=3)
    fp = numpy_params(init)
    fopt = fcls([{"params": fp[:SPLIT]}, {"params": fp[SPLIT:], "lr": 0.02}],
                **fastoptim_kw(kw))
    for g in grads[:K]:
        fastoptim_step(fopt, g)
    sd = to_torch(fopt.state_dict())
    tp = torch_params([p.copy() for p in fp])
    torch_kw = {k: v for k, v in kw.items() if k in TORCH_ONLY}   # torch's own choice
    topt = getattr(torch.optim, tname)(torch_groups(tp), **torch_kw)
    topt.load_state_dict(via_file(sd))
    # torch holds fastoptim's state, bit for bit (step as torch's 0-d float tensor)
    fsd = fopt.state_dict()
    tsd = topt.state_dict()
    assert tsd["state"].keys() == fsd["state"].keys()
    for idx, entry in fsd["state"].items():
        assert tsd["state"][idx].keys() == entry.keys()
        for key, value in entry.items():
            got = tsd["state"][idx][key]
            if key == "step":
                assert got.dtype == torch.float32 and got.item() == value
            else:
                np.testing.assert_array_equal(as_numpy(got), value)
    continue_both(topt, tp, fopt, fp, grads)
    assert_close(roles_fastoptim(fopt, fp), roles_torch(topt, tp), dtype)


def _scale_first_element(name_in_state, factor):
    def mutate(sd):
        entry = sd["state"][0]
        t = entry[name_in_state]
        t.view(-1)[0] *= factor
    return mutate


def _step_plus_one(sd):
    for entry in sd["state"].values():
        entry["step"] += 1


@pytest.mark.parametrize("name,mutate", [
    ("sgd-momentum", _scale_first_element("momentum_buffer", 1 + 1e-9)),
    ("adagrad", _scale_first_element("sum", 1 + 1e-9)),
    ("adagrad", _step_plus_one),
    ("rmsprop-centered-momentum-maximize", _scale_first_element("square_avg", 1 + 1e-9)),
    ("rmsprop-centered-momentum-maximize", _scale_first_element("grad_avg", 1 + 1e-9)),
    ("rmsprop-centered-momentum-maximize",
     _scale_first_element("momentum_buffer", 1 + 1e-9)),
    ("adam-amsgrad-wd", _scale_first_element("exp_avg", 1 + 1e-9)),
    ("adam-amsgrad-wd", _scale_first_element("max_exp_avg_sq", 1 + 1e-9)),
    ("adam-amsgrad-wd", _step_plus_one),
    ("adamw", _scale_first_element("exp_avg_sq", 1 + 1e-9)),
    ("adamw", _step_plus_one),
], ids=lambda v: v if isinstance(v, str) else getattr(v, "__name__", "scale"))
def test_the_comparison_is_sharp(name, mutate):
    """A state dict changed by one step, or one element by 1e-9 relative, gives a
    continuation that the comparison above rejects (float64)."""
    topt, tp, fopt, fp, grads, _sd = load_torch_into_fastoptim(name, np.float64,
                                                                mutate=mutate)
    continue_both(topt, tp, fopt, fp, grads)
    with pytest.raises(AssertionError, match="off by more than"):
        assert_close(roles_fastoptim(fopt, fp), roles_torch(topt, tp), np.float64)


# --- torch's group keys -------------------------------------------------------------------

def test_implementation_keys_are_ignored():
    """foreach / fused / capturable / differentiable choose how torch computes, not
    what: any values load to the same optimizer as without them."""
    _tname, fcls, _kw = CONFIGS["adam-amsgrad-wd"]
    topt, tp, _grads = torch_run("adam-amsgrad-wd", np.float64, K)
    plain = topt.state_dict()
    flagged = via_file(plain)
    for group in flagged["param_groups"]:
        group.update(foreach=True, fused=True, capturable=True, differentiable=True,
                     initial_lr=0.5, param_names=["a", "b", "c"][:len(group["params"])],
                     my_note="kept by torch, ignored here")
    a = fcls([{"params": numpy_params([as_numpy(p) for p in tp[:SPLIT]])},
              {"params": numpy_params([as_numpy(p) for p in tp[SPLIT:]])}])
    b = fcls([{"params": numpy_params([as_numpy(p) for p in tp[:SPLIT]])},
              {"params": numpy_params([as_numpy(p) for p in tp[SPLIT:]])}])
    a.load_state_dict(plain)
    b.load_state_dict(flagged)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert "foreach" not in sb["param_groups"][0]
    for idx in sa["state"]:
        for key, value in sa["state"][idx].items():
            np.testing.assert_array_equal(value, sb["state"][idx][key])


def test_adam_refuses_decoupled_weight_decay_and_adamw_follows_it():
    """torch.optim.Adam(decoupled_weight_decay=True) is AdamW: fastoptim.Adam refuses
    its state dict (and AdamW's), fastoptim.AdamW continues it as torch does."""
    init, grads = make_data(np.float64)
    tp = torch_params(init)
    topt = torch.optim.Adam(torch_groups(tp), lr=0.01, weight_decay=0.1,
                            decoupled_weight_decay=True)
    for g in grads[:K]:
        torch_step(topt, tp, g)
    sd = topt.state_dict()
    fp = numpy_params([as_numpy(p) for p in tp])
    adam = fastoptim.Adam([{"params": fp[:SPLIT]}, {"params": fp[SPLIT:]}])
    with pytest.raises(ValueError, match=r"state_dict\['param_groups'\]\[0\]"
                                         r"\['decoupled_weight_decay'\] is True .*AdamW"):
        adam.load_state_dict(sd)
    assert adam.state == {} and adam.param_groups[0]["lr"] == 1e-3
    adamw_sd = torch.optim.AdamW(torch_groups(torch_params(init))).state_dict()
    with pytest.raises(ValueError, match="decoupled_weight_decay"):
        adam.load_state_dict(adamw_sd)
    adamw = fastoptim.AdamW([{"params": fp[:SPLIT]}, {"params": fp[SPLIT:]}])
    adamw.load_state_dict(sd)
    continue_both(topt, tp, adamw, fp, grads)
    assert_close(roles_fastoptim(adamw, fp), roles_torch(topt, tp), np.float64)


def test_adamw_loads_torch_adam_state_as_torch_adamw_does():
    """torch's AdamW keeps decoupled weight decay whatever the loaded group says;
    fastoptim.AdamW loading torch.optim.Adam's state dict continues as torch.optim.AdamW
    loading it does."""
    init, grads = make_data(np.float64)
    tp = torch_params(init)
    tadam = torch.optim.Adam(torch_groups(tp), lr=0.01, weight_decay=0.1)
    for g in grads[:K]:
        torch_step(tadam, tp, g)
    sd = tadam.state_dict()
    tp2 = torch_params([as_numpy(p) for p in tp])
    tadamw = torch.optim.AdamW(torch_groups(tp2))
    tadamw.load_state_dict(via_file(sd))
    assert all(g["decoupled_weight_decay"] for g in tadamw.param_groups)
    fp = numpy_params([as_numpy(p) for p in tp])
    fadamw = fastoptim.AdamW([{"params": fp[:SPLIT]}, {"params": fp[SPLIT:]}])
    fadamw.load_state_dict(sd)
    continue_both(tadamw, tp2, fadamw, fp, grads)
    assert_close(roles_fastoptim(fadamw, fp), roles_torch(tadamw, tp2), np.float64)


def test_tensor_hyperparameters_load_as_numbers():
    init, grads = make_data(np.float32)
    tp = torch_params(init)
    topt = torch.optim.Adam(torch_groups(tp), lr=torch.tensor(0.01),
                            betas=(torch.tensor(0.8), torch.tensor(0.99)))
    for g in grads[:K]:
        torch_step(topt, tp, g)
    fp = numpy_params([as_numpy(p) for p in tp])
    fopt = fastoptim.Adam([{"params": fp[:SPLIT]}, {"params": fp[SPLIT:]}])
    fopt.load_state_dict(via_file(topt.state_dict()))
    g0 = fopt.param_groups[0]
    assert type(g0["lr"]) is float and g0["lr"] == float(torch.tensor(0.01))
    assert g0["betas"] == (float(torch.tensor(0.8)), float(torch.tensor(0.99)))
    assert all(type(b) is float for b in g0["betas"])
    assert fopt.param_groups[1]["lr"] == 0.02
    continue_both(topt, tp, fopt, fp, grads)     # runs (torch computes in float32 here)
    errs = errors_in_eps(roles_fastoptim(fopt, fp), roles_torch(topt, tp), np.float32)
    assert errs["params"] < 64, errs


# --- another rule's state dict, unreadable tensors --------------------------------------------

def _snapshot(opt):
    """Everything a load could change: options, state bits, counters, live arrays."""
    sd = opt.state_dict()
    out = [repr([{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]),
           [id(p) for g in opt.param_groups for p in g["params"]],
           [(s.steps.tobytes(), sorted((k, [None if a is None else (id(a), a.dtype.str,
                                                                     a.tobytes(order="A"))
                                            for a in v]) for k, v in s.arrays.items()))
            for s in opt._gstate],
           opt.skipped_steps]
    return out


def _trained_fastoptim(name, dtype=np.float64):
    _tname, fcls, kw = CONFIGS[name]
    init, grads = make_data(dtype, seed=7)
    fp = numpy_params(init)
    opt = fcls([{"params": fp[:SPLIT]}, {"params": fp[SPLIT:], "lr": 0.02}],
               **fastoptim_kw(kw))
    for g in grads[:3]:
        fastoptim_step(opt, g)
    return opt


def _torch_sd(tname, dtype=np.float64, **kw):
    init, grads = make_data(dtype, seed=7)
    tp = torch_params(init)
    topt = getattr(torch.optim, tname)(torch_groups(tp), **kw)
    for g in grads[:3]:
        torch_step(topt, tp, g)
    return topt.state_dict()


@pytest.mark.parametrize("target,source,match", [
    ("sgd-momentum", ("Adam", {}), r"param_groups'\]\[0\] has the option '(amsgrad|betas|eps)'"
                                   r", which SGD does not have"),
    ("adam", ("SGD", dict(momentum=0.9)), r"param_groups'\]\[0\] has the option "
                                          r"'(dampening|momentum|nesterov)'"),
    ("rmsprop", ("Adagrad", {}), r"has the option '(initial_accumulator_value|lr_decay)'"),
    ("adagrad", ("RMSprop", dict(centered=True)), r"has the option '(alpha|centered|momentum)'"),
    ("sgd-momentum", ("RMSprop", dict(momentum=0.5)), r"has the option '(alpha|centered|eps)'"),
    ("adam", ("NAdam", {}), r"has the option '(decoupled_weight_decay|momentum_decay)'"),
    ("adam", ("RAdam", {}), r"torch.optim's keys but not the option 'amsgrad'"),
    ("adam", ("Adamax", {}), r"torch.optim's keys but not the option 'amsgrad'"),
    ("rmsprop", ("Adadelta", {}), r"has the option 'rho'"),
    ("sgd-momentum", ("ASGD", {}), r"has the option '(alpha|lambd|t0)'"),
], ids=lambda v: v if isinstance(v, str) else v[0] if isinstance(v, tuple) else None)
def test_another_rules_torch_state_dict_is_refused_and_changes_nothing(target, source,
                                                                       match):
    opt = _trained_fastoptim(target)
    sd = _torch_sd(source[0], **source[1])
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert _snapshot(opt) == before


def test_another_rules_state_entries_are_refused():
    """Even with the groups made to fit, another rule's state names are refused."""
    opt = _trained_fastoptim("adam")
    sd = _torch_sd("Adamax")
    for group in sd["param_groups"]:
        group["amsgrad"] = False
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[0\] has 'exp_inf', which "
                                         r"Adam does not keep"):
        opt.load_state_dict(sd)
    assert _snapshot(opt) == before


def _set_state(key):
    def mutate(sd, value):
        sd["state"][0][key] = value
    return mutate


@pytest.mark.parametrize("case,make,exc,match", [
    ("step of two", lambda t: ("step", torch.tensor([1.0, 2.0])), ValueError,
     r"\['step'\] must be a single number, got shape \(2,\)"),
    ("step fractional", lambda t: ("step", torch.tensor(2.5)), ValueError,
     r"\['step'\] must be a non-negative whole number"),
    ("step of bools", lambda t: ("step", torch.tensor(True)), TypeError,
     r"\['step'\] must be a number, got bool"),
    ("wrong shape", lambda t: ("exp_avg", torch.zeros(8, dtype=t.dtype)), ValueError,
     r"\['exp_avg'\] has shape \(8,\), but the parameter has shape \(7,\)"),
    ("int64", lambda t: ("exp_avg_sq", torch.zeros(7, dtype=torch.int64)), TypeError,
     r"\['exp_avg_sq'\] has dtype int64: state arrays hold floating-point values"),
    ("bool", lambda t: ("exp_avg_sq", torch.zeros(7, dtype=torch.bool)), TypeError,
     r"\['exp_avg_sq'\] must hold real numbers, got dtype bool"),
    ("complex", lambda t: ("exp_avg", torch.zeros(7, dtype=torch.complex128)), TypeError,
     r"\['exp_avg'\] must hold real numbers, got dtype complex128"),
    ("meta device", lambda t: ("exp_avg", torch.zeros(7, device="meta")), TypeError,
     r"\['exp_avg'\] is a torch tensor that cannot be read as a NumPy array"),
    ("sparse", lambda t: ("exp_avg", torch.zeros(7).to_sparse()), TypeError,
     r"\['exp_avg'\] is a torch tensor that cannot be read as a NumPy array"),
    ("lr of two", lambda t: ("lr", torch.tensor([0.1, 0.2])), ValueError,
     r"param_groups'\]\[1\]\['lr'\] must be a number or a one-element tensor"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_torch_entries_are_refused_and_change_nothing(case, make, exc, match):
    opt = _trained_fastoptim("adam-amsgrad-wd")
    sd = _torch_sd("Adam", amsgrad=True, weight_decay=0.1)
    key, value = make(sd["state"][0]["exp_avg"])
    if key == "lr":
        sd["param_groups"][1]["lr"] = value
    else:
        sd["state"][0][key] = value
    before = _snapshot(opt)
    with pytest.raises(exc, match=r"state_dict\[.*" + match):
        opt.load_state_dict(sd)
    assert _snapshot(opt) == before


def test_torch_never_imported_by_fastoptim_optim():
    """optim.py reads tensors duck-typed: importing fastoptim does not import torch."""
    code = ("import sys, fastoptim, numpy as np; "
            "o = fastoptim.Adam([np.zeros(3)]); o.step([np.ones(3)]); "
            "o.load_state_dict(o.state_dict()); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "False"


# --- bfloat16 ------------------------------------------------------------------------------

def test_torch_state_into_bfloat16_state_and_back():
    """torch's float32 state -> AdamW(state_dtype="bfloat16"): rounded to nearest even
    (the public converter's result); its float32 view -> torch: the same values."""
    topt, tp, _grads = torch_run("adamw-amsgrad", np.float32, K)
    sd = topt.state_dict()
    fp = numpy_params([as_numpy(p) for p in tp])
    fopt = fastoptim.AdamW([{"params": fp[:SPLIT]}, {"params": fp[SPLIT:]}],
                           state_dtype="bfloat16")
    fopt.load_state_dict(sd)
    assert fopt.param_groups[0]["state_dtype"] == "bfloat16"
    for idx, entry in sd["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            got = fopt.state[idx][name]
            assert got.dtype == np.uint16
            np.testing.assert_array_equal(
                got, fastoptim.float32_to_bfloat16(as_numpy(entry[name])))
            # torch's own bfloat16 rounding agrees
            np.testing.assert_array_equal(
                got.ravel(), entry[name].to(torch.bfloat16).view(torch.int16).numpy()
                .view(np.uint16).ravel())
    back = torch.optim.AdamW(torch_groups(torch_params([p.copy() for p in fp])))
    back.load_state_dict(to_torch(fopt.state_dict(bfloat16="float32")))
    for idx, entry in back.state_dict()["state"].items():
        np.testing.assert_array_equal(
            entry["exp_avg"].numpy(),
            fastoptim.bfloat16_to_float32(fopt.state[idx]["exp_avg"]))


def test_bfloat16_tensors_load_as_their_bits():
    """State saved as torch.bfloat16 tensors: widened exactly into float32 state, bits
    copied into bfloat16 state."""
    topt, tp, _grads = torch_run("adam", np.float32, K)
    sd = topt.state_dict()
    for entry in sd["state"].values():
        for name in ("exp_avg", "exp_avg_sq"):
            entry[name] = entry[name].to(torch.bfloat16)
    for state_dtype in (None, "bfloat16"):
        fp = numpy_params([as_numpy(p) for p in tp])
        fopt = fastoptim.Adam([{"params": fp[:SPLIT]}, {"params": fp[SPLIT:]}],
                              state_dtype=state_dtype)
        fopt.load_state_dict(sd)
        for idx, entry in sd["state"].items():
            got = fopt.state[idx]["exp_avg"]
            if state_dtype is None:
                assert got.dtype == np.float32
                np.testing.assert_array_equal(got, entry["exp_avg"].float().numpy())
            else:
                np.testing.assert_array_equal(
                    got.ravel(),
                    entry["exp_avg"].view(torch.int16).numpy().view(np.uint16).ravel())
