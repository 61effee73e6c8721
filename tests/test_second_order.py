"""AdaHessian and Newton: compiled vs reference, checks, the optimizer classes, the
Hutchinson estimators, and the facts of the demo's story on the landscapes."""
import itertools
import os

import numpy as np
import pytest

import fastoptim
from fastoptim import _dispatch, demo, functional as F, landscapes as L, reference as R
from fastoptim.hessian import hutchinson_diag, spatial_average

from rules import ISAS, kernel_module

DTYPES = [np.float32, np.float64]
SHAPES = [(), (0,), (1,), (17,), (3, 5), (1003,)]

# --- SophiaH: compiled kernel vs reference, every state format -----------------------

SOPHIA_FORMATS = [(np.float32, None), (np.float64, None), (np.float32, "bfloat16"),
                  (np.float32, "8bit")]


def _sophia_state(dtype, fmt, shapes):
    """Zero state in ``fmt``: float, bfloat16 bits, or 8-bit codes (with block scales;
    parameters under 256 values keep float state)."""
    if fmt == "bfloat16":
        return [np.zeros(s, np.uint16) for s in shapes], None
    if fmt == "8bit":
        from fastoptim import formats as FM
        zero = int(np.flatnonzero(FM.dynamic_map(True) == 0)[0])
        return ([np.full(s, zero, np.uint8) if np.prod(s) >= 256 else np.zeros(s, dtype)
                 for s in shapes],
                [np.zeros(-(-int(np.prod(s)) // 256), np.float32) for s in shapes])
    return [np.zeros(s, dtype) for s in shapes], None


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype,fmt", SOPHIA_FORMATS)
def test_sophiah_kernel_equals_reference_in_every_state_format(isa, dtype, fmt):
    """SophiaH's kernel (its Hessian estimates a read-only input after the state, on
    every third step here; a skipped parameter; both weight decays) equals its
    reference bit for bit, in the parameters' dtype, bfloat16 (stochastic rounding)
    and 8-bit state, on every kernel path."""
    kernels = kernel_module(isa)
    rng = np.random.default_rng(0)
    shapes = [(5000,), (37,), (300, 20), ()]
    start = [np.asarray(rng.standard_normal(s), dtype) for s in shapes]
    runs = []
    for fn in (lambda *a, **k: R.sophiah_(*a, **k),
               lambda *a, **k: kernels.prepare_sophiah(
                   *a[:6], k["lr"], (0.96, 0.99), k["weight_decay"],
                   k["weight_decouple"], False, 1e-2, 1e-12, k["maximize"],
                   k.get("state_dtype"), k.get("rounding", "nearest"), k.get("seed", 0),
                   k.get("absmaxes")).run(2)):
        params = [p.copy() for p in start]
        (ms, ma), (hs, ha) = _sophia_state(dtype, fmt, shapes), _sophia_state(dtype, fmt, shapes)
        steps = np.zeros(len(shapes), np.int64)
        data = np.random.default_rng(1)
        for k in range(12):
            grads = [None if (k == 4 and i == 1) else np.asarray(data.standard_normal(s), dtype)
                     for i, s in enumerate(shapes)]
            hess = ([np.asarray(data.standard_normal(s), dtype) for s in shapes]
                    if k % 3 == 0 else None)
            kw = dict(lr=0.01, weight_decay=0.1, weight_decouple=k % 2 == 0, maximize=True)
            if fmt is not None:
                kw.update(state_dtype=fmt, seed=3,
                          rounding="stochastic" if fmt == "bfloat16" else "nearest")
            if fmt == "8bit":
                kw["absmaxes"] = (ma, ha)
            fn(params, grads, hess, ms, hs, steps, **kw)
        runs.append(params + ms + hs + (ma or []) + (ha or []) + [steps])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


# --- AdaHessian: compiled kernel vs reference ---------------------------------------

AH_OPTIONS = dict(lr=[0.15, 0.01], betas=[(0.9, 0.999), (0.3, 0.9)], eps=[1e-4, 1e-8],
                  weight_decay=[0.0, 0.01], hessian_power=[1.0, 0.5, 0.0],
                  maximize=[False, True])


def _exact(kernels, opts):
    """Whether a kernel module must reproduce the reference bit for bit: without
    fused multiply-add (the baseline build, or -ffp-contract=off) every operation
    rounds as NumPy's does. pow() is libm's in the kernel and may be NumPy's own
    (SIMD) in the reference, so a power other than 1 is compared with a tolerance."""
    no_fma = kernels.build_isa() == "baseline" or "-ffp-contract=off" in kernels.build_cflags()
    return no_fma and opts.get("hessian_power", 1.0) == 1.0


def _assert_close(got, want, dtype, exact, err_msg=""):
    if exact:
        np.testing.assert_array_equal(got, want, err_msg=err_msg)
    elif dtype == np.float32:
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=err_msg)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-13, err_msg=err_msg)


def _ah_state(params):
    return ([np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params],
            np.zeros(len(params), dtype=np.int64))


def _ah_run(kernels, opts, shapes, dtype, nsteps, seed, order="C", skip_prob=0.2):
    rng = np.random.default_rng(seed)
    params = [np.asarray(rng.standard_normal(s), dtype=dtype, order=order) for s in shapes]
    ref = [p.copy(order="K") for p in params]
    m, v, steps = _ah_state(params)
    rm, rv, rsteps = _ah_state(ref)
    o = dict(opts)
    b1, b2 = o.pop("betas", (0.9, 0.999))
    kw = dict(lr=0.15, eps=1e-4, weight_decay=0.0, hessian_power=1.0, maximize=False)
    kw.update(o)
    for _ in range(nsteps):
        grads = [np.asarray(rng.standard_normal(p.shape), dtype=dtype, order=order)
                 if rng.random() >= skip_prob else None for p in params]
        diags = [np.asarray(rng.standard_normal(p.shape), dtype=dtype, order=order)
                 for p in params]
        kernels.prepare_adahessian(params, grads, diags, m, v, steps, kw["lr"], (b1, b2),
                                   kw["eps"], kw["weight_decay"], kw["hessian_power"],
                                   kw["maximize"]).run(2)
        R.adahessian_(ref, grads, diags, rm, rv, rsteps, betas=(b1, b2), **kw)
    return (params, m, v, steps), (ref, rm, rv, rsteps)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_adahessian_every_option_matches_reference(isa, dtype):
    """Full factorial of AdaHessian's options, 20 steps, sizes across vector widths
    and tails, on every instruction-set path this process may run."""
    kernels = kernel_module(isa)
    keys = list(AH_OPTIONS)
    for values in itertools.product(*(AH_OPTIONS[k] for k in keys)):
        opts = dict(zip(keys, values))
        got, want = _ah_run(kernels, opts, SHAPES, dtype, 20, seed=5)
        exact = _exact(kernels, opts)
        for name, a_list, b_list in zip(("params", "exp_avgs", "exp_hessian_diag_sqs"),
                                        got[:3], want[:3]):
            for a, b in zip(a_list, b_list):
                _assert_close(a, b, dtype, exact, err_msg=f"{isa} {opts} {name}")
        np.testing.assert_array_equal(got[3], want[3])


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_adahessian_fortran_order_and_many_steps(dtype):
    got, want = _ah_run(_dispatch.kernels, dict(weight_decay=0.01), [(7, 9), (33, 2)],
                        dtype, 200, seed=6, order="F", skip_prob=0.0)
    exact = _exact(_dispatch.kernels, {})
    for a, b in zip(got[0], want[0]):
        assert a.flags.f_contiguous
        _assert_close(a, b, dtype, exact)


def test_adahessian_functional_is_the_dispatched_kernel():
    rng = np.random.default_rng(7)
    p = rng.standard_normal(50)
    g, d = rng.standard_normal(50), rng.standard_normal(50)
    q = p.copy()
    m, v, s = _ah_state([p])
    rm, rv, rs = _ah_state([q])
    F.adahessian_(p, g, d, m, v, s, lr=0.1, weight_decay=0.01)
    R.adahessian_(q, g, d, rm, rv, rs, lr=0.1, weight_decay=0.01)
    _assert_close(p, q, np.float64, _exact(_dispatch.kernels, {}))
    assert s[0] == 1


def test_adahessian_thread_count_does_not_change_results():
    try:
        fastoptim.set_serial_threshold(0)
        shapes = [(5000,), (17,), (3001,)]
        results = []
        for threads in (1, 2):
            r2 = np.random.default_rng(9)
            params = [r2.standard_normal(s).astype(np.float32) for s in shapes]
            m, v, steps = _ah_state(params)
            for _ in range(5):
                grads = [r2.standard_normal(s).astype(np.float32) for s in shapes]
                diags = [r2.standard_normal(s).astype(np.float32) for s in shapes]
                F.prepare_adahessian(params, grads, diags, m, v, steps,
                                     hessian_power=0.5).run(threads)
            results.append(params)
        for a, b in zip(*results):
            np.testing.assert_array_equal(a, b)
    finally:
        # None, not the value read before: setting any number (even the default one)
        # turns the per-rule calibration off for the rest of the process
        fastoptim.set_serial_threshold(None)


def test_adahessian_first_step_by_hand():
    """One step from zero state: m = (1-b1) g, v = (1-b2) D^2, bias-corrected to g
    and D^2, so p -= lr * g / (|D| + eps) (+ lr*wd*p)."""
    p = np.array([1.0, -2.0, 0.5])
    g = np.array([0.3, -0.1, 0.2])
    d = np.array([2.0, -4.0, 0.5])
    m, v, s = _ah_state([p])
    F.adahessian_([p], [g], [d], m, v, s, lr=0.5, eps=1e-4, weight_decay=0.1)
    want = np.array([1.0, -2.0, 0.5]) - 0.5 * (g / (np.abs(d) + 1e-4)
                                                + 0.1 * np.array([1.0, -2.0, 0.5]))
    np.testing.assert_allclose(p, want, rtol=1e-12)
    np.testing.assert_allclose(m[0], 0.1 * g, rtol=1e-15)
    np.testing.assert_allclose(v[0], 0.001 * d * d, rtol=1e-14)
    # hessian_power 0: the denominator is 1 + eps, plain momentum SGD with bias correction
    p = np.array([1.0, -2.0, 0.5])
    m, v, s = _ah_state([p])
    F.adahessian_([p], [g], [d], m, v, s, lr=0.5, eps=1e-4, hessian_power=0.0)
    np.testing.assert_allclose(p, np.array([1.0, -2.0, 0.5]) - 0.5 * g / (1 + 1e-4),
                               rtol=1e-12)


def test_adahessian_hessian_diag_inputs_that_need_a_copy():
    """Read-only, other-order, strided Hessian diagonals, and the gradient array
    itself as the diagonal, give the same result as a fresh contiguous copy."""
    rng = np.random.default_rng(10)
    p0 = rng.standard_normal((6, 5))
    g = rng.standard_normal((6, 5))
    d = rng.standard_normal((6, 5))
    ro = d.copy()
    ro.flags.writeable = False
    wide = np.zeros((6, 10))
    wide[:, ::2] = d
    cases = {"read-only": (g, ro, d), "F order": (g, np.asfortranarray(d), d),
             "strided": (g, wide[:, ::2], d), "same as grad": (g, g, g.copy())}
    for label, (gg, dd, dref) in cases.items():
        p, q = p0.copy(), p0.copy()
        m, v, s = _ah_state([p])
        rm, rv, rs = _ah_state([q])
        dd_before = np.array(dd)
        F.adahessian_([p], [gg], [dd], m, v, s, weight_decay=0.01)
        F.adahessian_([q], [g], [dref], rm, rv, rs, weight_decay=0.01)
        np.testing.assert_array_equal(p, q, err_msg=label)
        np.testing.assert_array_equal(np.asarray(dd), dd_before, err_msg=label)


def _ah_call(p, g, d, **kw):
    m, v, s = _ah_state(p)
    F.adahessian_(p, g, d, m, v, s, **kw)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(hessian_power=1.5), ValueError, "Hessian power"),
    (dict(hessian_power=-0.1), ValueError, "Hessian power"),
    (dict(lr=-1.0), ValueError, "learning rate"),
    (dict(betas=(1.0, 0.9)), ValueError, "beta parameter at index 0"),
    (dict(eps=-1e-3), ValueError, "epsilon"),
    (dict(weight_decay=-1.0), ValueError, "weight_decay"),
    (dict(maximize=1), TypeError, "maximize"),
])
def test_adahessian_bad_hyperparameters(kwargs, exc, match):
    p = [np.ones(4)]
    with pytest.raises(exc, match=match):
        _ah_call(p, [np.ones(4)], [np.ones(4)], **kwargs)
    np.testing.assert_array_equal(p[0], 1.0)


def test_adahessian_bad_arrays_change_nothing():
    def fresh():
        return [np.ones(4), np.ones((2, 3))], [np.full(4, 0.5), np.full((2, 3), 0.5)]

    cases = [
        (lambda g: [np.ones(4), np.ones(5)], ValueError, r"hessian_diags\[1\] has shape"),
        (lambda g: [np.ones(4), None], ValueError, r"hessian_diags\[1\] is None"),
        (lambda g: [np.ones(4)], ValueError, "hessian_diags has 1 entries"),
        (lambda g: [np.ones(4), np.ones((2, 3), np.float32)], TypeError,
         r"hessian_diags\[1\] has dtype float32"),
        (lambda g: [np.ones(4), [[1.0] * 3] * 2], TypeError, r"hessian_diags\[1\] must be"),
    ]
    for make_diags, exc, match in cases:
        params, grads = fresh()
        m, v, s = _ah_state(params)
        with pytest.raises(exc, match=match):
            F.adahessian_(params, grads, make_diags(grads), m, v, s)
        for p in params:
            np.testing.assert_array_equal(p, 1.0)
        for a in m + v:
            np.testing.assert_array_equal(a, 0.0)
        np.testing.assert_array_equal(s, 0)
    # a skipped parameter needs no diagonal; a diagonal aliasing a parameter is refused
    params, grads = fresh()
    m, v, s = _ah_state(params)
    F.adahessian_(params, [grads[0], None], [np.ones(4), None], m, v, s)
    np.testing.assert_array_equal(s, [1, 0])
    np.testing.assert_array_equal(params[1], 1.0)
    params, grads = fresh()
    m, v, s = _ah_state(params)
    with pytest.raises(ValueError, match="overlaps"):
        F.adahessian_(params, grads, [params[0], np.ones((2, 3))], m, v, s)
    np.testing.assert_array_equal(params[0], 1.0)


# --- the AdaHessian optimizer -------------------------------------------------------

def test_adahessian_class_matches_functional_across_groups():
    rng = np.random.default_rng(11)
    shapes = [(5,), (3, 4), (7,)]
    params = [rng.standard_normal(s) for s in shapes]
    ref = [p.copy() for p in params]
    opt = fastoptim.AdaHessian([{"params": params[:2]},
                                {"params": params[2:], "lr": 0.05, "hessian_power": 0.5}],
                               lr=0.2, weight_decay=0.01)
    m, v, steps = _ah_state(ref)
    for t in range(6):
        grads = [rng.standard_normal(s) for s in shapes]
        diags = [rng.standard_normal(s) for s in shapes]
        if t == 2:
            grads[1] = None
        opt.step(grads, diags)
        F.adahessian_(ref[:2], grads[:2], diags[:2], m[:2], v[:2], steps[:2], lr=0.2,
                      weight_decay=0.01)
        sub = steps[2:]
        F.adahessian_(ref[2:], grads[2:], diags[2:], m[2:], v[2:], sub, lr=0.05,
                      weight_decay=0.01, hessian_power=0.5)
        steps[2:] = sub
    for a, b in zip(params, ref):
        np.testing.assert_array_equal(a, b)
    st = opt.state
    assert [st[i]["step"] for i in range(3)] == [6, 5, 6]
    assert set(st[0]) == {"step", "exp_avg", "exp_hessian_diag_sq"}
    np.testing.assert_array_equal(st[1]["exp_hessian_diag_sq"], v[1])


def test_adahessian_class_state_dict_round_trip_and_refusals():
    rng = np.random.default_rng(12)
    params = [rng.standard_normal(8), rng.standard_normal((2, 2))]
    opt = fastoptim.AdaHessian(params)
    assert opt.defaults["lr"] == 0.15 and opt.defaults["eps"] == 1e-4
    data = [([rng.standard_normal(8), rng.standard_normal((2, 2))],
             [rng.standard_normal(8), rng.standard_normal((2, 2))]) for _ in range(6)]
    for g, d in data[:3]:
        opt.step(g, d)
    saved = opt.state_dict()
    copies = [p.copy() for p in params]
    opt2 = fastoptim.AdaHessian(copies)
    opt2.load_state_dict(saved)
    for g, d in data[3:]:
        opt.step(g, d)
        opt2.step(g, d)
    for a, b in zip(params, copies):
        np.testing.assert_array_equal(a, b)
    before = [p.copy() for p in params]
    with pytest.raises(ValueError, match="hessian_diags has 1 entries"):
        opt.step(data[0][0], data[0][1][:1])
    with pytest.raises(TypeError, match="hessian_diags must be a list"):
        opt.step(data[0][0], {"a": 1})
    with pytest.raises(ValueError, match="Hessian power"):
        fastoptim.AdaHessian(params, hessian_power=2.0)
    for a, b in zip(params, before):
        np.testing.assert_array_equal(a, b)
    assert opt.state[0]["step"] == 6


# --- Hutchinson's estimate ------------------------------------------------------------

def test_hutchinson_exact_for_a_diagonal_hessian():
    h = np.array([3.0, -1.0, 0.5, 0.0, 7.0])
    for seed in range(5):
        d = hutchinson_diag(lambda z: h * z, np.zeros(5), rng=seed)
        np.testing.assert_array_equal(d, h)


def test_hutchinson_is_unbiased_for_a_dense_hessian():
    rng = np.random.default_rng(13)
    a = rng.standard_normal((6, 6))
    h = a + a.T
    est = hutchinson_diag(lambda z: h @ z, np.zeros(6), n_samples=4000, rng=1)
    # each sample's error is a sum of +-h_ij terms: std ~ sqrt(sum_j h_ij^2 / n)
    err = np.sqrt((h ** 2).sum(axis=1) - np.diag(h) ** 2) / np.sqrt(4000)
    assert np.all(np.abs(est - np.diag(h)) < 5 * err)
    one = hutchinson_diag(lambda z: h @ z, np.zeros(6), rng=1)
    assert not np.allclose(one, np.diag(h))      # a single sample is noisy


def test_hutchinson_lists_dtypes_and_spatial_average():
    shapes = [(3,), (2, 2, 3, 3)]
    params = [np.zeros(shapes[0], np.float32), np.zeros(shapes[1], np.float32)]
    diag = [np.arange(3.0), np.arange(36.0).reshape(shapes[1]) - 10]
    out = hutchinson_diag(lambda zs: [d * z for d, z in zip(diag, zs)], params, rng=0)
    assert [o.dtype for o in out] == [np.float32, np.float32]
    np.testing.assert_array_equal(out[1], diag[1])
    avg = hutchinson_diag(lambda zs: [d * z for d, z in zip(diag, zs)], params, rng=0,
                          spatial_average=True)
    np.testing.assert_array_equal(avg[0], diag[0])        # <= 2-D: unchanged
    want = np.abs(diag[1]).mean(axis=(2, 3), keepdims=True) * np.ones(shapes[1])
    np.testing.assert_allclose(avg[1], want, rtol=1e-6)
    np.testing.assert_array_equal(spatial_average(diag[1]), want)
    with pytest.raises(TypeError, match="hvp must be callable"):
        hutchinson_diag(None, params)
    with pytest.raises(ValueError, match="n_samples"):
        hutchinson_diag(lambda z: z, params, n_samples=0)
    with pytest.raises(ValueError, match="hvp returned shape"):
        hutchinson_diag(lambda z: np.ones(4), np.zeros(3))


def test_torch_hutchinson_on_a_quadratic():
    torch = pytest.importorskip("torch")
    from fastoptim.torch_hessian import hutchinson_diag as thd

    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(14)
    a = rng.standard_normal((5, 5))
    h = torch.tensor(a + a.T)
    x = torch.tensor(rng.standard_normal(5), requires_grad=True)
    w = torch.tensor(rng.standard_normal((2, 3)), requires_grad=True)
    hw = torch.tensor(rng.uniform(1, 2, (2, 3)))
    b = torch.tensor(rng.standard_normal(4), requires_grad=True)   # enters linearly

    def loss_fn():
        return 0.5 * x @ h @ x + 0.5 * (hw * w * w).sum() + b.sum()

    diags, grads = thd(loss_fn(), [x, w, b], n_samples=1000, generator=gen,
                       return_grads=True)
    err = np.sqrt(((a + a.T) ** 2).sum(axis=1) - np.diag(a + a.T) ** 2) / np.sqrt(1000)
    assert np.all(np.abs(diags[0].numpy() - np.diag(a + a.T)) < 5 * err)
    np.testing.assert_allclose(diags[1].numpy(), hw.numpy(), rtol=1e-12)   # diagonal: exact
    np.testing.assert_array_equal(diags[2].numpy(), 0.0)
    np.testing.assert_allclose(grads[0].numpy(), (h @ x).detach().numpy(), rtol=1e-12)
    assert not any(d.requires_grad for d in diags)
    # reproducible with a seeded generator; spatial averaging of a 4-D kernel
    k = torch.tensor(rng.standard_normal((2, 1, 3, 3)), requires_grad=True)
    hk = torch.tensor(rng.uniform(1, 2, (2, 1, 3, 3)))
    d1 = thd(0.5 * (hk * k * k).sum(), [k], generator=torch.Generator().manual_seed(1),
             spatial_average=True)[0]
    np.testing.assert_allclose(d1.numpy(), hk.mean(dim=(2, 3), keepdim=True)
                               .expand_as(hk).numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="does not require grad"):
        thd(loss_fn(), [torch.ones(3)])
    with pytest.raises(TypeError, match="sequence of tensors"):
        thd(loss_fn(), x)


# --- Newton -----------------------------------------------------------------------------

def _spd(rng, n):
    a = rng.standard_normal((n, n))
    return a @ a.T + n * np.eye(n)


def _sym(rng, n):
    a = rng.standard_normal((n, n))
    return a + a.T


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("saddle_free", [False, True])
def test_newton_matches_reference(dtype, saddle_free):
    rng = np.random.default_rng(15)
    shapes = [(4,), (2, 3), (1,)]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    ref = [p.copy() for p in params]
    steps, rsteps = np.zeros(3, np.int64), np.zeros(3, np.int64)
    for t in range(4):
        grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
        hs = [_sym(rng, 4), _sym(rng, 6).reshape(2, 3, 2, 3), _sym(rng, 1)]
        hs[2] = (lambda h: (lambda p: h))(hs[2])              # a callable Hessian
        if t == 1:
            grads[0] = None
        kw = dict(lr=0.7, damping=0.1, saddle_free=saddle_free)
        F.newton_(params, grads, hs, steps, **kw)
        R.newton_(ref, grads, hs, rsteps, **kw)
    rtol = 1e-5 if dtype == np.float32 else 1e-10
    for a, b in zip(params, ref):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol)
    np.testing.assert_array_equal(steps, [3, 4, 4])
    np.testing.assert_array_equal(steps, rsteps)


def test_newton_solves_a_quadratic_in_one_step():
    rng = np.random.default_rng(16)
    a = _spd(rng, 6)
    b = rng.standard_normal(6)
    x_star = np.linalg.solve(a, b)
    x = rng.standard_normal(6)
    opt = fastoptim.Newton([x], lr=1.0)
    opt.step([a @ x - b], [a])
    np.testing.assert_allclose(x, x_star, rtol=1e-12, atol=1e-12)
    # and the landscape's narrow deep minimum: one step from the demo's start
    q = L.get("quadratic")
    p = np.array(q.start)
    fastoptim.Newton([p]).step([q.grad(p)], [q.hessian])
    np.testing.assert_allclose(p, 0.0, atol=1e-14)
    assert opt.state[0]["step"] == 1


def test_newton_saddle_attraction_and_repulsion():
    """On x^2 - y^2, plain Newton jumps exactly into the saddle; saddle-free Newton
    keeps x's step and reverses y's: x -> 0, y -> 2y."""
    s = L.get("saddle")
    p = np.array([0.8, 1e-3])
    fastoptim.Newton([p]).step([s.grad(p)], [s.hessian(p)])
    np.testing.assert_array_equal(p, [0.0, 0.0])
    p = np.array([0.8, 1e-3])
    fastoptim.Newton([p], saddle_free=True).step([s.grad(p)], [s.hessian(p)])
    np.testing.assert_allclose(p, [0.0, 2e-3], atol=1e-17)
    # |H| is Q|Lambda|Q^T also when H is not diagonal
    rng = np.random.default_rng(17)
    h = _sym(rng, 5)
    lam, q = np.linalg.eigh(h)
    g = rng.standard_normal(5)
    x = np.zeros(5)
    F.newton_([x], [g], [h], saddle_free=True, damping=0.5)
    np.testing.assert_allclose(-x, np.linalg.solve(q @ np.diag(np.abs(lam) + 0.5) @ q.T, g),
                               rtol=1e-10)


def test_newton_refusals_change_nothing():
    x = np.ones(3)
    g = np.ones(3)
    with pytest.raises(np.linalg.LinAlgError, match="singular"):
        F.newton_([x], [g], [np.zeros((3, 3))])
    with pytest.raises(np.linalg.LinAlgError, match="singular"):
        F.newton_([x], [g], [np.zeros((3, 3))], saddle_free=True)
    np.testing.assert_array_equal(x, 1.0)
    F.newton_([x], [g], [np.zeros((3, 3))], damping=2.0)       # damping regularises
    np.testing.assert_allclose(x, 0.5)
    cases = [
        (dict(hessians=[np.eye(2), np.eye(4)]), ValueError, r"hessians\[1\] has shape"),
        (dict(hessians=[np.eye(2), np.array([[1.0, 2.0, 0], [0, 1, 0], [0, 0, 1]])],
              saddle_free=True), ValueError, "not symmetric"),
        (dict(hessians=[np.eye(2), None]), ValueError, r"hessians\[1\] is None"),
        (dict(hessians=[np.eye(2)]), ValueError, "hessians has 1 entries"),
        (dict(hessians=[np.eye(2), np.full((3, 3), "a")]), TypeError, "real numbers"),
        (dict(hessians=[np.eye(2), np.eye(3)], lr=-1), ValueError, "learning rate"),
        (dict(hessians=[np.eye(2), np.eye(3)], damping=-1), ValueError, "damping"),
        (dict(hessians=[np.eye(2), np.eye(3)], grads=[np.ones(2), np.ones(4)]), ValueError,
         r"grads\[1\] has shape"),
    ]
    for kw, exc, match in cases:
        params = [np.ones(2), np.ones(3)]
        kw = dict(kw)
        grads = kw.pop("grads", [np.ones(2), np.ones(3)])
        steps = np.zeros(2, np.int64)
        with pytest.raises(exc, match=match):
            F.newton_(params, grads, kw.pop("hessians"), steps, **kw)
        for p in params:
            np.testing.assert_array_equal(p, 1.0)
        np.testing.assert_array_equal(steps, 0)


def test_newton_class_groups_state_dict_and_callables():
    p1, p2 = np.array([1.0, 2.0]), np.array([[3.0]])
    opt = fastoptim.Newton([{"params": [p1]}, {"params": [p2], "lr": 0.5}], damping=0.0)
    h1 = np.array([[2.0, 0.0], [0.0, 4.0]])
    opt.step([h1 @ p1, 2 * p2], [lambda p: h1, np.array([[2.0]])])
    np.testing.assert_allclose(p1, 0.0)
    np.testing.assert_allclose(p2, [[1.5]])
    sd = opt.state_dict()
    assert sd["state"] == {0: {"step": 1}, 1: {"step": 1}}
    assert sd["param_groups"][1]["lr"] == 0.5
    opt2 = fastoptim.Newton([{"params": [p1.copy()]}, {"params": [p2.copy()]}])
    opt2.load_state_dict(sd)
    assert opt2.param_groups[1]["lr"] == 0.5 and opt2.state[1]["step"] == 1
    with pytest.raises(ValueError, match="damping"):
        fastoptim.Newton([p1], damping=-1.0)
    with pytest.raises(TypeError, match="hessians must be a list"):
        opt.step([p1, p2], "H")


# --- the story, as numbers (the demo's default settings) ---------------------------------

def _runs(name, steps=None):
    ls = L.get(name)
    return {c.label: demo.run(ls, c, steps=steps) for c in demo.CONTENDERS}


ESCAPERS = ["SGD momentum 0.9", "Adagrad", "RMSprop", "Adam", "Adamax", "RAdam",
            "Adadelta", "Rprop", "Lion", "AdaHessian", "SophiaH", "saddle-free Newton"]


@pytest.mark.parametrize("name", ["saddle", "monkey"])
def test_story_saddles_sgd_stalls_others_escape_newton_is_drawn_in(name):
    runs = _runs(name)
    sgd = runs["SGD"]
    assert sgd.status == "ran" and sgd.escaped() is None
    assert sgd.saddle_distance()[-1] < 0.2          # it crept in and stays close
    for label in ESCAPERS:
        assert runs[label].status == "escaped", label
        assert runs[label].escaped() < sgd.steps, label
    newton = runs["Newton"]
    assert newton.escaped() is None and newton.saddle_distance()[-1] < 1e-4


def test_story_sophiah_clips_the_negative_curvature_into_sign_steps():
    """On x^2 - y^2 SophiaH's Hessian average along y is negative, so its denominator is
    the floor eps and the clip makes every y-step a sign step of exactly lr (as Lion's
    steps are), away from the saddle; along x (curvature +2) its steps are not clipped."""
    runs = _runs("saddle")
    lr = demo.SETTINGS["saddle"]["lr_adaptive"]
    for label in ("SophiaH", "Lion"):
        dy = np.diff(runs[label].path[:, 1])
        np.testing.assert_allclose(np.abs(dy), lr, rtol=1e-9, err_msg=label)
        assert np.all(np.sign(dy) == np.sign(runs[label].path[0, 1])), label
    # along x, once its curvature average has grown from 0 (its first steps are
    # clipped too), the unclipped, Newton-like step m/h, shrinking toward x = 0
    dx = np.abs(np.diff(runs["SophiaH"].path[:, 0]))
    assert np.all(dx[-5:] < lr * 0.99) and np.all(np.diff(dx[-5:]) < 0)


def test_story_saddle_sgd_closer_to_the_saddle_than_adam_after_n_steps():
    """Started near the ridge of x^2 - y^2, after N steps plain SGD is still close
    to the saddle, nearer than Adam, whose steps do not shrink with the gradient."""
    ls = L.get("saddle")
    settings = dict(demo.SETTINGS["saddle"], escape_radius=None)    # do not stop early
    for n in (50, 100, 150):
        sgd = demo.run(ls, "SGD", settings, steps=n)
        adam = demo.run(ls, "Adam", settings, steps=n)
        assert sgd.steps == adam.steps == n
        assert sgd.saddle_distance()[-1] < 0.4
        assert sgd.saddle_distance()[-1] < adam.saddle_distance()[-1] / 4
    # and SGD's escape speed is the textbook (1 + 2 lr) per step in y
    lr = demo.SETTINGS["saddle"]["lr_sgd"]
    sgd = demo.run(ls, "SGD", steps=100)
    np.testing.assert_allclose(sgd.path[-1, 1], ls.start[1] * (1 + 2 * lr) ** 100,
                               rtol=1e-12)


def test_story_narrow_valley_sgd_zigzags_newton_one_step():
    runs = _runs("quadratic")
    assert runs["SGD"].reversals() > 40                   # of 200 steps
    assert runs["Adam"].reversals() == 0
    for label in ("Newton", "saddle-free Newton"):
        assert runs[label].reached() == 1
        assert runs[label].gap()[1] < 1e-28
    assert runs["SGD"].reached() > 50
    # Rosenbrock's curved valley: Newton in a handful of steps, SGD not in 2000
    ros = _runs("rosenbrock")
    assert ros["Newton"].reached() <= 10
    assert ros["SGD"].reached() is None


def test_story_plateau_and_beale():
    runs = _runs("plateau")
    for label in ("SGD", "SGD momentum 0.9"):
        assert runs[label].gap()[-1] > 0.99, label        # still on the plateau
    for label in ("Adagrad", "Adam", "AdaHessian", "saddle-free Newton"):
        assert runs[label].reached() is not None, label
    assert runs["Newton"].reached() is None               # negative curvature: uphill
    beale = _runs("beale")
    saddle = np.asarray(L.get("beale").saddles[0])
    assert np.linalg.norm(beale["Newton"].path[-1] - saddle) < 1e-6
    assert beale["saddle-free Newton"].reached() is not None


# --- the demo command ---------------------------------------------------------------------

def test_demo_summary_without_plots(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--no-plots"]) == 0
    text = (tmp_path / "summary.txt").read_text()
    assert text == capsys.readouterr().out.split("wrote ")[0]
    for ls in L.LANDSCAPES.values():
        assert ls.title in text
    for c in demo.CONTENDERS:
        assert text.count(c.label) >= len(L.LANDSCAPES)
    assert sorted(os.listdir(tmp_path)) == ["summary.txt"]


def test_demo_figures(tmp_path):
    pytest.importorskip("matplotlib")
    assert demo.main(["--out", str(tmp_path), "--landscape", "saddle",
                      "--landscape", "quadratic"]) == 0
    for name in ("saddle.png", "quadratic.png", "overview.png", "summary.txt"):
        assert (tmp_path / name).exists(), name
    for name in ("saddle.png", "quadratic.png", "overview.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20000


def test_demo_without_matplotlib_says_so(tmp_path, monkeypatch, capsys):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as e:
        demo.main(["--out", str(tmp_path)])
    assert e.value.code == 2
    assert "--no-plots" in capsys.readouterr().err
    assert demo.main(["--out", str(tmp_path), "--no-plots",
                      "--landscape", "saddle"]) == 0


def test_adahessian_reads_hessian_diagonals_that_share_the_gradients_memory():
    """The Hessian diagonals, like the gradients, are read only: the two may be the same
    memory (only arrays the kernel writes must not overlap anything), and the update
    is the one from separate copies. A diagonal on a written array is still refused."""
    rng = np.random.default_rng(3)
    params = [rng.standard_normal(s).astype(np.float32) for s in [(40,), (3, 5)]]
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
    twin = [p.copy() for p in params]
    m, v, steps = _ah_state(params)
    tm, tv, tsteps = _ah_state(twin)
    F.adahessian_(params, grads, grads, m, v, steps)               # diagonals = grads
    F.adahessian_(twin, grads, [g.copy() for g in grads], tm, tv, tsteps)
    for a, b in zip(params + m + v, twin + tm + tv):
        np.testing.assert_array_equal(a, b)
    before = [a.copy() for a in params + m + v]
    with pytest.raises(ValueError, match=r"overlaps"):
        F.adahessian_(params, grads, [m[0], grads[1]], m, v, steps)
    for a, b in zip(params + m + v, before):
        np.testing.assert_array_equal(a, b)
