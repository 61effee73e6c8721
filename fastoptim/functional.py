"""Compiled, stateless, in-place update functions.

Same signatures and effects as :mod:`fastoptim.reference` (read it for the formulas).
Each function checks its hyperparameters (the ranges torch.optim checks, finite, the
right types) and its arrays (dtype, shape, contiguity, writeability, memory overlap),
all before any array is written, then makes one compiled call for the whole list of
arrays with the GIL released once. A refused call raises ``TypeError``/``ValueError`` naming the argument
and leaves every array, and ``steps``, unchanged.

``prepare_*`` do the checking and return a ready ``Step`` whose ``run(n_threads)``
cannot fail; the optimizer classes use them to check every parameter group before
updating any.
"""
import inspect

import numpy as np

from . import _config
from .reference import adopt_clip  # noqa: F401  (ADOPT's default clip)
from .reference import bfloat16_to_float32, float32_to_bfloat16   # bfloat16 state format
from .rules import RuleSpec, spec

__all__ = ["sgd_", "adagrad_", "rmsprop_", "adam_", "adamw_", "adamax_", "adadelta_",
           "radam_", "rprop_", "nadam_", "asgd_", "lion_", "adopt_", "ademamix_",
           "sophiah_", "adamw_schedulefree_", "adafactor_", "adahessian_",
           "newton_", "bfloat16_to_float32", "float32_to_bfloat16"]

_k = _config._kernels


# --- prepare: check everything, return a runnable Step -------------------------------
# The checks themselves run in the kernel module (compiled: a tiny step must cost about
# a microsecond); these functions give them torch's keyword signatures.

def prepare_sgd(params, grads, momentum_buffers=None, steps=None, *, lr=1e-3,
                momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                maximize=False, state_dtype=None, rounding="nearest", seed=0, absmaxes=None):
    return _k.prepare_sgd(params, grads, momentum_buffers, steps, lr, momentum, dampening,
                          nesterov, weight_decay, maximize, state_dtype, rounding, seed,
                          absmaxes)


def prepare_adagrad(params, grads, state_sums, steps, *, lr=1e-2, lr_decay=0.0,
                    weight_decay=0.0, eps=1e-10, maximize=False, state_dtype=None,
                    rounding="nearest", seed=0, absmaxes=None):
    return _k.prepare_adagrad(params, grads, state_sums, steps, lr, lr_decay, weight_decay,
                              eps, maximize, state_dtype, rounding, seed, absmaxes)


def prepare_rmsprop(params, grads, square_avgs, grad_avgs=None, momentum_buffers=None,
                    steps=None, *, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
                    momentum=0.0, centered=False, maximize=False, state_dtype=None,
                    rounding="nearest", seed=0, absmaxes=None):
    return _k.prepare_rmsprop(params, grads, square_avgs, grad_avgs, momentum_buffers, steps,
                              lr, alpha, eps, weight_decay, momentum, centered, maximize,
                              state_dtype, rounding, seed, absmaxes)


def prepare_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, steps=None,
                 *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, maximize=False, decoupled_weight_decay=False,
                 state_dtype=None, rounding="nearest", seed=0, absmaxes=None):
    return _k.prepare_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr,
                           betas, eps, weight_decay, amsgrad, maximize,
                           decoupled_weight_decay, state_dtype, rounding, seed, absmaxes)


def prepare_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, steps=None,
                  *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                  amsgrad=False, maximize=False, state_dtype=None, rounding="nearest",
                  seed=0, absmaxes=None):
    return _k.prepare_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr,
                           betas, eps, weight_decay, amsgrad, maximize, True, state_dtype,
                           rounding, seed, absmaxes)


def prepare_adamax(params, grads, exp_avgs, exp_infs, steps, *, lr=2e-3,
                   betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False,
                   state_dtype=None, rounding="nearest", seed=0, absmaxes=None):
    return _k.prepare_adamax(params, grads, exp_avgs, exp_infs, steps, lr, betas, eps,
                             weight_decay, maximize, state_dtype, rounding, seed, absmaxes)


def prepare_adadelta(params, grads, square_avgs, acc_deltas, steps, *, lr=1.0, rho=0.9,
                     eps=1e-6, weight_decay=0.0, maximize=False, state_dtype=None,
                     rounding="nearest", seed=0, absmaxes=None):
    return _k.prepare_adadelta(params, grads, square_avgs, acc_deltas, steps, lr, rho, eps,
                               weight_decay, maximize, state_dtype, rounding, seed,
                               absmaxes)


def prepare_radam(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr=1e-3,
                  betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                  decoupled_weight_decay=False, maximize=False, state_dtype=None,
                  rounding="nearest", seed=0, absmaxes=None):
    return _k.prepare_radam(params, grads, exp_avgs, exp_avg_sqs, steps, lr, betas, eps,
                            weight_decay, decoupled_weight_decay, maximize, state_dtype,
                            rounding, seed, absmaxes)


def prepare_rprop(params, grads, prevs, step_size_arrays, steps, *, lr=1e-2, etas=(0.5, 1.2),
                  step_sizes=(1e-6, 50), maximize=False, state_dtype=None,
                  rounding="nearest", seed=0, absmaxes=None):
    return _k.prepare_rprop(params, grads, prevs, step_size_arrays, steps, lr, etas,
                            step_sizes, maximize, state_dtype, rounding, seed, absmaxes)


def prepare_nadam(params, grads, exp_avgs, exp_avg_sqs, mu_products, steps, *, lr=2e-3,
                  betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, momentum_decay=4e-3,
                  decoupled_weight_decay=False, maximize=False, state_dtype=None,
                  rounding="nearest", seed=0, absmaxes=None):
    return _k.prepare_nadam(params, grads, exp_avgs, exp_avg_sqs, mu_products, steps, lr,
                            betas, eps, weight_decay, momentum_decay,
                            decoupled_weight_decay, maximize, state_dtype, rounding, seed,
                            absmaxes)


def prepare_asgd(params, grads, axs, etas, mus, steps, *, lr=1e-2, lambd=1e-4, alpha=0.75,
                 t0=1e6, weight_decay=0.0, maximize=False, state_dtype=None,
                 rounding="nearest", seed=0, absmaxes=None):
    return _k.prepare_asgd(params, grads, axs, etas, mus, steps, lr, lambd, alpha, t0,
                           weight_decay, maximize, state_dtype, rounding, seed, absmaxes)


def prepare_lion(params, grads, exp_avgs, steps=None, *, lr=1e-4, betas=(0.9, 0.99),
                 weight_decay=0.0, maximize=False, state_dtype=None, rounding="nearest",
                 seed=0, absmaxes=None):
    return _k.prepare_lion(params, grads, exp_avgs, steps, lr, betas, weight_decay,
                           maximize, state_dtype, rounding, seed, absmaxes)


def prepare_adopt(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr=1e-3,
                  betas=(0.9, 0.9999), clip_lambda=adopt_clip, weight_decay=0.0,
                  weight_decouple=False, fixed_decay=False, eps=1e-6, maximize=False,
                  state_dtype=None, rounding="nearest", seed=0, absmaxes=None):
    return _k.prepare_adopt(params, grads, exp_avgs, exp_avg_sqs, steps, lr, betas,
                            clip_lambda, weight_decay, weight_decouple, fixed_decay, eps,
                            maximize, state_dtype, rounding, seed, absmaxes)


def prepare_ademamix(params, grads, exp_avgs, exp_avg_sqs, exp_avg_slows, steps, *, lr=1e-3,
                     betas=(0.9, 0.999, 0.9999), weight_decay=0.0, weight_decouple=False,
                     fixed_decay=False, alpha=5.0, t_alpha_beta3=None, eps=1e-8,
                     maximize=False, state_dtype=None, rounding="nearest", seed=0,
                     absmaxes=None):
    return _k.prepare_ademamix(params, grads, exp_avgs, exp_avg_sqs, exp_avg_slows, steps,
                               lr, betas, weight_decay, weight_decouple, fixed_decay, alpha,
                               t_alpha_beta3, eps, maximize, state_dtype, rounding, seed,
                               absmaxes)


def prepare_sophiah(params, grads, hessians, momentums, hessian_moments, steps, *, lr=6e-2,
                    betas=(0.96, 0.99), weight_decay=0.0, weight_decouple=True,
                    fixed_decay=False, p=1e-2, eps=1e-12, maximize=False, state_dtype=None,
                    rounding="nearest", seed=0, absmaxes=None):
    return _k.prepare_sophiah(params, grads, hessians, momentums, hessian_moments, steps, lr,
                              betas, weight_decay, weight_decouple, fixed_decay, p, eps,
                              maximize, state_dtype, rounding, seed, absmaxes)


def prepare_adamw_schedulefree(params, grads, zs, exp_avg_sqs, steps, *, lr=0.0025,
                               betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, ckp1=1.0,
                               maximize=False):
    return _k.prepare_adamw_schedulefree(params, grads, zs, exp_avg_sqs, steps, lr, betas,
                                         eps, weight_decay, ckp1, maximize)


def prepare_adafactor(params, grads, row_vars, col_vars, variances, steps, *, lr=1e-2,
                      beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0,
                      maximize=False):
    return _k.prepare_adafactor(params, grads, row_vars, col_vars, variances, steps, lr,
                                beta2_decay, eps, d, weight_decay, maximize)


def prepare_adahessian(params, grads, hessian_diags, exp_avgs, exp_hessian_diag_sqs,
                       steps, *, lr=0.15, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.0,
                       hessian_power=1.0, maximize=False):
    return _k.prepare_adahessian(params, grads, hessian_diags, exp_avgs,
                                 exp_hessian_diag_sqs, steps, lr, betas, eps, weight_decay,
                                 hessian_power, maximize)


def caller(rule):
    """The function ``call(params, grads, states, steps, options, *inputs)`` (the
    rule's inputs by name) that
    :func:`prepare` calls for ``rule`` (a RuleSpec or its name; the classes keep it).
    It is written out from the registry once, as namedtuple and dataclasses
    write theirs: the classes prepare every group at every step, and a generic loop
    over names cost ~0.8 us a call more than this straight line of lookups. The kernel
    module's prepare_<kernel> takes the options positionally, in the order of the
    keyword-only arguments of this module's prepare_<kernel> (each passes them on in
    that order)."""
    name = rule.name if isinstance(rule, RuleSpec) else rule
    call = _CALLERS.get(name)
    if call is not None:
        return call
    s = spec(name)
    opts = _kernel_options(s)
    lists = [f"states.get({n!r})" for n in s.kernel_state]
    lists += [f"states.get({n!r})" for n, _ in s.scalar_state]
    steps = "steps"
    if not s.counts_steps:              # (SGD: step counts only with a momentum buffer)
        steps = f"steps if {' or '.join(f'{x} is not None' for x in lists)} else None"
    fast = [repr(s.kernel_options[n]) if n in s.kernel_options
            else f"states.get({n!r})" if n in _FROM_STATES else f"options[{n!r}]"
            for n, _ in opts]
    slow = [repr(s.kernel_options[n]) if n in s.kernel_options
            else f"states.get({n!r})" if n in _FROM_STATES
            else f"(options[{n!r}] if {n!r} in options else defaults[{n!r}])"
            for n, _ in opts]
    inputs = "".join(f"{n}, " for n in s.inputs)
    head = f"kernel(params, grads, {inputs}{', '.join(lists + [steps])}, "
    src = (f"def call(params, grads, states, steps, options, {inputs}):\n"
           f"    try:\n"
           f"        return {head}{', '.join(fast)})\n"
           f"    except KeyError:\n"
           f"        pass\n"
           f"    return {head}{', '.join(slow)})\n")
    # a missing option takes the rule's default (AdamW's weight decay is not Adam's)
    namespace = {"kernel": getattr(_k, f"prepare_{s.kernel}"),
                 "defaults": dict(opts, **s.defaults)}
    exec(compile(src, f"<fastoptim.functional: prepare {name}>", "exec"), namespace)
    _CALLERS[name] = call = namespace["call"]
    return call


def _kernel_options(s):
    """``(name, default)`` of the options of rule ``s``'s kernel: the keyword-only
    arguments of this module's prepare_<kernel>, in the order it passes them on to the
    kernel module (positionally, after the arrays and the steps)."""
    sig = inspect.signature(globals()[f"prepare_{s.kernel}"])
    return [(n, p.default) for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY]


_CALLERS = {}
#: keyword arguments of prepare_* that are part of an optimizer's state, not options:
#: :func:`prepare` takes them from ``states`` (8-bit state's block scales)
_FROM_STATES = ("absmaxes",)


def prepare(rule, params, grads, states, steps, options, *inputs):
    """A rule's prepared step from what an optimizer holds, through the registry.

    ``rule``: a :class:`fastoptim.rules.RuleSpec` or its name. ``states``: the state
    lists by name (``{"exp_avg": [...], ...}``; a state the options leave out may be
    absent), in any order: the registry orders them as the rule's ``prepare_*`` takes
    them. ``options``: a parameter group (keys the rule's ``prepare_*`` does not take
    are ignored; those it takes and the group lacks keep their defaults; the rule's
    fixed options, such as AdamW's decoupled weight decay, are added). ``inputs``:
    read-only arrays that come before the state (AdaHessian's Hessian diagonals).
    ``steps`` is passed when the rule counts steps or keeps state under these options.
    Same checks and errors as the rule's ``prepare_*``.
    """
    return caller(rule)(params, grads, states, steps, options, *inputs)


class NewtonStep:
    """A checked Newton update: every solve is done, ``run()`` only subtracts.

    Newton's rule is not element-wise: its work is a dense factorization per
    parameter, done by LAPACK through ``numpy.linalg`` (the "compiled kernel" of this
    rule). So the solves happen while preparing, where a singular system can still be
    refused with every array unchanged, and ``run()`` cannot fail.
    """

    def __init__(self, params, deltas, index, steps):
        self._params = params
        self._deltas = deltas
        self._index = index
        self._steps = steps
        self._done = False

    @property
    def size(self):
        """Number of elements this step updates (summed over arrays)."""
        return sum(p.size for p in self._params)

    @property
    def count(self):
        """Number of arrays this step updates."""
        return len(self._params)

    def run(self, n_threads=1):
        """Apply the update in place. Runs at most once. (``n_threads`` is accepted
        for the Step interface; LAPACK's threads are those of NumPy's BLAS.)"""
        if self._done:
            raise RuntimeError("this step has already run")
        self._done = True
        if self._steps is not None:
            for i in self._index:
                self._steps[i] += 1
        for p, d in zip(self._params, self._deltas):
            p -= d


def _hessian_matrix(h, p, i):
    """hessians[i] (array, or callable of p) as a checked (n, n) float64 matrix."""
    where = f"hessians[{i}]"
    if h is None:
        raise ValueError(f"{where} is None but grads[{i}] is not; a Hessian is needed "
                         f"for every updated parameter")
    if callable(h) and not isinstance(h, np.ndarray):
        h = h(p)
        where = f"hessians[{i}](params[{i}])"
    if not isinstance(h, np.ndarray):
        try:
            h = np.asarray(h)
        except Exception:
            raise TypeError(f"{where} must be an array, got {type(h).__name__}") from None
    if h.dtype.kind not in "fiu":
        raise TypeError(f"{where} must hold real numbers, got dtype {h.dtype}")
    n = p.size
    if h.shape != (n, n) and h.shape != p.shape + p.shape:
        raise ValueError(f"{where} has shape {h.shape}; expected ({n}, {n}) or "
                         f"{p.shape + p.shape} for params[{i}] of shape {p.shape}")
    return np.asarray(h, dtype=np.float64).reshape(n, n), where


def prepare_newton(params, grads, hessians, steps=None, *, lr=1.0, damping=0.0,
                   saddle_free=False):
    lr = _k.real_arg("learning rate", lr, low=0.0)
    damping = _k.real_arg("damping", damping, low=0.0)
    saddle_free = _k.flag_arg("saddle_free", saddle_free)
    params, grads = _k.array_list("params", params), _k.array_list("grads", grads)
    if callable(hessians) and not isinstance(hessians, np.ndarray):
        hessians = [hessians]
    hessians = _k.array_list("hessians", hessians)
    # The array checks of every rule (dtype, shape, contiguity, writeability, overlap,
    # steps), by preparing -- never running -- a plain SGD step on the same arrays.
    _k.prepare_sgd(params, grads, None, steps, 0.0, 0.0, 0.0, False, 0.0, False)
    if len(hessians) != len(params):
        raise ValueError(f"hessians has {len(hessians)} entries, expected {len(params)} "
                         f"(one per parameter)")
    todo, deltas, index = [], [], []
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        h, where = _hessian_matrix(hessians[i], p, i)
        g64 = np.asarray(g, dtype=np.float64).reshape(-1)
        if saddle_free:
            scale = max(1.0, float(np.max(np.abs(h), initial=0.0)))
            if not np.all(np.abs(h - h.T) <= 1e-6 * scale):
                raise ValueError(f"{where} is not symmetric; saddle_free=True needs a "
                                 f"symmetric Hessian (eigh reads one triangle)")
            lam, q = np.linalg.eigh(h)
            curv = np.abs(lam) + damping
            if np.any(curv == 0):
                raise np.linalg.LinAlgError(
                    f"|{where}| + damping*I is singular; use damping > 0")
            delta = q @ ((q.T @ g64) / curv)
        else:
            try:
                delta = np.linalg.solve(h + damping * np.eye(p.size), g64)
            except np.linalg.LinAlgError as e:
                raise np.linalg.LinAlgError(
                    f"{where} + damping*I is singular ({e}); use damping > 0") from None
        todo.append(p)
        deltas.append((lr * delta).astype(p.dtype).reshape(p.shape))
        index.append(i)
    return NewtonStep(todo, deltas, index, steps)

# --- the public in-place functions: prepare_*, then run ----------------------------------

def _in_place(prepare_fn, doc):
    """The public function of a prepare_*: the same signature, checks and errors; it
    runs the step at once on fastoptim's thread count. Written out from the signature,
    calling the kernel module as the prepare_* does (the options positionally, in the
    order of the keyword-only arguments of prepare_<kernel>; those this function does
    not take are the registry's fixed ones, AdamW's decoupled weight decay): a wrapper
    taking ``*args, **kwargs`` through the prepare_* cost ~0.3 us a call more."""
    sig = inspect.signature(prepare_fn)
    rule = prepare_fn.__name__[len("prepare_"):]
    s = spec(rule)
    params = []
    for n, p in sig.parameters.items():
        if p.kind is p.KEYWORD_ONLY and "*" not in params:
            params.append("*")
        params.append(n if p.default is p.empty else f"{n}=defaults[{n!r}]")
    passed = [n for n, p in sig.parameters.items() if p.kind is not p.KEYWORD_ONLY]
    passed += [n if n in sig.parameters else repr(s.kernel_options[n])
               for n, _ in _kernel_options(s)]
    src = (f"def {rule}_({', '.join(params)}):\n"
           f"    kernel({', '.join(passed)}).run(threads())\n")
    namespace = {"kernel": getattr(_k, f"prepare_{s.kernel}"),
                 "threads": _config.get_num_threads,
                 "defaults": {n: p.default for n, p in sig.parameters.items()}}
    exec(compile(src, f"<fastoptim.functional: {rule}_>", "exec"), namespace)
    update = namespace[f"{rule}_"]
    update.__doc__ = doc
    update.__module__ = __name__
    return update


sgd_ = _in_place(prepare_sgd, """SGD with optional (Nesterov) momentum, in place. See
    :func:`reference.sgd_` (also for ``state_dtype="bfloat16"``).""")
adagrad_ = _in_place(prepare_adagrad, """AdaGrad, in place. See :func:`reference.adagrad_`
    (also for ``state_dtype="bfloat16"``).""")
rmsprop_ = _in_place(prepare_rmsprop, """RMSProp, in place. See :func:`reference.rmsprop_`
    (also for ``state_dtype="bfloat16"``).""")
adam_ = _in_place(prepare_adam, """Adam (or AdamW with ``decoupled_weight_decay``), in place.
    See :func:`reference.adam_` (also for ``state_dtype="bfloat16"``).""")
adamw_ = _in_place(prepare_adamw, """AdamW (decoupled weight decay), in place. See
    :func:`reference.adamw_`.""")
adamax_ = _in_place(prepare_adamax, """Adamax, in place. See :func:`reference.adamax_`.""")
adadelta_ = _in_place(prepare_adadelta, """Adadelta, in place. See
    :func:`reference.adadelta_`.""")
radam_ = _in_place(prepare_radam, """RAdam (rectified Adam), in place. See
    :func:`reference.radam_`.""")
rprop_ = _in_place(prepare_rprop, """Rprop, in place. See :func:`reference.rprop_`;
    ``step_size_arrays`` start at ``lr`` (the optimizer's initial state).""")
nadam_ = _in_place(prepare_nadam, """NAdam, in place. See :func:`reference.nadam_`;
    ``mu_products``: one 0-d float32 array per parameter, starting at 1.""")
asgd_ = _in_place(prepare_asgd, """ASGD (averaged SGD), in place. See
    :func:`reference.asgd_`; ``etas`` (starting at lr) and ``mus`` (starting at 1): one
    0-d float32 array per parameter each.""")
lion_ = _in_place(prepare_lion, """Lion (sign of the interpolated momentum), in place. See
    :func:`reference.lion_`; ``steps`` is optional (Lion counts none).""")
adopt_ = _in_place(prepare_adopt, """ADOPT, in place. See :func:`reference.adopt_`;
    ``clip_lambda`` is called with each parameter's step when the update is checked.""")
ademamix_ = _in_place(prepare_ademamix, """AdEMAMix, in place. See
    :func:`reference.ademamix_`.""")
sophiah_ = _in_place(prepare_sophiah, """SophiaH, in place. See :func:`reference.sophiah_`;
    ``hessians`` (one Hessian-diagonal estimate per parameter) on the steps that update
    the Hessian moment, None on the others.""")
adamw_schedulefree_ = _in_place(prepare_adamw_schedulefree, """Schedule-Free AdamW, in
    place. See :func:`reference.adamw_schedulefree_`; ``lr`` and ``ckp1`` are this step's
    (:func:`reference.schedulefree_schedule`).""")
adafactor_ = _in_place(prepare_adafactor, """Adafactor, in place. See
    :func:`reference.adafactor_`: a parameter of two or more dimensions (C-contiguous)
    keeps ``row_vars[i]`` and ``col_vars[i]`` (its shape with the last, or the one
    before, axis 1) and ``variances[i] = None``; a vector or 0-d one ``variances[i]``
    (its shape) and None factors. Not element-wise: two or three compiled parallel
    passes per parameter.""")
adahessian_ = _in_place(prepare_adahessian, """AdaHessian, in place, from Hessian-diagonal
    estimates (one per parameter). See :func:`reference.adahessian_`; estimate the
    diagonals with :func:`fastoptim.hessian.hutchinson_diag` (or
    :mod:`fastoptim.torch_hessian`).""")


def newton_(params, grads, hessians, steps=None, *, lr=1.0, damping=0.0,
            saddle_free=False):
    """Damped (optionally saddle-free) Newton steps, in place. See
    :func:`reference.newton_`. Not an element-wise rule: each parameter's step is a
    dense solve by LAPACK (``numpy.linalg``), all done before any array is written;
    a singular system raises ``numpy.linalg.LinAlgError`` (a ``ValueError``)."""
    prepare_newton(params, grads, hessians, steps, lr=lr, damping=damping,
                   saddle_free=saddle_free).run(_config.get_num_threads())
