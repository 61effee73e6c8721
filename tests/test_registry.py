"""The rule registry (fastoptim.rules) against every layer that repeats it and against
torch.optim itself: hyperparameter names, order and defaults; which state each option
mix keeps, in which order; whether a rule counts steps."""
import inspect
import itertools
import re

import numpy as np
import pytest

import fastoptim
from fastoptim import functional as F
from fastoptim.rules import REGISTRY, spec

CLASSES = {"sgd": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop", "adam": "Adam",
           "adamw": "AdamW", "adamax": "Adamax", "adadelta": "Adadelta",
           "radam": "RAdam", "rprop": "Rprop", "nadam": "NAdam", "asgd": "ASGD",
           "lion": "Lion", "adopt": "ADOPT", "ademamix": "AdEMAMix",
           "sophiah": "SophiaH", "adamw_schedulefree": "AdamWScheduleFree",
           "adafactor": "Adafactor", "adahessian": "AdaHessian"}
#: rules torch.optim lacks: the package whose class is the oracle (the registry's)
ORACLES = {name: s.oracle for name, s in REGISTRY.items() if s.oracle}
#: state an oracle keeps that fastoptim does not (SophiaH's copy of its last estimate,
#: which no step reads)
ORACLE_EXTRA_STATE = {"sophiah": ("hessian",)}


def _torch_class(name):
    """torch.optim's class of rule ``name``, or its oracle package's (a skip that says
    so when the package is missing)."""
    import torch
    if name in ORACLES:
        _, module, cls = ORACLES[name]
        return getattr(pytest.importorskip(module, reason=f"the oracle of {name}"), cls)
    return getattr(torch.optim, CLASSES[name])


def _defaults(fn, skip=("self", "params")):
    """(name, default) of ``fn``'s parameters that have a default, in order."""
    return [(k, v.default) for k, v in inspect.signature(fn).parameters.items()
            if k not in skip and v.default is not inspect.Parameter.empty]


def test_every_rule_has_an_entry_and_a_class_in_each_layer():
    assert list(REGISTRY) == list(CLASSES)
    for name, cls in CLASSES.items():
        assert spec(name).title == cls
        assert getattr(fastoptim, cls)._rule is spec(name)
    with pytest.raises(ValueError, match="no rule 'nosuchrule'"):
        spec("nosuchrule")


@pytest.mark.parametrize("name", list(CLASSES))
def test_numpy_class_and_functional_defaults_are_the_registry_s(name):
    s = spec(name)
    got = _defaults(getattr(fastoptim, CLASSES[name]).__init__)
    # the class takes the hyperparameters in the registry's order, with its defaults
    assert got[:len(s.hyperparameters)] == list(s.hyperparameters)
    fn = dict(_defaults(getattr(F, name + "_")))
    for key, default in s.hyperparameters:
        if key in fn:                       # (the state-initial options are the class's)
            assert fn[key] == default, (name, key)


@pytest.mark.parametrize("name", [n for n in CLASSES if n != "adahessian"])
def test_torch_classes_and_torch_optim_have_the_registry_s_defaults(name):
    torch = pytest.importorskip("torch")
    import fastoptim.torch as fot
    s = spec(name)
    for cls in (_torch_class(name), getattr(fot, CLASSES[name])):
        got = dict(_defaults(cls.__init__))
        # (an oracle without maximize: fastoptim's classes add it, keyword-only)
        keys = [k for k, _ in s.hyperparameters
                if k in got or not (name in ORACLES and k == "maximize")]
        for key in keys:
            if callable(s.defaults[key]):   # (ADOPT's clip_lambda: the same function)
                assert [got[key](t) for t in (1, 2, 7, 100)] == \
                    [s.defaults[key](t) for t in (1, 2, 7, 100)], (cls, key)
                continue
            assert got[key] == s.defaults[key], (cls, key)
        order = [k for k in inspect.signature(cls.__init__).parameters if k in s.defaults]
        assert order == keys, cls
    assert getattr(fot, CLASSES[name])._rule is s


def _option_mixes(s):
    """Every combination of the options that decide which state is kept."""
    keys = sorted(set(s.kept_if.values()))
    on = {"momentum": 0.9, "centered": True, "amsgrad": True}
    for values in itertools.product(*([False, True] for _ in keys)):
        opts = {k: (on[k] if v else type(on[k])(0)) for k, v in zip(keys, values)}
        yield opts


@pytest.mark.parametrize("name", [n for n in CLASSES if n != "adahessian"])
def test_kept_state_and_its_order_are_torch_optim_s(name):
    torch = pytest.importorskip("torch")
    import fastoptim.torch as fot
    s = spec(name)
    for opts in _option_mixes(s):
        # (torch's order: step, then the per-parameter scalars, NAdam's mu_product)
        # (of a vector: Adafactor's matrices keep other state, test_adafactor.py)
        want = tuple(n for n, _ in s.scalar_state) + tuple(
            n for n in s.state_names(dict(s.defaults, **opts))
            if s.state_shape(n, (5,)) is not None)
        p = torch.nn.Parameter(torch.ones(5))
        p.grad = torch.ones(5)
        ref = _torch_class(name)([p], **opts)
        if hasattr(ref, "eval"):            # (Schedule-Free steps in train mode only)
            ref.train()
        # (SophiaH's first step updates its Hessian moment: given an estimate here)
        hess = {"hessian": [torch.ones(5)]} if spec(name).inputs else {}
        ref.step(**hess)
        keys = [k for k in ref.state[p] if k not in ORACLE_EXTRA_STATE.get(name, ())]
        assert ("step" in keys) == s.counts_steps, (name, opts)
        assert tuple(k for k in keys if k != "step") == want, (name, opts, keys)
        q = torch.nn.Parameter(torch.ones(5))
        q.grad = torch.ones(5)
        ours = getattr(fot, CLASSES[name])([q], **opts)
        if hasattr(ours, "eval"):
            ours.train()
        ours.step(**hess)
        assert list(ours.state[q]) == keys, (name, opts)
        a = np.ones(5)
        cls = getattr(fastoptim, CLASSES[name])([a], **opts)
        if hasattr(cls, "eval"):
            cls.train()
        cls.step([np.ones(5)], *([np.ones(5)] if hess else []))
        assert sorted(k for k in cls.state.get(0, {}) if k != "step") == sorted(want), \
            (name, opts)


def test_a_flag_keeps_state_when_true_a_number_when_positive():
    r = spec("rmsprop")
    base = r.defaults
    assert r.state_names(dict(base, momentum=0.0, centered=False)) == ("square_avg",)
    assert r.state_names(dict(base, momentum=0.5, centered=1)) == (
        "square_avg", "momentum_buffer", "grad_avg")
    assert r.state_names(dict(base, momentum=-0.5)) == ("square_avg",)
    assert spec("adam").state_names(dict(spec("adam").defaults, amsgrad="yes")) == (
        "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _template_table():
    """RULES and the format lists of the kernels' dispatch template, or skip (a wheel
    installs the generated kernels, not their templates)."""
    import os
    path = os.path.join(os.path.dirname(fastoptim.__file__), "_kernels", "segments.pxi.tp")
    if not os.path.exists(path):
        pytest.skip("the kernel templates are not installed here (a wheel)")
    text = open(path, encoding="utf-8").read()
    code = text[text.index("{{py:") + len("{{py:"):text.index("}}")]
    table = {}
    exec(code, table)
    return table


def test_the_kernels_dispatch_table_is_the_registry_s():
    """segments.pxi.tp instantiates each kernel's loops for the state formats its
    registry entries accept, and no others (AdaHessian and Adafactor have their own
    dispatch)."""
    t = _template_table()
    formats = {"bfloat16": ["bf16_nearest", "bf16_stochastic"], "8bit": ["q8"]}
    want = {}
    for s in REGISTRY.values():
        if s.name in ("adahessian", "adafactor"):      # (their own kernels)
            continue
        got = want.setdefault(s.kernel, set(t["NATIVE"]))
        for f in s.state_formats:
            got |= set(formats[f])
    assert {r: set(f) for r, f in t["RULES"]} == want


@pytest.mark.parametrize("name", list(CLASSES))
def test_state_formats_are_what_the_functional_api_takes(name):
    s = spec(name)
    takes = "state_dtype" in inspect.signature(getattr(F, f"prepare_{s.kernel}")).parameters
    assert takes == bool(s.state_formats)


def _problem(name, rng):
    s = spec(name)
    shapes = [(5,), (3, 4)]
    params = [rng.standard_normal(sh) for sh in shapes]
    grads = [rng.standard_normal(sh) for sh in shapes]
    states = {n: [None if s.state_shape(n, sh) is None
                  else np.abs(rng.standard_normal(s.state_shape(n, sh))) for sh in shapes]
              for n in s.state}
    states.update({n: [np.full((), s.defaults["lr"] if v is None else v, np.float32)
                       for _ in shapes] for n, v in s.scalar_state})
    inputs = [[rng.standard_normal(sh) for sh in shapes] for _ in s.inputs]
    return params, grads, states, np.array([3, 1], np.int64), inputs


OPTION_MIXES = {
    "sgd": [{}, {"momentum": 0.9, "nesterov": True}, {"momentum": 0.5, "dampening": 0.1}],
    "adagrad": [{}, {"lr_decay": 0.1, "weight_decay": 0.01}],
    "rmsprop": [{}, {"momentum": 0.9}, {"centered": True}, {"centered": True, "momentum": 0.5}],
    "adam": [{}, {"amsgrad": True, "weight_decay": 0.1}],
    "adamw": [{}, {"amsgrad": True, "maximize": True}],
    "adamax": [{}, {"weight_decay": 0.1, "maximize": True, "betas": (0.5, 0.9)}],
    "adadelta": [{}, {"weight_decay": 0.1, "maximize": True, "rho": 0.5}],
    "radam": [{}, {"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True}],
    "rprop": [{}, {"etas": (0.3, 1.5), "step_sizes": (1e-3, 0.1), "maximize": True}],
    "nadam": [{}, {"weight_decay": 0.1, "decoupled_weight_decay": True, "momentum_decay": 0.01}],
    "asgd": [{}, {"weight_decay": 0.1, "t0": 1.0, "lambd": 1e-3, "maximize": True}],
    "lion": [{}, {"weight_decay": 0.1, "maximize": True, "betas": (0.5, 0.9)}],
    "adopt": [{}, {"weight_decay": 0.1, "weight_decouple": True, "clip_lambda": None}],
    "ademamix": [{}, {"weight_decay": 0.1, "t_alpha_beta3": 10.0, "maximize": True}],
    "sophiah": [{}, {"weight_decay": 0.1, "weight_decouple": False, "p": 0.5}],
    "adamw_schedulefree": [{}, {"weight_decay": 0.1, "ckp1": 0.3, "maximize": True}],
    "adafactor": [{}, {"weight_decay": 0.1, "maximize": True, "eps": (1e-3, 1e-2), "d": 2.0,
                       "beta2_decay": -0.5}],
    "adahessian": [{}, {"hessian_power": 0.5, "weight_decay": 0.1}],
}


@pytest.mark.parametrize("name", list(CLASSES))
def test_prepare_through_the_registry_is_the_rule_s_prepare(name):
    """functional.prepare (what both class layers call) orders the state as the rule's
    prepare_* takes it, fills the options a group lacks with their defaults, adds the
    rule's fixed ones and passes step counts only where the rule uses them: the result
    is the explicit call's, bit for bit."""
    s = spec(name)
    fn = getattr(F, f"prepare_{name}")
    positional = [n for n, p in inspect.signature(fn).parameters.items()
                  if p.kind is p.POSITIONAL_OR_KEYWORD][2 + len(s.inputs):-1]
    scalars = tuple(n for n, _ in s.scalar_state)
    order = dict(zip(positional, s.kernel_state + scalars))   # list argument -> state name
    for opts in OPTION_MIXES[name]:
        kept = s.state_names(dict(s.defaults, **opts)) + scalars
        a = _problem(name, np.random.default_rng(0))
        b = _problem(name, np.random.default_rng(0))
        pa, ga, sa, ta, ia = a
        F.prepare(s, pa, ga, {n: sa[n] for n in kept}, ta, dict(opts, params=pa),
                  *ia).run(1)
        pb, gb, sb, tb, ib = b
        lists = [sb[order[arg]] if order[arg] in kept else None for arg in positional]
        steps = tb if (s.counts_steps or kept) else None
        fn(pb, gb, *ib, *lists, steps, **opts).run(1)
        for x, y in zip(pa + [a for n in kept for a in sa[n]] + [ta],
                        pb + [b for n in kept for b in sb[n]] + [tb]):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", list(CLASSES))
def test_bounds_are_the_kernels_and_torchs(name):
    """Each bounded option of the registry: the kernels (or the NumPy class, for an
    option the kernel does not take) refuse a value out of it with the registry's
    label, and check_bounds raises torch's text; the defaults pass both."""
    s = spec(name)
    assert s.bounds, name
    opts = dict(s.defaults)
    fn = getattr(F, f"prepare_{s.kernel}")
    kw = {k: v for k, v in opts.items() if k in inspect.signature(fn).parameters}
    empty = [[] for _ in s.kernel_state + s.scalar_state]
    fn([], [], *[[] for _ in s.inputs], *empty, np.zeros(0, np.int64), **kw)   # passes
    s.check_bounds(opts)
    for key, bound, label, *_text in s.bounds:
        bad = 1.0 if bound in ("unit", "nonpos") else -1.0
        option, _, item = key.partition("[")
        value = bad if not item else tuple(bad if i == int(item[:-1]) else v
                                            for i, v in enumerate(opts[option]))
        with pytest.raises(ValueError, match=rf"^Invalid {re.escape(label)}: "):
            if option in kw:
                fn([], [], *[[] for _ in s.inputs], *empty, np.zeros(0, np.int64),
                   **dict(kw, **{option: value}))
            else:                            # (an option of the class, not the kernel)
                getattr(fastoptim, CLASSES[name])([np.zeros(3)], **{option: value})
        with pytest.raises(ValueError, match=rf"^{re.escape(s.bound_message(key, bad))}$"):
            s.check_bounds(dict(opts, **{option: value}))
