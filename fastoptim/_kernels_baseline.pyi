# Type stubs for the compiled kernel modules (fastoptim/_kernels.pxi, built once per
# instruction-set level as _kernels_baseline, _kernels_avx2 and _kernels_avx512, which
# re-export this file). Checked against the built module by tests/test_typing.py
# (mypy's stubtest): a new argument in _kernels.pxi needs its line here.
from collections.abc import Callable, Sequence
from typing import Any, Union

import numpy as np
from numpy.typing import NDArray

_Array = NDArray[Any]
_Arrays = Union[_Array, Sequence[_Array]]
_Grads = Union[_Array, Sequence[Union[_Array, None]]]
_States = Union[_Array, Sequence[Union[_Array, None]]]
_Steps = NDArray[np.int64]
_Real = Union[float, np.floating[Any], np.integer[Any], _Array]

class Step:
    """A checked, ready-to-run update of a list of arrays. ``run()`` cannot fail."""
    @property
    def size(self) -> int: ...
    @property
    def count(self) -> int: ...
    def run(self, n_threads: int = 1) -> None: ...
    def make_reusable(self) -> None: ...
    def set_grads(self, addresses: list[int] | NDArray[np.int64]) -> None: ...
    def take_hyperparameters(self, other: Step) -> bool: ...

def openmp_enabled() -> bool: ...
def omp_max_threads() -> int: ...
def omp_num_procs() -> int: ...
def cpu_isa_level() -> int: ...
def build_isa() -> str: ...
def build_cflags() -> str: ...
def set_serial_threshold(n: int | None) -> None: ...
def get_serial_threshold() -> int: ...
def calibration() -> dict[str, Any]: ...
def check_array(obj: object, name: str, index: int, written: bool = True) -> _Array: ...
def real_arg(name: str, value: object, low: float = ..., low_open: bool = False,
             high: float = ..., high_open: bool = False) -> float: ...
def flag_arg(name: str, value: object) -> bool: ...
def array_list(name: str, x: object) -> list[Any]: ...
def prepare_sgd(params: _Arrays, grads: _Grads, momentum_buffers: _States | None,
                steps: _Steps | None, lr: _Real, momentum: _Real, dampening: _Real,
                nesterov: bool, weight_decay: _Real, maximize: bool,
                state_dtype: str | None = None, rounding: str = "nearest",
                seed: int = 0,
                absmaxes: Sequence[_States | None] | None = None) -> Step: ...
def prepare_adagrad(params: _Arrays, grads: _Grads, state_sums: _States,
                    steps: _Steps | None, lr: _Real, lr_decay: _Real, weight_decay: _Real,
                    eps: _Real, maximize: bool, state_dtype: str | None = None,
                    rounding: str = "nearest", seed: int = 0,
                absmaxes: Sequence[_States | None] | None = None) -> Step: ...
def prepare_rmsprop(params: _Arrays, grads: _Grads, square_avgs: _States,
                    grad_avgs: _States | None, momentum_buffers: _States | None,
                    steps: _Steps | None, lr: _Real, alpha: _Real, eps: _Real,
                    weight_decay: _Real, momentum: _Real, centered: bool,
                    maximize: bool, state_dtype: str | None = None,
                    rounding: str = "nearest", seed: int = 0,
                absmaxes: Sequence[_States | None] | None = None) -> Step: ...
def prepare_adam(params: _Arrays, grads: _Grads, exp_avgs: _States, exp_avg_sqs: _States,
                 max_exp_avg_sqs: _States | None, steps: _Steps | None, lr: _Real,
                 betas: tuple[_Real, _Real] | Sequence[_Real], eps: _Real,
                 weight_decay: _Real, amsgrad: bool, maximize: bool, decoupled: bool,
                 state_dtype: str | None = None, rounding: str = "nearest",
                 seed: int = 0,
                absmaxes: Sequence[_States | None] | None = None) -> Step: ...
def prepare_adamax(params: _Arrays, grads: _Grads, exp_avgs: _States, exp_infs: _States,
                   steps: _Steps | None, lr: _Real,
                   betas: tuple[_Real, _Real] | Sequence[_Real], eps: _Real,
                   weight_decay: _Real, maximize: bool, state_dtype: str | None = None,
                   rounding: str = "nearest", seed: int = 0,
                   absmaxes: Sequence[_States | None] | None = None) -> Step: ...
def prepare_adadelta(params: _Arrays, grads: _Grads, square_avgs: _States,
                     acc_deltas: _States, steps: _Steps | None, lr: _Real, rho: _Real,
                     eps: _Real, weight_decay: _Real, maximize: bool,
                     state_dtype: str | None = None, rounding: str = "nearest",
                     seed: int = 0,
                     absmaxes: Sequence[_States | None] | None = None) -> Step: ...
def prepare_radam(params: _Arrays, grads: _Grads, exp_avgs: _States, exp_avg_sqs: _States,
                  steps: _Steps | None, lr: _Real,
                  betas: tuple[_Real, _Real] | Sequence[_Real], eps: _Real,
                  weight_decay: _Real, decoupled: bool, maximize: bool,
                  state_dtype: str | None = None, rounding: str = "nearest", seed: int = 0,
                  absmaxes: Sequence[_States | None] | None = None) -> Step: ...
def prepare_rprop(params: _Arrays, grads: _Grads, prevs: _States, step_size_arrays: _States,
                  steps: _Steps | None, lr: _Real,
                  etas: tuple[_Real, _Real] | Sequence[_Real],
                  step_sizes: tuple[_Real, _Real] | Sequence[_Real], maximize: bool,
                  state_dtype: str | None = None, rounding: str = "nearest", seed: int = 0,
                  absmaxes: Sequence[_States | None] | None = None) -> Step: ...
def prepare_nadam(params: _Arrays, grads: _Grads, exp_avgs: _States, exp_avg_sqs: _States,
                  mu_products: _States | None, steps: _Steps | None, lr: _Real,
                  betas: tuple[_Real, _Real] | Sequence[_Real], eps: _Real,
                  weight_decay: _Real, momentum_decay: _Real, decoupled: bool,
                  maximize: bool, state_dtype: str | None = None, rounding: str = "nearest",
                  seed: int = 0,
                  absmaxes: Sequence[_States | None] | None = None) -> Step: ...
def prepare_asgd(params: _Arrays, grads: _Grads, axs: _States, etas: _States | None,
                 mus: _States | None, steps: _Steps | None, lr: _Real, lambd: _Real,
                 alpha: _Real, t0: _Real, weight_decay: _Real, maximize: bool,
                 state_dtype: str | None = None, rounding: str = "nearest", seed: int = 0,
                 absmaxes: Sequence[_States | None] | None = None) -> Step: ...
def prepare_lion(params: _Arrays, grads: _Grads, exp_avgs: _States, steps: _Steps | None,
                 lr: _Real, betas: tuple[_Real, _Real] | Sequence[_Real],
                 weight_decay: _Real, maximize: bool, state_dtype: str | None = None,
                 rounding: str = "nearest", seed: int = 0,
                 absmaxes: Sequence[_States | None] | None = None) -> Step: ...
def adopt_set_clips(s: Step, clip_lambda: Callable[[int], _Real] | None) -> None: ...
def prepare_adopt(params: _Arrays, grads: _Grads, exp_avgs: _States, exp_avg_sqs: _States,
                  steps: _Steps | None, lr: _Real,
                  betas: tuple[_Real, _Real] | Sequence[_Real],
                  clip_lambda: Callable[[int], _Real] | None, weight_decay: _Real,
                  weight_decouple: bool, fixed_decay: bool, eps: _Real, maximize: bool,
                  state_dtype: str | None = None, rounding: str = "nearest", seed: int = 0,
                  absmaxes: Sequence[_States | None] | None = None) -> Step: ...
def prepare_ademamix(params: _Arrays, grads: _Grads, exp_avgs: _States,
                     exp_avg_sqs: _States, exp_avg_slows: _States, steps: _Steps | None,
                     lr: _Real, betas: tuple[_Real, _Real, _Real] | Sequence[_Real],
                     weight_decay: _Real, weight_decouple: bool, fixed_decay: bool,
                     alpha: _Real, t_alpha_beta3: _Real | None, eps: _Real, maximize: bool,
                     state_dtype: str | None = None, rounding: str = "nearest", seed: int = 0,
                     absmaxes: Sequence[_States | None] | None = None) -> Step: ...
def prepare_sophiah(params: _Arrays, grads: _Grads, hessians: _States | None,
                    momentums: _States, hessian_moments: _States, steps: _Steps | None,
                    lr: _Real, betas: tuple[_Real, _Real] | Sequence[_Real],
                    weight_decay: _Real, weight_decouple: bool, fixed_decay: bool, p: _Real,
                    eps: _Real, maximize: bool, state_dtype: str | None = None,
                    rounding: str = "nearest", seed: int = 0,
                    absmaxes: Sequence[_States | None] | None = None) -> Step: ...
def prepare_adamw_schedulefree(params: _Arrays, grads: _Grads, zs: _States,
                               exp_avg_sqs: _States, steps: _Steps | None, lr: _Real,
                               betas: tuple[_Real, _Real] | Sequence[_Real], eps: _Real,
                               weight_decay: _Real, ckp1: _Real, maximize: bool) -> Step: ...
class AdafactorStep:
    """A checked, ready-to-run Adafactor update of a list of arrays (the interface of
    Step: ``run(n_threads)`` cannot fail and runs once)."""
    @property
    def size(self) -> int: ...
    @property
    def count(self) -> int: ...
    def run(self, n_threads: int = 1) -> None: ...

def prepare_adafactor(params: _Arrays, grads: _Grads, row_vars: _States | None,
                      col_vars: _States | None, variances: _States | None, steps: _Steps,
                      lr: _Real, beta2_decay: _Real,
                      eps: tuple[_Real | None, _Real] | Sequence[_Real | None], d: _Real,
                      weight_decay: _Real, maximize: bool) -> AdafactorStep: ...
def prepare_adahessian(params: _Arrays, grads: _Grads, hessian_diags: _States,
                       exp_avgs: _States, exp_hessian_diag_sqs: _States,
                       steps: _Steps | None, lr: _Real,
                       betas: tuple[_Real, _Real] | Sequence[_Real], eps: _Real,
                       weight_decay: _Real, hessian_power: _Real, maximize: bool) -> Step: ...
def prepare_traffic(params: list[_Array], grads: list[_Array | None],
                    states: list[Sequence[_Array]],
                    absmaxes: Sequence[Sequence[_Array]] | None = ...) -> Step: ...
def gather_counts(addresses: NDArray[np.int64], doubles: NDArray[Any],
                  out: NDArray[np.int64]) -> int: ...
def scatter_counts(addresses: NDArray[np.int64], doubles: NDArray[Any],
                   counts: NDArray[np.int64]) -> None: ...
def addresses(objs: list[Any], reader: int = 0, exact: tuple[type, ...] = ()) -> NDArray[np.int64]: ...
def addresses_equal(objs: list[Any], expected: NDArray[np.int64], reader: int = 0,
                    exact: tuple[type, ...] = ()) -> bool: ...
def entries_are(dicts: list[Any], keys: list[Any], values: list[Any]) -> bool: ...
def kept_grads(params: list[Any], expected: list[Any], mask: list[bool]) -> list[Any] | None: ...
def first_nonfinite(arrays: list[_Array | None], n_threads: int = 1) -> int: ...
def first_overlap(written: list[list[Any]], read: list[list[Any]]) -> tuple[int, int, bool, int, int, bool] | None: ...
