"""Parity with torch.optim: fastoptim must follow torch's default (single-tensor) path.

Every rule, every option, float32 and float64, 200 steps, element-wise on parameters
AND on every state array, plus the step counters and which parameters have state.

* Reference: ``torch.optim.<X>(..., foreach=False)``, torch's plain for-loop path. Not
  ``fused=True``: torch 2.13's fused CPU kernels give wrong updates for strided
  parameters (see DESIGN.md), and one parameter here is F-contiguous.
* Both sides get the same gradients (fresh random values every step, scale varying
  over three decades so AMSGrad's running maximum both rises and holds).
* The parameter list covers what breaks vector kernels and bookkeeping: a 0-d array,
  empty arrays, sizes 1, 17 and 1003 (not multiples of any vector width), a 2-D
  F-contiguous array whose gradient alternates between F and C order, two parameter
  groups with different learning rates, a parameter without a gradient on every third
  step (including the first, so its state starts late), one that never gets a
  gradient, and a learning-rate change mid-run.
* Tolerance: see TOL and assert_close.

Why fastoptim is not bit-identical to torch (measured with torch 2.13 CPU, AVX512
capability). Each item is a difference of at most one rounding in one operation per
step; they accumulate over the steps, to about 8 eps of the magnitude in 200 steps:

1. torch's ``Tensor.sqrt`` on CPU is not correctly rounded: it is one ulp off for
   about 0.6% (fp32) / 0.75% (fp64) of elements, in contiguous, strided and short
   tensors alike. fastoptim's sqrt is the IEEE instruction (sqrtps / sqrtpd).
2. torch's AVX2/AVX512 kernels fuse multiply-adds: ``add(y, alpha=a)`` is
   ``fma(y, a, x)``, ``addcmul(t1, t2, value=v)`` is ``fma(v*t1, t2, x)``, ``lerp`` is
   ``fma(w, end - start, start)`` (or ``fma(w - 1, end - start, end)``). fastoptim's
   kernels are built with -ffp-contract=off to equal fastoptim.reference bit for bit,
   and round every product. This touches every rule, SGD included (weight decay,
   momentum, the parameter update).
3. Adam/AdamW: fastoptim multiplies ``sqrt(v)`` by ``1/sqrt(1 - beta2**t)`` (one
   divide per element fewer); torch divides by ``sqrt(1 - beta2**t)``.
"""
import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastoptim  # noqa: E402
from fastoptim import functional as F  # noqa: E402
from fastoptim import reference as R  # noqa: E402

N_STEPS = 200
LR_CHANGE_AT = 120          # every group's lr is multiplied by LR_FACTOR before this step
LR_FACTOR = 0.3
GROUP1_LR_FACTOR = 0.5      # group 1's lr relative to group 0's
SEED = 1234

# Tolerance, in units of the dtype's epsilon times the magnitude of the compared role
# (see assert_close): |fastoptim - torch| <= TOL * eps * magnitude, element-wise.
# Largest errors measured over this file (seeds 1234, 1 and 2; every built kernel
# path; torch 2.13, AVX512 capability): 8 eps in the class and functional tests, both
# dtypes; 44 (fp32) and 99 (fp64) once, in the threaded RMSprop test with seed 2: one
# element's gradient nearly cancelled its weight decay (g + wd*p ~ 6e-7 from terms of
# 0.02, where torch's fused add and fastoptim's rounded product differ in relative
# terms by ~1e4 eps), and RMSprop's normalization carries that into the momentum.
# fp32: 256 eps = 3.1e-5, fp64: 256 eps = 5.7e-14, relative to the magnitude.
# How sharp that is: scaling lr, betas, alpha, momentum, dampening, weight_decay or
# lr_decay by 1 + 1e-6 on fastoptim's side fails every fp64 case of that option (eps
# too where it is large enough to matter); in fp32, lr * (1 + 1e-3) fails every case.
TOL = {
    np.float32: 256.0,
    np.float64: 256.0,
}


# ------------------------------------------------------------------------------------
# The rules and their option grids
# ------------------------------------------------------------------------------------

CLASSES = {
    "sgd": (fastoptim.SGD, torch.optim.SGD),
    "adagrad": (fastoptim.Adagrad, torch.optim.Adagrad),
    "rmsprop": (fastoptim.RMSprop, torch.optim.RMSprop),
    "adam": (fastoptim.Adam, torch.optim.Adam),
    "adamw": (fastoptim.AdamW, torch.optim.AdamW),
    "adamax": (fastoptim.Adamax, torch.optim.Adamax),
    "adadelta": (fastoptim.Adadelta, torch.optim.Adadelta),
    "radam": (fastoptim.RAdam, torch.optim.RAdam),
    "rprop": (fastoptim.Rprop, torch.optim.Rprop),
    "nadam": (fastoptim.NAdam, torch.optim.NAdam),
    "asgd": (fastoptim.ASGD, torch.optim.ASGD),
}

# Options shared by every combination of a rule (not defaults, so that the class
# really passes them on), then the grid: option -> values, full factorial.
BASE = {
    "sgd": dict(lr=0.05),
    "adagrad": dict(lr=0.05),
    "rmsprop": dict(lr=0.01),
    "adam": dict(lr=0.01),
    "adamw": dict(lr=0.01),
    "adamax": dict(lr=0.01),
    "adadelta": dict(lr=0.5),
    "radam": dict(lr=0.01),
    "rprop": dict(lr=0.05),
    "nadam": dict(lr=0.01),
    "asgd": dict(lr=0.05),
}
GRID = {
    "sgd": dict(momentum=[0.0, 0.9], dampening=[0.0, 0.25], nesterov=[False, True],
                weight_decay=[0.0, 0.01], maximize=[False, True]),
    "adagrad": dict(lr_decay=[0.0, 0.01], weight_decay=[0.0, 0.02],
                    initial_accumulator_value=[0.0, 0.1], eps=[1e-10, 0.1],
                    maximize=[False, True]),
    # alpha=0.4 makes 1-alpha >= 0.5: the second branch of torch's lerp (centered)
    "rmsprop": dict(alpha=[0.99, 0.4], eps=[1e-8, 1e-3], weight_decay=[0.0, 0.02],
                    momentum=[0.0, 0.8], centered=[False, True], maximize=[False, True]),
    # beta1=0.4 makes 1-beta1 >= 0.5: the second branch of torch's lerp
    "adam": dict(betas=[(0.9, 0.999), (0.4, 0.95)], eps=[1e-8, 1e-3],
                 weight_decay=[0.0, 0.05], amsgrad=[False, True], maximize=[False, True]),
    "adamw": dict(betas=[(0.9, 0.999), (0.4, 0.95)], eps=[1e-8, 1e-3],
                  weight_decay=[0.0, 0.1], amsgrad=[False, True], maximize=[False, True]),
    "adamax": dict(betas=[(0.9, 0.999), (0.4, 0.95)], eps=[1e-8, 1e-3],
                   weight_decay=[0.0, 0.05], maximize=[False, True]),
    "adadelta": dict(rho=[0.9, 0.4, 1.0], eps=[1e-6, 1e-3], weight_decay=[0.0, 0.05],
                     maximize=[False, True]),
    "radam": dict(betas=[(0.9, 0.999), (0.4, 0.95)], eps=[1e-8, 1e-3],
                  weight_decay=[0.0, 0.05], decoupled_weight_decay=[False, True],
                  maximize=[False, True]),
    "rprop": dict(etas=[(0.5, 1.2), (0.3, 1.6)], step_sizes=[(1e-6, 50), (1e-3, 0.1)],
                  maximize=[False, True]),
    "nadam": dict(betas=[(0.9, 0.999), (0.4, 0.95)], eps=[1e-8, 1e-3],
                  weight_decay=[0.0, 0.05], momentum_decay=[4e-3, 0.02],
                  decoupled_weight_decay=[False, True], maximize=[False, True]),
    "asgd": dict(lambd=[1e-4, 1e-2], alpha=[0.75, 0.5], t0=[1e6, 5.0],
                 weight_decay=[0.0, 0.05], maximize=[False, True]),
}
# Pairs of numeric options that vary together rather than factorially (keeps the grid
# small; each value is still covered with every boolean combination).
TIED = {"rmsprop": ("alpha", "eps"), "adam": ("betas", "eps"), "adamw": ("betas", "eps"),
        "adamax": ("betas", "eps"), "adadelta": ("rho", "eps"),
        "radam": ("betas", "eps"), "rprop": ("etas", "step_sizes"),
        "nadam": ("betas", "eps"), "asgd": ("lambd", "alpha")}


def _valid(rule, opts):
    if rule == "sgd" and opts["nesterov"]:
        return opts["momentum"] > 0 and opts["dampening"] == 0
    return True


def _fmt(value):
    if isinstance(value, bool):
        return "T" if value else "F"
    if isinstance(value, tuple):
        return "/".join(_fmt(v) for v in value)
    return f"{value:g}"


def _combos(rule):
    grid = dict(GRID[rule])
    tied = TIED.get(rule)
    if tied:
        a, b = tied
        grid[a + "+" + b] = list(zip(grid.pop(a), grid.pop(b)))
    out = []
    for values in itertools.product(*grid.values()):
        opts = {}
        for key, value in zip(grid, values):
            if "+" in key:
                opts.update(zip(key.split("+"), value))
            else:
                opts[key] = value
        if _valid(rule, opts):
            out.append(opts)
    return out


def _cases():
    for rule in CLASSES:
        for opts in _combos(rule):
            ident = rule + "-" + ",".join(f"{k}={_fmt(v)}" for k, v in opts.items())
            yield pytest.param(rule, opts, id=ident)


DTYPES = [pytest.param(np.float32, id="fp32"), pytest.param(np.float64, id="fp64")]

# ------------------------------------------------------------------------------------
# Parameters, gradients, the lock-step run
# ------------------------------------------------------------------------------------

# (shape, memory order, gradient policy); group 0 then group 1.
LAYOUT = [
    [((), "C", "every"),
     ((17,), "C", "every"),
     ((0,), "C", "every"),
     ((1,), "C", "skip3")],         # no gradient on steps 0, 3, 6, ...
    [((1003,), "C", "every"),
     ((13, 7), "F", "every"),       # gradient alternates F and C order
     ((2, 0, 3), "C", "every"),
     ((5,), "C", "never")],         # never updated: no state (but Adagrad's)
]


def _make_params(dtype, rng):
    groups = []
    for group in LAYOUT:
        arrays = []
        for shape, order, _ in group:
            arrays.append(np.array(rng.standard_normal(shape), dtype=dtype, order=order))
        groups.append(arrays)
    return groups


def _grads(dtype, rng, step):
    """One step's gradients (None where the policy skips), same for both sides."""
    scale = 10.0 ** rng.uniform(-2.0, 1.0)
    out = []
    for group in LAYOUT:
        for shape, order, policy in group:
            g = np.array(rng.standard_normal(shape) * scale, dtype=dtype)
            if order == "F" and step % 2 == 0:
                g = np.asfortranarray(g)
            if policy == "never" or (policy == "skip3" and step % 3 == 0):
                g = None
            out.append(g)
    return out


def _torch_copy(a):
    """A torch tensor with its own copy of `a`, keeping its memory order."""
    return torch.from_numpy(np.array(a, copy=True, order="K"))


class Pair:
    """A fastoptim optimizer and a torch one over equal copies of the same params."""

    def __init__(self, rule, opts, dtype, seed):
        self.rng = np.random.default_rng(seed)
        self.dtype = dtype
        groups = _make_params(dtype, self.rng)
        self.fparams = [p for g in groups for p in g]
        self.tparams = [_torch_copy(p) for p in self.fparams]
        lr = opts.get("lr", BASE[rule]["lr"])
        opts = {**BASE[rule], **opts}
        fgroups, tgroups, k = [], [], 0
        for gi, group in enumerate(groups):
            glr = lr * (GROUP1_LR_FACTOR if gi == 1 else 1.0)
            n = len(group)
            fgroups.append({"params": self.fparams[k:k + n], "lr": glr})
            tgroups.append({"params": self.tparams[k:k + n], "lr": glr})
            k += n
        fcls, tcls = CLASSES[rule]
        self.fopt = fcls(fgroups, **opts)
        self.topt = tcls(tgroups, foreach=False, **opts)
        self.step_no = 0

    def step(self):
        grads = _grads(self.dtype, self.rng, self.step_no)
        self.fopt.step(grads)
        for t, g in zip(self.tparams, grads):
            t.grad = None if g is None else _torch_copy(g)
        self.topt.step()
        self.step_no += 1

    def set_lr(self, factor):
        for fg, tg in zip(self.fopt.param_groups, self.topt.param_groups):
            fg["lr"] *= factor
            tg["lr"] *= factor

    def run(self, n_steps, lr_change_at=None):
        """Run both; return the largest error seen at the checkpoints."""
        errs = []
        for k in range(n_steps):
            if k == lr_change_at:
                errs.append(compare_optimizers(self))
                self.set_lr(LR_FACTOR)
            self.step()
        errs.append(compare_optimizers(self))
        return max(errs)


# ------------------------------------------------------------------------------------
# Comparison
# ------------------------------------------------------------------------------------

def _magnitude(arrays):
    """The largest |element| over some arrays (0.0 when all are empty)."""
    return max((float(np.abs(x).max()) for x in arrays if x.size), default=0.0)


def assert_close(name, actual, expected, dtype, scale):
    """Element-wise |actual - expected| <= TOL * eps * scale; returns the error in
    units of eps * scale.

    `scale` is the largest magnitude among the arrays of the same role (all params,
    all exp_avgs, ...). An element-relative tolerance is the wrong yardstick: an
    element that wanders through zero (a momentum buffer, a parameter) still carries
    the absolute rounding error of its history, so its relative error is large while
    the two trajectories agree to rounding. Measured per role rather than per array,
    so that a 0-d or 1-element array that happens to sit near zero at the checkpoint
    is held to the scale its values had."""
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == tuple(expected.shape), f"{name}: shape {actual.shape}"
    if actual.size == 0:
        return 0.0
    unit = float(np.finfo(dtype).eps) * scale
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOL[dtype] * unit,
                               err_msg=f"{name}: off by more than {TOL[dtype]} eps of the "
                                       f"magnitude {scale:.3g}")
    diff = float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max())
    return diff / unit if diff else 0.0


def compare_optimizers(pair):
    """Params, state arrays, state keys and step counters of both optimizers."""
    tparams = [t.numpy() for t in pair.tparams]
    scale = _magnitude(tparams)
    errs = [0.0]
    for i, (fp, tp) in enumerate(zip(pair.fparams, tparams)):
        errs.append(assert_close(f"param {i} after {pair.step_no} steps", fp, tp,
                                 pair.dtype, scale))
    fstate = pair.fopt.state
    tstate = {i: pair.topt.state[t] for i, t in enumerate(pair.tparams)
              if t in pair.topt.state and pair.topt.state[t]}
    assert sorted(fstate) == sorted(tstate), "parameters with state differ"
    scales = {}
    for i, tentry in tstate.items():
        tkeys = {k for k, v in tentry.items() if v is not None}
        assert set(fstate[i]) == tkeys, f"state keys of param {i}"
        assert fstate[i].get("step") == (int(tentry["step"]) if "step" in tentry else None), \
            f"step count of param {i}"
        for key in tkeys - {"step"}:
            scales[key] = max(scales.get(key, 0.0), _magnitude([tentry[key].numpy()]))
    for i, tentry in tstate.items():
        for key in scales:
            if key in tentry:
                want = tentry[key].numpy()    # (NAdam's mu_product: float32 for both)
                errs.append(assert_close(f"state[{i}][{key!r}] after {pair.step_no} steps",
                                         fstate[i][key], want,
                                         pair.dtype if want.ndim else want.dtype.type,
                                         scales[key]))
    return max(errs)


# ------------------------------------------------------------------------------------
# The optimizer classes
# ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule,opts", list(_cases()))
def test_class_matches_torch(rule, opts, dtype):
    pair = Pair(rule, opts, dtype, seed=SEED)
    pair.run(N_STEPS, lr_change_at=LR_CHANGE_AT)
    # the counters compared with torch's above are the ones the policies imply
    if rule != "sgd":
        policies = [policy for group in LAYOUT for _, _, policy in group]
        expected = {"every": N_STEPS, "skip3": N_STEPS - (N_STEPS + 2) // 3, "never": 0}
        for i, policy in enumerate(policies):
            assert pair.fopt.state.get(i, {}).get("step", 0) == expected[policy]


# ------------------------------------------------------------------------------------
# The functional API (and the NumPy specification) on single arrays
# ------------------------------------------------------------------------------------

# Per rule: a few option sets. The empty one calls with no hyperparameters at all, so
# the defaults of both APIs are compared too.
FUNCTIONAL_CASES = {
    "sgd": [dict(), dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
            dict(lr=0.05, momentum=0.9, dampening=0.25, weight_decay=0.01, maximize=True)],
    "adagrad": [dict(), dict(lr=0.05, lr_decay=0.01, weight_decay=0.02, eps=0.1,
                             maximize=True)],
    "rmsprop": [dict(), dict(lr=0.01, alpha=0.4, weight_decay=0.02, momentum=0.8,
                             centered=True, maximize=True),
                dict(lr=0.01, centered=True)],
    "adam": [dict(), dict(lr=0.01, betas=(0.4, 0.95), eps=1e-3, weight_decay=0.05,
                          amsgrad=True, maximize=True)],
    "adamw": [dict(), dict(lr=0.01, betas=(0.4, 0.95), eps=1e-3, weight_decay=0.1,
                           amsgrad=True, maximize=True)],
    "adamax": [dict(), dict(lr=0.01, betas=(0.4, 0.95), eps=1e-3, weight_decay=0.05,
                            maximize=True)],
    "adadelta": [dict(), dict(lr=0.5, rho=0.4, eps=1e-3, weight_decay=0.05, maximize=True)],
    "radam": [dict(), dict(lr=0.01, betas=(0.4, 0.95), eps=1e-3, weight_decay=0.05,
                           decoupled_weight_decay=True, maximize=True)],
    "rprop": [dict(), dict(lr=0.05, etas=(0.3, 1.6), step_sizes=(1e-3, 0.1), maximize=True)],
    "nadam": [dict(), dict(lr=0.01, betas=(0.4, 0.95), eps=1e-3, weight_decay=0.05,
                           momentum_decay=0.02, decoupled_weight_decay=True, maximize=True)],
    "asgd": [dict(), dict(lr=0.05, lambd=1e-3, alpha=0.6, t0=5.0, weight_decay=0.05,
                          maximize=True)],
}
# torch's state names, in the order of the functional API's state arguments
STATE_ARGS = {
    "sgd": ["momentum_buffer"],
    "adagrad": ["sum"],
    "rmsprop": ["square_avg", "grad_avg", "momentum_buffer"],
    "adam": ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
    "adamw": ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
    "adamax": ["exp_avg", "exp_inf"],
    "adadelta": ["square_avg", "acc_delta"],
    "radam": ["exp_avg", "exp_avg_sq"],
    "rprop": ["prev", "step_size"],
    "nadam": ["exp_avg", "exp_avg_sq", "mu_product"],
    "asgd": ["ax", "eta", "mu"],
}


def _state_names(rule, opts):
    """The state arrays a rule keeps with these options (torch's names)."""
    if rule == "sgd":
        return ["momentum_buffer"] if opts.get("momentum", 0.0) != 0 else []
    if rule == "adagrad":
        return ["sum"]
    if rule == "rmsprop":
        return (["square_avg"] + (["grad_avg"] if opts.get("centered") else [])
                + (["momentum_buffer"] if opts.get("momentum", 0.0) > 0 else []))
    if rule == "adamax":
        return ["exp_avg", "exp_inf"]
    if rule == "adadelta":
        return ["square_avg", "acc_delta"]
    if rule == "radam":
        return ["exp_avg", "exp_avg_sq"]
    if rule == "rprop":
        return ["prev", "step_size"]
    if rule == "nadam":
        return ["exp_avg", "exp_avg_sq", "mu_product"]
    if rule == "asgd":
        return ["ax", "eta", "mu"]
    return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if opts.get("amsgrad") else [])


def _functional_cases():
    for rule, cases in FUNCTIONAL_CASES.items():
        for opts in cases:
            ident = rule + "-" + (",".join(f"{k}={_fmt(v)}" for k, v in opts.items())
                                  or "defaults")
            yield pytest.param(rule, opts, id=ident)


def _call(module, rule, p, g, state, steps, opts):
    fn = getattr(module, rule + "_")
    arrays = [state.get(name) for name in STATE_ARGS[rule]]
    if rule == "adagrad":
        return fn(p, g, arrays[0], steps, **opts)
    return fn(p, g, *arrays, steps, **opts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", [pytest.param(F, id="functional"),
                                  pytest.param(R, id="reference")])
@pytest.mark.parametrize("rule,opts", list(_functional_cases()))
def test_functional_matches_torch(rule, opts, impl, dtype):
    rng = np.random.default_rng(SEED + 1)
    p = np.array(rng.standard_normal((37, 29)), dtype=dtype, order="F")
    t = _torch_copy(p)
    topt = CLASSES[rule][1]([t], foreach=False, **opts)
    names = _state_names(rule, opts)
    state = {n: np.zeros_like(p) for n in names}
    if rule == "rprop":                    # (torch's initial step sizes: lr)
        state["step_size"][...] = opts.get("lr", 1e-2)
    if rule == "nadam":                    # (one float32 number, from 1)
        state["mu_product"] = np.ones((), np.float32)
    if rule == "asgd":                     # (float32 numbers: eta from lr, mu from 1)
        state["eta"] = np.full((), opts.get("lr", 1e-2), np.float32)
        state["mu"] = np.ones((), np.float32)
    steps = np.zeros(1, dtype=np.int64)
    for k in range(N_STEPS):
        g = np.array(rng.standard_normal(p.shape) * 10.0 ** rng.uniform(-2, 1), dtype=dtype,
                     order="F" if k % 2 else "C")
        _call(impl, rule, p, g, state, steps, opts)
        t.grad = _torch_copy(g)
        topt.step()
    tstate = topt.state[t]
    assert_close("param", p, t.numpy(), dtype, _magnitude([t.numpy()]))
    for name in names:
        expected = tstate[name].numpy()
        assert_close(name, state[name], expected, dtype if expected.ndim else
                     expected.dtype.type, _magnitude([expected]))
    assert set(names) == {k for k, v in tstate.items() if k != "step" and v is not None}
    if "step" in tstate:
        assert steps[0] == int(tstate["step"]) == N_STEPS


# ------------------------------------------------------------------------------------
# Threads: results do not depend on the thread count, above the serial threshold and
# with thread pieces that cross array boundaries
# ------------------------------------------------------------------------------------

THREAD_OPTS = {
    "sgd": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adagrad": dict(lr=0.05, lr_decay=0.01, weight_decay=0.02),
    "rmsprop": dict(lr=0.01, momentum=0.8, centered=True, weight_decay=0.02),
    "adam": dict(lr=0.01, amsgrad=True, weight_decay=0.05),
    "adamw": dict(lr=0.01, amsgrad=True, weight_decay=0.1),
    "adamax": dict(lr=0.01, weight_decay=0.05),
    "adadelta": dict(lr=0.5, weight_decay=0.05),
    "radam": dict(lr=0.01, weight_decay=0.05),
    "rprop": dict(lr=0.05, step_sizes=(1e-4, 0.5)),
    "nadam": dict(lr=0.01, weight_decay=0.05),
    "asgd": dict(lr=0.05, t0=3.0, weight_decay=0.05),
}


# A fixed serial threshold (instead of the per-rule one calibrated at first use), so
# that the sizes below are known to take the parallel path.
THRESHOLD = 1 << 15


@pytest.fixture
def fixed_threshold():
    fastoptim.set_serial_threshold(THRESHOLD)
    yield
    fastoptim.set_num_threads(None)
    fastoptim.set_serial_threshold(None)


def _bits(a):
    return a.dtype.str, a.shape, a.tobytes(order="A")


def _thread_run(rule, dtype, n_threads, shapes, n_steps):
    rng = np.random.default_rng(SEED + 3)
    params = [np.array(rng.standard_normal(s), dtype=dtype, order=o) for s, o in shapes]
    fastoptim.set_num_threads(n_threads)
    opt = CLASSES[rule][0](params, **THREAD_OPTS[rule])
    for _ in range(n_steps):
        opt.step([np.array(rng.standard_normal(p.shape), dtype=dtype, order="K")
                  for p in params])
    return params, opt.state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", list(CLASSES))
def test_thread_count_does_not_change_results(rule, dtype, fixed_threshold):
    if fastoptim.config()["omp_max_threads"] < 2 or not fastoptim.config()["openmp"]:
        pytest.skip("needs OpenMP")
    big = fastoptim.get_serial_threshold() + 1003
    shapes = [((17,), "C"), ((big,), "C"), ((), "C"), ((131, 67), "F"), ((1,), "C")]
    results = [_thread_run(rule, dtype, n, shapes, 12) for n in (1, 2)]
    # and tiny steps forced onto the thread team: pieces split inside small arrays
    fastoptim.set_serial_threshold(0)
    small = [((17,), "C"), ((3,), "C"), ((), "C"), ((5, 9), "F"), ((40,), "C")]
    results += [_thread_run(rule, dtype, n, small, 12) for n in (1, 2)]
    for (p1, s1), (p2, s2) in (results[:2], results[2:]):
        for i, (a, b) in enumerate(zip(p1, p2)):
            assert _bits(a) == _bits(b), f"param {i} differs between 1 and 2 threads"
        assert sorted(s1) == sorted(s2)
        for i in s1:
            assert sorted(s1[i]) == sorted(s2[i])
            for key in s1[i]:
                if key == "step":
                    assert s1[i][key] == s2[i][key]
                else:
                    assert _bits(s1[i][key]) == _bits(s2[i][key]), \
                        f"state[{i}][{key!r}] differs between 1 and 2 threads"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", list(CLASSES))
def test_threaded_large_step_matches_torch(rule, dtype, fixed_threshold):
    """The parallel path (above the serial threshold) against torch, a few steps."""
    fastoptim.set_num_threads(2)
    big = fastoptim.get_serial_threshold() + 1003
    rng = np.random.default_rng(SEED + 2)
    params = [np.array(rng.standard_normal(s), dtype=dtype) for s in ((big,), (17,))]
    tparams = [_torch_copy(p) for p in params]
    fopt = CLASSES[rule][0](params, **THREAD_OPTS[rule])
    topt = CLASSES[rule][1](tparams, foreach=False, **THREAD_OPTS[rule])
    for _ in range(10):
        grads = [np.array(rng.standard_normal(p.shape), dtype=dtype) for p in params]
        fopt.step(grads)
        for t, g in zip(tparams, grads):
            t.grad = _torch_copy(g)
        topt.step()
    scale = _magnitude([t.numpy() for t in tparams])
    for i, (p, t) in enumerate(zip(params, tparams)):
        assert_close(f"param {i}", p, t.numpy(), dtype, scale)
    for key in fopt.state[0]:
        if key != "step":
            expected = [topt.state[t][key].numpy() for t in tparams]
            for i, x in enumerate(expected):
                assert_close(f"state[{i}][{key!r}]", fopt.state[i][key], x,
                             dtype if x.ndim else x.dtype.type, _magnitude(expected))
