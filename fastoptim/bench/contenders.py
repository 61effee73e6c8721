"""Contenders: one implementation in one configuration (NumPy reference, fastoptim,
the ceiling loop, torch.optim), and every contender for a rule over a case's arrays."""
import math

import numpy as np

from .. import _config, functional, reference
from ..rules import spec
from .threads import SerialPolicy

_kernels = _config._kernels


class Contender:
    """One implementation in one configuration.

    ``call()`` is timed; ``warm()`` runs untimed before each block; ``before()`` sets
    global state the call depends on (fastoptim's thread count, the ceiling's exact
    thread team) and ``after()`` undoes what must not outlive the block; ``settle(calls,
    warms)``, after a block of that many calls and warm-ups, puts the arrays back as
    they were (the ceiling loop). ``threads_used`` is filled in by the case: the
    threads the calls really ran on (``threads`` unless fastoptim stayed serial)."""

    def __init__(self, impl, variant, threads, call, warm=None, before=None,
                 settle=None, period=1, after=None):
        self.impl = impl            # "numpy", "fastoptim", "torch", "ceiling"
        self.variant = variant      # "", "optimizer class", "single-tensor", "foreach", "fused"
        self.threads = threads
        self.threads_used = threads
        self.call = call
        self.warm = warm if warm is not None else call
        self.before = before
        self.after = after
        self.settle = settle
        self.period = period        # settle is free after blocks of a multiple of this

    @property
    def label(self):
        name = {"numpy": "numpy reference", "ceiling": "ceiling (traffic)"}.get(
            self.impl, self.impl)
        return f"{name} {self.variant}".strip()

    @property
    def key(self):
        return f"{self.impl}:{self.variant}:{self.threads}"


def _numpy_call(rule, P, G, S):
    steps = np.zeros(len(P), dtype=np.int64)
    return lambda: rule.call(reference, P, G, S, steps)


def _fastoptim_call(rule, P, G, S):
    steps = np.zeros(len(P), dtype=np.int64)
    return lambda: rule.call(functional, P, G, S, steps)


def _ceiling_contender(P, G, S, threads, warm=None, policy=None, passes=None):
    """The same-traffic loop on exactly ``threads`` threads over P, G, S (``warm``:
    prefix views for the warm-up), once per pass (``passes``: the state arrays each
    pass moves, or "read" for a pass that only reads p and g; default one pass over
    all of S). Each pass moves every value one step
    around the cycle p <- s0 <- s1 ... <- p (1 + its states' arrays); ``settle``
    completes the cycles. With more than one thread, ``before``/``after`` switch the
    kernels' serial threshold off and back (``policy``, a :class:`SerialPolicy`), so
    the loop runs a team of ``threads`` at every size."""
    prepare = _kernels.prepare_traffic
    passes = (len(S),) if passes is None else tuple(passes)
    period = math.lcm(*(1 + k for k in passes if k != "read"))

    def run(P, G, S):
        for k in passes:
            if k == "read":       # (the non-finite scan: p and g read once, in parallel)
                _kernels.first_nonfinite(P + G, threads)
            else:
                prepare(P, G, S[:k]).run(threads)

    def call():
        run(P, G, S)

    def warm_call():
        run(*warm)

    def settle(calls, warms):
        if warm is None:
            calls, warms = calls + warms, 0
        for _ in range(-calls % period):
            call()
        for _ in range(-warms % period):
            warm_call()

    exact = threads > 1 and policy is not None
    return Contender("ceiling", "", threads, call, warm_call if warm else None,
                     before=policy.force_exact if exact else None,
                     after=policy.restore if exact else None,
                     settle=settle, period=period)


def _set_fo_threads(n):
    return lambda: _config.set_num_threads(n)


def _torch_call(torch, rule, P, G, S, variant):
    """A torch.optim step over ``torch.from_numpy`` views of P, with p.grad set once and
    every state tensor living in the arrays of S.

    The state's structure (names, the step counter's dtype) comes from one step of the
    same optimizer on a one-element tensor; each parameter then gets that state with
    its tensors replaced by views of S, so torch never allocates state of its own (and
    no full-size step is spent on setting up)."""
    cls, kw = _torch_class(torch, rule, variant)
    if rule.spec.factored:
        # (Adafactor: torch makes its own factors, at the first, untimed, warm-up step)
        tp = [torch.from_numpy(rule.view(p)) for p in P]
        for t, g in zip(tp, G):
            t.grad = torch.from_numpy(rule.view(g))
        return cls(tp, **rule.torch_kwargs, **kw).step
    dtype = torch.from_numpy(P[0][:0].reshape(-1)).dtype
    probe = torch.zeros(1, dtype=dtype)
    probe.grad = torch.ones(1, dtype=dtype)
    probe_opt = _ready(cls([probe], **rule.torch_kwargs, **kw))
    probe_opt.step()
    template = probe_opt.state[probe]
    scalars = {n for n, _ in rule.spec.scalar_state}
    if set(template) - {"step"} - scalars != set(rule.torch_state):
        raise RuntimeError(f"{cls.__module__}.{cls.__name__} keeps state "
                           f"{sorted(template)}, expected {list(rule.torch_state)}")
    tp = [torch.from_numpy(p) for p in P]
    for t, g in zip(tp, G):
        t.grad = torch.from_numpy(g)
    opt = _ready(cls(tp, **rule.torch_kwargs, **kw))
    for i, t in enumerate(tp):
        state = {name: value.clone() for name, value in template.items()}
        for slot, name in enumerate(rule.torch_state):
            state[name] = torch.from_numpy(S[slot][i])
        opt.state[t] = state
    return opt.step


def _ready(opt):
    """An optimizer ready to step: Schedule-Free's in train mode (its oracle and
    fastoptim's classes refuse a step in eval mode)."""
    if hasattr(opt, "train") and hasattr(opt, "eval"):
        opt.train()
    return opt


def _torch_class(torch, rule, variant):
    """The optimizer class and keyword arguments of a torch variant: torch.optim's
    class (single-tensor, foreach, fused), or a rule's oracle package's (its own
    variant name)."""
    if rule.oracle is not None:
        import importlib
        package, module, name = rule.oracle
        return getattr(importlib.import_module(module), name), {}
    kw = {"single-tensor": dict(foreach=False), "foreach": dict(foreach=True),
          "fused": dict(fused=True)}[variant]
    return getattr(torch.optim, rule.torch_name), kw


def _dropin_call(torch, rule, P, G):
    """fastoptim.torch's optimizer (the drop-in for torch.optim) on nn.Parameters copied
    from P, with .grad set once: what a PyTorch user's step() costs."""
    from .. import torch as fot
    params = [torch.nn.Parameter(torch.from_numpy(rule.view(p.copy()))) for p in P]
    for t, g in zip(params, G):
        t.grad = torch.from_numpy(rule.view(g.copy()))
    opt = _ready(getattr(fot, rule.torch_name)(params, **rule.torch_kwargs))
    if rule.spec.inputs:      # (SophiaH: its estimate, once)
        opt.step(hessian=[torch.ones_like(p) for p in params])
    return opt.step


def _torch_variants(rule):
    if rule.oracle is not None:
        return (rule.oracle[0],)
    return ("single-tensor", "foreach") + (("fused",) if rule.torch_fused else ())


def build_contenders(rule, arrays, threads, torch=None, warm_prefix=None,
                     with_optimizer_class=False, notes=None, policy=None):
    """Every contender for ``rule`` on ``arrays``; ``threads`` is the list of thread
    counts for fastoptim and the ceiling (torch runs on the largest). ``policy``: the
    run's :class:`SerialPolicy` (a new one by default)."""
    policy = policy if policy is not None else SerialPolicy()
    P, G, S = arrays.view(rule.n_state)
    warm = arrays.view(rule.n_state, warm_prefix) if warm_prefix else None
    out = [Contender("numpy", "", 1, _numpy_call(rule, P, G, S),
                     _numpy_call(rule, *warm) if warm else None)]
    for n in threads:
        out.append(Contender("fastoptim", "", n, _fastoptim_call(rule, P, G, S),
                             _fastoptim_call(rule, *warm) if warm else None,
                             before=_set_fo_threads(n)))
    if with_optimizer_class:
        n = max(threads)
        from .. import optim
        cls = getattr(optim, rule.torch_name)
        opt = _ready(cls([rule.view(p.copy()) for p in P], **rule.torch_kwargs))
        grads = [rule.view(g.copy()) for g in G]
        if opt._rule.inputs:                      # (SophiaH: its estimate, once)
            opt.step(grads, [np.ones_like(g) for g in grads])
        out.append(Contender("fastoptim", "optimizer class", n, lambda: opt.step(grads),
                             before=_set_fo_threads(n)))
        if torch is not None:
            out.append(Contender("fastoptim", "torch drop-in", n,
                                 _dropin_call(torch, rule, P, G), before=_set_fo_threads(n)))
    for n in sorted(set(threads) | {1}):     # 1 thread: the NumPy reference's ceiling
        out.append(_ceiling_contender(P, G, S, n, warm, policy, rule.passes))
    if torch is not None:
        n = torch.get_num_threads()
        for variant in _torch_variants(rule):
            try:
                call = _torch_call(torch, rule, P, G, S, variant)
                wcall = _torch_call(torch, rule, *warm, variant) if warm else None
            except Exception as exc:   # a variant this torch build lacks
                if notes is not None:
                    notes.append(f"torch {rule.torch_name} {variant}: skipped "
                                 f"({type(exc).__name__}: {exc})")
                continue
            out.append(Contender("torch", variant, n, call, wcall))
    return out
