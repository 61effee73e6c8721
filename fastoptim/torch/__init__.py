"""Drop-in ``torch.optim`` optimizers whose update runs fastoptim's compiled kernels.

    import fastoptim.torch as fot

    opt = fot.AdamW(model.parameters(), lr=1e-3)    # instead of torch.optim.AdamW
    for x, y in data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

``SGD``, ``Adagrad``, ``RMSprop``, ``Adam``, ``AdamW``, ``Adamax``, ``Adadelta``,
``RAdam``, ``Rprop``, ``NAdam``, ``ASGD`` and ``Adafactor`` subclass
``torch.optim.Optimizer`` with torch 2.13's constructor signatures, defaults, parameter
group keys, argument errors and ``state`` / ``state_dict()`` layout (``Lion``: those of
``lion_pytorch.Lion``, ``ADOPT``, ``AdEMAMix`` and ``SophiaH``:
``pytorch_optimizer``'s, ``AdamWScheduleFree``: ``schedulefree``'s), so
checkpoints,
schedulers, ``GradScaler``, hooks, DDP and ``ZeroRedundancyOptimizer`` work unchanged
and state moves between these classes and torch's in both directions. (``Adafactor``,
not element-wise, has its own step, ``_adafactor``: the points below are the others'.)

How a step runs, point by point:

* The state is torch's: ``self.state[p]`` holds real tensors (``step`` a 0-d float
  tensor, ``exp_avg``... shaped like the parameter), created as torch creates them.
  The kernels write the tensors' memory through zero-copy NumPy views; a complex
  parameter (and its gradient and state) is seen as its ``view_as_real`` twin.
* Every parameter group is checked and prepared (one ``fastoptim.functional.prepare_*``
  call each) before any group runs, so a refused step (CUDA or float16 parameter,
  sparse gradient, bad hyperparameter, ...) raises naming the parameter and changes
  nothing: no parameter, no state tensor, no step counter, no new state entry. Then
  each group runs as one compiled call for all its parameters.
* The kernels update arrays whose elements lie in one memory order. A parameter that
  is dense in any order (C, Fortran, channels_last, ...) is updated in place through a
  flat view of its memory; its state tensors (created like the parameter, as torch's
  ``zeros_like`` does) are viewed the same way. A strided (non-dense) parameter is
  copied into a contiguous buffer right before its group runs and copied back right
  after, in the same step. State in another order than its parameter (possible after
  loading a state dict) gets the same treatment; a gradient in another order is copied
  into the parameter's order (read only: ``p.grad`` is never written).
* Step counters: the kernel counts in an ``int64`` array built from the ``step``
  tensors (``state["step"]``, 0-d float32 as in torch) at each step; after the run
  the new counts are written back into the same tensors through cached NumPy views
  (about 40 ns a parameter, against ~1.4 us for ``torch._foreach_add_``).
  ``state["step"]`` stays the single source of truth, so a loaded or hand-edited
  counter is always honoured.
* The NumPy views of a parameter and its state are cached between steps: a
  parameter's are remade when its data pointer, shape, strides or dtype change
  (``p.data = ...``, as ``module.to()`` and ZeRO's bucket views do), a state tensor's
  when it is another object or at another address (a loaded state dict,
  ``share_memory_()``). A view keeps its storage alive, so a new tensor cannot take
  over a cached address. Gradients are viewed afresh at every step.
* A group's prepared kernel call is kept from one step to the next while nothing it
  depends on changed (see ``_reuse._Reuse``); a kept step reads each gradient, checks
  every parameter's and gradient's type, dtype, shape and strides in one compiled call
  (torch's own tensor check, dynamo's ``TensorGuards``; Python reads where a torch
  lacks it), compares every tensor's data address in a compiled loop (through torch's
  C reader of a tensor's data pointer, the one inductor's compiled wrappers call;
  ``data_ptr()`` where this torch has none), and points the kernel at the new
  gradients: about 0.1 us a parameter beyond the NumPy class's step when the tensors'
  metadata is in cache.
* Numerics: the kernels do torch's default (for-loop) operations in the same order,
  but round a*b+c twice where torch's vectorized CPU ops may use one fused
  multiply-add, so results agree with torch.optim's to rounding (over hundreds of
  steps, relative differences of ~1e-5 in float32 and ~1e-13 in float64). Step
  scalars (bias corrections, ...) are computed in double; torch computes them in the
  dtype of a tensor ``lr``/``betas``, so float32 tensor hyperparameters on float64
  parameters differ more (~1e-8).
* The autograd version counter of every written parameter and state tensor is bumped
  (``torch.autograd.graph.increment_version``), as an in-place torch op would:
  backward through a graph that saved a parameter before the step raises instead of
  silently using the new values. (A kept step bumps them just before its kernel runs,
  which cannot fail, while the tensors' metadata is still in cache.)
* Hyperparameters are read from the group at every step (``lr`` and Adam's ``betas``
  may be 1-element tensors), so ``torch.optim.lr_scheduler`` works.
* ``foreach`` and ``fused`` are accepted and change nothing (the compiled kernel
  always runs). ``differentiable=True`` and ``capturable=True`` are refused: the
  kernels work outside autograd and on CPU memory. No class claims
  ``_step_supports_amp_scaling``, so ``GradScaler`` unscales the gradients (and skips
  steps with infs) itself before calling ``step()``.
* Compressed state, per parameter group (torch's constructors are unchanged, so the
  choice is a group key): ``{"params": ..., "state_dtype": "bfloat16"}`` keeps state
  tensors in ``torch.bfloat16``; ``"8bit"`` keeps bitsandbytes' blockwise format, a
  uint8 ``exp_avg`` of codes shaped like the parameter beside ``exp_avg_absmax``
  (float32, one scale per 256 elements in the parameter's memory order), for float32
  parameters of at least ``min_8bit_size`` (another group key, default 4096) elements.
  Also ``rounding`` ("nearest"/"stochastic", bfloat16) and ``seed``. Steps equal the
  NumPy classes' bit for bit. ``load_state_dict`` keeps compressed tensors from
  torch's cast to the parameter's dtype and converts loaded state to the group's
  format; it reads bitsandbytes' and torchao's 8-bit Adam/AdamW state dicts, and
  :func:`to_bitsandbytes` / :func:`to_torchao` write them (see ``_convert``).
* Threads: the kernels use ``fastoptim.set_num_threads(n)`` when it was called, else
  ``torch.get_num_threads()``. On Linux, torch's wheel and fastoptim both load
  ``libgomp.so.1``; the dynamic linker loads it once, so both share one OpenMP runtime
  and thread pool (no oversubscription).
"""
from ._classes import (ADOPT, ASGD, SGD, Adadelta, Adagrad, Adam, Adamax, AdamW,
                       AdamWScheduleFree, AdEMAMix, Lion, NAdam, RAdam, RMSprop, Rprop,
                       SophiaH)
from ._adafactor import Adafactor
from ._convert import to_bitsandbytes, to_torchao

# (read by tests and tools; a kept step reads them from _probes at each step)
from ._base import _threads  # noqa: F401
from ._probes import _EXACT, _LAYOUT_GUARD, _READER  # noqa: F401

__all__ = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Adamax", "Adadelta", "RAdam",
           "Rprop", "NAdam", "ASGD", "Lion", "ADOPT", "AdEMAMix",
           "SophiaH", "AdamWScheduleFree", "Adafactor", "to_bitsandbytes", "to_torchao"]

# The code lives in submodules (_base: the optimizer base class; _plan and _reuse: the
# planned and the kept step; _tensors: tensors as the kernels see them; _probes: torch
# internals a kept step reads; _classes: one class per rule); the classes' public home,
# for reprs and pickles, is this package.
for _cls in (SGD, Adagrad, RMSprop, Adam, AdamW, Adamax, Adadelta, RAdam, Rprop, NAdam,
             ASGD, Lion, ADOPT, AdEMAMix, SophiaH, AdamWScheduleFree, Adafactor,
             to_bitsandbytes, to_torchao):
    _cls.__module__ = __name__
del _cls
