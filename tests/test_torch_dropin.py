"""fastoptim.torch: drop-in torch.optim optimizers, held to torch.optim itself.

Every test runs the same thing through torch.optim's default (for-loop) path and
through fastoptim.torch, and compares parameters and state element-wise.
"""
import copy
import inspect
import io
import os
import subprocess
import warnings
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastoptim  # noqa: E402
import fastoptim.torch as fot  # noqa: E402

from rules import RULES, valid  # noqa: E402

NAMES = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Adamax", "Adadelta", "RAdam",
         "Rprop", "NAdam", "ASGD"]
RULE = {"SGD": "sgd", "Adagrad": "adagrad", "RMSprop": "rmsprop", "Adam": "adam",
        "AdamW": "adamw", "Adamax": "adamax", "Adadelta": "adadelta",
        "RAdam": "radam", "Rprop": "rprop", "NAdam": "nadam", "ASGD": "asgd"}
# options that make each class keep every kind of state it can
RICH = {
    "SGD": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "Adagrad": dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.2),
    "RMSprop": dict(lr=0.01, momentum=0.5, centered=True),
    "Adam": dict(lr=0.01, amsgrad=True, weight_decay=0.1),
    "AdamW": dict(lr=0.01, amsgrad=True),
    "Adamax": dict(lr=0.01, weight_decay=0.1, betas=(0.4, 0.95)),
    "Adadelta": dict(lr=0.5, rho=0.4, weight_decay=0.1),
    "RAdam": dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    "Rprop": dict(lr=0.05, etas=(0.3, 1.5), step_sizes=(1e-4, 0.5)),
    "NAdam": dict(lr=0.01, weight_decay=0.1, momentum_decay=0.01),
    "ASGD": dict(lr=0.05, lambd=1e-3, t0=5.0, weight_decay=0.1),
}

# Kernel vs torch's for-loop path: the same operations in the same order, but torch's
# vectorized CPU ops fuse some a*b+c into one FMA (e.g. add with alpha) where the kernels
# round twice, so results differ in the last bits. Over 200 steps the worst element
# (relative to its own size, floored at 1e-3 of the tensor's largest) stayed below
# 5e-5 in float32 and 2e-13 in float64; a wrong formula or a lost update is off by
# orders of magnitude more.
RTOL = {torch.float32: 2e-4, torch.float64: 1e-11}


def assert_close(got, want, msg=""):
    """|got - want| <= rtol * (|want| + 1e-3 * max|want|), element-wise; same dtype,
    shape, and NaN where want has NaN."""
    assert got.dtype == want.dtype and got.shape == want.shape, (msg, got.dtype, want.dtype)
    a, b = want.detach(), got.detach()
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    if a.numel() == 0:
        return
    assert torch.equal(a.isnan(), b.isnan()), msg
    a, b = a.nan_to_num(), b.nan_to_num()
    bound = RTOL[a.dtype] * (a.abs() + 1e-3 * a.abs().max())
    err = (b - a).abs()
    assert bool((err <= bound).all()), \
        f"{msg}: |diff| up to {err.max().item():.3g}, over the bound by " \
        f"{(err - bound).max().item():.3g}"


def _option_sets(name):
    """The defaults, each option's other values one at a time, and all at once."""
    opts = RULES[RULE[name]]["options"]
    sets = [{}]
    for key, values in opts.items():
        for v in values[1:]:
            sets.append({key: v})
    sets.append({k: v[-1] for k, v in opts.items()})
    if name == "Adagrad":
        sets.append({"initial_accumulator_value": 0.3})
    if name == "SGD":
        sets.append(dict(momentum=0.9, nesterov=True, weight_decay=0.01, maximize=True))
    return [s for s in sets if valid(RULE[name], s)]


def _param_kinds(dtype, gen):
    """Parameters of every memory kind, with the grad each kind gets (a function of a
    fresh random tensor shaped like the parameter)."""
    cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128

    def r(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, dtype=dt)

    base = r(8, 21)
    kinds = {
        "contiguous": r(7, 33),
        "scalar": r(()),
        "vector": r(1029),
        "empty": r(0, 3),
        "strided": base[:, ::3],                                  # not dense
        "fortran": r(9, 6).t(),                                   # F-contiguous
        "channels_last": r(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "complex": r(4, 5, dt=cdtype),
        "complex_strided": r(6, 8, dt=cdtype)[::2, 1::2],
    }
    return kinds


def _make(kinds, requires_grad=True):
    """Leaf parameters that keep each kind's strides, on private copies of memory."""
    out = {}
    for k, t in kinds.items():
        if k.endswith("strided"):
            # the same strides, over private memory
            span = t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
            holder = torch.zeros(span + 1, dtype=t.dtype)
            view = holder.as_strided(t.shape, t.stride(), t.storage_offset())
            view.copy_(t)
            t = view
        else:
            t = t.clone(memory_format=torch.preserve_format)
        out[k] = torch.nn.Parameter(t, requires_grad=requires_grad)
    return out


def _grad_like(p, gen, how):
    g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    if how == 0:
        return g                                    # C-contiguous, any parameter layout
    if how == 1 and g.dim() >= 2:
        return g.mT.contiguous().mT                 # F-order (last two dims) grad
    if how == 2 and g.dim() >= 1:
        big = torch.randn((*p.shape[:-1], 2 * p.shape[-1]), generator=gen, dtype=p.dtype)
        return big[..., ::2]                        # strided grad
    return g


def _pair(name, kinds, opts, param_filter=None):
    keys = [k for k in kinds if param_filter is None or param_filter(k)]
    pt, pf = _make({k: kinds[k] for k in keys}), _make({k: kinds[k] for k in keys})
    ot = getattr(torch.optim, name)(list(pt.values()), **opts)
    of = getattr(fot, name)(list(pf.values()), **opts)
    return keys, pt, pf, ot, of


def _assert_same(pt, pf, ot, of, keys, msg=""):
    for k in keys:
        assert_close(pf[k], pt[k], f"{msg} {k}")
        sa, sb = ot.state.get(pt[k], {}), of.state.get(pf[k], {})
        assert sorted(sa) == sorted(sb), (msg, k, sorted(sa), sorted(sb))
        for key in sa:
            if torch.is_tensor(sa[key]):
                assert_close(sb[key], sa[key], f"{msg} {k} {key}")
            else:
                assert sb[key] == sa[key]


def _train(keys, pt, pf, ot, of, gen, nsteps, skip_every=7):
    for s in range(nsteps):
        for j, k in enumerate(keys):
            if (s + j) % skip_every == 0:
                pt[k].grad = pf[k].grad = None          # this parameter sits out a step
                continue
            g = _grad_like(pt[k], gen, (s + j) % 3)
            pt[k].grad = g.clone()
            pf[k].grad = g
        ot.step()
        of.step()


# --- parity with torch.optim --------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", NAMES)
def test_parity_every_option_every_layout(name, dtype):
    """Hundreds of steps of every option set, on contiguous, scalar, empty, strided,
    Fortran, channels_last and complex parameters with C, F and strided grads."""
    gen = torch.Generator().manual_seed(1234)
    kinds = _param_kinds(dtype, gen)
    for opts in _option_sets(name):
        keys, pt, pf, ot, of = _pair(name, kinds, opts)
        _train(keys, pt, pf, ot, of, gen, 200)
        _assert_same(pt, pf, ot, of, keys, msg=f"{name} {opts}")


@pytest.mark.parametrize("name", NAMES)
def test_parity_with_param_groups_and_foreach_fused_flags(name):
    """Groups with their own options; foreach=/fused= accepted and change nothing."""
    gen = torch.Generator().manual_seed(7)
    kinds = _param_kinds(torch.float32, gen)
    keys = list(kinds)
    flags = [{}, {"foreach": True}, {"foreach": False}]
    if "fused" in inspect.signature(getattr(torch.optim, name).__init__).parameters:
        flags.append({"fused": True})
    for extra in flags:
        pt, pf = _make(kinds), _make(kinds)
        half = len(keys) // 2

        def groups(ps):
            return [{"params": [ps[k] for k in keys[:half]]},
                    {"params": [ps[k] for k in keys[half:]], **RICH[name]}]
        ot = getattr(torch.optim, name)(groups(pt))
        of = getattr(fot, name)(groups(pf), **extra)
        _train(keys, pt, pf, ot, of, gen, 100)
        _assert_same(pt, pf, ot, of, keys, msg=f"{name} {extra}")
        assert not getattr(of, "_step_supports_amp_scaling", False)


def test_strided_parameter_is_updated_in_its_base():
    base = torch.zeros(4, 6)
    p = torch.nn.Parameter(base[:, ::2])          # shares base's memory
    opt = fot.SGD([p], lr=1.0)
    p.grad = torch.ones(4, 3)
    opt.step()
    assert torch.equal(base[:, ::2], torch.full((4, 3), -1.0))
    assert torch.equal(base[:, 1::2], torch.zeros(4, 3))      # untouched neighbours


def test_grad_is_never_written():
    gen = torch.Generator().manual_seed(3)
    for name in NAMES:
        kinds = _param_kinds(torch.float32, gen)
        ps = _make(kinds)
        opt = getattr(fot, name)(list(ps.values()), **RICH[name], maximize=True)
        for s in range(3):
            saved = {}
            for k, p in ps.items():
                p.grad = _grad_like(p, gen, s)
                saved[k] = (p.grad.clone(), p.grad._version, p.grad)
            opt.step()
            for k, p in ps.items():
                g0, v0, obj = saved[k]
                assert p.grad is obj and p.grad._version == v0
                assert torch.equal(p.grad, g0), (name, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_lr_and_betas_as_tensors(dtype):
    """1-element tensor hyperparameters (in the parameters' dtype: torch computes its
    step scalars in the tensor's dtype, fastoptim always in double)."""
    gen = torch.Generator().manual_seed(5)
    kinds = _param_kinds(dtype, gen)

    def t(x):
        return torch.tensor(x, dtype=dtype)
    for name, opts in [("Adam", dict(lr=t(0.01), betas=(t(0.8), t([0.99])))),
                       ("AdamW", dict(lr=t([0.02]))),
                       ("SGD", dict(lr=t(0.1), momentum=0.9, weight_decay=t(0.01))),
                       ("Adagrad", dict(lr=t(0.1))),
                       ("RMSprop", dict(lr=t(0.01)))]:
        keys, pt, pf, ot, of = _pair(name, kinds, opts)
        _train(keys, pt, pf, ot, of, gen, 50)
        _assert_same(pt, pf, ot, of, keys, msg=name)


def test_step_state_is_a_float_tensor_like_torchs():
    for name in ["Adagrad", "RMSprop", "Adam", "AdamW"]:
        p = torch.nn.Parameter(torch.randn(3))
        opt = getattr(fot, name)([p])
        for _ in range(3):
            p.grad = torch.randn(3)
            opt.step()
        st = opt.state[p]["step"]
        assert torch.is_tensor(st) and st.dim() == 0 and st.dtype == torch.float32
        assert st.item() == 3.0
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        p = torch.nn.Parameter(torch.randn(3))
        opt = fot.Adam([p])
        p.grad = torch.randn(3)
        opt.step()
        assert opt.state[p]["step"].dtype == torch.float64      # as torch's
    finally:
        torch.set_default_dtype(old)


# --- state dicts ----------------------------------------------------------------------

def _layout_of(sd):
    return ({k: {n: (type(v).__name__, getattr(v, "dtype", None), tuple(getattr(v, "shape", ())))
                 for n, v in e.items()} for k, e in sd["state"].items()},
            [{k: v for k, v in g.items()} for g in sd["param_groups"]])


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_layout_is_torchs(name):
    gen = torch.Generator().manual_seed(11)
    kinds = _param_kinds(torch.float32, gen)
    for opts in [{}, RICH[name]]:
        keys, pt, pf, ot, of = _pair(name, kinds, opts)
        _train(keys, pt, pf, ot, of, gen, 5)
        st, sf = ot.state_dict(), of.state_dict()
        assert _layout_of(sf) == _layout_of(st)
        for entry in sf["state"].values():
            for v in entry.values():
                assert torch.is_tensor(v) and not isinstance(v, np.ndarray)
        # key order of each entry, as torch creates them
        for k in st["state"]:
            assert list(sf["state"][k]) == list(st["state"][k])


def test_sgd_without_momentum_keeps_no_state():
    p = torch.nn.Parameter(torch.randn(4))
    opt = fot.SGD([p], lr=0.1)
    for _ in range(3):
        p.grad = torch.randn(4)
        opt.step()
    assert opt.state_dict()["state"] == {} and len(opt.state) == 0


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("direction", ["torch->fastoptim", "fastoptim->torch"])
def test_state_dict_swap_continues_as_if_never_switched(name, direction):
    gen = torch.Generator().manual_seed(21)
    kinds = _param_kinds(torch.float32, gen)
    keys, pt, pf, ot, of = _pair(name, kinds, RICH[name])
    _train(keys, pt, pf, ot, of, gen, 30)
    # switch: a third optimizer of the other kind takes over one side's checkpoint
    src, src_params = (ot, pt) if direction == "torch->fastoptim" else (of, pf)
    sd = _roundtrip(src.state_dict())
    dst_params = _make({k: src_params[k].detach() for k in keys})
    other = (fot if direction == "torch->fastoptim" else torch.optim)
    dst = getattr(other, name)(list(dst_params.values()), **RICH[name])
    dst.load_state_dict(sd)
    # continue: the switched run against an unswitched run of the source kind
    _train(keys, src_params, dst_params, src, dst, gen, 30)
    _assert_same(src_params, dst_params, src, dst, keys, msg=direction)


def test_state_dict_swap_in_a_fresh_process(tmp_path):
    """torch.optim.Adam saves; a fresh process loads into fastoptim.torch.Adam
    (weights_only=True), trains on, saves; torch.optim.Adam continues the same way."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    x, y = torch.randn(32, 6), torch.randn(32, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, amsgrad=True)

    def train(model, opt, n):
        for _ in range(n):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    train(model, opt, 20)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "x": x, "y": y}, ckpt)
    script = f"""
import torch, fastoptim.torch as fot
c = torch.load({str(ckpt)!r}, weights_only=True)
model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
model.load_state_dict(c["model"])
opt = fot.Adam(model.parameters(), lr=0.01, amsgrad=True)
opt.load_state_dict(c["optim"])
for _ in range(20):
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(c["x"]), c["y"]).backward()
    opt.step()
out = {{"model": model.state_dict(), "optim": opt.state_dict()}}
torch.save(out, {str(tmp_path / "out.pt")!r})
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(fastoptim.__file__))]
        + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    train(model, opt, 20)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    for k, v in model.state_dict().items():
        assert_close(out["model"][k], v, k)
    mine = opt.state_dict()
    assert _layout_of(out["optim"]) == _layout_of(mine)
    for k, entry in mine["state"].items():
        for n, v in entry.items():
            assert_close(out["optim"]["state"][k][n], v, f"{k} {n}")
    # and back: torch.optim.Adam, in this process, loads what fastoptim saved
    back = torch.optim.Adam(model.parameters(), lr=0.01, amsgrad=True)
    back.load_state_dict(out["optim"])
    assert back.state_dict()["state"][0]["step"].item() == 40.0


@pytest.mark.parametrize("name", NAMES)
def test_old_checkpoints_without_new_keys_load(name):
    """Groups missing keys added in later torch versions and numeric steps load, as
    they do into torch's classes (whose __setstate__ fills the defaults)."""
    gen = torch.Generator().manual_seed(31)
    kinds = {k: v for k, v in _param_kinds(torch.float32, gen).items()
             if k in ("contiguous", "vector", "fortran")}
    keys, pt, pf, ot, of = _pair(name, kinds, RICH[name])
    _train(keys, pt, pf, ot, of, gen, 10)
    sd = ot.state_dict()
    old = copy.deepcopy(sd)
    for g in old["param_groups"]:
        for key in ("foreach", "maximize", "capturable", "differentiable", "fused",
                    "decoupled_weight_decay", "nesterov"):
            g.pop(key, None)
    for entry in old["state"].values():
        if "step" in entry:
            entry["step"] = int(entry["step"].item())          # very old: a number
    t2 = getattr(torch.optim, name)([pt[k] for k in keys], **RICH[name])
    f2 = getattr(fot, name)([pf[k] for k in keys], **RICH[name])
    t2.load_state_dict(copy.deepcopy(old))
    f2.load_state_dict(copy.deepcopy(old))
    assert _layout_of(f2.state_dict()) == _layout_of(t2.state_dict())
    _train(keys, pt, pf, t2, f2, gen, 10)
    _assert_same(pt, pf, t2, f2, keys, msg=name)


def test_sgd_old_checkpoint_with_none_buffers():
    """torch 1.x SGD stored momentum_buffer=None; such a state loads and the buffer is
    set to the gradient on the next step, as torch does."""
    pt, pf = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
    pf.data.copy_(pt.data)
    sd = {"state": {0: {"momentum_buffer": None}},
          "param_groups": [{"lr": 0.1, "momentum": 0.9, "dampening": 0, "weight_decay": 0,
                            "nesterov": False, "params": [0]}]}
    ot, of = torch.optim.SGD([pt], momentum=0.9), fot.SGD([pf], momentum=0.9)
    ot.load_state_dict(copy.deepcopy(sd))
    of.load_state_dict(copy.deepcopy(sd))
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        g = torch.randn(5, generator=gen)
        pt.grad, pf.grad = g.clone(), g.clone()
        ot.step()
        of.step()
    assert_close(pf, pt)
    assert_close(of.state[pf]["momentum_buffer"], ot.state[pt]["momentum_buffer"])


# --- what torch users use ------------------------------------------------------------------

def test_scheduler_and_clipping_and_zero_grad():
    gen = torch.Generator().manual_seed(41)
    kinds = _param_kinds(torch.float32, gen)
    for name in NAMES:
        keys, pt, pf, ot, of = _pair(name, kinds, RICH[name])
        st = torch.optim.lr_scheduler.OneCycleLR(ot, max_lr=0.05, total_steps=60,
                                                 cycle_momentum=False)
        sf = torch.optim.lr_scheduler.OneCycleLR(of, max_lr=0.05, total_steps=60,
                                                 cycle_momentum=False)
        for s in range(60):
            ot.zero_grad(set_to_none=bool(s % 2))
            of.zero_grad(set_to_none=bool(s % 2))
            for k in keys:
                g = _grad_like(pt[k], gen, s % 3) * 10
                pt[k].grad, pf[k].grad = g.clone(), g.clone()
            torch.nn.utils.clip_grad_norm_(list(pt.values()), 1.0)
            torch.nn.utils.clip_grad_norm_(list(pf.values()), 1.0)
            ot.step()
            of.step()
            st.step()
            sf.step()
        assert of.param_groups[0]["lr"] == ot.param_groups[0]["lr"]
        _assert_same(pt, pf, ot, of, keys, msg=name)


def test_tensor_lr_with_scheduler():
    pt = torch.nn.Parameter(torch.randn(10))
    pf = torch.nn.Parameter(pt.detach().clone())
    ot = torch.optim.Adam([pt], lr=torch.tensor(0.01))
    of = fot.Adam([pf], lr=torch.tensor(0.01))
    st = torch.optim.lr_scheduler.ExponentialLR(ot, gamma=0.9)
    sf = torch.optim.lr_scheduler.ExponentialLR(of, gamma=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        g = torch.randn(10, generator=gen)
        pt.grad, pf.grad = g.clone(), g.clone()
        ot.step()
        of.step()
        st.step()
        sf.step()
    assert torch.is_tensor(of.param_groups[0]["lr"])
    assert_close(pf, pt)


def test_grad_scaler():
    """torch.amp.GradScaler unscales (fastoptim.torch claims no amp support) and skips
    steps whose gradients hold infs; results equal torch.optim's."""
    torch.manual_seed(0)
    mt = torch.nn.Linear(8, 3)
    mf = copy.deepcopy(mt)
    ot, of = torch.optim.AdamW(mt.parameters(), lr=0.01), fot.AdamW(mf.parameters(), lr=0.01)
    scaler_t, scaler_f = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    x, y = torch.randn(16, 8), torch.randn(16, 3)
    for s in range(12):
        for m, o, sc in ((mt, ot, scaler_t), (mf, of, scaler_f)):
            o.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(x)
            loss = torch.nn.functional.mse_loss(out.float(), y)
            sc.scale(loss).backward()
            if s == 5:
                m.weight.grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in m.parameters()]
            sc.step(o)
            sc.update()
            if s == 5:      # skipped: nothing changed
                assert all(torch.equal(a, p) for a, p in zip(before, m.parameters()))
        assert scaler_f.get_scale() == scaler_t.get_scale()
    for a, b in zip(mt.parameters(), mf.parameters()):
        assert_close(b, a)
    assert of.state[mf.weight]["step"].item() == 11.0


def test_version_counter_bumped_so_autograd_detects_the_change():
    for name in NAMES:
        w = torch.nn.Parameter(torch.randn(3, 3))
        x = torch.randn(2, 3, requires_grad=True)
        opt = getattr(fot, name)([w], **RICH[name])
        y = (x @ w).sum()                  # saves w for x's gradient
        w.grad = torch.ones(3, 3)
        v0 = w._version
        opt.step()
        assert w._version > v0
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()


def test_step_hooks_fire_once_and_closure_returns_loss():
    p = torch.nn.Parameter(torch.randn(3))
    calls = []
    opt = fot.Adam([p], lr=0.1)
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    from torch.optim.optimizer import register_optimizer_step_post_hook
    glob = register_optimizer_step_post_hook(lambda o, a, k: calls.append("global"))
    try:
        def closure():
            opt.zero_grad()
            loss = (p ** 2).sum()
            loss.backward()
            return loss
        loss = opt.step(closure)
    finally:
        glob.remove()
    assert calls == ["pre", "post", "global"]
    assert torch.is_tensor(loss) and loss.item() > 0


def test_state_dict_hooks():
    p = torch.nn.Parameter(torch.randn(3))
    opt = fot.RMSprop([p])
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("sd-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: seen.append("sd-post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("load-pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load-post"))
    p.grad = torch.randn(3)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert seen == ["sd-pre", "sd-post", "load-pre", "load-post"]


def test_deepcopy_and_repr_and_named_parameters():
    torch.manual_seed(3)
    m = torch.nn.Linear(4, 2)
    opt = fot.AdamW(m.named_parameters(), lr=0.01)
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]
    for _ in range(3):
        for p in m.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    twin = copy.deepcopy(opt)              # copies the parameters and the state with it
    mine, theirs = opt.param_groups[0]["params"], twin.param_groups[0]["params"]
    assert all(a is not b and torch.equal(a, b) for a, b in zip(mine, theirs))
    for _ in range(3):
        for a, b in zip(mine, theirs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        twin.step()
    for a, b in zip(mine, theirs):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg"], twin.state[b]["exp_avg"])
        assert opt.state[a]["exp_avg"].data_ptr() != twin.state[b]["exp_avg"].data_ptr()
    ref = torch.optim.AdamW(m.named_parameters(), lr=0.01)
    assert repr(opt) == repr(ref)


def test_add_param_group_and_adagrad_lazy_state():
    gen = torch.Generator().manual_seed(9)
    for name in NAMES:
        a, b = torch.randn(4, generator=gen), torch.randn(3, 2, generator=gen)
        pt = [torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())]
        pf = [torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())]
        ot = getattr(torch.optim, name)([pt[0]], **RICH[name])
        of = getattr(fot, name)([pf[0]], **RICH[name])
        for s in range(6):
            if s == 2:
                ot.add_param_group({"params": [pt[1]], "lr": 0.03})
                of.add_param_group({"params": [pf[1]], "lr": 0.03})
            for x, y in zip(pt, pf):
                g = torch.randn(x.shape, generator=gen)
                x.grad, y.grad = g.clone(), g.clone()
            ot.step()
            of.step()
        for x, y in zip(pt, pf):
            assert_close(y, x, name)
        assert _layout_of(of.state_dict()) == _layout_of(ot.state_dict())


def test_param_data_swapped_between_steps():
    """p.data = ... (as module.to() and bucket views do) is followed: the new memory
    is updated and the state carries on."""
    pt = torch.nn.Parameter(torch.randn(6, 4))
    pf = torch.nn.Parameter(pt.detach().clone())
    ot, of = torch.optim.Adam([pt], lr=0.1), fot.Adam([pf], lr=0.1)
    gen = torch.Generator().manual_seed(4)
    for s in range(6):
        if s == 3:
            pt.data = pt.data.clone()
            pf.data = pf.data.clone().t().contiguous().t()    # new memory, F order
        g = torch.randn(6, 4, generator=gen)
        pt.grad, pf.grad = g.clone(), g.clone()
        ot.step()
        of.step()
    assert_close(pf, pt)
    assert_close(of.state[pf]["exp_avg_sq"], ot.state[pt]["exp_avg_sq"])


def test_threads_follow_torch_unless_set():
    assert fot._threads() == torch.get_num_threads()
    fastoptim.set_num_threads(1)
    try:
        assert fot._threads() == 1
    finally:
        fastoptim.set_num_threads(None)


def test_import_is_lazy():
    code = ("import sys, fastoptim; assert 'torch' not in sys.modules; "
            "assert 'fastoptim.torch' not in sys.modules; "
            "import fastoptim.torch as fot; assert fastoptim.torch is fot")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(fastoptim.__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


# --- errors ---------------------------------------------------------------------------------

BAD_ARGS = {
    "SGD": [dict(lr=-1.0), dict(momentum=-0.5), dict(weight_decay=-1.0),
            dict(nesterov=True), dict(nesterov=True, momentum=0.9, dampening=0.1),
            dict(lr=torch.tensor([0.1, 0.2])), dict(fused=True, foreach=True),
            dict(fused=True, differentiable=True)],
    "Adagrad": [dict(lr=-1.0), dict(lr_decay=-1.0), dict(weight_decay=-0.1),
                dict(initial_accumulator_value=-1.0), dict(eps=-1.0),
                dict(lr=torch.tensor([0.1, 0.2])), dict(fused=True, foreach=True),
                dict(fused=True, differentiable=True)],
    "RMSprop": [dict(lr=-1.0), dict(eps=-1.0), dict(momentum=-1.0), dict(weight_decay=-1.0),
                dict(alpha=-0.1), dict(lr=torch.tensor([0.1, 0.2]))],
    "Adam": [dict(lr=-1.0), dict(eps=-1.0), dict(betas=(1.0, 0.999)), dict(betas=(0.9, -0.1)),
             dict(weight_decay=-1.0), dict(betas=(0, 0.999)),
             dict(betas=(torch.tensor(0.9), 0.999)),
             dict(betas=(torch.tensor([0.9, 0.8]), torch.tensor(0.999))),
             dict(betas=(torch.tensor(0.9), torch.tensor(0.999)), foreach=True),
             dict(lr=torch.tensor(0.01), foreach=True), dict(lr=torch.tensor([0.1, 0.2])),
             dict(fused=True, foreach=True), dict(fused=True, differentiable=True)],
}
BAD_ARGS["AdamW"] = BAD_ARGS["Adam"]
BAD_ARGS["Adamax"] = [dict(lr=-1.0), dict(eps=-1.0), dict(betas=(1.0, 0.999)),
                      dict(betas=(0.9, -0.1)), dict(weight_decay=-1.0),
                      dict(lr=torch.tensor([0.1, 0.2]))]
BAD_ARGS["Adadelta"] = [dict(lr=-1.0), dict(rho=1.5), dict(rho=-0.1), dict(eps=-1.0),
                        dict(weight_decay=-1.0), dict(lr=torch.tensor([0.1, 0.2]))]
BAD_ARGS["RAdam"] = BAD_ARGS["Adamax"]
BAD_ARGS["NAdam"] = BAD_ARGS["Adamax"] + [dict(momentum_decay=-0.1)]
BAD_ARGS["ASGD"] = [dict(lr=-1.0), dict(weight_decay=-1.0), dict(lr=torch.tensor([0.1, 0.2]))]
BAD_ARGS["Rprop"] = [dict(lr=-1.0), dict(etas=(1.5, 1.2)), dict(etas=(0.5, 0.9)),
                     dict(etas=(0.0, 1.2)), dict(lr=torch.tensor([0.1, 0.2]))]


def _outcome(fn):
    try:
        fn()
    except Exception as e:          # noqa: BLE001 - the exception is what is compared
        return type(e), str(e)
    return None


@pytest.mark.parametrize("name", NAMES)
def test_constructor_errors_equal_torchs(name):
    p = torch.nn.Parameter(torch.randn(2))
    cases = [(kw, [p]) for kw in BAD_ARGS[name]]
    cases += [({}, []), ({}, torch.randn(3)), ({}, [{"params": {p}}]), ({}, [torch.randn(2) * p]),
              ({}, [{"params": [p]}, {"params": [p]}]), ({}, [[p]])]
    for kw, params in cases:
        want = _outcome(lambda: getattr(torch.optim, name)(params, **kw))
        got = _outcome(lambda: getattr(fot, name)(params, **kw))
        assert want is not None, kw
        assert got == want, kw


@pytest.mark.parametrize("name", NAMES)
def test_signatures_and_defaults_equal_torchs(name):
    import inspect
    want = inspect.signature(getattr(torch.optim, name).__init__)
    got = inspect.signature(getattr(fot, name).__init__)
    assert [(p.name, p.kind, p.default) for p in got.parameters.values()] == \
        [(p.name, p.kind, p.default) for p in want.parameters.values()]
    p1, p2 = torch.nn.Parameter(torch.randn(2)), torch.nn.Parameter(torch.randn(2))
    assert getattr(fot, name)([p1]).defaults == getattr(torch.optim, name)([p2]).defaults
    assert issubclass(getattr(fot, name), torch.optim.Optimizer)


@pytest.mark.parametrize("name", NAMES)
def test_differentiable_and_capturable_refused(name):
    p = torch.nn.Parameter(torch.randn(3))
    flags = ["differentiable"] + (["capturable"] if name in ("Adam", "AdamW", "RMSprop") else [])
    for flag in flags:
        with pytest.raises(ValueError, match=f"does not support {flag}=True"):
            getattr(fot, name)([p], **{flag: True})
        with pytest.raises(ValueError, match=f"does not support {flag}=True"):
            getattr(fot, name)([{"params": [p], flag: True}])
        opt = getattr(fot, name)([p])
        with pytest.raises(ValueError, match=f"does not support {flag}=True"):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], flag: True})
        assert len(opt.param_groups) == 1
        # a checkpoint made with the flag on: refused at the step, before any change
        p.grad = torch.randn(3)
        opt.param_groups[0][flag] = True
        snap = _snapshot(opt, [p])
        with pytest.raises(ValueError, match=f"does not support {flag}=True"):
            opt.step()
        _assert_unchanged(opt, [p], snap)


def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
             for p, s in opt.state.items()},
            [p._version for p in params])


def _assert_unchanged(opt, params, snap):
    vals, state, versions = snap
    for p, v in zip(params, vals):
        assert torch.equal(p.detach(), v)
    assert {id(p) for p in opt.state} == set(state)
    for p, s in opt.state.items():
        assert sorted(s) == sorted(state[id(p)])
        for k, v in s.items():
            torch.testing.assert_close(v, state[id(p)][k], rtol=0, atol=0, equal_nan=True)
    assert [p._version for p in params] == versions


@pytest.mark.parametrize("name", NAMES)
def test_refused_step_changes_nothing(name):
    """A bad parameter or option in a later group: the step raises naming it, and no
    parameter, state tensor, step counter or state entry changed (not even those of
    the good group that comes first); the next good step is what it would have been."""
    gen = torch.Generator().manual_seed(8)
    good = [torch.nn.Parameter(torch.randn(5, generator=gen)) for _ in range(2)]
    fresh = torch.nn.Parameter(torch.randn(3, generator=gen))     # no state yet
    bad = torch.nn.Parameter(torch.randn(4, generator=gen))
    opt = getattr(fot, name)([{"params": good + [fresh]},
                              {"params": [bad], "lr": 0.01}], **RICH[name])
    for g in good + [bad]:
        g.grad = torch.randn(g.shape, generator=gen)
    opt.step()
    fresh.grad = torch.randn(3, generator=gen)
    params = good + [fresh, bad]
    twin_opt, twin_params = copy.deepcopy((opt, params))
    orig = bad.data

    def sparse_grad():
        bad.grad = torch.randn(4).to_sparse()

    def half_param():
        bad.data = orig.half()
        bad.grad = torch.randn(4).half()

    def shrunk_param():                 # p.data replaced; the old grad no longer fits
        bad.data = orig[:2]

    def bad_lr():
        opt.param_groups[1]["lr"] = -1.0

    cases = [
        (sparse_grad, TypeError,
         r"parameter param_groups\[1\]\['params'\]\[0\] has a sparse gradient"),
        (half_param, TypeError, r"param_groups\[1\]\['params'\]\[0\] has dtype torch.float16"),
        (shrunk_param, ValueError,
         r"gradient of parameter param_groups\[1\]\['params'\]\[0\] is a torch.float32 "
         r"tensor of shape \(4,\)"),
        (bad_lr, ValueError, "Invalid learning rate"),
    ]
    for make_bad, exc, match in cases:
        bad.data = orig
        bad.grad = torch.randn(4, generator=gen)
        opt.param_groups[1]["lr"] = 0.01
        make_bad()
        snap = _snapshot(opt, params[:3])
        with pytest.raises(exc, match=match):
            opt.step()
        _assert_unchanged(opt, params[:3], snap)
    # once the problem is gone, the step is exactly the one the twin (which never saw
    # the refused steps) makes
    bad.data = orig
    opt.param_groups[1]["lr"] = 0.01
    bad.grad = torch.randn(4, generator=gen)
    for p, q in zip(params, twin_params):
        q.grad = p.grad.clone()
    opt.step()
    twin_opt.step()
    assert fresh in opt.state
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            assert torch.equal(v, twin_opt.state[q][k])


def test_errors_name_the_parameter_by_name():
    m = torch.nn.Linear(3, 2)
    opt = fot.SGD(m.named_parameters(), lr=0.1)
    m.bias.grad = torch.randn(2).to_sparse()
    where = r"parameter 'bias' \(param_groups\[0\]\['params'\]\[1\]\)"
    with pytest.raises(TypeError, match=where):
        opt.step()
    with pytest.raises(ValueError, match="is on device meta"):
        fot.Adam([torch.nn.Parameter(torch.empty(3, device="meta"))])
    with pytest.raises(TypeError, match="has dtype torch.bfloat16"):
        fot.Adam([torch.nn.Parameter(torch.randn(3, dtype=torch.bfloat16))])
    with pytest.raises(TypeError, match="has dtype torch.int64"):
        fot.SGD([torch.zeros(3, dtype=torch.int64)])


def test_params_sharing_memory_are_refused():
    base = torch.zeros(10)
    a = torch.nn.Parameter(base[:6])
    b = torch.nn.Parameter(base[4:])             # overlaps a
    opt = fot.SGD([a, b], lr=0.1)
    a.grad, b.grad = torch.ones(6), torch.ones(6)
    with pytest.raises(ValueError, match="overlaps"):
        opt.step()
    assert torch.equal(base, torch.zeros(10))
    s = torch.zeros(4, 6)
    c, d = torch.nn.Parameter(s[:, ::2]), torch.nn.Parameter(s[:, ::3])   # strided, shared
    opt = fot.SGD([c, d], lr=0.1)
    c.grad, d.grad = torch.ones(4, 3), torch.ones(4, 2)
    with pytest.raises(ValueError, match="shares memory"):
        opt.step()
    assert torch.equal(s, torch.zeros(4, 6))


def test_same_parameter_twice_in_a_group_is_refused():
    p = torch.nn.Parameter(torch.zeros(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # torch warns about the duplicate
        opt = fot.Adam([p, p])
    p.grad = torch.ones(3)
    with pytest.raises(ValueError,
                       match=r"\[1\] overlaps parameter param_groups\[0\]\['params'\]\[0\]"):
        opt.step()
    assert torch.equal(p, torch.zeros(3)) and len(opt.state) == 0


def test_grad_with_a_graph_from_create_graph():
    """backward(create_graph=True) leaves grads that require grad: read, not changed."""
    wt = torch.nn.Parameter(torch.randn(4))
    wf = torch.nn.Parameter(wt.detach().clone())
    ot, of = torch.optim.SGD([wt], lr=0.1, momentum=0.5), fot.SGD([wf], lr=0.1, momentum=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            for w, o in ((wt, ot), (wf, of)):
                o.zero_grad()
                (w ** 3).sum().backward(create_graph=True)
                assert w.grad.requires_grad
                o.step()
    assert_close(wf, wt)


def test_bad_step_counts_are_refused():
    p = torch.nn.Parameter(torch.randn(3))
    opt = fot.Adam([p])
    p.grad = torch.randn(3)
    opt.step()
    for bad in (2.5, -1.0, float("nan"), float("inf")):
        opt.state[p]["step"].fill_(bad)
        snap = _snapshot(opt, [p])
        with pytest.raises(ValueError, match="a step count must be a whole number >= 0"):
            opt.step()
        _assert_unchanged(opt, [p], snap)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("first", ["torch", "fastoptim"])
def test_one_openmp_runtime_shared_with_torch(first):
    """torch's wheel and fastoptim both need libgomp.so.1; the loader maps it once, in
    either import order, so the two share one thread pool (README: threads)."""
    code = (f"import {first}; import fastoptim.torch, torch; "
            "fastoptim.torch.Adam([torch.nn.Parameter(torch.zeros(1 << 16))]); "
            "libs = {l.split()[-1] for l in open('/proc/self/maps') "
            "        if 'libgomp' in l or 'libomp' in l or 'libiomp' in l}; "
            "print(len(libs)); assert len(libs) <= 1, libs")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(fastoptim.__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
