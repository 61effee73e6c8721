"""The rules beyond torch.optim against the package people use for each (the oracle):
trajectories over hundreds of steps, fp64 and fp32, for several option mixes, through
both class layers; checkpoints both ways; the oracle's refusals. A missing oracle
package is a skip that names it (they are test extras: ``pip install ".[test]"``)."""
import copy
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastoptim  # noqa: E402
import fastoptim.torch as fot  # noqa: E402


def _oracle(name):
    """The oracle class of fastoptim's rule ``name`` (the registry names it), or a skip
    that names its package."""
    package, module, cls = getattr(fot, name)._rule.oracle
    return getattr(pytest.importorskip(module, reason=f"{package} (the oracle of {name}) "
                                       "is not installed"), cls)


#: rule -> option mixes (its oracle: the registry's)
MIXES = {
    "Lion": [
        dict(), dict(lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1),
        dict(lr=3e-3, weight_decay=0.5, decoupled_weight_decay=True),
        dict(lr=1e-2, betas=(1.0, 0.0), weight_decay=0.01)],
    "ADOPT": [
        dict(), dict(lr=1e-2, betas=(0.5, 0.9), weight_decay=0.1, eps=1e-3),
        dict(lr=1e-2, weight_decay=0.1, weight_decouple=True),
        dict(lr=1e-2, weight_decay=0.01, weight_decouple=True, fixed_decay=True,
             maximize=True),
        dict(lr=1e-2, clip_lambda=None, foreach=False),
        dict(lr=1e-2, clip_lambda=lambda step: 0.5 + 0.1 * step)],
    "AdEMAMix": [
        dict(), dict(lr=1e-2, betas=(0.8, 0.99, 0.999), alpha=2.0, weight_decay=0.1),
        dict(lr=1e-2, t_alpha_beta3=100.0, weight_decay=0.1, weight_decouple=True),
        dict(lr=1e-2, t_alpha_beta3=50, alpha=8.0, weight_decay=0.01,
             weight_decouple=True, fixed_decay=True, maximize=True),
        dict(lr=1e-2, betas=(0.9, 0.999, 1.0), foreach=False, eps=1e-6)],
    # (Hessian estimates given on the steps that update their average; the oracle's own
    # autograd estimate: test_sophiah_estimates_the_hessian_as_the_oracle)
    "SophiaH": [
        dict(), dict(lr=1e-2, betas=(0.9, 0.95), update_period=3, p=0.5, weight_decay=0.1),
        dict(lr=1e-2, update_period=4, weight_decay=0.1, weight_decouple=False, eps=1e-3),
        dict(lr=1e-2, update_period=2, weight_decay=0.01, fixed_decay=True,
             maximize=True, foreach=False)],
    # (train() before the first step, as the oracle requires; an eval()/train() round
    # trip midway: test_trajectories_follow_the_oracle)
    "AdamWScheduleFree": [
        dict(), dict(lr=1e-2, warmup_steps=20, weight_decay=0.1, r=0.5),
        dict(lr=1e-2, betas=(0.5, 0.9), weight_lr_power=0.0, foreach=False, eps=1e-6),
        dict(lr=1e-2, warmup_steps=5, weight_lr_power=1.0, maximize=True)],
}
CASES = [(name, i) for name, mixes in MIXES.items() for i in range(len(mixes))]
SHAPES = [(37,), (64, 33), (), (0,)]


def _tensors(rng, dtype):
    """Parameters of several shapes, one of them Fortran-ordered (a transposed view)."""
    out = [torch.tensor(rng.standard_normal(s), dtype=dtype) for s in SHAPES]
    out.append(torch.tensor(rng.standard_normal((6, 5)), dtype=dtype).t())
    return out


def _hessians(name, kw, k, start, rng, dtype):
    """SophiaH's Hessian-diagonal estimates on the steps that update their average (the
    first and every update_period-th), else None; None for the other rules."""
    if name != "SophiaH" or k % kw.get("update_period", 10):
        return None
    return [torch.tensor(rng.standard_normal(t.shape) + 0.5, dtype=dtype) for t in start]


def _step_all(name, h, torch_opts, numpy_opt=None, numpy_grads=None):
    """One step of each optimizer, with the Hessian estimates ``h`` where given."""
    for o in torch_opts:
        o.step() if h is None else o.step(hessian=[x.clone() for x in h])
    if numpy_opt is not None:
        if h is None:
            numpy_opt.step(numpy_grads)
        else:
            numpy_opt.step(numpy_grads, [x.numpy().copy() for x in h])


def _train(*opts):
    """Schedule-Free's train mode (its step refuses eval mode); nothing for the rest."""
    for o in opts:
        if hasattr(o, "train") and hasattr(o, "eval"):
            o.train()


def _oracle_options(oracle_cls, kw):
    """The oracle's options, and the sign of its gradients: where the oracle has no
    ``maximize`` (Schedule-Free; fastoptim adds it), it steps on the negated gradient."""
    import inspect
    if "maximize" in inspect.signature(oracle_cls.__init__).parameters:
        return kw, 1
    return ({k: v for k, v in kw.items() if k != "maximize"},
            -1 if kw.get("maximize") else 1)


def _numpy_options(kw):
    """The NumPy class's options: torch's implementation choices left out."""
    return {k: v for k, v in kw.items() if k != "foreach"}


def _tolerance(dtype):
    # fp64 to ~1e-9 relative; fp32 to a few ulp of the array's scale (the oracle's torch
    # ops fuse multiply-adds where fastoptim's kernels round each operation)
    return 1e-9 if dtype == torch.float64 else 8 * 2.0 ** -23


def _close(got, want, dtype, what):
    # the scale: the array's, or the problem's (values and gradients start at ~1: a
    # moment that ends near 0 carries the rounding of its larger past)
    scale = max(float(want.abs().max()) if want.numel() else 0.0, 1.0)
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= _tolerance(dtype) * scale, f"{what}: error {err:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name,mix", CASES)
def test_trajectories_follow_the_oracle(name, mix, dtype):
    """300 steps of the oracle, fastoptim.torch's class and the NumPy class from the same
    values and gradients (a parameter skipped now and then): parameters and state
    stay within rounding of the oracle's; the gradients are never written."""
    oracle_cls, kw = _oracle(name), MIXES[name][mix]
    rng = np.random.default_rng(mix)
    start = _tensors(rng, dtype)
    a = [t.clone().requires_grad_() for t in start]
    b = [torch.nn.Parameter(t.clone()) for t in start]
    b[-1] = torch.nn.Parameter(start[-1].t().clone().t())            # (Fortran order)
    arrays = [t.numpy().copy(order="K") for t in start]
    okw, sign = _oracle_options(oracle_cls, kw)
    oa, ob = oracle_cls(a, **okw), getattr(fot, name)(b, **kw)
    oc = getattr(fastoptim, name)(arrays, **_numpy_options(kw))
    _train(oa, ob, oc)
    for k in range(300):
        grads = [torch.tensor(rng.standard_normal(t.shape), dtype=dtype) for t in start]
        skip = k % 7 == 3
        for i, (x, y, g) in enumerate(zip(a, b, grads)):
            x.grad = None if skip and i == 1 else g.clone() * sign
            y.grad = None if skip and i == 1 else g.clone()
        if k == 150 and hasattr(oa, "eval"):        # (Schedule-Free: to x and back)
            for o in (oa, ob, oc):
                o.eval()
            for o in (oa, ob, oc):
                o.train()
        keep = [None if y.grad is None else y.grad.clone() for y in b]
        _step_all(name, _hessians(name, kw, k, start, rng, dtype), (oa, ob), oc,
                  [None if skip and i == 1 else g.numpy().copy()
                   for i, g in enumerate(grads)])
        for y, g in zip(b, keep):
            assert (y.grad is None) == (g is None)
            if g is not None:
                assert torch.equal(y.grad, g), "a gradient was written"
    for i, (x, y, z) in enumerate(zip(a, b, arrays)):
        _close(y.detach(), x.detach(), dtype, f"{name} {kw} param {i} (torch class)")
        _close(torch.from_numpy(z), x.detach(), dtype, f"{name} {kw} param {i} (NumPy class)")
        for key in ob._rule.state:          # (the oracle's own extras: SophiaH's hessian)
            want = oa.state[x].get(key)
            if want is not None:
                _close(ob.state[y][key], want, dtype, f"{name} {kw} {key} {i}")
                _close(torch.from_numpy(oc.state[i][key]), want, dtype,
                       f"{name} {kw} {key} {i} (NumPy class)")


@pytest.mark.parametrize("name", list(MIXES))
def test_checkpoints_move_to_and_from_the_oracle(name):
    """A state dict of the oracle loads into both of fastoptim's classes (and the torch
    class's into the oracle), through torch.save/torch.load(weights_only=True) in both
    directions, and every optimizer continues on the same trajectory."""
    import io
    oracle_cls, kw = _oracle(name), MIXES[name][1]
    rng = np.random.default_rng(5)
    start = _tensors(rng, torch.float64)
    grads = [[torch.tensor(rng.standard_normal(t.shape)) for t in start] for _ in range(20)]
    hess = [_hessians(name, kw, k, start, rng, torch.float64) for k in range(20)]

    def run(opt, params, gs, first):
        for k, g in enumerate(gs):
            for p, x in zip(params, g):
                p.grad = x.clone()
            _step_all(name, hess[first + k], (opt,))

    def through_disk(sd):
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=True)

    ref = [t.clone().requires_grad_() for t in start]
    oref = oracle_cls(ref, **kw)
    _train(oref)
    run(oref, ref, grads, 0)
    # oracle -> fastoptim.torch -> oracle
    a = [t.clone().requires_grad_() for t in start]
    oa = oracle_cls(a, **kw)
    _train(oa)
    run(oa, a, grads[:10], 0)
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    ob = getattr(fot, name)(b, **kw)
    ob.load_state_dict(through_disk(oa.state_dict()))
    run(ob, b, grads[10:15], 10)
    c = [x.detach().clone().requires_grad_() for x in b]
    oc = oracle_cls(c, **kw)
    oc.load_state_dict(through_disk(ob.state_dict()))
    run(oc, c, grads[15:], 15)
    # oracle -> the NumPy class
    arrays = [x.detach().numpy().copy() for x in a]
    on = getattr(fastoptim, name)(arrays, **_numpy_options(kw))
    on.load_state_dict(through_disk(oa.state_dict()))
    for k, g in enumerate(grads[10:]):
        _step_all(name, hess[10 + k], (), on, [x.numpy().copy() for x in g])
    for i, (x, y, z) in enumerate(zip(ref, c, arrays)):
        _close(y.detach(), x.detach(), torch.float64, f"param {i} (oracle -> torch class)")
        _close(torch.from_numpy(z), x.detach(), torch.float64, f"param {i} (-> NumPy class)")


def test_lion_refuses_what_it_cannot_do_and_changes_nothing():
    p = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(ValueError, match="use_triton"):
        fot.Lion([p], use_triton=True)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1: 1.5"):
        fot.Lion([p], betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="Invalid beta parameter at index 0: -0.1"):
        fastoptim.Lion([np.ones(3)], betas=(-0.1, 0.9))
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        fot.Lion([p], lr=-1.0)
    for cls, params in ((fot.Lion, [p]), (fastoptim.Lion, [np.ones(3)])):
        with pytest.raises(ValueError, match="divides weight_decay by the initial"):
            cls(params, lr=0.0, decoupled_weight_decay=True)
        with pytest.raises(TypeError, match="decoupled_weight_decay must be a bool"):
            cls(params, decoupled_weight_decay="yes")
    z = torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"is complex .*Lion takes real parameters only"):
        fot.Lion([p, z])
    # a refused step (bad group option set later) changes no parameter and no state
    q = torch.nn.Parameter(torch.ones(4))
    opt = fot.Lion([p, q], lr=0.1)
    p.grad, q.grad = torch.ones(4), torch.ones(4)
    opt.step()
    before = [p.detach().clone(), q.detach().clone(), opt.state[p]["exp_avg"].clone()]
    opt.param_groups[0]["betas"] = (0.9, 2.0)
    with pytest.raises(ValueError, match="beta parameter at index 1"):
        opt.step()
    after = [p.detach(), q.detach(), opt.state[p]["exp_avg"]]
    assert all(torch.equal(x, y) for x, y in zip(before, after))


def test_lion_decoupled_decay_survives_pickling():
    """The oracle's decoupled_weight_decay is an optimizer attribute (weight decay
    divided by the initial lr at each step, even after the lr changes); it survives a
    pickle of either class."""
    for make in (lambda: fot.Lion([torch.nn.Parameter(torch.ones(3))], lr=0.5,
                                  weight_decay=0.2, decoupled_weight_decay=True),
                 lambda: fastoptim.Lion([np.ones(3)], lr=0.5, weight_decay=0.2,
                                        decoupled_weight_decay=True)):
        opt = make()
        opt.param_groups[0]["lr"] = 0.1
        twin = pickle.loads(pickle.dumps(opt))
        for o in (opt, twin):
            params = o.param_groups[0]["params"]
            if isinstance(params[0], torch.Tensor):
                params[0].grad = torch.zeros(3)
                o.step()
                got = params[0].detach().numpy()
            else:
                o.step([np.zeros(3)])
                got = params[0]
            # decay 1 - lr * wd / init_lr = 1 - 0.1 * 0.2 / 0.5; sign(0) = 0: no step
            np.testing.assert_allclose(got, np.full(3, 1 - 0.1 * 0.2 / 0.5), rtol=1e-6)


def test_adopt_counts_steps_per_group_as_the_oracle():
    """The oracle's step is the group's, advanced at every step() even for a group none
    of whose parameters has a gradient; a parameter that first gets one later takes
    the normal update, not the first step's. Both classes keep that count, save it in
    the group (where the oracle's state dicts have it) and load it back."""
    oracle_cls = _oracle("ADOPT")
    rng = np.random.default_rng(3)
    start = [torch.tensor(rng.standard_normal(s)) for s in ((5,), (4, 3))]
    a = [t.clone().requires_grad_() for t in start]
    b = [torch.nn.Parameter(t.clone()) for t in start]
    arrays = [t.numpy().copy() for t in start]
    oa = oracle_cls([{"params": [a[0]]}, {"params": [a[1]]}], lr=0.01)
    ob = fot.ADOPT([{"params": [b[0]]}, {"params": [b[1]]}], lr=0.01)
    oc = fastoptim.ADOPT([{"params": [arrays[0]]}, {"params": [arrays[1]]}], lr=0.01)
    for k in range(8):
        gs = [torch.tensor(rng.standard_normal(t.shape)) for t in start]
        late = k < 3                        # the second group's parameter waits
        for x, y, g, i in zip(a, b, gs, range(2)):
            x.grad = None if late and i == 1 else g.clone()
            y.grad = None if late and i == 1 else g.clone()
        oa.step()
        ob.step()
        oc.step([gs[0].numpy().copy(), None if late else gs[1].numpy().copy()])
    assert [g["step"] for g in oa.param_groups] == [g["step"] for g in ob.param_groups] \
        == [g["step"] for g in oc.state_dict()["param_groups"]] == [8, 8]
    for x, y, z in zip(a, b, arrays):
        _close(y.detach(), x.detach(), torch.float64, "torch class")
        _close(torch.from_numpy(z), x.detach(), torch.float64, "NumPy class")
    twin = fastoptim.ADOPT([{"params": [z.copy()]} for z in arrays], lr=0.01)
    twin.load_state_dict(oa.state_dict())
    assert [g["step"] for g in twin.state_dict()["param_groups"]] == [8, 8]


def test_adopt_refuses_what_it_cannot_do_and_changes_nothing():
    p = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(ValueError, match="cautious=True"):
        fot.ADOPT([p], cautious=True)
    fot.ADOPT([p], cautious=False, stable_adamw=False)            # (the oracle's keys)
    with pytest.raises(TypeError, match="unexpected keyword argument 'nosuch'"):
        fot.ADOPT([p], nosuch=1)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1: 1.0"):
        fot.ADOPT([p], betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="clip_lambda must be a function"):
        fastoptim.ADOPT([np.ones(3)], clip_lambda=2.0)
    # a clip the step cannot use, found when the step is checked: nothing changes
    for make, step in (
            (lambda c: fot.ADOPT([p], lr=0.1, clip_lambda=c), None),
            (lambda c: fastoptim.ADOPT([np.ones(4)], lr=0.1, clip_lambda=c), np.ones(4))):
        opt = make(lambda t: 1.0 if t < 3 else -1.0)
        for _ in range(2):
            if step is None:
                p.grad = torch.ones(4)
                opt.step()
            else:
                opt.step([step])
        sd = opt.state_dict()
        before = [_numpy(v).copy() for v in sd["state"][0].values()]
        value = (p.detach().clone() if step is None
                 else opt.param_groups[0]["params"][0].copy())
        with pytest.raises(ValueError, match=r"clip_lambda\(3\)"):
            opt.step() if step is None else opt.step([step])
        sd2 = opt.state_dict()
        assert sd2["param_groups"][0]["step"] == sd["param_groups"][0]["step"] == 2
        assert all(np.array_equal(x, _numpy(y)) for x, y in
                   zip(before, sd2["state"][0].values()))
        now = p.detach() if step is None else opt.param_groups[0]["params"][0]
        assert np.array_equal(_numpy(now), _numpy(value))


def _numpy(x):
    return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64])
def test_adopt_steps_complex_parameters_as_the_oracle(dtype):
    """The oracle steps a complex parameter as its real pairs (view_as_real), and so
    does fastoptim.torch.ADOPT."""
    oracle_cls = _oracle("ADOPT")
    rng = np.random.default_rng(9)
    start = torch.tensor(rng.standard_normal(12) + 1j * rng.standard_normal(12), dtype=dtype)
    a, b = start.clone().requires_grad_(), torch.nn.Parameter(start.clone())
    oa = oracle_cls([a], lr=0.01, weight_decay=0.1)
    ob = fot.ADOPT([b], lr=0.01, weight_decay=0.1)
    for _ in range(100):
        g = torch.tensor(rng.standard_normal(12) + 1j * rng.standard_normal(12), dtype=dtype)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    _close(torch.view_as_real(b.detach()), torch.view_as_real(a.detach()), real, "param")
    for key in ("exp_avg", "exp_avg_sq"):
        _close(torch.view_as_real(ob.state[b][key]), torch.view_as_real(oa.state[a][key]),
               real, key)


def _mlp(dtype):
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 1)).to(dtype)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("opts", [dict(update_period=3),
                                  dict(update_period=2, num_samples=2,
                                       hessian_distribution="rademacher", weight_decay=0.1)])
def test_sophiah_estimates_the_hessian_as_the_oracle(opts, dtype):
    """fastoptim.torch.SophiaH estimates the Hessian diagonals itself as the oracle does
    (Hutchinson, autograd Hessian-vector products of the gradients made with
    create_graph=True, the random vectors drawn in the oracle's order): with torch's
    generator seeded alike before each step, 60 steps of a small network follow the
    oracle; its checkpoint holds no copy of the estimate."""
    oracle_cls = _oracle("SophiaH")
    torch.manual_seed(0)
    X, Y = torch.randn(64, 5, dtype=dtype), torch.randn(64, 1, dtype=dtype)
    ma, mb = _mlp(dtype), _mlp(dtype)
    oa = oracle_cls(ma.parameters(), lr=0.01, **opts)
    ob = fot.SophiaH(mb.parameters(), lr=0.01, **opts)
    for k in range(60):
        for m, o in ((ma, oa), (mb, ob)):
            o.zero_grad()
            ((m(X) - Y) ** 2).mean().backward(create_graph=True)
            torch.manual_seed(100 + k)
            o.step()
    for x, y in zip(ma.parameters(), mb.parameters()):
        _close(y.detach(), x.detach(), dtype, "param")
        for key in ("momentum", "hessian_moment"):
            _close(ob.state[y][key], oa.state[x][key], dtype, key)
    assert ob.param_groups[0]["step"] == oa.param_groups[0]["step"] == 60
    ob.load_state_dict(oa.state_dict())                 # (the oracle's holds "hessian")
    assert all("hessian" not in st for st in ob.state.values())


def test_sophiah_asks_for_what_a_hessian_step_needs_and_changes_nothing():
    p = torch.nn.Parameter(torch.ones(4))
    opt = fot.SophiaH([p], lr=0.1, update_period=2)
    p.grad = torch.ones(4)                               # (no graph to differentiate)
    with pytest.raises(RuntimeError, match=r"create_graph=True.*or pass"):
        opt.step()
    with pytest.raises(ValueError, match="shape of parameter and hessian"):
        opt.step(hessian=[torch.ones(3)])
    with pytest.raises(ValueError, match="one tensor per parameter"):
        opt.step(hessian=torch.ones(4))
    assert torch.equal(p.detach(), torch.ones(4)) and not opt.state[p]
    assert opt.param_groups[0].get("step", 0) == 0
    opt.step(hessian=[torch.full((4,), 2.0)])
    opt.step()                                           # step 2: no estimate due
    assert opt.param_groups[0]["step"] == 2
    frozen = torch.ones(2)                               # (a gradient, no requires_grad)
    frozen.grad = torch.ones(2)
    with pytest.raises(ValueError, match="does not require one: SophiaH cannot estimate"):
        fot.SophiaH([frozen]).step()
    assert torch.equal(frozen, torch.ones(2))
    with pytest.raises(ValueError, match="update_period must be an int >= 1"):
        fot.SophiaH([p], update_period=0)
    with pytest.raises(ValueError, match="hessian_distribution must be"):
        fastoptim.SophiaH([np.ones(3)], hessian_distribution="uniform")
    # the NumPy class needs the estimates on the steps that update their average
    w = np.ones(4, np.float32)
    nopt = fastoptim.SophiaH([w], lr=0.1, update_period=2)
    with pytest.raises(ValueError, match=r"step 1 updates the Hessian moment"):
        nopt.step([np.ones(4, np.float32)])
    assert np.array_equal(w, np.ones(4)) and not nopt.state
    nopt.step([np.ones(4, np.float32)], [np.full(4, 2.0, np.float32)])
    nopt.step([np.ones(4, np.float32)])
    with pytest.raises(ValueError, match=r"step 3 updates"):
        nopt.step([np.ones(4, np.float32)])
    np.testing.assert_array_equal(w, p.detach().numpy())


@pytest.mark.parametrize("fmt", ["bfloat16", "8bit"])
def test_sophiah_compressed_state_is_the_numpy_class_s(fmt):
    """fastoptim.torch.SophiaH with bfloat16 or 8-bit state (a group key, as for every
    drop-in) steps as the NumPy class does, bit for bit, given the same estimates."""
    rng = np.random.default_rng(2)
    shapes = [(64, 80), (10,)]
    start = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    ps = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in start]
    arrays = [a.copy() for a in start]
    opt = fot.SophiaH([{"params": ps, "state_dtype": fmt}], lr=0.01, update_period=3)
    nopt = fastoptim.SophiaH(arrays, lr=0.01, update_period=3, state_dtype=fmt)
    for k in range(9):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        hess = ([np.abs(rng.standard_normal(s)).astype(np.float32) for s in shapes]
                if k % 3 == 0 else None)
        for p, g in zip(ps, grads):
            p.grad = torch.from_numpy(g.copy())
        opt.step(hessian=None if hess is None else [torch.from_numpy(h) for h in hess])
        nopt.step(grads, hess)
    for p, a in zip(ps, arrays):
        np.testing.assert_array_equal(p.detach().numpy(), a)
    big = opt.state[ps[0]]["momentum"]
    assert big.dtype == (torch.bfloat16 if fmt == "bfloat16" else torch.uint8)



@pytest.mark.parametrize("direction", ["oracle->fastoptim", "fastoptim->oracle"])
def test_schedulefree_checkpoints_in_eval_mode(direction):
    """As the oracle advises, a Schedule-Free checkpoint is saved in eval mode (the
    parameters hold x): loaded with the model's values into the other class, train()
    returns both to y and they continue alike; the groups' running values (k,
    weight_sum, lr_max, train_mode) travel in the state dict."""
    oracle_cls = _oracle("AdamWScheduleFree")
    rng = np.random.default_rng(4)
    start = _tensors(rng, torch.float64)
    grads = [[torch.tensor(rng.standard_normal(t.shape)) for t in start] for _ in range(30)]
    make_a, make_b = ((oracle_cls, fot.AdamWScheduleFree) if direction.startswith("oracle")
                      else (fot.AdamWScheduleFree, oracle_cls))
    kw = dict(lr=0.01, warmup_steps=5, weight_decay=0.05)
    ref = [t.clone().requires_grad_() for t in start]
    oref = oracle_cls(ref, **kw)
    a = [t.clone().requires_grad_() for t in start]
    oa = make_a(a, **kw)
    for o, ps, gs in ((oref, ref, grads), (oa, a, grads[:15])):
        o.train()
        for g in gs[:15]:
            for p, x in zip(ps, g):
                p.grad = x.clone()
            o.step()
        o.eval()
    sd = oa.state_dict()
    assert sd["param_groups"][0]["train_mode"] is False and sd["param_groups"][0]["k"] == 15
    b = [x.detach().clone().requires_grad_() for x in a]        # (the model's x)
    ob = make_b(b, **kw)
    # (a copy: torch's load_state_dict keeps the dict's tensors when their dtype fits, and
    # this one's are oa's own state, which the NumPy class loads below)
    ob.load_state_dict(copy.deepcopy(sd))
    for o, ps in ((oref, ref), (ob, b)):
        o.train()
        for g in grads[15:]:
            for p, x in zip(ps, g):
                p.grad = x.clone()
            o.step()
        o.eval()
    for x, y in zip(ref, b):
        _close(y.detach(), x.detach(), torch.float64, direction)
    assert ob.param_groups[0]["weight_sum"] == oref.param_groups[0]["weight_sum"]
    # the NumPy class takes the same checkpoint
    arrays = [x.detach().numpy().copy() for x in a]
    on = fastoptim.AdamWScheduleFree(arrays, **kw)
    on.load_state_dict(sd)
    on.train()
    for g in grads[15:]:
        on.step([x.numpy().copy() for x in g])
    on.eval()
    for x, z in zip(ref, arrays):
        _close(torch.from_numpy(z), x.detach(), torch.float64, "NumPy class")


def test_schedulefree_refuses_a_step_in_eval_mode_and_changes_nothing():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    for opt, step in ((fot.AdamWScheduleFree([p]), lambda o: o.step()),
                      (fastoptim.AdamWScheduleFree([np.ones(3)]),
                       lambda o: o.step([np.ones(3)]))):
        with pytest.raises(RuntimeError, match="not in train mode"):
            step(opt)
        assert opt.param_groups[0]["k"] == 0 and opt.param_groups[0]["weight_sum"] == 0.0
        opt.train()
        step(opt)
        assert opt.param_groups[0]["k"] == 1 and opt.param_groups[0]["weight_sum"] > 0
    assert torch.equal(p.grad, torch.ones(3))                    # (never written)
