"""Compiled, stateless, in-place update functions.

Same signatures and effects as :mod:`fastoptim.reference` (read it for the formulas).
Each function checks its hyperparameters here and its arrays in the kernel module
(dtype, shape, contiguity, writeability, memory overlap), all before any array is
written, then makes one compiled call for the whole list of arrays with the GIL
released once. A refused call raises ``TypeError``/``ValueError`` naming the argument
and leaves every array, and ``steps``, unchanged.

``prepare_*`` do the checking and return a ready ``Step`` whose ``run(n_threads)``
cannot fail; the optimizer classes use them to check every parameter group before
updating any.
"""
import math
import numbers

import numpy as np

from . import _config

__all__ = ["sgd_", "adagrad_", "rmsprop_", "adam_", "adamw_", "adahessian_", "newton_"]

_k = _config._kernels


# --- hyperparameter checks ---------------------------------------------------------

def _real(name, value, *, low=None, low_open=False, high=None, high_open=False):
    """Return value as a float after checking it is a finite real within bounds."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "fiu":
            value = value.item()
        else:
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"Invalid {name}: {value} (must be {'>' if low_open else '>='} {low})")
    if high is not None and (v >= high if high_open else v > high):
        raise ValueError(f"Invalid {name}: {value} (must be {'<' if high_open else '<='} {high})")
    return v


def _flag(name, value):
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _betas(betas):
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    return (_real("beta parameter at index 0", betas[0], low=0.0, high=1.0, high_open=True),
            _real("beta parameter at index 1", betas[1], low=0.0, high=1.0, high_open=True))


def _arrays(name, x):
    """A list of the caller's arrays: one ndarray becomes a one-element list."""
    if isinstance(x, list):
        return x
    if isinstance(x, np.ndarray):
        return [x]
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"{name} must be an ndarray or a list/tuple of ndarrays, "
                    f"got {type(x).__name__}")


def _optional_arrays(name, x):
    return None if x is None else _arrays(name, x)


# --- prepare: check everything, return a runnable Step -------------------------------

def prepare_sgd(params, grads, momentum_buffers=None, steps=None, *, lr=1e-3,
                momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                maximize=False):
    lr = _real("learning rate", lr, low=0.0)
    momentum = _real("momentum value", momentum, low=0.0)
    dampening = _real("dampening", dampening)
    weight_decay = _real("weight_decay value", weight_decay, low=0.0)
    nesterov = _flag("nesterov", nesterov)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    return _k.prepare_sgd(
        _arrays("params", params), _arrays("grads", grads),
        _optional_arrays("momentum_buffers", momentum_buffers), steps,
        lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
        weight_decay=weight_decay, maximize=_flag("maximize", maximize))


def prepare_adagrad(params, grads, state_sums, steps, *, lr=1e-2, lr_decay=0.0,
                    weight_decay=0.0, eps=1e-10, maximize=False):
    return _k.prepare_adagrad(
        _arrays("params", params), _arrays("grads", grads),
        _arrays("state_sums", state_sums), steps,
        lr=_real("learning rate", lr, low=0.0),
        lr_decay=_real("lr_decay value", lr_decay, low=0.0),
        weight_decay=_real("weight_decay value", weight_decay, low=0.0),
        eps=_real("epsilon value", eps, low=0.0),
        maximize=_flag("maximize", maximize))


def prepare_rmsprop(params, grads, square_avgs, grad_avgs=None, momentum_buffers=None,
                    steps=None, *, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
                    momentum=0.0, centered=False, maximize=False):
    return _k.prepare_rmsprop(
        _arrays("params", params), _arrays("grads", grads),
        _arrays("square_avgs", square_avgs), _optional_arrays("grad_avgs", grad_avgs),
        _optional_arrays("momentum_buffers", momentum_buffers), steps,
        lr=_real("learning rate", lr, low=0.0),
        alpha=_real("alpha value", alpha, low=0.0),
        eps=_real("epsilon value", eps, low=0.0),
        weight_decay=_real("weight_decay value", weight_decay, low=0.0),
        momentum=_real("momentum value", momentum, low=0.0),
        centered=_flag("centered", centered), maximize=_flag("maximize", maximize))


def prepare_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, steps=None,
                 *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, maximize=False, decoupled_weight_decay=False):
    beta1, beta2 = _betas(betas)
    return _k.prepare_adam(
        _arrays("params", params), _arrays("grads", grads),
        _arrays("exp_avgs", exp_avgs), _arrays("exp_avg_sqs", exp_avg_sqs),
        _optional_arrays("max_exp_avg_sqs", max_exp_avg_sqs), steps,
        lr=_real("learning rate", lr, low=0.0), beta1=beta1, beta2=beta2,
        eps=_real("epsilon value", eps, low=0.0),
        weight_decay=_real("weight_decay value", weight_decay, low=0.0),
        amsgrad=_flag("amsgrad", amsgrad), maximize=_flag("maximize", maximize),
        decoupled=_flag("decoupled_weight_decay", decoupled_weight_decay))



def prepare_adahessian(params, grads, hessian_diags, exp_avgs, exp_hessian_diag_sqs,
                       steps, *, lr=0.15, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.0,
                       hessian_power=1.0, maximize=False):
    beta1, beta2 = _betas(betas)
    return _k.prepare_adahessian(
        _arrays("params", params), _arrays("grads", grads),
        _arrays("hessian_diags", hessian_diags), _arrays("exp_avgs", exp_avgs),
        _arrays("exp_hessian_diag_sqs", exp_hessian_diag_sqs), steps,
        lr=_real("learning rate", lr, low=0.0), beta1=beta1, beta2=beta2,
        eps=_real("epsilon value", eps, low=0.0),
        weight_decay=_real("weight_decay value", weight_decay, low=0.0),
        hessian_power=_real("Hessian power value", hessian_power, low=0.0, high=1.0),
        maximize=_flag("maximize", maximize))


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
    lr = _real("learning rate", lr, low=0.0)
    damping = _real("damping", damping, low=0.0)
    saddle_free = _flag("saddle_free", saddle_free)
    params, grads = _arrays("params", params), _arrays("grads", grads)
    if callable(hessians) and not isinstance(hessians, np.ndarray):
        hessians = [hessians]
    hessians = _arrays("hessians", hessians)
    # The array checks of every rule (dtype, shape, contiguity, writeability, overlap,
    # steps), by preparing -- never running -- a plain SGD step on the same arrays.
    _k.prepare_sgd(params, grads, None, steps, lr=0.0, momentum=0.0, dampening=0.0,
                   nesterov=False, weight_decay=0.0, maximize=False)
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

# --- the public in-place functions -------------------------------------------------

def sgd_(params, grads, momentum_buffers=None, steps=None, *, lr=1e-3, momentum=0.0,
         dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False):
    """SGD with optional (Nesterov) momentum, in place. See :func:`reference.sgd_`."""
    prepare_sgd(params, grads, momentum_buffers, steps, lr=lr, momentum=momentum,
                dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
                maximize=maximize).run(_config.get_num_threads())


def adagrad_(params, grads, state_sums, steps, *, lr=1e-2, lr_decay=0.0,
             weight_decay=0.0, eps=1e-10, maximize=False):
    """AdaGrad, in place. See :func:`reference.adagrad_`."""
    prepare_adagrad(params, grads, state_sums, steps, lr=lr, lr_decay=lr_decay,
                    weight_decay=weight_decay, eps=eps,
                    maximize=maximize).run(_config.get_num_threads())


def rmsprop_(params, grads, square_avgs, grad_avgs=None, momentum_buffers=None,
             steps=None, *, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
             momentum=0.0, centered=False, maximize=False):
    """RMSProp, in place. See :func:`reference.rmsprop_`."""
    prepare_rmsprop(params, grads, square_avgs, grad_avgs, momentum_buffers, steps,
                    lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                    momentum=momentum, centered=centered,
                    maximize=maximize).run(_config.get_num_threads())


def adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, steps=None, *,
          lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
          maximize=False, decoupled_weight_decay=False):
    """Adam (or AdamW with ``decoupled_weight_decay``), in place. See
    :func:`reference.adam_`."""
    prepare_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr=lr,
                 betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                 maximize=maximize, decoupled_weight_decay=decoupled_weight_decay,
                 ).run(_config.get_num_threads())


def adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, steps=None, *,
           lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
           maximize=False):
    """AdamW (decoupled weight decay), in place. See :func:`reference.adamw_`."""
    adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr=lr,
          betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
          maximize=maximize, decoupled_weight_decay=True)


def adahessian_(params, grads, hessian_diags, exp_avgs, exp_hessian_diag_sqs, steps, *,
                lr=0.15, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.0,
                hessian_power=1.0, maximize=False):
    """AdaHessian, in place, from Hessian-diagonal estimates (one per parameter). See
    :func:`reference.adahessian_`; estimate the diagonals with
    :func:`fastoptim.hessian.hutchinson_diag` (or :mod:`fastoptim.torch_hessian`)."""
    prepare_adahessian(params, grads, hessian_diags, exp_avgs, exp_hessian_diag_sqs,
                       steps, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                       hessian_power=hessian_power,
                       maximize=maximize).run(_config.get_num_threads())


def newton_(params, grads, hessians, steps=None, *, lr=1.0, damping=0.0,
            saddle_free=False):
    """Damped (optionally saddle-free) Newton steps, in place. See
    :func:`reference.newton_`. Not an element-wise rule: each parameter's step is a
    dense solve by LAPACK (``numpy.linalg``), all done before any array is written;
    a singular system raises ``numpy.linalg.LinAlgError`` (a ``ValueError``)."""
    prepare_newton(params, grads, hessians, steps, lr=lr, damping=damping,
                   saddle_free=saddle_free).run(_config.get_num_threads())
