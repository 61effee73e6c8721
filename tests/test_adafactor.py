"""Adafactor, the rule that is not element-wise: its compiled passes against its NumPy
reference (bit for bit, every ISA, any thread count), against torch.optim.Adafactor
(every layer, hundreds of steps), its refusals, and its checkpoints both ways."""
import io
import subprocess
import sys

import numpy as np
import pytest

import fastoptim
from fastoptim import functional as F
from fastoptim import reference as R
from fastoptim.rules import spec

from rules import ISAS, kernel_module

S = spec("adafactor")
#: matrices (one spanning several threads' blocks, one batched), vectors (one longer than
#: the serial threshold, one of a partial chunk), a 0-d and odd small shapes
SHAPES = [(300, 200), (2, 3, 40, 33), (37, 53), (1, 17), (64, 16), (70001,), (4100,),
          (5,), (), (1, 1)]
MIXES = [{}, {"weight_decay": 0.1, "maximize": True, "eps": (1e-30, 1e-3), "d": 1.5,
              "beta2_decay": -0.5, "lr": 0.3},
         {"eps": (1e-3, 1e-2), "lr": 0.05}, {"eps": (0.0, 0.0), "weight_decay": 1.0}]


def _state(p):
    """(row_var, col_var, variance) of a new parameter, as the registry shapes them."""
    return tuple(None if S.state_shape(n, p.shape) is None
                 else np.zeros(S.state_shape(n, p.shape), p.dtype) for n in S.state)


def _problem(dtype, seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    params = [np.asarray(rng.standard_normal(s), dtype) for s in shapes]
    return params, [_state(p) for p in params], np.zeros(len(params), np.int64)


def _grads(rng, params, k):
    gs = [np.asarray(rng.standard_normal(p.shape) * 10.0 ** (i % 3 - 1), p.dtype)
          for i, p in enumerate(params)]
    if k == 0:
        gs[0][3] = 0                 # (a zero row: V may be clamped, U is summed)
        gs[1][1, 2] = 0
    if k == 2:
        gs[1] = None                 # (a parameter without a gradient is left alone)
    return gs


def _lists(states):
    return [[s[j] for s in states] for j in range(3)]


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("mix", range(len(MIXES)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("isa", ISAS)
def test_kernel_equals_reference_bit_for_bit(isa, dtype, mix, n_threads):
    """The passes' sums follow the reference's order on every ISA and any thread count:
    parameters, factors, second moments and step counts are equal bit for bit."""
    k = kernel_module(isa)
    opts = dict(lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0,
                maximize=False)
    opts.update(MIXES[mix])
    pa, sa, ta = _problem(dtype)
    pb, sb, tb = _problem(dtype)
    rng = np.random.default_rng(1)
    for step in range(4):
        gs = _grads(rng, pa, step)
        R.adafactor_(pa, gs, *_lists(sa), ta, **opts)
        k.prepare_adafactor(pb, gs, *_lists(sb), tb, opts["lr"], opts["beta2_decay"],
                            opts["eps"], opts["d"], opts["weight_decay"],
                            opts["maximize"]).run(n_threads)
    for x, y in zip(pa + [a for s in sa for a in s if a is not None],
                    pb + [b for s in sb for b in s if b is not None]):
        assert x.tobytes() == y.tobytes()
    np.testing.assert_array_equal(ta, tb)
    assert list(ta) == [4, 3] + [4] * (len(SHAPES) - 2)


def test_the_functional_api_is_the_kernel_s():
    pa, sa, ta = _problem(np.float32)
    pb, sb, tb = _problem(np.float32)
    gs = _grads(np.random.default_rng(3), pa, 0)
    F.adafactor_(pa, gs, *_lists(sa), ta, weight_decay=0.1)
    F.prepare_adafactor(pb, gs, *_lists(sb), tb, weight_decay=0.1).run(1)
    for x, y in zip(pa, pb):
        assert x.tobytes() == y.tobytes()


def test_an_empty_parameter_counts_its_step_and_changes_nothing():
    """(torch.optim.Adafactor divides by its zero size: ZeroDivisionError)"""
    p, q = np.zeros((0, 3), np.float32), np.zeros(0)
    steps = np.zeros(2, np.int64)
    F.adafactor_([p, q], [p.copy(), q.copy()], [np.zeros((0, 1), np.float32), None],
                 [np.zeros((1, 3), np.float32), None], [None, q.copy()], steps)
    assert list(steps) == [1, 1]


# --- against torch.optim.Adafactor -------------------------------------------------------

def _torch_run(torch, make, shapes, dtype, opts, steps, transpose=False, group2=None):
    """``steps`` steps of an optimizer ``make(params, **opts)`` on fixed parameters and
    gradients (``transpose``: the matrices are transposed views, not C-ordered)."""
    g = torch.Generator().manual_seed(0)
    params = []
    for s in shapes:
        if transpose and len(s) >= 2:
            t = torch.randn(s[::-1], dtype=dtype, generator=g).t() if len(s) == 2 else \
                torch.randn(s, dtype=dtype, generator=g).transpose(-1, -2).contiguous() \
                .transpose(-1, -2)
        else:
            t = torch.randn(s, dtype=dtype, generator=g)
        params.append(torch.nn.Parameter(t))
    groups = [{"params": params}]
    if group2 is not None:
        groups = [{"params": params[:2]}, dict(group2, params=params[2:])]
    opt = make(groups, **opts)
    gg = torch.Generator().manual_seed(1)
    for k in range(steps):
        for i, p in enumerate(params):
            p.grad = None if (k % 5 == 3 and i == 0) else \
                torch.randn(p.shape, dtype=dtype, generator=gg)
        opt.step()
    return [p.detach() for p in params], opt


TORCH_SHAPES = [(37, 53), (3, 7, 12), (5,), (), (20, 1), (1, 30)]


@pytest.mark.parametrize("transpose", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("mix", range(len(MIXES)))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fastoptim_torch_follows_torch_optim(dtype, mix, transpose):
    """300 steps (a parameter without a gradient now and then, a second group with its
    own options) of fastoptim.torch.Adafactor and torch.optim.Adafactor: fp64 to 1e-10
    relative to the values' scale, fp32 to 1e-4; state and its layout are torch's."""
    torch = pytest.importorskip("torch")
    import fastoptim.torch as fot
    dt = getattr(torch, dtype)
    group2 = {"lr": 0.02, "weight_decay": 0.05}
    a, oa = _torch_run(torch, torch.optim.Adafactor, TORCH_SHAPES, dt, MIXES[mix], 300,
                       transpose, group2)
    b, ob = _torch_run(torch, fot.Adafactor, TORCH_SHAPES, dt, MIXES[mix], 300,
                       transpose, group2)
    tol = 1e-10 if dtype == "float64" else 1e-4
    for x, y in zip(a, b):
        assert float((x - y).abs().max()) <= tol * max(float(x.abs().max()), 1.0)
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        assert list(sa["state"][k]) == list(sb["state"][k])
        for name, t in sa["state"][k].items():
            assert sb["state"][k][name].shape == t.shape and sb["state"][k][name].dtype == t.dtype


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_numpy_class_follows_torch_optim(dtype):
    torch = pytest.importorskip("torch")
    dt = getattr(torch, dtype)
    a, _ = _torch_run(torch, torch.optim.Adafactor, TORCH_SHAPES, dt, MIXES[1], 200)
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, dtype=dt, generator=g).numpy() for s in TORCH_SHAPES]
    opt = fastoptim.Adafactor(params, **MIXES[1])
    gg = torch.Generator().manual_seed(1)
    for k in range(200):
        opt.step([None if (k % 5 == 3 and i == 0) else
                  torch.randn(p.shape, dtype=dt, generator=gg).numpy()
                  for i, p in enumerate(params)])
    tol = 1e-10 if dtype == "float64" else 1e-4
    for x, y in zip(a, params):
        assert np.max(np.abs(x.numpy() - y)) <= tol * max(np.max(np.abs(y)), 1.0)


def test_eps1_none_is_the_machine_epsilon_of_the_first_parameter_stepped():
    """torch resolves eps1=None once per group, from its first parameter with a
    gradient: here float64's epsilon serves the float32 parameter after it too."""
    torch = pytest.importorskip("torch")
    import fastoptim.torch as fot
    out = []
    for cls in (torch.optim.Adafactor, fot.Adafactor):
        p64 = torch.nn.Parameter(torch.ones(3, 4, dtype=torch.float64))
        p32 = torch.nn.Parameter(torch.ones(4, 3))
        opt = cls([p64, p32])
        for _ in range(3):
            p64.grad = torch.full((3, 4), 1e-5, dtype=torch.float64)
            p32.grad = torch.full((4, 3), 1e-5)
            opt.step()
        out.append(p32.detach().clone())
    torch.testing.assert_close(out[0], out[1], rtol=1e-6, atol=0)
    assert R.adafactor_eps1((None, 1e-3), [np.zeros(2), np.zeros(2, np.float32)],
                            [None, np.zeros(2, np.float32)]) == np.finfo(np.float32).eps


# --- refusals ------------------------------------------------------------------------------

def _refused(call, error, match, arrays):
    before = [a.copy() for a in arrays]
    with pytest.raises(error, match=match):
        call()
    for a, b in zip(arrays, before):
        assert a.tobytes() == b.tobytes()


def test_bad_arrays_are_refused_naming_them_and_change_nothing():
    p = np.ones((4, 3))
    row, col, var = np.zeros((4, 1)), np.zeros((1, 3)), np.zeros(5)
    v = np.ones(5)
    steps = np.zeros(2, np.int64)
    arrays = [p, row, col, var, v, steps]
    g = [np.ones((4, 3)), np.ones(5)]
    _refused(lambda: F.adafactor_([p, v], g, [np.zeros((4, 3)), None], [col, None],
                                  [None, var], steps),
             ValueError, r"row_vars\[0\] has shape \(4, 3\); params\[0\] of shape "
             r"\(4, 3\) keeps it of shape \(4, 1\)", arrays)
    _refused(lambda: F.adafactor_([p, v], g, [row, None], [col, None], [var, var], steps),
             ValueError, r"variances\[0\] must be None", arrays)
    _refused(lambda: F.adafactor_([p, v], g, [row, None], [col, None], [None, None], steps),
             TypeError, r"variances\[1\] must be a numpy.ndarray", arrays)
    _refused(lambda: F.adafactor_([np.ones((3, 4)).T, v], g, [row, None], [col, None],
                                  [None, var], steps),
             ValueError, r"params\[0\] must be C-contiguous", arrays)
    _refused(lambda: F.adafactor_([p, v], g, [row.astype(np.float32), None], [col, None],
                                  [None, var], steps),
             TypeError, r"row_vars\[0\] has dtype float32 but params\[0\] has dtype "
             r"float64", arrays)
    _refused(lambda: F.adafactor_([p, v], [g[0], np.ones(4)], [row, None], [col, None],
                                  [None, var], steps),
             ValueError, r"grads\[1\] has shape \(4,\)", arrays)
    # state in the memory of another updated array
    _refused(lambda: F.adafactor_([p, v], g, [row, None], [col, None], [None, v], steps),
             ValueError, r"variances\[1\] and params\[1\] share memory|params\[1\] and "
             r"variances\[1\] share memory", arrays)
    _refused(lambda: F.adafactor_([p, v], g, [row, None], [col, None], [None, var],
                                  np.zeros(2, np.int32)),
             TypeError, "steps must have dtype int64", arrays)
    _refused(lambda: F.adafactor_([p, v], g, [row, None], [col, None], [None, var], steps,
                                  eps=(None,)),
             TypeError, r"eps must be a pair", arrays)
    _refused(lambda: F.adafactor_([p, v], g, [row, None], [col, None], [None, var], steps,
                                  beta2_decay=0.5),
             ValueError, r"Invalid beta2_decay: 0.5", arrays)


def test_the_numpy_class_state_and_checkpoints():
    """State per torch's layout (a matrix's factors, a vector's and a 0-d's second
    moment), a state dict that continues bit for bit, torch's state dict loaded, and
    a state of the wrong kind refused naming it."""
    rng = np.random.default_rng(0)
    ps = [np.asarray(rng.standard_normal(s)) for s in [(6, 4), (2, 3, 5), (7,), ()]]
    opt = fastoptim.Adafactor(ps, weight_decay=0.1)
    for _ in range(3):
        opt.step([np.asarray(rng.standard_normal(p.shape)) for p in ps])
    shapes = {k: {n: np.shape(v) for n, v in e.items()} for k, e in opt.state.items()}
    assert shapes == {0: {"step": (), "row_var": (6, 1), "col_var": (1, 4)},
                      1: {"step": (), "row_var": (2, 3, 1), "col_var": (2, 1, 5)},
                      2: {"step": (), "variance": (7,)}, 3: {"step": (), "variance": ()}}
    sd = opt.state_dict()
    twin = [p.copy() for p in ps]
    other = fastoptim.Adafactor(twin, weight_decay=0.1)
    other.load_state_dict(sd)
    gs = [np.asarray(rng.standard_normal(p.shape)) for p in ps]
    opt.step(gs)
    other.step(gs)
    for a, b in zip(ps, twin):
        assert a.tobytes() == b.tobytes()
    bad = {"state": {0: {"step": 1, "variance": np.zeros((6, 4))}},
           "param_groups": sd["param_groups"]}
    with pytest.raises(ValueError, match=r"\['state'\]\[0\] has 'variance', which a "
                                         r"parameter of shape \(6, 4\) does not keep"):
        other.load_state_dict(bad)
    bad = {"state": {0: {"step": 1, "row_var": np.zeros((1, 4)), "col_var": np.zeros((1, 4))}},
           "param_groups": sd["param_groups"]}
    with pytest.raises(ValueError, match=r"'row_var'\] has shape \(1, 4\), but the parameter "
                                         r"has shape \(6, 4\) and keeps it of shape \(6, 1\)"):
        other.load_state_dict(bad)


def test_torch_refusals_are_torch_s_and_change_nothing():
    torch = pytest.importorskip("torch")
    import fastoptim.torch as fot
    w = torch.nn.Parameter(torch.ones(3, 2))
    z = torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))
    opt = fot.Adafactor([{"params": [w]}, {"params": [z]}])
    w.grad, z.grad = torch.ones(3, 2), torch.ones(2, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="Adafactor does not support complex parameters"):
        opt.step()
    assert torch.equal(w, torch.ones(3, 2)) and not opt.state
    s = torch.nn.Parameter(torch.ones(3))
    opt = fot.Adafactor([w, s])
    s.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="Adafactor does not support sparse gradients"):
        opt.step()
    assert torch.equal(w, torch.ones(3, 2)) and not opt.state
    h = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    h.grad = torch.ones(3, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] is a "
                                         r"torch.float16 tensor"):
        fot.Adafactor([h]).step()
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        fot.Adafactor([w], lr=torch.ones(2))
    with pytest.raises(ValueError, match="epsilon2 should be >= 0 but is: -1"):
        fot.Adafactor([w], eps=(None, -1))


def test_tensor_lr_scheduler_hooks_and_version_counter():
    """(A float64 tensor lr: with a float32 one torch computes the step size in
    float32, fastoptim in double.)"""
    torch = pytest.importorskip("torch")
    import fastoptim.torch as fot
    out = []
    for cls in (torch.optim.Adafactor, fot.Adafactor):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(),
                                    torch.nn.Linear(5, 1)).double()
        opt = cls(model.parameters(), lr=torch.tensor(0.05, dtype=torch.float64))
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        seen = []
        opt.register_step_post_hook(lambda o, a, k: seen.append(1))
        x = torch.randn(32, 6, dtype=torch.float64)
        y = x.sum(1, keepdim=True)
        v0 = model[0].weight._version
        for _ in range(10):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()
        assert len(seen) == 10 and model[0].weight._version > v0
        out.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


_FRESH = """
import copy, sys, torch, fastoptim.torch as fot
sd = torch.load(sys.argv[1], weights_only=True)
outs = []
for cls in (torch.optim.Adafactor, fot.Adafactor):
    g = torch.Generator().manual_seed(5)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64))
          for s in [(4, 3), (3,)]]
    opt = cls(ps)
    opt.load_state_dict(copy.deepcopy(sd))     # (torch's load keeps the dict's tensors)
    for _ in range(5):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        opt.step()
    outs.append(torch.cat([p.detach().reshape(-1) for p in ps]))
assert torch.allclose(outs[0], outs[1], rtol=1e-12, atol=0), (outs[0] - outs[1]).abs().max()
print("ok")
"""


@pytest.mark.parametrize("source", ["torch", "fastoptim"])
def test_checkpoints_move_both_ways_in_a_fresh_process(tmp_path, source):
    """A state dict saved from either class, read with weights_only=True by a new
    process, continues in both classes alike."""
    torch = pytest.importorskip("torch")
    import fastoptim.torch as fot
    cls = torch.optim.Adafactor if source == "torch" else fot.Adafactor
    g = torch.Generator().manual_seed(5)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64))
          for s in [(4, 3), (3,)]]
    opt = cls(ps, weight_decay=0.01)
    for _ in range(4):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        opt.step()
    path = tmp_path / "adafactor.pt"
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    path.write_bytes(buf.getvalue())
    out = subprocess.run([sys.executable, "-c", _FRESH, str(path)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
