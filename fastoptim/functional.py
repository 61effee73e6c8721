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
from . import _config
from .reference import bf16_to_f32, f32_to_bf16   # the bfloat16 storage format

__all__ = ["sgd_", "adagrad_", "rmsprop_", "adam_", "adamw_", "bf16_to_f32", "f32_to_bf16"]

_k = _config._kernels


# --- prepare: check everything, return a runnable Step -------------------------------
# The checks themselves run in the kernel module (compiled: a tiny step must cost about
# a microsecond); these functions give them torch's keyword signatures.

def prepare_sgd(params, grads, momentum_buffers=None, steps=None, *, lr=1e-3,
                momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                maximize=False):
    return _k.prepare_sgd(params, grads, momentum_buffers, steps, lr, momentum, dampening,
                          nesterov, weight_decay, maximize)


def prepare_adagrad(params, grads, state_sums, steps, *, lr=1e-2, lr_decay=0.0,
                    weight_decay=0.0, eps=1e-10, maximize=False):
    return _k.prepare_adagrad(params, grads, state_sums, steps, lr, lr_decay, weight_decay,
                              eps, maximize)


def prepare_rmsprop(params, grads, square_avgs, grad_avgs=None, momentum_buffers=None,
                    steps=None, *, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
                    momentum=0.0, centered=False, maximize=False):
    return _k.prepare_rmsprop(params, grads, square_avgs, grad_avgs, momentum_buffers, steps,
                              lr, alpha, eps, weight_decay, momentum, centered, maximize)


def prepare_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, steps=None,
                 *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, maximize=False, decoupled_weight_decay=False,
                 state_dtype=None, rounding="nearest", seed=0):
    return _k.prepare_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr,
                           betas, eps, weight_decay, amsgrad, maximize,
                           decoupled_weight_decay, state_dtype, rounding, seed)


# --- the public in-place functions -------------------------------------------------

def sgd_(params, grads, momentum_buffers=None, steps=None, *, lr=1e-3, momentum=0.0,
         dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False):
    """SGD with optional (Nesterov) momentum, in place. See :func:`reference.sgd_`."""
    _k.prepare_sgd(params, grads, momentum_buffers, steps, lr, momentum, dampening, nesterov,
                   weight_decay, maximize).run(_config.get_num_threads())


def adagrad_(params, grads, state_sums, steps, *, lr=1e-2, lr_decay=0.0,
             weight_decay=0.0, eps=1e-10, maximize=False):
    """AdaGrad, in place. See :func:`reference.adagrad_`."""
    _k.prepare_adagrad(params, grads, state_sums, steps, lr, lr_decay, weight_decay, eps,
                       maximize).run(_config.get_num_threads())


def rmsprop_(params, grads, square_avgs, grad_avgs=None, momentum_buffers=None,
             steps=None, *, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
             momentum=0.0, centered=False, maximize=False):
    """RMSProp, in place. See :func:`reference.rmsprop_`."""
    _k.prepare_rmsprop(params, grads, square_avgs, grad_avgs, momentum_buffers, steps, lr,
                       alpha, eps, weight_decay, momentum, centered,
                       maximize).run(_config.get_num_threads())


def adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, steps=None, *,
          lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
          maximize=False, decoupled_weight_decay=False, state_dtype=None,
          rounding="nearest", seed=0):
    """Adam (or AdamW with ``decoupled_weight_decay``), in place. See
    :func:`reference.adam_` (also for ``state_dtype="bfloat16"``)."""
    _k.prepare_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, betas,
                    eps, weight_decay, amsgrad, maximize, decoupled_weight_decay,
                    state_dtype, rounding, seed).run(_config.get_num_threads())


def adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, steps=None, *,
           lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
           maximize=False, state_dtype=None, rounding="nearest", seed=0):
    """AdamW (decoupled weight decay), in place. See :func:`reference.adamw_`."""
    _k.prepare_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, betas,
                    eps, weight_decay, amsgrad, maximize, True, state_dtype, rounding,
                    seed).run(_config.get_num_threads())
