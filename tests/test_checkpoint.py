"""Checkpoints: state_dict -> pickle / np.savez (files) -> load -> continue gives the
bits of never stopping, for every optimizer and option family; also across a fresh
process, and for a pickled optimizer object.

Each run has two parameter groups (the second with its own learning rate), float32
and float64 parameters, 0-d, F-ordered and large (placed-state) arrays, skipped
gradients before and after the checkpoint, and a learning-rate change after it.
"""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import fastoptim

CONFIGS = {
    "sgd": (fastoptim.SGD, dict(lr=0.05)),
    "sgd-momentum": (fastoptim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1)),
    "sgd-nesterov": (fastoptim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True,
                                         weight_decay=0.01, maximize=True)),
    "adagrad": (fastoptim.Adagrad, dict(lr=0.1, lr_decay=0.01,
                                        initial_accumulator_value=0.1, weight_decay=0.01)),
    "rmsprop": (fastoptim.RMSprop, dict(lr=0.01, alpha=0.9)),
    "rmsprop-centered-momentum": (fastoptim.RMSprop, dict(lr=0.01, centered=True,
                                                          momentum=0.5, weight_decay=0.01)),
    "adam": (fastoptim.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    "adamw": (fastoptim.AdamW, dict(lr=0.01, betas=(0.8, 0.99), maximize=True)),
    "adam-bf16": (fastoptim.Adam, dict(lr=0.01, state_dtype="bfloat16", amsgrad=True)),
    "adamw-bf16-stochastic": (fastoptim.AdamW, dict(lr=0.01, state_dtype="bfloat16",
                                                    rounding="stochastic", seed=11)),
    "adahessian": (fastoptim.AdaHessian, dict(lr=0.1, weight_decay=0.01,
                                              hessian_power=0.5)),
    "newton": (fastoptim.Newton, dict(lr=0.5, damping=0.1)),
    "newton-saddle-free": (fastoptim.Newton, dict(lr=0.5, damping=0.1, saddle_free=True)),
}
NSTEPS, CHECKPOINT = 12, 5


def _shapes(name):
    if name.startswith("newton"):
        return [(3,), (2, 2), ()], [(4,)]
    return [(7,), (3, 4), ()], [(130, 130), (1000,)]


def make_params(name, seed=0):
    """Two groups' parameters: float32 and float64 (float32 only for bf16 state),
    one F-ordered 2-D array, one 0-d array, one placed-state-sized array."""
    rng = np.random.default_rng(seed)
    g0, g1 = _shapes(name)
    bf16 = "bf16" in name
    params = []
    for k, s in enumerate(g0 + g1):
        dtype = np.float32 if (bf16 or k % 2 == 0) else np.float64
        params.append(np.asarray(rng.standard_normal(s), dtype=dtype,
                                 order="F" if len(s) == 2 else "C"))
    return params, len(g0)


def make_inputs(name, params, seed=1):
    """Per step: gradients (some None) and the curvature input the rule needs."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(NSTEPS):
        grads = [None if (k + i) % 4 == 3 else
                 np.asarray(rng.standard_normal(p.shape), p.dtype) for i, p in enumerate(params)]
        curv = None
        if name == "adahessian":
            curv = [np.asarray(rng.uniform(-2, 2, p.shape), p.dtype) for p in params]
        elif name.startswith("newton"):
            curv = []
            for p in params:
                a = rng.standard_normal((p.size, p.size))
                curv.append(a @ a.T + p.size * np.eye(p.size) if name == "newton"
                            else a + a.T)
        out.append((grads, curv))
    return out


def make_optimizer(name, params, split):
    cls, kw = CONFIGS[name]
    return cls([{"params": params[:split]}, {"params": params[split:], "lr": 0.02}], **kw)


def run_steps(name, opt, inputs, start):
    for k, (grads, curv) in enumerate(inputs, start):
        if k == 8:
            opt.param_groups[1]["lr"] *= 0.5          # a schedule, after the checkpoint
        if curv is None:
            opt.step(grads)
        else:
            opt.step(grads, curv)


def straight_run(name):
    params, split = make_params(name)
    opt = make_optimizer(name, params, split)
    run_steps(name, opt, make_inputs(name, params), 0)
    return params, opt


def first_part(name):
    params, split = make_params(name)
    opt = make_optimizer(name, params, split)
    inputs = make_inputs(name, params)
    run_steps(name, opt, inputs[:CHECKPOINT], 0)
    return params, split, opt, inputs


def assert_same_state(a, b):
    """Two state dicts hold the same bits (groups compared option by option)."""
    assert len(a["param_groups"]) == len(b["param_groups"])
    for ga, gb in zip(a["param_groups"], b["param_groups"]):
        assert set(ga) == set(gb)
        for key in ga:
            va, vb = ga[key], gb[key]
            assert (list(va) if isinstance(va, (tuple, list)) else va) == \
                (list(vb) if isinstance(vb, (tuple, list)) else vb), key
    assert a["state"].keys() == b["state"].keys()
    for idx in a["state"]:
        x, y = a["state"][idx], b["state"][idx]
        assert x.keys() == y.keys(), idx
        for key in x:
            if isinstance(x[key], np.ndarray):
                assert x[key].dtype == y[key].dtype and x[key].shape == y[key].shape
                np.testing.assert_array_equal(x[key], y[key], err_msg=f"{idx}/{key}")
            else:
                assert x[key] == y[key], f"{idx}/{key}"


# --- the ways to store a state dict ---------------------------------------------------

def via_pickle_file(sd, path):
    with open(path / "opt.pkl", "wb") as f:
        pickle.dump(sd, f, protocol=pickle.HIGHEST_PROTOCOL)
    with open(path / "opt.pkl", "rb") as f:
        return pickle.load(f)


def via_npz_file(sd, path):
    """Arrays as npz members, the groups as JSON text: no pickle anywhere."""
    flat = {"param_groups": np.array(json.dumps(sd["param_groups"]))}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            flat[f"state/{idx}/{key}"] = np.asarray(value)
    np.savez(path / "opt.npz", **flat)
    with np.load(path / "opt.npz", allow_pickle=False) as z:
        groups = json.loads(str(z["param_groups"]))
        state = {}
        for member in z.files:
            if member.startswith("state/"):
                _, idx, key = member.split("/")
                value = z[member]
                state.setdefault(int(idx), {})[key] = value if value.ndim else value[()]
    for g in groups:              # JSON has no tuples
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


@pytest.mark.parametrize("via", [via_pickle_file, via_npz_file], ids=["pickle", "npz"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_resume_from_a_file_is_bit_identical_to_never_stopping(name, via, tmp_path):
    want_params, want_opt = straight_run(name)
    params, split, opt, inputs = first_part(name)
    sd = via(opt.state_dict(), tmp_path)
    del opt
    resumed_params = [p.copy(order="K") for p in params]   # new arrays, same values
    resumed = make_optimizer(name, resumed_params, split)
    resumed.load_state_dict(sd)
    run_steps(name, resumed, inputs[CHECKPOINT:], CHECKPOINT)
    for a, b in zip(resumed_params, want_params):
        assert a.dtype == b.dtype and a.flags.f_contiguous == b.flags.f_contiguous
        np.testing.assert_array_equal(a, b)
    assert_same_state(resumed.state_dict(), want_opt.state_dict())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_pickled_optimizer_object_continues_bit_identically(name):
    want_params, want_opt = straight_run(name)
    params, split, opt, inputs = first_part(name)
    clone, clone_params = pickle.loads(pickle.dumps((opt, params)))
    assert all(a is b for a, b in zip(clone.param_groups[0]["params"], clone_params))
    run_steps(name, clone, inputs[CHECKPOINT:], CHECKPOINT)
    for a, b in zip(clone_params, want_params):
        np.testing.assert_array_equal(a, b)
    assert_same_state(clone.state_dict(), want_opt.state_dict())


def test_a_checkpoint_is_independent_of_the_live_optimizer():
    """state_dict() copies; load_state_dict() copies: later steps of either side do
    not reach the other."""
    params, split, opt, inputs = first_part("adam")
    sd = opt.state_dict()
    frozen = pickle.loads(pickle.dumps(sd))
    run_steps("adam", opt, inputs[CHECKPOINT:], CHECKPOINT)
    assert_same_state(sd, frozen)                  # the saved copy did not move
    other = make_optimizer("adam", [p.copy(order="K") for p in params], split)
    other.load_state_dict(sd)
    for entry in sd["state"].values():
        for v in entry.values():
            if isinstance(v, np.ndarray):
                v[...] = 7                         # scribbling on the dict...
    assert_same_state(other.state_dict(), frozen)  # ...does not reach the optimizer


RESUME_SCRIPT = r"""
import pickle, sys
sys.path.insert(0, sys.argv[3])
import test_checkpoint as T
with open(sys.argv[1], "rb") as f:
    jobs = pickle.load(f)
out = {}
for name, (sd, params, split) in jobs.items():
    opt = T.make_optimizer(name, params, split)
    opt.load_state_dict(sd)
    inputs = T.make_inputs(name, T.make_params(name)[0])
    T.run_steps(name, opt, inputs[T.CHECKPOINT:], T.CHECKPOINT)
    out[name] = (params, opt.state_dict())
with open(sys.argv[2], "wb") as f:
    pickle.dump(out, f)
"""


def test_resume_in_a_fresh_process_is_bit_identical(tmp_path):
    """Save in this process, continue in a new interpreter (same package), compare."""
    jobs = {}
    for name in CONFIGS:
        params, split, opt, _ = first_part(name)
        jobs[name] = (opt.state_dict(), params, split)
    with open(tmp_path / "jobs.pkl", "wb") as f:
        pickle.dump(jobs, f)
    env = dict(os.environ,
               PYTHONPATH=os.path.dirname(os.path.dirname(fastoptim.__file__)))
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(tmp_path / "jobs.pkl"),
                    str(tmp_path / "out.pkl"), os.path.dirname(os.path.abspath(__file__))],
                   check=True, timeout=300, env=env)
    with open(tmp_path / "out.pkl", "rb") as f:
        out = pickle.load(f)
    for name in CONFIGS:
        want_params, want_opt = straight_run(name)
        got_params, got_sd = out[name]
        for a, b in zip(got_params, want_params):
            np.testing.assert_array_equal(a, b, err_msg=name)
        assert_same_state(got_sd, want_opt.state_dict())
