"""The benchmark's rules: hyperparameters and how each implementation is called."""
import numpy as np

from ..rules import spec


class Rule:
    """One update rule as the benchmark runs it: a registry entry (fastoptim.rules) and
    the options it is run with.

    ``call(module, params, grads, states, steps)`` runs one step through
    :mod:`fastoptim.functional` or :mod:`fastoptim.reference` (same signatures);
    ``states`` is a list of ``n_state`` lists of arrays, the state the registry says
    ``options`` keep, in its order (``torch_state``: torch's names for them). ``kernel``
    is the kernel family that runs it (the name its serial threshold is calibrated
    under, ``_kernels.calibration``). ``oracle``: for a rule torch.optim lacks, the
    registry's ``(package, module, class)`` whose optimizer the benchmark runs in
    torch's place, if installed (None for torch.optim's rules).
    """

    def __init__(self, key, title, call, name, options, torch_fused, kernel, view=None,
                 passes=None):
        entry = spec(name)
        self.spec = entry                   # (the registry entry)
        self.key = key
        self.title = title
        self.call = call
        self.torch_name = entry.title
        self.torch_kwargs = options
        # (factored state is not shaped like the parameter: the rule keeps its own, and
        # torch's optimizer makes its own, not views of the case's state arrays)
        self.torch_state = () if entry.factored else \
            entry.state_names(dict(entry.defaults, **options))
        self.n_state = len(self.torch_state)
        self.torch_fused = torch_fused
        self.kernel = kernel
        self.oracle = entry.oracle or None
        #: ``view(array)``: the array as the rule steps it (Adafactor: a matrix)
        self.view = view if view is not None else (lambda a: a)
        #: the passes of the same-traffic ceiling, each a traffic loop over this many
        #: state arrays, or "read" (p and g read, nothing written): what the rule's own
        #: passes must move (one pass for an element-wise rule)
        self.passes = passes if passes is not None else (self.n_state,)

    def __repr__(self):
        return f"Rule({self.key!r})"


def _matrix(a):
    """A 1-D array of a multiple of 1024 elements (at least 2^14) as a matrix of 1024
    columns; other arrays as they are (a vector's Adafactor keeps a full second moment)."""
    if a.ndim == 1 and a.size >= 1 << 14 and a.size % 1024 == 0:
        return a.reshape(-1, 1024)
    return a


RULES = {r.key: r for r in (
    Rule("sgd", "SGD",
         lambda m, P, G, S, st: m.sgd_(P, G, None, None, lr=1e-3),
         "sgd", dict(lr=1e-3), True, "sgd"),
    Rule("sgd_momentum", "SGD-momentum",
         lambda m, P, G, S, st: m.sgd_(P, G, S[0], st, lr=1e-3, momentum=0.9),
         "sgd", dict(lr=1e-3, momentum=0.9), True, "sgd"),
    Rule("adagrad", "Adagrad",
         lambda m, P, G, S, st: m.adagrad_(P, G, S[0], st, lr=1e-2),
         "adagrad", dict(lr=1e-2), True, "adagrad"),
    Rule("rmsprop", "RMSprop",
         lambda m, P, G, S, st: m.rmsprop_(P, G, S[0], None, None, st, lr=1e-2),
         "rmsprop", dict(lr=1e-2), False, "rmsprop"),
    Rule("adam", "Adam",
         lambda m, P, G, S, st: m.adam_(P, G, S[0], S[1], None, st, lr=1e-3),
         "adam", dict(lr=1e-3), True, "adam"),
    Rule("adamw", "AdamW",
         lambda m, P, G, S, st: m.adamw_(P, G, S[0], S[1], None, st, lr=1e-3,
                                         weight_decay=1e-2),
         "adamw", dict(lr=1e-3, weight_decay=1e-2), True, "adam"),
    Rule("adamax", "Adamax",
         lambda m, P, G, S, st: m.adamax_(P, G, S[0], S[1], st, lr=2e-3),
         "adamax", dict(lr=2e-3), False, "adamax"),
    Rule("adadelta", "Adadelta",
         lambda m, P, G, S, st: m.adadelta_(P, G, S[0], S[1], st, lr=1.0),
         "adadelta", dict(lr=1.0), False, "adadelta"),
    Rule("radam", "RAdam",
         lambda m, P, G, S, st: m.radam_(P, G, S[0], S[1], st, lr=1e-3),
         "radam", dict(lr=1e-3), False, "radam"),
    Rule("rprop", "Rprop",
         lambda m, P, G, S, st: m.rprop_(P, G, S[0], S[1], st),
         "rprop", dict(lr=1e-2), False, "rprop"),
    Rule("nadam", "NAdam",
         lambda m, P, G, S, st: m.nadam_(P, G, S[0], S[1],
                                         _scalars(P, "mu_product", 1.0, st), st,
                                    lr=2e-3),
         "nadam", dict(lr=2e-3), False, "nadam"),
    Rule("asgd", "ASGD",
         lambda m, P, G, S, st: m.asgd_(P, G, S[0], _scalars(P, "eta", 1e-2, st),
                                        _scalars(P, "mu", 1.0, st), st, lr=1e-2, t0=10),
         "asgd", dict(lr=1e-2, t0=10), False, "asgd"),
    Rule("lion", "Lion",
         lambda m, P, G, S, st: m.lion_(P, G, S[0], st, lr=1e-4, weight_decay=0.1),
         "lion", dict(lr=1e-4, weight_decay=0.1), False, "lion"),
    Rule("adopt", "ADOPT",
         lambda m, P, G, S, st: m.adopt_(P, G, S[0], S[1], st, lr=1e-3),
         "adopt", dict(lr=1e-3), False, "adopt"),
    Rule("ademamix", "AdEMAMix",
         lambda m, P, G, S, st: m.ademamix_(P, G, S[0], S[1], S[2], st, lr=1e-3),
         "ademamix", dict(lr=1e-3), False, "ademamix"),
    # (the steps between Hessian updates, which the issue times: the estimate is the
    # caller's, or autograd's; the classes get one at a first, untimed step)
    Rule("sophiah", "SophiaH",
         lambda m, P, G, S, st: m.sophiah_(P, G, None, S[0], S[1], st, lr=6e-2),
         "sophiah", dict(lr=6e-2, update_period=10**9), False, "sophiah"),
    # (a mid-run step: the average's weight 0.01)
    Rule("adamw_schedulefree", "AdamWScheduleFree",
         lambda m, P, G, S, st: m.adamw_schedulefree_(P, G, S[0], S[1], st, lr=0.0025,
                                                      ckp1=0.01),
         "adamw_schedulefree", dict(lr=0.0025), False, "adamw-schedulefree"),
    # (a matrix of 1024 columns: its row and column factors; its passes read p and g,
    # then read p and g and write p -- a read-only pass and a plain-SGD loop)
    Rule("adafactor", "Adafactor",
         lambda m, P, G, S, st: m.adafactor_(*_adafactor_arrays(P, G), st, lr=1e-2),
         "adafactor", dict(lr=1e-2), False, "adafactor", view=_matrix,
         passes=("read", 0)),
)}


_SCALARS = {}
_FACTORS = {}


def _adafactor_arrays(P, G):
    """(params, grads, row_vars, col_vars, variances) of an Adafactor step over P, G
    (seen through _matrix), its state kept between the benchmark's steps (one entry per
    list of parameters, looked up by the list's identity: the 16-element case times the
    call, not this)."""
    entry = _FACTORS.get(id(P))
    if entry is None or entry[0] is not P or entry[1] is not G:
        if len(_FACTORS) > 8:
            _FACTORS.clear()
        s = spec("adafactor")
        mP = [_matrix(p) for p in P]
        state = [[None if s.state_shape(n, p.shape) is None
                  else np.zeros(s.state_shape(n, p.shape), p.dtype) for p in mP]
                 for n in s.state]
        entry = _FACTORS[id(P)] = (P, G, (mP, [_matrix(g) for g in G], *state))
    return entry[2]


def _scalars(params, name, initial, steps):
    """A rule's per-parameter scalar state (NAdam's mu_product, ASGD's eta and mu: 0-d
    float32 from ``initial``), one list per parameter list and step counter (each
    contender's own: ASGD's mu follows its counter, and a reference sharing it with the
    kernel set it back to 1 between the kernel's steps), kept between its steps as an
    optimizer keeps it."""
    key = (name, id(steps)) + tuple(id(p) for p in params)
    if key not in _SCALARS:
        if len(_SCALARS) > 64:
            _SCALARS.clear()
        _SCALARS[key] = [np.full((), initial, np.float32) for _ in params]
    return _SCALARS[key]


def bytes_per_element(rule, itemsize):
    """Bytes a step moves per element: read p, g and each state; write p and each state
    (per pass of the rule: Adafactor's matrices read p and g, then update p).

    fp32: plain SGD 12, one state array (SGD-momentum, Adagrad, RMSprop) 20, Adam 28,
    Adafactor 20."""
    return sum(2 if k == "read" else 3 + 2 * k for k in rule.passes) * itemsize
