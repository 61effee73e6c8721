"""The rule registry: what each update rule is, written once, read by every layer.

An entry says, for one rule: its hyperparameters in torch.optim's positional order with
their defaults, every state array it may keep in one order (torch.optim's: the order of
its state dicts), which option decides whether a state array is kept, and whether the
rule counts steps. The NumPy classes (:mod:`fastoptim.optim`) and the torch drop-in
(:mod:`fastoptim.torch`) take their state names from here; tests hold the functional
API, both class layers and torch.optim itself to the defaults written here
(``tests/test_registry.py``). The math of a rule lives in :mod:`fastoptim.reference` and
in its kernel file (``fastoptim/_kernels/rules/<name>.pxi``).

Adding a rule: its reference function, its kernel file (and its name in the kernels'
rule table, ``fastoptim/_kernels/segments.pxi.tp``, for an element-wise rule), its
``prepare_<name>`` in :mod:`fastoptim.functional`, one entry here, its NumPy class,
its torch class, and its options in the tests' grid (``tests/rules.py``).
"""
import numbers
from dataclasses import dataclass, field

from .reference import adopt_clip

__all__ = ["RuleSpec", "REGISTRY", "spec"]


@dataclass(frozen=True)
class RuleSpec:
    """One update rule.

    ``hyperparameters``: ``(name, default)`` pairs in torch.optim's positional order,
    then its keyword-only ones (``maximize``). ``state``: every state array the rule may
    keep, in torch.optim's order. ``kept_if``: state name -> the option that keeps it
    (kept when the option is positive, for a number, or true, for a flag); state not
    named there is always kept. ``counts_steps``: whether the state holds a ``step`` counter.

    How the kernels run it (:func:`fastoptim.functional.prepare` reads these):
    ``kernel``, the ``functional.prepare_<kernel>`` that does (default: the rule's name);
    ``kernel_state``, the state in the order that function takes it (default: ``state``);
    ``unsigned_state``: the state that is never negative (8-bit state quantizes it
    with the unsigned map; the rest with the signed one).

    ``bounds``: ``(option, bound, label)`` in the order torch.optim's constructor checks
    them; ``bound`` is how torch writes the test (see _BOUNDS), ``label`` names the
    option in torch's error text, ``Invalid <label>: <value>`` (the kernels' checks use
    the same labels; ``betas[0]`` names an item of an option); a fourth item, where
    torch words it otherwise, is its text (:meth:`bound_message`). :meth:`check_bounds`
    raises those errors.

    ``inputs``, read-only arrays the kernel takes besides the gradients, before the
    state (AdaHessian's Hessian diagonals); ``kernel_options``, keyword arguments fixed
    by the rule (Adam: L2 weight decay,
    AdamW: decoupled; torch's ``Adam(decoupled_weight_decay=True)`` runs as AdamW); ``state_formats``, the ``state_dtype`` values it accepts besides the
    parameters' own (its kernel loops are instantiated for those formats only).

    ``scalar_state``: state of one number per parameter (NAdam's ``mu_product``, ASGD's
    ``eta`` and ``mu``), as ``(name, initial value)`` (None: the group's lr); the kernel
    takes one 0-d array per parameter for each, after the per-element state, and
    updates it in place (float32, as torch keeps it).

    ``group_step``: the name of a count kept per parameter group (``group["step"]``;
    Schedule-Free's ``group["k"]``), an int advanced once per ``step()`` for the whole
    group, whether or not a parameter has a gradient, as the oracle packages of the
    rules beyond torch.optim count (instead of per parameter, ``state["step"]``,
    torch.optim's); the kernel takes it as every parameter's count. ``param_copies``:
    state that starts as a copy of the parameter (Schedule-Free's ``z``). ``oracle``:
    for a rule torch.optim lacks, ``(package, module, class)`` of the package people
    use for it, whose class is the tests' oracle and the benchmark's contender. ``factored``:
    state kept, by a parameter of two or more dimensions, as factors of the parameter's
    shape with one of its last two axes 1 (the first named reduces the last axis, the
    next the one before), in place of the rest of ``state``, which only vectors and
    0-d parameters keep (Adafactor's row and column factors; see :meth:`state_shape`).
    ``attributes``: options the oracle
    keeps as attributes of the optimizer, not in its groups (ADOPT's ``clip_lambda``
    and ``maximize``): the torch class keeps them so (its state dicts are the
    oracle's), the NumPy class in its groups (and loads groups that lack them).
    """
    name: str
    title: str
    hyperparameters: tuple
    state: tuple
    kept_if: dict = field(default_factory=dict)
    counts_steps: bool = True
    kernel: str = ""
    kernel_state: tuple = ()
    kernel_options: dict = field(default_factory=dict)
    state_formats: tuple = ()
    inputs: tuple = ()
    bounds: tuple = ()
    unsigned_state: tuple = ()
    scalar_state: tuple = ()
    group_step: str = ""
    attributes: tuple = ()
    param_copies: tuple = ()
    oracle: tuple = ()
    factored: tuple = ()

    def __post_init__(self):
        if not self.kernel:
            object.__setattr__(self, "kernel", self.name)
        if not self.kernel_state:
            object.__setattr__(self, "kernel_state", self.state)
        if sorted(self.kernel_state) != sorted(self.state):
            raise ValueError(f"{self.name}: kernel_state must order the same names as state")
        # the options that decide the state, and their answers so far: a step asks
        # every time, and a cached answer costs one dict lookup
        object.__setattr__(self, "_deciding", tuple(dict.fromkeys(self.kept_if.values())))
        object.__setattr__(self, "_answers", {})

    def check_bounds(self, values):
        """torch.optim's constructor checks of this rule's bounded options, in its order
        and with its texts: ``ValueError("Invalid <label>: <value>")`` for the first
        option of ``values`` (a dict by name) out of its bound. Tensor options compare
        as torch compares them."""
        for key, bound, *_ in self.bounds:
            name, _, item = key.partition("[")
            if name not in values:
                continue
            x = values[name][int(item[:-1])] if item else values[name]
            if x is not None and _BOUNDS[bound](x):
                raise ValueError(self.bound_message(key, x))

    def bound_message(self, key, value):
        """torch's error text for option ``key`` (as ``bounds`` names it) at ``value``:
        ``Invalid <label>: <value>``, or the entry's own text (its fourth item, a format
        of the value: Adafactor's ``Learning rate should be >= 0 but is: {}``)."""
        for k, _, label, *text in self.bounds:
            if k == key:
                return text[0].format(value) if text else f"Invalid {label}: {value}"
        raise KeyError(key)

    def state_shape(self, name, shape):
        """The shape of state ``name`` of a parameter of ``shape``, or None when such a
        parameter does not keep it: the parameter's own, but for a rule with
        ``factored`` state (a matrix keeps its factors, a vector the rest)."""
        shape = tuple(shape)
        if not self.factored:
            return shape
        if len(shape) < 2:
            return None if name in self.factored else shape
        if name not in self.factored:
            return None
        axis = len(shape) - 1 - self.factored.index(name)
        return shape[:axis] + (1,) + shape[axis + 1:]

    @property
    def defaults(self):
        """``{name: default}`` of every hyperparameter."""
        return dict(self.hyperparameters)

    def scalar_values(self, options, value=None):
        """``(name, initial value)`` of the rule's per-parameter scalar state under
        ``options`` (a parameter group): an initial value of None is the group's lr,
        read through ``value(name, v)`` when given (the torch layer's tensor lr)."""
        out = []
        for name, initial in self.scalar_state:
            if initial is None:
                initial = options["lr"] if value is None else value("lr", options["lr"])
            out.append((name, initial))
        return tuple(out)

    def state_names(self, options, value=None):
        """The state arrays kept under ``options`` (a parameter group), in the rule's
        order; ``value(name, v)`` reads an option (the torch layer reads 1-element
        tensors through it)."""
        deciding = self._deciding
        if not deciding:
            return self.state
        if value is None and len(deciding) == 1:
            key = options[deciding[0]]
        elif value is None and len(deciding) == 2:
            key = (options[deciding[0]], options[deciding[1]])
        else:
            key = tuple(options[o] if value is None else value(o, options[o])
                        for o in deciding)
        try:
            return self._answers[key]
        except (KeyError, TypeError):             # (TypeError: an unhashable value)
            pass
        keeps = dict(zip(deciding, map(_keeps, key if isinstance(key, tuple) else (key,))))
        names = tuple(n for n in self.state if n not in self.kept_if
                      or keeps[self.kept_if[n]])
        try:
            if len(self._answers) < 64:
                self._answers[key] = names
        except TypeError:
            pass
        return names


#: how torch.optim's constructors bound an option, as it writes the tests: "nonneg" is
#: ``not 0.0 <= x`` (NaN refused), "not_negative" is ``x < 0.0`` (NaN passes: SGD's),
#: "unit" is ``not 0.0 <= x < 1.0`` (Adam's betas), "closed_unit" ``not 0.0 <= x <= 1.0``
#: (Adadelta's rho), "nonpos" ``not 0.0 >= x`` and "at_least_one" ``not 1.0 <= x``
#: (Adafactor's beta2_decay and d); an option that is None is not checked (Adafactor's
#: eps1)
_BOUNDS = {"nonneg": lambda x: not 0.0 <= x, "not_negative": lambda x: x < 0.0,
           "unit": lambda x: not 0.0 <= x < 1.0, "closed_unit": lambda x: not 0.0 <= x <= 1.0,
           "nonpos": lambda x: not 0.0 >= x, "at_least_one": lambda x: not 1.0 <= x}


def _keeps(v):
    """A number keeps its state when positive (momentum), a flag when true (amsgrad)."""
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        return v > 0
    return bool(v)


_ADAM = (("lr", 1e-3), ("betas", (0.9, 0.999)), ("eps", 1e-8), ("weight_decay", 0.0),
         ("amsgrad", False), ("maximize", False))

_ADAM_BOUNDS = (("lr", "nonneg", "learning rate"), ("eps", "nonneg", "epsilon value"),
                ("betas[0]", "unit", "beta parameter at index 0"),
                ("betas[1]", "unit", "beta parameter at index 1"),
                ("weight_decay", "nonneg", "weight_decay value"))

#: every rule with per-element state, in public order
REGISTRY = {s.name: s for s in (
    RuleSpec("sgd", "SGD",
             (("lr", 1e-3), ("momentum", 0.0), ("dampening", 0.0), ("weight_decay", 0.0),
              ("nesterov", False), ("maximize", False)),
             ("momentum_buffer",), {"momentum_buffer": "momentum"}, counts_steps=False,
             state_formats=("bfloat16", "8bit"),
             bounds=(("lr", "not_negative", "learning rate"),
                     ("momentum", "not_negative", "momentum value"),
                     ("weight_decay", "not_negative", "weight_decay value"))),
    RuleSpec("adagrad", "Adagrad",
             (("lr", 1e-2), ("lr_decay", 0.0), ("weight_decay", 0.0),
              ("initial_accumulator_value", 0.0), ("eps", 1e-10), ("maximize", False)),
             ("sum",), state_formats=("bfloat16", "8bit"), unsigned_state=("sum",),
             bounds=(("lr", "nonneg", "learning rate"), ("lr_decay", "nonneg", "lr_decay value"),
                     ("weight_decay", "nonneg", "weight_decay value"),
                     ("initial_accumulator_value", "nonneg",
                      "initial_accumulator_value value"),
                     ("eps", "nonneg", "epsilon value"))),
    RuleSpec("rmsprop", "RMSprop",
             (("lr", 1e-2), ("alpha", 0.99), ("eps", 1e-8), ("weight_decay", 0.0),
              ("momentum", 0.0), ("centered", False), ("maximize", False)),
             ("square_avg", "momentum_buffer", "grad_avg"),
             {"momentum_buffer": "momentum", "grad_avg": "centered"},
             kernel_state=("square_avg", "grad_avg", "momentum_buffer"),
             state_formats=("bfloat16", "8bit"), unsigned_state=("square_avg",),
             bounds=(("lr", "nonneg", "learning rate"), ("eps", "nonneg", "epsilon value"),
                     ("momentum", "nonneg", "momentum value"),
                     ("weight_decay", "nonneg", "weight_decay value"),
                     ("alpha", "nonneg", "alpha value"))),
    RuleSpec("adam", "Adam", _ADAM, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
             {"max_exp_avg_sq": "amsgrad"}, kernel_options={"decoupled_weight_decay": False},
             state_formats=("bfloat16", "8bit"), bounds=_ADAM_BOUNDS,
             unsigned_state=("exp_avg_sq", "max_exp_avg_sq")),
    RuleSpec("adamw", "AdamW", tuple((k, 1e-2 if k == "weight_decay" else v)
                                     for k, v in _ADAM),
             ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), {"max_exp_avg_sq": "amsgrad"},
             kernel="adam", kernel_options={"decoupled_weight_decay": True},
             state_formats=("bfloat16", "8bit"), bounds=_ADAM_BOUNDS,
             unsigned_state=("exp_avg_sq", "max_exp_avg_sq")),
    RuleSpec("adamax", "Adamax",
             (("lr", 2e-3), ("betas", (0.9, 0.999)), ("eps", 1e-8), ("weight_decay", 0.0),
              ("maximize", False)),
             ("exp_avg", "exp_inf"), state_formats=("bfloat16", "8bit"),
             bounds=_ADAM_BOUNDS, unsigned_state=("exp_inf",)),
    RuleSpec("adadelta", "Adadelta",
             (("lr", 1.0), ("rho", 0.9), ("eps", 1e-6), ("weight_decay", 0.0),
              ("maximize", False)),
             ("square_avg", "acc_delta"), state_formats=("bfloat16", "8bit"),
             unsigned_state=("square_avg", "acc_delta"),
             bounds=(("lr", "nonneg", "learning rate"), ("rho", "closed_unit", "rho value"),
                     ("eps", "nonneg", "epsilon value"),
                     ("weight_decay", "nonneg", "weight_decay value"))),
    RuleSpec("radam", "RAdam",
             (("lr", 1e-3), ("betas", (0.9, 0.999)), ("eps", 1e-8), ("weight_decay", 0.0),
              ("decoupled_weight_decay", False), ("maximize", False)),
             ("exp_avg", "exp_avg_sq"), state_formats=("bfloat16", "8bit"),
             bounds=_ADAM_BOUNDS, unsigned_state=("exp_avg_sq",)),
    RuleSpec("rprop", "Rprop",
             (("lr", 1e-2), ("etas", (0.5, 1.2)), ("step_sizes", (1e-6, 50)),
              ("maximize", False)),
             ("prev", "step_size"), state_formats=("bfloat16", "8bit"),
             unsigned_state=("step_size",), bounds=(("lr", "nonneg", "learning rate"),)),
    RuleSpec("nadam", "NAdam",
             (("lr", 2e-3), ("betas", (0.9, 0.999)), ("eps", 1e-8), ("weight_decay", 0.0),
              ("momentum_decay", 4e-3), ("decoupled_weight_decay", False),
              ("maximize", False)),
             ("exp_avg", "exp_avg_sq"), state_formats=("bfloat16", "8bit"),
             unsigned_state=("exp_avg_sq",), scalar_state=(("mu_product", 1.0),),
             bounds=_ADAM_BOUNDS + (("momentum_decay", "nonneg", "momentum_decay value"),)),
    RuleSpec("asgd", "ASGD",
             (("lr", 1e-2), ("lambd", 1e-4), ("alpha", 0.75), ("t0", 1e6),
              ("weight_decay", 0.0), ("maximize", False)),
             ("ax",), state_formats=("bfloat16", "8bit"),
             scalar_state=(("eta", None), ("mu", 1.0)),
             bounds=(("lr", "nonneg", "learning rate"),
                     ("weight_decay", "nonneg", "weight_decay value"))),
    # beyond torch.optim: the names and defaults of the package people use (the oracle
    # of the tests): lion_pytorch.Lion (its assert: betas in [0, 1])
    RuleSpec("lion", "Lion",
             (("lr", 1e-4), ("betas", (0.9, 0.99)), ("weight_decay", 0.0),
              ("maximize", False)),
             ("exp_avg",), counts_steps=False, state_formats=("bfloat16", "8bit"),
             oracle=("lion-pytorch", "lion_pytorch", "Lion"),
             bounds=(("lr", "nonneg", "learning rate"),
                     ("betas[0]", "closed_unit", "beta parameter at index 0"),
                     ("betas[1]", "closed_unit", "beta parameter at index 1"),
                     ("weight_decay", "nonneg", "weight_decay value"))),
    # pytorch_optimizer.ADOPT (its step is the group's)
    RuleSpec("adopt", "ADOPT",
             (("lr", 1e-3), ("betas", (0.9, 0.9999)), ("clip_lambda", adopt_clip),
              ("weight_decay", 0.0), ("weight_decouple", False), ("fixed_decay", False),
              ("eps", 1e-6), ("maximize", False)),
             ("exp_avg", "exp_avg_sq"), counts_steps=False, group_step="step",
             attributes=("clip_lambda", "maximize"),
             state_formats=("bfloat16", "8bit"), unsigned_state=("exp_avg_sq",),
             oracle=("pytorch-optimizer", "pytorch_optimizer", "ADOPT"),
             bounds=(("lr", "nonneg", "learning rate"),
                     ("betas[0]", "unit", "beta parameter at index 0"),
                     ("betas[1]", "unit", "beta parameter at index 1"),
                     ("weight_decay", "nonneg", "weight_decay value"),
                     ("eps", "nonneg", "epsilon value"))),
    # pytorch_optimizer.AdEMAMix (its step is the group's; beta3 may be 1)
    RuleSpec("ademamix", "AdEMAMix",
             (("lr", 1e-3), ("betas", (0.9, 0.999, 0.9999)), ("weight_decay", 0.0),
              ("weight_decouple", False), ("fixed_decay", False), ("alpha", 5.0),
              ("t_alpha_beta3", None), ("eps", 1e-8), ("maximize", False)),
             ("exp_avg", "exp_avg_sq", "exp_avg_slow"), counts_steps=False,
             group_step="step", attributes=("maximize",),
             state_formats=("bfloat16", "8bit"), unsigned_state=("exp_avg_sq",),
             oracle=("pytorch-optimizer", "pytorch_optimizer", "AdEMAMix"),
             bounds=(("lr", "nonneg", "learning rate"),
                     ("betas[0]", "unit", "beta parameter at index 0"),
                     ("betas[1]", "unit", "beta parameter at index 1"),
                     ("betas[2]", "closed_unit", "beta parameter at index 2"),
                     ("alpha", "nonneg", "alpha value"),
                     ("weight_decay", "nonneg", "weight_decay value"),
                     ("eps", "nonneg", "epsilon value"))),
    # pytorch_optimizer.SophiaH (its step is the group's; the Hessian-diagonal estimate
    # an input on the steps that update its average; update_period, num_samples and
    # hessian_distribution are for the torch class, which estimates it)
    RuleSpec("sophiah", "SophiaH",
             (("lr", 6e-2), ("betas", (0.96, 0.99)), ("weight_decay", 0.0),
              ("weight_decouple", True), ("fixed_decay", False), ("p", 1e-2),
              ("update_period", 10), ("num_samples", 1),
              ("hessian_distribution", "gaussian"), ("eps", 1e-12), ("maximize", False)),
             ("momentum", "hessian_moment"), counts_steps=False, group_step="step",
             inputs=("hessians",),
             attributes=("maximize", "update_period", "num_samples", "hessian_distribution"),
             state_formats=("bfloat16", "8bit"),
             oracle=("pytorch-optimizer", "pytorch_optimizer", "SophiaH"),
             bounds=(("lr", "nonneg", "learning rate"),
                     ("betas[0]", "unit", "beta parameter at index 0"),
                     ("betas[1]", "unit", "beta parameter at index 1"),
                     ("weight_decay", "nonneg", "weight_decay value"),
                     ("p", "nonneg", "p (update clip) value"),
                     ("eps", "nonneg", "epsilon value"))),
    # schedulefree.AdamWScheduleFree (its count is group["k"]; the group also keeps the
    # schedule's running values, as the oracle). z is an iterate, not a statistic: it
    # stays in the parameters' dtype (no compressed formats)
    RuleSpec("adamw_schedulefree", "AdamWScheduleFree",
             (("lr", 0.0025), ("betas", (0.9, 0.999)), ("eps", 1e-8), ("weight_decay", 0.0),
              ("warmup_steps", 0), ("r", 0.0), ("weight_lr_power", 2.0),
              ("maximize", False)),
             ("z", "exp_avg_sq"), counts_steps=False, group_step="k", param_copies=("z",),
             attributes=("maximize",),
             oracle=("schedulefree", "schedulefree", "AdamWScheduleFree"),
             bounds=(("lr", "nonneg", "learning rate"),
                     ("betas[0]", "unit", "beta parameter at index 0"),
                     ("betas[1]", "unit", "beta parameter at index 1"),
                     ("eps", "nonneg", "epsilon value"),
                     ("weight_decay", "nonneg", "weight_decay value"))),
    # not element-wise: a matrix's second moment is factored into row and column means
    # (their shapes: state_shape), the step scaled by RMS(p) and clipped by RMS(update);
    # its own kernel (no compressed formats: the factors are already sublinear)
    RuleSpec("adafactor", "Adafactor",
             (("lr", 1e-2), ("beta2_decay", -0.8), ("eps", (None, 1e-3)), ("d", 1.0),
              ("weight_decay", 0.0), ("maximize", False)),
             ("row_var", "col_var", "variance"), factored=("row_var", "col_var"),
             unsigned_state=("row_var", "col_var", "variance"),
             bounds=(("lr", "nonneg", "learning rate", "Learning rate should be >= 0 but is: {}"),
                     ("beta2_decay", "nonpos", "beta2_decay",
                      "beta2_decay should be <= 0 but is: {}"),
                     ("eps[0]", "nonneg", "epsilon1", "epsilon1 should be >= 0 but is: {}"),
                     ("eps[1]", "nonneg", "epsilon2", "epsilon2 should be >= 0 but is: {}"),
                     ("d", "at_least_one", "clipping threshold d",
                      "Clipping threshold d should be >= 1 but is: {}"),
                     ("weight_decay", "nonneg", "weight_decay value",
                      "weight_decay should be >= 0 but is: {}"))),
    RuleSpec("adahessian", "AdaHessian",
             (("lr", 0.15), ("betas", (0.9, 0.999)), ("eps", 1e-4), ("weight_decay", 0.0),
              ("hessian_power", 1.0), ("maximize", False)),
             ("exp_avg", "exp_hessian_diag_sq"), inputs=("hessian_diags",),
             bounds=_ADAM_BOUNDS, unsigned_state=("exp_hessian_diag_sq",)),
)}


def spec(name):
    """The registry entry of rule ``name`` (``"adam"``, ...)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"no rule {name!r}; the rules are {', '.join(REGISTRY)}") from None
