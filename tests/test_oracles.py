"""The rules beyond torch.optim against the package people use for each (the oracle):
trajectories over hundreds of steps, fp64 and fp32, for several option mixes, through
both class layers; checkpoints both ways; the oracle's refusals. A missing oracle
package is a skip that names it (they are test extras: ``pip install ".[test]"``)."""
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastoptim  # noqa: E402
import fastoptim.torch as fot  # noqa: E402


def _oracle(module, name):
    return getattr(pytest.importorskip(module, reason=f"{module} (the oracle of {name}) is "
                                       "not installed"), name)


#: rule -> (oracle module, class, option mixes)
ORACLES = {
    "Lion": ("lion_pytorch", "Lion",
             [dict(), dict(lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1),
              dict(lr=3e-3, weight_decay=0.5, decoupled_weight_decay=True),
              dict(lr=1e-2, betas=(1.0, 0.0), weight_decay=0.01)]),
    "ADOPT": ("pytorch_optimizer", "ADOPT",
              [dict(), dict(lr=1e-2, betas=(0.5, 0.9), weight_decay=0.1, eps=1e-3),
               dict(lr=1e-2, weight_decay=0.1, weight_decouple=True),
               dict(lr=1e-2, weight_decay=0.01, weight_decouple=True, fixed_decay=True,
                    maximize=True),
               dict(lr=1e-2, clip_lambda=None, foreach=False),
               dict(lr=1e-2, clip_lambda=lambda step: 0.5 + 0.1 * step)]),
    "AdEMAMix": ("pytorch_optimizer", "AdEMAMix",
                 [dict(), dict(lr=1e-2, betas=(0.8, 0.99, 0.999), alpha=2.0,
                               weight_decay=0.1),
                  dict(lr=1e-2, t_alpha_beta3=100.0, weight_decay=0.1, weight_decouple=True),
                  dict(lr=1e-2, t_alpha_beta3=50, alpha=8.0, weight_decay=0.01,
                       weight_decouple=True, fixed_decay=True, maximize=True),
                  dict(lr=1e-2, betas=(0.9, 0.999, 1.0), foreach=False, eps=1e-6)]),
}
CASES = [(name, i) for name, (_, _, mixes) in ORACLES.items() for i in range(len(mixes))]
SHAPES = [(37,), (64, 33), (), (0,)]


def _tensors(rng, dtype):
    """Parameters of several shapes, one of them Fortran-ordered (a transposed view)."""
    out = [torch.tensor(rng.standard_normal(s), dtype=dtype) for s in SHAPES]
    out.append(torch.tensor(rng.standard_normal((6, 5)), dtype=dtype).t())
    return out


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
    module, cls_name, mixes = ORACLES[name]
    oracle_cls, kw = _oracle(module, cls_name), mixes[mix]
    rng = np.random.default_rng(mix)
    start = _tensors(rng, dtype)
    a = [t.clone().requires_grad_() for t in start]
    b = [torch.nn.Parameter(t.clone()) for t in start]
    b[-1] = torch.nn.Parameter(start[-1].t().clone().t())            # (Fortran order)
    arrays = [t.numpy().copy(order="K") for t in start]
    oa, ob = oracle_cls(a, **kw), getattr(fot, name)(b, **kw)
    oc = getattr(fastoptim, name)(arrays, **_numpy_options(kw))
    for k in range(300):
        grads = [torch.tensor(rng.standard_normal(t.shape), dtype=dtype) for t in start]
        skip = k % 7 == 3
        for i, (x, y, g) in enumerate(zip(a, b, grads)):
            x.grad = None if skip and i == 1 else g.clone()
            y.grad = None if skip and i == 1 else g.clone()
        keep = [None if y.grad is None else y.grad.clone() for y in b]
        oa.step()
        ob.step()
        oc.step([None if skip and i == 1 else g.numpy().copy()
                 for i, g in enumerate(grads)])
        for y, g in zip(b, keep):
            assert (y.grad is None) == (g is None)
            if g is not None:
                assert torch.equal(y.grad, g), "a gradient was written"
    for i, (x, y, z) in enumerate(zip(a, b, arrays)):
        _close(y.detach(), x.detach(), dtype, f"{name} {kw} param {i} (torch class)")
        _close(torch.from_numpy(z), x.detach(), dtype, f"{name} {kw} param {i} (NumPy class)")
        for key, want in oa.state[x].items():
            if isinstance(want, torch.Tensor) and want.shape == x.shape:
                _close(ob.state[y][key], want, dtype, f"{name} {kw} {key} {i}")
                _close(torch.from_numpy(oc.state[i][key]), want, dtype,
                       f"{name} {kw} {key} {i} (NumPy class)")


@pytest.mark.parametrize("name", list(ORACLES))
def test_checkpoints_move_to_and_from_the_oracle(name):
    """A state dict of the oracle loads into both of fastoptim's classes (and the torch
    class's into the oracle), through torch.save/torch.load(weights_only=True) in both
    directions, and every optimizer continues on the same trajectory."""
    import io
    module, cls_name, mixes = ORACLES[name]
    oracle_cls, kw = _oracle(module, cls_name), mixes[1]
    rng = np.random.default_rng(5)
    start = _tensors(rng, torch.float64)
    grads = [[torch.tensor(rng.standard_normal(t.shape)) for t in start] for _ in range(20)]

    def run(opt, params, gs):
        for g in gs:
            for p, x in zip(params, g):
                p.grad = x.clone()
            opt.step()

    def through_disk(sd):
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=True)

    ref = [t.clone().requires_grad_() for t in start]
    oref = oracle_cls(ref, **kw)
    run(oref, ref, grads)
    # oracle -> fastoptim.torch -> oracle
    a = [t.clone().requires_grad_() for t in start]
    oa = oracle_cls(a, **kw)
    run(oa, a, grads[:10])
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    ob = getattr(fot, name)(b, **kw)
    ob.load_state_dict(through_disk(oa.state_dict()))
    run(ob, b, grads[10:15])
    c = [x.detach().clone().requires_grad_() for x in b]
    oc = oracle_cls(c, **kw)
    oc.load_state_dict(through_disk(ob.state_dict()))
    run(oc, c, grads[15:])
    # oracle -> the NumPy class
    arrays = [x.detach().numpy().copy() for x in a]
    on = getattr(fastoptim, name)(arrays, **_numpy_options(kw))
    on.load_state_dict(through_disk(oa.state_dict()))
    for g in grads[10:]:
        on.step([x.numpy().copy() for x in g])
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
    oracle_cls = _oracle("pytorch_optimizer", "ADOPT")
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
    oracle_cls = _oracle("pytorch_optimizer", "ADOPT")
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
