"""Stateful optimizers shaped like ``torch.optim``, for NumPy arrays.

Each class only holds state and calls one function of :mod:`fastoptim.functional` per
parameter group and step; the formulas are in :mod:`fastoptim.reference`.

    opt = fastoptim.Adam([w, b], lr=1e-3)
    for batch in data:
        gw, gb = gradients(w, b, batch)
        opt.step([gw, gb])            # w and b change in place

* ``params`` is a sequence of arrays, or of dicts (parameter groups) with per-group
  hyperparameter overrides, as in torch. ``opt.param_groups[k]["lr"]`` may be changed
  between steps (learning-rate schedules).
* ``step(grads)`` takes one gradient per parameter, across all groups in order;
  ``None`` skips that parameter (its state and step counter stay as they are).
* State is created on a parameter's first step (Adagrad's accumulator at
  construction, as in torch). ``opt.state`` maps the parameter's position (across all
  groups) to its state; ``state_dict()`` / ``load_state_dict()`` use torch's layout
  (``{"state": {index: {...}}, "param_groups": [{..., "params": [indices]}]}``), with
  copies of the arrays, so a saved and reloaded optimizer continues bit-identically.
  ``load_state_dict`` also takes ``torch.optim``'s state dicts of the same rule
  (tensors included, e.g. from ``torch.load(path, weights_only=True)``); see there.
* A refused call (bad gradient, bad hyperparameter, malformed state dict) raises
  before anything changes: every array and every step counter keep their values.
"""
from .base import Optimizer
from .classes import (ADOPT, SGD, Adadelta, Adafactor, AdaHessian, Adagrad, Adam, Adamax,
                      AdamW, AdamWScheduleFree, AdEMAMix, Lion, Newton, NAdam, RAdam,
                      RMSprop, Rprop, ASGD, SophiaH)

__all__ = ["Optimizer", "SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Adamax", "Adadelta",
           "RAdam", "Rprop", "NAdam", "ASGD", "Lion", "ADOPT", "AdEMAMix",
           "SophiaH", "AdamWScheduleFree", "Adafactor", "AdaHessian", "Newton"]

# The classes live in submodules (base: groups and the step; state_dict: state, state
# dicts and loading torch's; classes: one per rule); their public home, for reprs and
# pickles, is this package.
for _cls in (Optimizer, SGD, Adagrad, RMSprop, Adam, AdamW, Adamax, Adadelta, RAdam, Rprop,
             NAdam, ASGD, Lion, ADOPT, AdEMAMix, SophiaH, AdamWScheduleFree, Adafactor,
             AdaHessian, Newton):
    _cls.__module__ = __name__
del _cls
