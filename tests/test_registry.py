"""The rule registry (fastoptim.rules) against every layer that repeats it and against
torch.optim itself: hyperparameter names, order and defaults; which state each option
mix keeps, in which order; whether a rule counts steps."""
import inspect
import itertools

import numpy as np
import pytest

import fastoptim
from fastoptim import functional as F
from fastoptim.rules import REGISTRY, spec

CLASSES = {"sgd": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop", "adam": "Adam",
           "adamw": "AdamW", "adahessian": "AdaHessian"}


def _defaults(fn, skip=("self", "params")):
    """(name, default) of ``fn``'s parameters that have a default, in order."""
    return [(k, v.default) for k, v in inspect.signature(fn).parameters.items()
            if k not in skip and v.default is not inspect.Parameter.empty]


def test_every_rule_has_an_entry_and_a_class_in_each_layer():
    assert list(REGISTRY) == list(CLASSES)
    for name, cls in CLASSES.items():
        assert spec(name).title == cls
        assert getattr(fastoptim, cls)._rule is spec(name)
    with pytest.raises(ValueError, match="no rule 'lion'"):
        spec("lion")


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
    for cls in (getattr(torch.optim, CLASSES[name]), getattr(fot, CLASSES[name])):
        got = dict(_defaults(cls.__init__))
        for key, default in s.hyperparameters:
            assert got[key] == default, (cls, key)
        order = [k for k in inspect.signature(cls.__init__).parameters if k in s.defaults]
        assert order == [k for k, _ in s.hyperparameters], cls
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
        want = s.state_names(dict(s.defaults, **opts))
        p = torch.nn.Parameter(torch.ones(5))
        p.grad = torch.ones(5)
        ref = getattr(torch.optim, CLASSES[name])([p], **opts)
        ref.step()
        keys = list(ref.state[p])
        assert ("step" in keys) == s.counts_steps, (name, opts)
        assert tuple(k for k in keys if k != "step") == want, (name, opts, keys)
        q = torch.nn.Parameter(torch.ones(5))
        q.grad = torch.ones(5)
        ours = getattr(fot, CLASSES[name])([q], **opts)
        ours.step()
        assert list(ours.state[q]) == keys, (name, opts)
        a = np.ones(5)
        cls = getattr(fastoptim, CLASSES[name])([a], **opts)
        cls.step([np.ones(5)])
        assert tuple(k for k in cls.state.get(0, {}) if k != "step") == want, (name, opts)


def test_a_flag_keeps_state_when_true_a_number_when_positive():
    r = spec("rmsprop")
    base = r.defaults
    assert r.state_names(dict(base, momentum=0.0, centered=False)) == ("square_avg",)
    assert r.state_names(dict(base, momentum=0.5, centered=1)) == (
        "square_avg", "momentum_buffer", "grad_avg")
    assert r.state_names(dict(base, momentum=-0.5)) == ("square_avg",)
    assert spec("adam").state_names(dict(spec("adam").defaults, amsgrad="yes")) == (
        "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
