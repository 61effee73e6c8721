"""What the tests need to know about each rule: its functions, its state arrays and
the options it takes. Shared by the test modules."""
import numpy as np
import pytest

from fastoptim import _dispatch
from fastoptim import functional as F
from fastoptim import reference as R
from fastoptim.rules import spec

#: every instruction-set level, widest first: tests that compare kernel paths are
#: parametrized over all of them and run those this process may run (see kernel_module)
ISAS = [name for name, _level in _dispatch.LEVELS]


def kernel_module(isa):
    """The kernel module of level ``isa``, or a skip saying why this process may not run
    it (the CPU lacks the instructions, FASTOPTIM_ISA rules it out, or it was not built).
    Never imports a module the CPU cannot execute."""
    reason = _dispatch.why_not(isa)
    if reason:
        pytest.skip(reason)
    return _dispatch.load(isa)

def _grid(rule, **others):
    """option name -> values worth testing: the registry's default first, then others."""
    return dict(options={k: [spec(rule).defaults[k]] + v for k, v in others.items()})


# option name -> values worth testing (first is the default, from fastoptim.rules)
RULES = {
    "sgd": _grid("sgd", lr=[0.05], momentum=[0.9], dampening=[0.3], nesterov=[True],
                 weight_decay=[0.01], maximize=[True]),
    "adagrad": _grid("adagrad", lr=[0.1], lr_decay=[0.01], weight_decay=[0.01],
                     eps=[1e-6], maximize=[True]),
    "rmsprop": _grid("rmsprop", lr=[1e-3], alpha=[0.3], eps=[1e-6], weight_decay=[0.01],
                     momentum=[0.9], centered=[True], maximize=[True]),
    "adam": _grid("adam", lr=[0.01], betas=[(0.3, 0.9)], eps=[1e-6], weight_decay=[0.01],
                  amsgrad=[True], maximize=[True]),
    "adamw": _grid("adamw", lr=[0.01], betas=[(0.3, 0.9)], eps=[1e-6],
                   weight_decay=[0.0, 0.1], amsgrad=[True], maximize=[True]),
    "adamax": _grid("adamax", lr=[0.01], betas=[(0.3, 0.9)], eps=[1e-6],
                    weight_decay=[0.01], maximize=[True]),
    "adadelta": _grid("adadelta", lr=[0.5], rho=[0.4], eps=[1e-3], weight_decay=[0.01],
                      maximize=[True]),
    "radam": _grid("radam", lr=[0.01], betas=[(0.3, 0.9)], eps=[1e-6], weight_decay=[0.01],
                   decoupled_weight_decay=[True], maximize=[True]),
    "rprop": _grid("rprop", lr=[0.05], etas=[(0.3, 1.5)], step_sizes=[(1e-3, 0.1)],
                   maximize=[True]),
    "nadam": _grid("nadam", lr=[0.01], betas=[(0.3, 0.9)], eps=[1e-6], weight_decay=[0.01],
                   momentum_decay=[0.01], decoupled_weight_decay=[True], maximize=[True]),
    "asgd": _grid("asgd", lr=[0.05], lambd=[1e-3], alpha=[0.6], t0=[3.0], weight_decay=[0.01],
                  maximize=[True]),
    "adopt": _grid("adopt", lr=[0.01], betas=[(0.3, 0.9)], clip_lambda=[None],
                   weight_decay=[0.1], weight_decouple=[True], fixed_decay=[True], eps=[1e-3],
                   maximize=[True]),
    "ademamix": _grid("ademamix", lr=[0.01], betas=[(0.3, 0.9, 0.95)], weight_decay=[0.1],
                      weight_decouple=[True], fixed_decay=[True], alpha=[2.0],
                      t_alpha_beta3=[7.0], eps=[1e-3], maximize=[True]),
    "adamw_schedulefree": _grid("adamw_schedulefree", lr=[0.01], betas=[(0.3, 0.9)],
                                eps=[1e-3], weight_decay=[0.1], maximize=[True]),
    "lion": _grid("lion", lr=[0.01], betas=[(0.3, 0.9), (1.0, 0.0)], weight_decay=[0.1],
                  maximize=[True]),
}


def valid(rule, opts):
    """Whether an option combination is one torch accepts."""
    if rule == "sgd" and opts.get("nesterov"):
        return opts.get("momentum", 0) > 0 and opts.get("dampening", 0) == 0
    return True


def state_names(rule, opts):
    if rule == "sgd":
        return ["momentum_buffers"] if opts.get("momentum", 0) != 0 else []
    if rule == "adagrad":
        return ["state_sums"]
    if rule == "rmsprop":
        names = ["square_avgs"]
        names += ["grad_avgs"] if opts.get("centered") else []
        names += ["momentum_buffers"] if opts.get("momentum", 0) > 0 else []
        return names
    if rule == "adamax":
        return ["exp_avgs", "exp_infs"]
    if rule == "adadelta":
        return ["square_avgs", "acc_deltas"]
    if rule == "radam":
        return ["exp_avgs", "exp_avg_sqs"]
    if rule == "rprop":
        return ["prevs", "step_size_arrays"]
    if rule == "nadam":
        return ["exp_avgs", "exp_avg_sqs", "mu_products"]
    if rule == "asgd":
        return ["axs", "etas", "mus"]
    if rule == "lion":
        return ["exp_avgs"]
    if rule == "adopt":
        return ["exp_avgs", "exp_avg_sqs"]
    if rule == "ademamix":
        return ["exp_avgs", "exp_avg_sqs", "exp_avg_slows"]
    if rule == "adamw_schedulefree":
        return ["zs", "exp_avg_sqs"]
    names = ["exp_avgs", "exp_avg_sqs"]
    return names + (["max_exp_avg_sqs"] if opts.get("amsgrad") else [])


def make_state(rule, opts, params, init=0.0):
    """Fresh state for a list of params: {name: [arrays]} and the steps array."""
    first = {"state_sums": init, "step_size_arrays": opts.get("lr", 1e-2)}
    state = {name: [np.full_like(p, first.get(name, 0.0)) for p in params]
             for name in state_names(rule, opts)}
    if "mu_products" in state:              # NAdam's: one float32 number per parameter
        state["mu_products"] = [np.ones((), np.float32) for _ in params]
    if "etas" in state:                     # ASGD's: eta from lr, mu from 1
        state["etas"] = [np.full((), opts.get("lr", 1e-2), np.float32) for _ in params]
        state["mus"] = [np.ones((), np.float32) for _ in params]
    steps = np.zeros(len(params), dtype=np.int64)
    return state, steps


def call(module, rule, params, grads, state, steps, opts):
    """Call rule `rule` of `module` (fastoptim.functional or fastoptim.reference)."""
    fn = getattr(module, rule + "_")
    if rule == "sgd":
        return fn(params, grads, state.get("momentum_buffers"), steps, **opts)
    if rule == "adagrad":
        return fn(params, grads, state["state_sums"], steps, **opts)
    if rule == "rmsprop":
        return fn(params, grads, state["square_avgs"], state.get("grad_avgs"),
                  state.get("momentum_buffers"), steps, **opts)
    if rule == "adamax":
        return fn(params, grads, state["exp_avgs"], state["exp_infs"], steps, **opts)
    if rule == "adadelta":
        return fn(params, grads, state["square_avgs"], state["acc_deltas"], steps, **opts)
    if rule == "radam":
        return fn(params, grads, state["exp_avgs"], state["exp_avg_sqs"], steps, **opts)
    if rule == "rprop":
        return fn(params, grads, state["prevs"], state["step_size_arrays"], steps, **opts)
    if rule == "nadam":
        return fn(params, grads, state["exp_avgs"], state["exp_avg_sqs"],
                  state["mu_products"], steps, **opts)
    if rule == "asgd":
        return fn(params, grads, state["axs"], state["etas"], state["mus"], steps, **opts)
    if rule == "lion":
        return fn(params, grads, state["exp_avgs"], steps, **opts)
    if rule == "adopt":
        return fn(params, grads, state["exp_avgs"], state["exp_avg_sqs"], steps, **opts)
    if rule == "ademamix":
        return fn(params, grads, state["exp_avgs"], state["exp_avg_sqs"],
                  state["exp_avg_slows"], steps, **opts)
    if rule == "adamw_schedulefree":            # (this step's weight in the average: 0.3)
        return fn(params, grads, state["zs"], state["exp_avg_sqs"], steps,
                  **dict(opts, ckp1=0.3))
    return fn(params, grads, state["exp_avgs"], state["exp_avg_sqs"],
              state.get("max_exp_avg_sqs"), steps, **opts)


def prepare(kernels, rule, params, grads, state, steps, opts):
    """Call a kernel module's prepare_* directly (to test every built ISA)."""
    o = dict(opts)
    if rule == "sgd":
        momentum = o.get("momentum", 0.0)
        return kernels.prepare_sgd(params, grads, state.get("momentum_buffers"),
                                   steps if momentum else None, o.get("lr", 1e-3), momentum,
                                   o.get("dampening", 0.0), o.get("nesterov", False),
                                   o.get("weight_decay", 0.0), o.get("maximize", False))
    if rule == "adagrad":
        return kernels.prepare_adagrad(params, grads, state["state_sums"], steps,
                                       o.get("lr", 1e-2), o.get("lr_decay", 0.0),
                                       o.get("weight_decay", 0.0), o.get("eps", 1e-10),
                                       o.get("maximize", False))
    if rule == "rmsprop":
        return kernels.prepare_rmsprop(params, grads, state["square_avgs"],
                                       state.get("grad_avgs"), state.get("momentum_buffers"),
                                       steps, o.get("lr", 1e-2), o.get("alpha", 0.99),
                                       o.get("eps", 1e-8), o.get("weight_decay", 0.0),
                                       o.get("momentum", 0.0), o.get("centered", False),
                                       o.get("maximize", False))
    if rule == "asgd":
        return kernels.prepare_asgd(params, grads, state["axs"], state["etas"], state["mus"],
                                    steps, o.get("lr", 1e-2), o.get("lambd", 1e-4),
                                    o.get("alpha", 0.75), o.get("t0", 1e6),
                                    o.get("weight_decay", 0.0), o.get("maximize", False))
    if rule == "adopt":
        d = spec("adopt").defaults
        return kernels.prepare_adopt(params, grads, state["exp_avgs"], state["exp_avg_sqs"],
                                     steps, *[o.get(k, d[k]) for k in (
                                         "lr", "betas", "clip_lambda", "weight_decay",
                                         "weight_decouple", "fixed_decay", "eps",
                                         "maximize")])
    if rule == "ademamix":
        d = spec("ademamix").defaults
        return kernels.prepare_ademamix(params, grads, state["exp_avgs"], state["exp_avg_sqs"],
                                        state["exp_avg_slows"], steps, *[o.get(k, d[k]) for k in (
                                            "lr", "betas", "weight_decay", "weight_decouple",
                                            "fixed_decay", "alpha", "t_alpha_beta3", "eps",
                                            "maximize")])
    if rule == "adamw_schedulefree":
        d = spec("adamw_schedulefree").defaults
        return kernels.prepare_adamw_schedulefree(
            params, grads, state["zs"], state["exp_avg_sqs"], steps,
            *[o.get(k, d[k]) for k in ("lr", "betas", "eps", "weight_decay")], 0.3,
            o.get("maximize", False))
    if rule == "lion":
        return kernels.prepare_lion(params, grads, state["exp_avgs"], steps, o.get("lr", 1e-4),
                                    o.get("betas", (0.9, 0.99)), o.get("weight_decay", 0.0),
                                    o.get("maximize", False))
    if rule == "nadam":
        return kernels.prepare_nadam(params, grads, state["exp_avgs"], state["exp_avg_sqs"],
                                     state["mu_products"], steps, o.get("lr", 2e-3),
                                     o.get("betas", (0.9, 0.999)), o.get("eps", 1e-8),
                                     o.get("weight_decay", 0.0), o.get("momentum_decay", 4e-3),
                                     o.get("decoupled_weight_decay", False),
                                     o.get("maximize", False))
    if rule == "rprop":
        return kernels.prepare_rprop(params, grads, state["prevs"], state["step_size_arrays"],
                                     steps, o.get("lr", 1e-2), o.get("etas", (0.5, 1.2)),
                                     o.get("step_sizes", (1e-6, 50)), o.get("maximize", False))
    if rule == "radam":
        return kernels.prepare_radam(params, grads, state["exp_avgs"], state["exp_avg_sqs"],
                                     steps, o.get("lr", 1e-3), o.get("betas", (0.9, 0.999)),
                                     o.get("eps", 1e-8), o.get("weight_decay", 0.0),
                                     o.get("decoupled_weight_decay", False),
                                     o.get("maximize", False))
    if rule == "adadelta":
        return kernels.prepare_adadelta(params, grads, state["square_avgs"],
                                        state["acc_deltas"], steps, o.get("lr", 1.0),
                                        o.get("rho", 0.9), o.get("eps", 1e-6),
                                        o.get("weight_decay", 0.0), o.get("maximize", False))
    if rule == "adamax":
        return kernels.prepare_adamax(params, grads, state["exp_avgs"], state["exp_infs"],
                                      steps, o.get("lr", 2e-3), o.get("betas", (0.9, 0.999)),
                                      o.get("eps", 1e-8), o.get("weight_decay", 0.0),
                                      o.get("maximize", False))
    return kernels.prepare_adam(params, grads, state["exp_avgs"], state["exp_avg_sqs"],
                                state.get("max_exp_avg_sqs"), steps, o.get("lr", 1e-3),
                                o.get("betas", (0.9, 0.999)), o.get("eps", 1e-8),
                                o.get("weight_decay", 1e-2 if rule == "adamw" else 0.0),
                                o.get("amsgrad", False), o.get("maximize", False),
                                rule == "adamw")


def assert_close(got, want, dtype, nsteps, err_msg=""):
    """Kernel result vs reference: bit-for-bit equal.

    The kernels do the reference's operations in the same order and dtype, and are
    compiled with -ffp-contract=off (no fused multiply-add: every operation rounds once,
    as NumPy's do), so every instruction-set path gives exactly the reference's bits.
    NaNs compare equal to NaNs."""
    np.testing.assert_array_equal(got, want, err_msg=err_msg)
