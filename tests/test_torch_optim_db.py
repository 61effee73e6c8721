"""fastoptim.torch against PyTorch's own optimizer test database: torch 2.13 ships it as
``torch.testing._internal.common_optimizers.optim_db`` -- for each optimizer, the option
mixes and the bad arguments that PyTorch's test/test_optim.py runs (that file itself is
not in the wheel). Every OptimizerInfo whose optimizer fastoptim.torch has is run here
on the CPU: each error input raises (or warns) as torch's class does, with the same
type and text, and each option mix steps a small model as torch's class does. Below
those, the CPU tests of test_optim.py's TestOptimRenewed, run through fastoptim.torch's
classes over the database's inputs."""
import copy
import re
import warnings

import pytest

torch = pytest.importorskip("torch")
# (torch's test helpers import expecttest, a test extra)
pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest")
from torch.testing._internal.common_optimizers import (  # noqa: E402
    OptimizerErrorEnum, optim_db)

import fastoptim.torch as fot  # noqa: E402

INFOS = {info.optim_cls.__name__: info for info in optim_db
         if hasattr(fot, info.optim_cls.__name__)}


def test_the_database_covers_every_drop_in_of_a_torch_optim_rule():
    assert sorted(INFOS) == sorted(n for n in fot.__all__ if hasattr(torch.optim, n))
    assert len(INFOS) == 12


@pytest.mark.parametrize("name", sorted(INFOS))
def test_torch_s_error_inputs_fail_alike(name):
    """PyTorch's test_errors, with fastoptim.torch's class in place of torch's."""
    info, cls = INFOS[name], getattr(fot, name)
    inputs = info.optim_error_inputs_func(device="cpu", dtype=torch.float32)
    assert inputs
    for e in inputs:
        oi = e.optimizer_error_input
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if e.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
                    cls(oi.params, **oi.kwargs)
                else:
                    cls(oi.params, **oi.kwargs).step()
            except Exception as ex:          # noqa: BLE001 (compared below)
                assert not issubclass(e.error_type, Warning), (oi.desc, ex)
                assert isinstance(ex, e.error_type), (oi.desc, type(ex), ex)
                assert re.search(e.error_regex, str(ex)), (oi.desc, str(ex))
                continue
        assert issubclass(e.error_type, Warning), (oi.desc, "no error raised")
        assert any(issubclass(w.category, e.error_type) and re.search(e.error_regex,
                                                                       str(w.message))
                   for w in caught), (oi.desc, [str(w.message) for w in caught])


def _model(dtype, seed=0):
    """A weight, a bias and a Fortran-ordered weight: their losses are quadratic."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(10, 5, dtype=dtype, generator=g),
            torch.randn(10, dtype=dtype, generator=g),
            torch.randn(5, 10, dtype=dtype, generator=g).t(),
            torch.randn(5, dtype=dtype, generator=g))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", sorted(INFOS))
def test_every_option_mix_of_torch_s_database_steps_as_torch(name, dtype):
    """Each of the database's CPU option mixes: 20 closure steps of torch's class and
    fastoptim.torch's on the same model stay within rounding (fp64 1e-10, fp32 1e-5
    relative to the values' scale)."""
    info = INFOS[name]
    inputs = info.optim_inputs_func(device="cpu", dtype=dtype)
    assert inputs
    for oi in inputs:
        assert oi.params is None, oi.desc        # (the CPU mixes set options only)
        w, b, wt, x = _model(dtype)
        runs = []
        for cls in (info.optim_cls, getattr(fot, name)):
            params = [w.clone().requires_grad_(), b.clone().requires_grad_(),
                      wt.t().clone().t().requires_grad_()]
            opt = cls(params, **copy.deepcopy(oi.kwargs))

            def closure(opt=opt, params=params):
                opt.zero_grad()
                W, B, WT = params
                loss = ((W @ x + B) ** 2).sum() + (WT @ x).pow(2).sum()
                loss.backward()
                return loss
            for _ in range(20):
                opt.step(closure)
            runs.append(params)
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        for want, got in zip(*runs):
            want, got = want.detach(), got.detach()
            scale = max(float(want.abs().max()), 1.0)
            err = float((want - got).abs().max())
            assert err <= tol * scale, (oi.desc, oi.kwargs, err)


# --- the CPU tests of PyTorch's test/test_optim.py (TestOptimRenewed), each over the
# database's inputs for every drop-in. That file is not in the wheel; these follow what
# its tests check, in this suite's words, with fastoptim.torch's class in place of
# torch's (and, where torch's test compares two runs of one class, both runs ours).

from torch.nn import Parameter  # noqa: E402
from torch.optim.lr_scheduler import ReduceLROnPlateau  # noqa: E402
from torch.optim.optimizer import (  # noqa: E402
    register_optimizer_step_post_hook, register_optimizer_step_pre_hook)
from torch.testing._internal.common_optimizers import (  # noqa: E402
    _get_optim_inputs_including_global_cliquey_kwargs)

NAMES = sorted(INFOS)


def _all_inputs(name, dtype=torch.float32, skip=("differentiable",)):
    """The database's option mixes with each of foreach/fused on and off (as torch's
    tests take them); differentiable=True is refused by fastoptim.torch, so left out."""
    return _get_optim_inputs_including_global_cliquey_kwargs(
        "cpu", dtype, INFOS[name], skip=skip)


def _linear(dtype=torch.float32, contiguous=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    if contiguous:
        w, b = torch.randn(10, 5, generator=g), torch.randn(10, generator=g)
    else:
        w = torch.randn(10, 5, 2, generator=g)[..., 0]
        b = torch.randn(10, 2, generator=g)[..., 0]
    x = torch.randn(5, generator=g)
    return Parameter(w.to(dtype)), Parameter(b.to(dtype)), x.to(dtype)


def _loss_closure(opt, w, b, x):
    def closure():
        opt.zero_grad()
        loss = (w.mv(x) + b).pow(2).sum()
        loss.backward()
        return loss
    return closure


def _step_schedulers(schedulers, loss):
    for s in schedulers:
        if isinstance(s, ReduceLROnPlateau):
            s.step(loss)
        else:
            s.step()


def _assert_right_way(kwargs, before, after):
    if kwargs.get("maximize", False):
        assert after > before, (kwargs, before, after)
    else:
        assert after < before, (kwargs, before, after)


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("with_scheduler", [False, True], ids=["", "scheduled"])
@pytest.mark.parametrize("name", NAMES)
def test_loss_goes_the_right_way(name, with_scheduler, contiguous):
    """test_forloop_goes_right_direction: 20 steps of each option mix (with each of the
    database's scheduler lists) lower the loss, or raise it under maximize."""
    info, cls = INFOS[name], getattr(fot, name)
    for sched in (info.scheduler_inputs if with_scheduler else [None]):
        for oi in info.optim_inputs_func(device="cpu"):   # fresh: a tensor lr mutates
            kwargs = dict(oi.kwargs, foreach=False)
            w, b, x = _linear(contiguous=contiguous)
            opt = cls([w, b], **kwargs)
            schedulers = [s(opt) for s in (sched or [])]
            closure = _loss_closure(opt, w, b, x)
            before = closure().item()
            for _ in range(20):
                loss = closure()
                opt.step()
                _step_schedulers(schedulers, loss)
            _assert_right_way(kwargs, before, closure().item())


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_with_a_scheduler_go_the_right_way(name):
    """test_param_group_with_lrscheduler_goes_right_direction."""
    info, cls = INFOS[name], getattr(fot, name)
    for sched in info.scheduler_inputs:
        w, b, x = _linear()
        opt = cls([{"params": [w]}, {"params": [b], "lr": 0.01}])
        schedulers = [s(opt) for s in sched]
        closure = _loss_closure(opt, w, b, x)
        before = closure().item()
        for _ in range(20):
            loss = opt.step(closure)
            _step_schedulers(schedulers, loss)
        assert closure().item() < before


@pytest.mark.parametrize("name", NAMES)
def test_a_tensor_lr_steps_as_the_float_lr(name):
    """test_tensor_lr, stepping both: lr=torch.tensor(1e-3) as lr=1e-3 (to the float32
    rounding of 1e-3), and refused with torch's text exactly where torch refuses it."""
    info, cls = INFOS[name], getattr(fot, name)
    for oi in _all_inputs(name):
        kwargs = dict(oi.kwargs, lr=1e-3)
        w, b, x = _linear()
        wc, bc = (Parameter(t.detach().clone()) for t in (w, b))
        try:
            info.optim_cls([torch.zeros(2, requires_grad=True)],
                           **dict(kwargs, lr=torch.tensor(1e-3)))
            refused = None
        except ValueError as e:
            refused = str(e)
        try:
            opt_c = cls([wc, bc], **dict(kwargs, lr=torch.tensor(1e-3)))
        except ValueError as e:
            assert refused == str(e), (oi.desc, refused, str(e))
            continue
        assert refused is None, (oi.desc, refused)
        opt = cls([w, b], **kwargs)
        for _ in range(5):
            opt.step(_loss_closure(opt, w, b, x))
            opt_c.step(_loss_closure(opt_c, wc, bc, x))
            torch.testing.assert_close(w, wc, msg=oi.desc)
            torch.testing.assert_close(b, bc, msg=oi.desc)


@pytest.mark.parametrize("name", [n for n in NAMES if INFOS[n].supports_complex])
def test_complex_parameters_step_as_their_real_views(name):
    """test_complex: complex parameters (and a real one beside them) step as their
    torch.view_as_real twins under another instance of the same class."""
    cls = getattr(fot, name)
    for oi in _all_inputs(name, torch.complex64, skip=("differentiable", "fused")):
        g = torch.Generator().manual_seed(7)
        complex_params = [torch.randn(10, 5, dtype=torch.complex64, generator=g),
                          torch.randn(10, dtype=torch.complex64, generator=g),
                          torch.randn(10, 5, generator=g)]
        complex_params = [Parameter(t) for t in complex_params]
        real_params = [Parameter(torch.view_as_real(t.detach()).clone()
                                 if t.is_complex() else t.detach().clone())
                       for t in complex_params]
        opt_c, opt_r = cls(complex_params, **oi.kwargs), cls(real_params, **oi.kwargs)
        for _ in range(3):
            for pc, pr in zip(complex_params, real_params):
                pr.grad = torch.randn(pr.shape, generator=g)
                pc.grad = (torch.view_as_complex(pr.grad.clone()) if pc.is_complex()
                           else pr.grad.clone())
            opt_c.step()
            opt_r.step()
            for pc, pr in zip(complex_params, real_params):
                got = torch.view_as_real(pc) if pc.is_complex() else pc
                torch.testing.assert_close(got, pr, msg=oi.desc)


@pytest.mark.parametrize("name", [n for n in NAMES if INFOS[n].supports_complex])
def test_a_complex_parameter_steps_as_its_real_and_imaginary_parts(name):
    """test_complex_2d: a complex 2-vector on |rosenbrock| and two real leaves holding
    its real and imaginary parts get the same gradients and the same steps."""
    cls = getattr(fot, name)

    def rosenbrock(t):
        return (1 - t[0]) ** 2 + 100 * (t[1] - t[0] ** 2) ** 2

    for oi in _all_inputs(name, torch.complex64, skip=("differentiable", "fused")):
        g = torch.Generator().manual_seed(2024)
        a1 = torch.randn(2, dtype=torch.complex64, generator=g).requires_grad_()
        re, im = (a1.real.detach().clone().requires_grad_(),
                  a1.imag.detach().clone().requires_grad_())
        opt1, opt2 = cls([a1], **oi.kwargs), cls([re, im], **oi.kwargs)
        for _ in range(3):
            opt1.zero_grad()
            opt2.zero_grad()
            rosenbrock(a1).abs().backward()
            rosenbrock(torch.complex(re, im)).abs().backward()
            torch.testing.assert_close(a1.grad.real, re.grad, msg=oi.desc)
            torch.testing.assert_close(a1.grad.imag, im.grad, msg=oi.desc)
            opt1.step()
            opt2.step()
            torch.testing.assert_close(a1.real, re, msg=oi.desc)
            torch.testing.assert_close(a1.imag, im, msg=oi.desc)


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_with_their_own_weight_decay(name):
    """test_param_groups_weight_decay: the bias in a group without weight decay; 20
    steps lower the loss (raise it under maximize)."""
    cls = getattr(fot, name)
    for oi in _all_inputs(name):
        w, b, x = _linear()
        opt = cls([{"params": [w], **oi.kwargs},
                   {"params": [b], **dict(oi.kwargs, weight_decay=0)}])
        closure = _loss_closure(opt, w, b, x)
        before = closure().item()
        for _ in range(20):
            closure()
            opt.step()
        _assert_right_way(oi.kwargs, before, closure().item())


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_with_their_own_lr(name):
    """test_param_groups_lr: a group's lr overrides the optimizer's (1e-28); a group
    left at that lr does not move."""
    cls = getattr(fot, name)
    for oi in _all_inputs(name):
        kwargs = dict(oi.kwargs)
        if kwargs.get("lr", 0) == 0 or torch.is_tensor(kwargs.get("lr")):
            kwargs["lr"] = 1e-3
        outer = {"lr": 1e-28}
        if name == "Rprop":
            outer["step_sizes"] = (0, 50)
        w, b, x = _linear()
        irrelevant = Parameter(torch.randn(2))
        keep = irrelevant.detach().clone()
        opt = cls([{"params": [w, b], **kwargs}, {"params": [irrelevant]}], **outer)
        closure = _loss_closure(opt, w, b, x)
        before = closure().item()
        for _ in range(20):
            closure()
            irrelevant.grad = torch.rand_like(irrelevant)
            opt.step()
        _assert_right_way(kwargs, before, closure().item())
        assert torch.equal(irrelevant, keep), oi.desc


@pytest.mark.parametrize("name", [n for n in NAMES if n != "ASGD"])
def test_zero_gradients_leave_parameters_as_they_are(name):
    """test_step_is_noop_for_zero_grads (not ASGD, whose average moves: torch's database
    skips it too): without weight decay a zero gradient changes no parameter. (AdamW's
    default decay stays: at lr 1e-5 it moves p by 1e-7 of itself, within tolerance, as
    in torch's test; every other rule must leave p bit for bit.)"""
    cls = getattr(fot, name)
    for oi in _all_inputs(name):
        if oi.kwargs.get("weight_decay", 0) != 0:
            continue
        kwargs = dict(oi.kwargs)
        if name == "AdamW":
            kwargs["lr"] = (torch.tensor(1e-5) if torch.is_tensor(kwargs.get("lr"))
                            else 1e-5)
        p = Parameter(torch.randn(5, 1))
        keep = p.detach().clone()
        opt = cls([p], **kwargs)
        p.grad = torch.zeros_like(p)
        opt.step(lambda: torch.tensor([1.0]))
        if name == "AdamW":
            torch.testing.assert_close(p.detach(), keep, msg=oi.desc)
        else:
            assert torch.equal(p, keep), oi.desc


@pytest.mark.parametrize("name", NAMES)
def test_printed_and_stepped_without_gradients(name):
    """test_optimizer_can_be_printed and test_step_is_noop_when_params_have_no_grad:
    repr as torch's; a step over parameters without gradients changes none and keeps
    the state torch's class keeps (Adagrad's, made at construction; none for others)."""
    info, cls = INFOS[name], getattr(fot, name)
    for oi in _all_inputs(name):
        params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
        keep = [p.detach().clone() for p in params]
        opt = cls(params, **oi.kwargs)
        assert repr(opt) == repr(info.optim_cls(params, **oi.kwargs))
        theirs = info.optim_cls([Parameter(p.detach().clone()) for p in params],
                                **oi.kwargs)
        assert torch.equal(opt.step(lambda: torch.tensor([1.0])), torch.tensor([1.0]))
        theirs.step()
        assert all(torch.equal(p, k) for p, k in zip(params, keep))
        assert ([sorted(s) for s in opt.state.values()]
                == [sorted(s) for s in theirs.state.values()]), oi.desc


def _assert_same(a, b, where=""):
    """Two state_dicts (or parts) equal: tensors bit for bit, with dtype and shape."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a.keys(), b.keys())
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{k}]")
    else:
        assert a == b, (where, a, b)


def _named(params, named):
    return [(f"p{i}", p) for i, p in enumerate(params)] if named else params


@pytest.mark.parametrize("named", [(False, False), (True, False), (False, True),
                                   (True, True)], ids=["", "named0", "named1", "named"])
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_is_deterministic(name, named):
    """test_state_dict_deterministic: a second optimizer loaded from the first's state
    (each with plain or named parameters) steps as the first, bit for bit, and gives
    the same state_dict (param_names aside); a repeated group reads the same. (As
    torch's class does, the loaded state keeps the given dict's tensors and steps them.)"""
    cls = getattr(fot, name)
    for oi in _all_inputs(name):
        g = torch.Generator().manual_seed(3)
        w, b = Parameter(torch.randn(2, 3, generator=g)), Parameter(torch.randn(2, generator=g))
        x = torch.randn(3, generator=g)
        opt = cls(_named([w, b], named[0]), **oi.kwargs)
        for _ in range(10):
            opt.step(_loss_closure(opt, w, b, x))
        wc, bc = Parameter(w.detach().clone()), Parameter(b.detach().clone())
        opt_c = cls(_named([wc, bc], named[1]), **oi.kwargs)
        opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
        for _ in range(10):
            opt.step(_loss_closure(opt, w, b, x))
            opt_c.step(_loss_closure(opt_c, wc, bc, x))
            assert torch.equal(w, wc) and torch.equal(b, bc), oi.desc
        a, c = opt.state_dict(), opt_c.state_dict()
        for d in (a, c):
            for group in d["param_groups"]:
                group.pop("param_names", None)
        _assert_same(a, c, oi.desc)
        opt_c.param_groups.extend(opt_c.param_groups)
        last_c = opt_c.state_dict()["param_groups"][-1]
        last = opt.state_dict()["param_groups"][-1]
        last_c.pop("param_names", None)
        last.pop("param_names", None)
        assert last == last_c


def _conv_model():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2),
                                torch.nn.BatchNorm2d(2, eps=1e-05, momentum=0.1))
    return model, torch.rand([1, 4, 16, 16])


@pytest.mark.parametrize("name", NAMES)
def test_a_state_dict_without_newer_flags_loads(name):
    """test_can_load_older_state_dict: the flags torch added after an optimizer's first
    release (the database's not_og_supported_flags) removed from a checkpoint; it loads
    (the flags back at their defaults) and the next step is torch's class's from the
    same checkpoint."""
    info, cls = INFOS[name], getattr(fot, name)
    for oi in _all_inputs(name):
        model, x = _conv_model()
        opt = cls(model.parameters(), **oi.kwargs)
        for _ in range(3):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
        sd = copy.deepcopy(opt.state_dict())
        for group in sd["param_groups"]:
            for flag in info.not_og_supported_flags:
                group.pop(flag, None)
        mine, theirs = copy.deepcopy(model), copy.deepcopy(model)
        opt_m = cls(mine.parameters(), **oi.kwargs)
        opt_t = info.optim_cls(theirs.parameters(), **oi.kwargs)
        for m, o in ((mine, opt_m), (theirs, opt_t)):
            o.load_state_dict(copy.deepcopy(sd))
            o.zero_grad()
            m(x).sum().backward()
            o.step()
        for a, c in zip(mine.parameters(), theirs.parameters()):
            torch.testing.assert_close(a, c, msg=oi.desc)


@pytest.mark.parametrize("named", [(False, False), (True, False), (False, True),
                                   (True, True)], ids=["", "named0", "named1", "named"])
@pytest.mark.parametrize("name", NAMES)
def test_state_dicts_move_between_named_and_plain(name, named):
    """test_can_load_from_to_named_state_dict."""
    cls = getattr(fot, name)
    for oi in _all_inputs(name):
        model, x = _conv_model()
        args = [model.named_parameters() if n else model.parameters() for n in named]
        opt = cls(args[0], **oi.kwargs)
        for _ in range(3):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
        opt2 = cls(args[1], **oi.kwargs)
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
        opt2.zero_grad()
        model(x).sum().backward()
        opt2.step()
        if any(named):
            names = opt2.state_dict()["param_groups"][0].get("param_names")
            if named[1]:
                assert names == ["0.weight", "0.bias", "1.weight", "1.bias"]


@pytest.mark.parametrize("named", [False, True], ids=["", "named"])
@pytest.mark.parametrize("name", NAMES)
def test_saved_state_loads_with_weights_only(name, named, tmp_path):
    """test_save_load_equality_with_weights_only."""
    cls = getattr(fot, name)
    for k, oi in enumerate(_all_inputs(name)):
        w, b, x = _linear()
        opt = cls(_named([w, b], named), **oi.kwargs)
        for _ in range(3):
            opt.step(_loss_closure(opt, w, b, x))
        sd = opt.state_dict()
        path = tmp_path / f"{k}.pt"
        torch.save(sd, path)
        _assert_same(torch.load(path, weights_only=False), sd, oi.desc)
        _assert_same(torch.load(path, weights_only=True), sd, oi.desc)


@pytest.mark.parametrize("name", NAMES)
def test_a_step_count_as_a_number_loads(name):
    """test_load_nontensor_step: steps saved as Python numbers load, and the next step
    is the one the tensor counts give."""
    cls = getattr(fot, name)
    for oi in _all_inputs(name):
        g = torch.Generator().manual_seed(5)
        params = [Parameter(torch.randn(2, 3, generator=g)) for _ in range(2)]
        opt = cls(params, **oi.kwargs)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        sd = copy.deepcopy(opt.state_dict())
        numbers = copy.deepcopy(sd)
        for state in numbers["state"].values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].item()
        twins = [Parameter(p.detach().clone()) for p in params]
        opt_n = cls(twins, **oi.kwargs)
        opt_n.load_state_dict(numbers)
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for o, ps in ((opt, params), (opt_n, twins)):
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
            o.step()
        for a, c in zip(params, twins):
            assert torch.equal(a, c), oi.desc


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_and_load_hooks(name):
    """The six state_dict hook tests: pre and post hooks of state_dict() and
    load_state_dict(), their order, prepend, and what each may change."""
    cls = getattr(fot, name)
    for oi in _all_inputs(name):
        p = Parameter(torch.randn(2, 3))
        opt = cls([p], **oi.kwargs)
        ran = {}

        def pre(o):
            o.state["test"] = 1

        def post(o, sd):
            ran["pre"] = "test" in sd["state"]
            sd["state"].pop("test", None)
            ran["post"] = True
            return sd

        h1 = opt.register_state_dict_pre_hook(pre)
        assert opt.state_dict()["state"]["test"] == 1
        h1.remove()
        opt.state.pop("test", None)
        h2 = opt.register_state_dict_post_hook(post)
        ran.clear()
        assert ran.get("pre") is None and "test" not in opt.state_dict()["state"]
        assert ran == {"pre": False, "post": True}
        opt.register_state_dict_pre_hook(pre)
        sd = opt.state_dict()
        assert ran == {"pre": True, "post": True} and "test" not in sd["state"]
        h2.remove()

        opt = cls([p], **oi.kwargs)
        sd = opt.state_dict()

        def lr_in_place(o, s):
            s["param_groups"][0]["lr"] = 0.002

        def lr_copy(o, s):
            ran["copy"] = s["param_groups"][0]["lr"]
            s = copy.deepcopy(s)
            s["param_groups"][0]["lr"] = 0.003
            return s

        def after(o):
            ran["after"] = o.param_groups[0]["lr"]

        opt.register_load_state_dict_pre_hook(lr_in_place)
        opt.load_state_dict(sd)
        assert opt.param_groups[0]["lr"] == 0.002
        opt.register_load_state_dict_pre_hook(lr_copy, prepend=True)
        opt.register_load_state_dict_post_hook(after)
        opt.load_state_dict(sd)
        # (lr_copy first, on the dict as given; then lr_in_place on its copy)
        assert opt.param_groups[0]["lr"] == 0.002 and ran["after"] == 0.002


@pytest.mark.parametrize("name", NAMES)
def test_step_hooks(name):
    """test_step_pre_hook, test_step_post_hook and test_step_all_hooks: hooks of the
    optimizer, of another optimizer over the same parameter and global ones, in order,
    on every step (kept steps included), and none after their handles are removed."""
    cls = getattr(fot, name)
    for oi in _all_inputs(name):
        p = Parameter(torch.tensor([1.0, 1.0]))
        opt = cls([p], **oi.kwargs)
        other = torch.optim.SGD([p], lr=0.0)
        data = {"pre": 5, "post": 2}
        order = []

        def add(key, amount):
            def hook(o, args, kwargs):
                data[key] += amount
            return hook

        handles = [opt.register_step_pre_hook(add("pre", 2)),
                   opt.register_step_post_hook(add("post", 2))]
        for _ in range(2):
            p.grad = torch.zeros(2)
            opt.step()
        assert data == {"pre": 9, "post": 6}
        for h in handles:
            h.remove()
        p.grad = torch.zeros(2)
        opt.step()
        assert data == {"pre": 9, "post": 6}

        def mark(k):
            return lambda o, args, kwargs: order.append(k)

        handles = [register_optimizer_step_pre_hook(mark(0)),
                   register_optimizer_step_post_hook(mark(5)),
                   opt.register_step_pre_hook(mark(1)),
                   opt.register_step_post_hook(mark(2)),
                   other.register_step_pre_hook(mark(3)),
                   other.register_step_post_hook(mark(4))]
        try:
            for o in (opt, other, opt):
                p.grad = torch.randn(2)
                o.step()
            assert order == [0, 1, 2, 5, 0, 3, 4, 5, 0, 1, 2, 5]
        finally:
            for h in handles:
                h.remove()
        for o in (opt, other):
            p.grad = torch.randn(2)
            o.step()
        assert len(order) == 12


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_copies_all_public_attributes(name):
    """test_deepcopy_copies_all_public_attrs."""
    cls = getattr(fot, name)
    for oi in _all_inputs(name):
        params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
        opt = cls(params, **oi.kwargs)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()

        def public(o):
            return {k for k in o.__dict__ if not k.startswith("_")}
        assert public(opt) == public(copy.deepcopy(opt))


@pytest.mark.parametrize("name", NAMES)
def test_one_step_leaves_the_state_torch_leaves(name):
    """test_non_empty_state, sharpened: after one step every parameter's state holds
    the entries torch's class keeps (none for SGD without momentum)."""
    info, cls = INFOS[name], getattr(fot, name)
    for oi in info.optim_inputs_func(device="cpu"):
        keys = []
        for c in (cls, info.optim_cls):
            torch.manual_seed(0)
            model = torch.nn.Linear(5, 5)
            opt = c(model.parameters(), **oi.kwargs)
            model(torch.randn(2, 5)).sum().backward()
            opt.step()
            keys.append([sorted(opt.state[p]) for p in model.parameters()])
        assert keys[0] == keys[1], oi.desc
        if name != "SGD" or oi.kwargs.get("momentum", 0):
            assert all(keys[0]), oi.desc


@pytest.mark.parametrize("name", NAMES)
def test_steps_with_missing_and_frozen_gradients_match_torch(name):
    """test_foreach_matches_forloop / test_fused_matches_forloop, against torch's
    for-loop class: a small MLP and a 0-d parameter over 7 steps, the gradients all None
    at one step and one layer frozen for two; parameters and every state entry (fp64)
    stay within 1e-10 of torch's, with each of foreach/fused off and on."""
    info, cls = INFOS[name], getattr(fot, name)
    for oi in _all_inputs(name, torch.float64):
        runs = []
        for c in (info.optim_cls, cls):
            kwargs = dict(oi.kwargs)
            if c is info.optim_cls:              # torch's for-loop path
                kwargs.pop("fused", None)
                if "foreach" in kwargs:
                    kwargs["foreach"] = False
            torch.manual_seed(1)
            model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(),
                                        torch.nn.Linear(3, 1), torch.nn.Sigmoid())
            model.to(torch.float64)
            scalar = Parameter(torch.tensor(0.5, dtype=torch.float64))
            params = [*model.parameters(), scalar]
            opt = c(params, **kwargs)
            g = torch.Generator().manual_seed(4)
            x = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], dtype=torch.float64)
            for i in range(7):
                opt.zero_grad()
                if i == 3:
                    model[2].requires_grad_(False)
                if i == 5:
                    model[2].requires_grad_(True)
                if i != 2:
                    model(x).sum().backward()
                    scalar.grad = torch.randn((), dtype=torch.float64, generator=g)
                opt.step()
            runs.append((params, opt))
        (pt, ot), (pf, of) = runs
        for a, b in zip(pt, pf):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=oi.desc)
            assert sorted(ot.state[a]) == sorted(of.state[b]), oi.desc
            for k, v in ot.state[a].items():
                torch.testing.assert_close(of.state[b][k], v, rtol=1e-10, atol=1e-10,
                                           msg=f"{oi.desc}: {k}")
