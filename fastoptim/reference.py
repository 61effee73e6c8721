"""The specification: one readable NumPy function per update rule.

Every function here has the same signature and the same in-place effect as its
compiled twin in :mod:`fastoptim.functional`; the tests hold the two equal and the
benchmarks time the compiled one against this one. Each function updates lists of
arrays in place (a single array is accepted too). ``grads[i] is None`` skips
parameter i entirely, as a missing ``.grad`` does in torch.optim. ``steps`` is an
``int64`` array with one counter per parameter; it is incremented in place for every
parameter that is updated, like torch's ``state_steps``.

The operation order follows torch.optim's default implementation, so that results
agree to rounding: ``x.add_(y, alpha=a)`` is ``x + a*y``, ``addcmul`` is
``x + (v*a)*b``, ``addcdiv`` is ``x + (v*a)/b``, and lerp is torch's two-sided formula.
Every scalar that depends only on the step is computed in double precision, then used
in the arrays' dtype (NumPy 2 treats Python floats as weak scalars).
"""
import functools
import inspect
import math

import numpy as np

__all__ = ["sgd_", "adagrad_", "rmsprop_", "adam_", "adamw_", "adamax_", "adadelta_",
           "radam_", "rprop_", "nadam_", "asgd_", "lion_", "adopt_",
           "ademamix_", "sophiah_", "adamw_schedulefree_", "adafactor_", "adahessian_",
           "newton_", "bfloat16_to_float32", "float32_to_bfloat16"]


def _as_list(x):
    if x is None or isinstance(x, np.ndarray):
        return [x]
    return list(x)


def _lerp(start, end, weight):
    """torch.lerp: start + w*(end-start) for w < 0.5, else end - (end-start)*(1-w)."""
    if weight < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1.0 - weight)


def _scalar(value, like):
    """A step scalar computed in double, rounded to the arrays' dtype."""
    return like.dtype.type(value)


# --- bfloat16 state: the upper half of a float32, stored in uint16 arrays --------------

def bfloat16_to_float32(bits):
    """bfloat16 values, stored as their bits in a uint16 array -> float32 (exact).

    This is how bfloat16 optimizer state (``state_dtype="bfloat16"``) is kept: read it
    as numbers with ``fastoptim.bfloat16_to_float32(opt.state[0]["exp_avg"])``. The
    result is a new float32 array of the same shape and memory order. ``bits`` is
    normally a uint16 array; an int16 array is read as the same 16 bits (PyTorch's
    ``t.view(torch.int16).numpy()`` of a bfloat16 tensor ``t``), other integers must
    lie in [0, 65535]. Floating-point input is refused (``TypeError``): it holds
    values, not bits (round values with :func:`float32_to_bfloat16`).
    """
    bits = np.asarray(bits)
    if bits.dtype == np.int16:
        bits = bits.view(np.uint16)
    elif bits.dtype != np.uint16:
        if bits.dtype.kind not in "iu":
            raise TypeError("bits must hold bfloat16 bits (a uint16 array), got dtype "
                            f"{bits.dtype}; float32_to_bfloat16 rounds values to bfloat16")
        if bits.size and (bits.min() < 0 or bits.max() > 0xFFFF):
            raise ValueError("bits must hold bfloat16 bits, integers in [0, 65535]; got "
                             f"values in [{bits.min()}, {bits.max()}]")
    return (bits.astype(np.uint32) << 16).view(np.float32)


def hash32(x):
    """The 32-bit integer hash used for stochastic rounding (Python int or uint32 array)."""
    if isinstance(x, (np.ndarray, np.generic)):
        x = np.array(x, dtype=np.uint32)       # arrays wrap silently on overflow
        x ^= x >> 16
        x *= np.uint32(0x7FEB352D)
        x ^= x >> 15
        x *= np.uint32(0x846CA68B)
        x ^= x >> 16
        return x
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def float32_to_bfloat16(x, random_bits=None):
    """float32 values -> bfloat16, as their bits in a new uint16 array.

    Rounds to nearest, ties to even (the optimizers' ``rounding="nearest"``), or, given
    ``random_bits`` (uint32, one per element, the low 16 used), stochastically: up with
    probability dropped/2^16. NaN stays NaN (quiet), ±Inf stays ±Inf, and values
    beyond bfloat16's range round to ±Inf. float64 input is rounded once, directly (not
    through float32, which could round twice); other input is converted to float32.
    ``float32_to_bfloat16(bfloat16_to_float32(b))`` gives ``b`` back for every non-NaN
    ``b``.
    """
    x = np.asarray(x)
    if x.dtype.kind == "f" and x.dtype.itemsize > 4:
        x = _f64_to_f32_round_to_odd(x)
    u = np.asarray(x, np.float32).view(np.uint32)
    if random_bits is None:
        rounded = (u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16
    else:
        rounded = (u + (random_bits & np.uint32(0xFFFF))) >> 16
    nan = (u >> 16) | np.uint32(0x40)
    return np.where(np.isnan(x), nan, rounded).astype(np.uint16)


def _f64_to_f32_round_to_odd(x):
    """float64 -> float32 rounded toward zero, with the last bit set when inexact
    ("round to odd"): rounding that to bfloat16 (16 bits shorter) equals rounding
    the float64 value to bfloat16 directly."""
    x = np.asarray(x, np.float64)
    with np.errstate(over="ignore"):
        y = x.astype(np.float32)              # nearest; an overflow gives ±Inf
    back = y.astype(np.float64)
    inexact = (back != x) & np.isfinite(back)
    u = y.view(np.uint32)                     # (y is a new array)
    u -= (inexact & (np.abs(back) > np.abs(x))).astype(np.uint32)   # toward zero
    u |= inexact.astype(np.uint32)
    return u.view(np.float32).reshape(x.shape)


def _memory_index(p):
    """Each element's position in memory within its array, as uint32."""
    order = "F" if p.flags.f_contiguous and not p.flags.c_contiguous else "C"
    return np.arange(p.size, dtype=np.uint32).reshape(p.shape, order=order)


def _stored_state(state, touched, unsigned=()):
    """A rule's reference, taking its state in another storage format too.

    ``state``: the rule's state arguments, in order; ``touched(options)``: those the
    rule reads and writes under ``options`` (its arguments). With
    ``state_dtype="bfloat16"`` (float32 parameters only) those are uint16 arrays of
    bfloat16 bits: the rule runs on their float32 values (so the parameter update uses
    this step's unrounded state) and each is rounded once when stored back, to nearest
    even (``rounding="nearest"``) or stochastically (``"stochastic"``). Stochastic
    rounding draws element k's 16 random bits for the j-th of the rule's state
    arguments (j from 1, whether the options use the others or not) from
    ``hash32(k * 0x9E3779B9 ^ key_q)``, ``q = (j + 1) // 2``: its low 16 bits for odd
    j, its high 16 for even j (one hash serves two states); k is the element's
    position in memory within its array, ``key_q = hash32(key ^ q)``, ``key`` a hash
    of ``seed``, the parameter's step and its position in the list.

    With ``state_dtype="8bit"``, a parameter's state arrays are uint8 codes, with their
    float32 block scales in ``absmaxes`` (one list per state argument, in order), or
    arrays in the parameter's dtype (a small parameter's): codes are decoded
    (:func:`fastoptim.formats.dequantize_blockwise`), the rule runs on the float32
    values, and each array is encoded again with new block scales
    (:func:`~fastoptim.formats.quantize_blockwise`); ``unsigned`` names the state that
    is never negative (the unsigned map), the rest take the signed map."""
    def wrap(rule):
        sig = inspect.signature(rule)

        @functools.wraps(rule)
        def update(*args, state_dtype=None, rounding="nearest", seed=0, absmaxes=None,
                   **kwargs):
            if state_dtype is None:
                return rule(*args, **kwargs)
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            names = touched(a)
            if state_dtype == "8bit":
                return _run_8bit(rule, a, names, absmaxes)
            stored = {n: _as_list(a[n]) for n in names}
            wide = {n: [None if x is None else np.asarray(bfloat16_to_float32(x))
                        for x in lst]
                    for n, lst in stored.items()}
            rule(**dict(a, **wide))
            params, grads, steps = _as_list(a["params"]), _as_list(a["grads"]), a["steps"]
            for i, (p, g) in enumerate(zip(params, grads)):
                if g is None:
                    continue
                if rounding == "stochastic":
                    key = hash32(hash32(hash32(seed) ^ (int(steps[i]) & 0xFFFFFFFF)) ^ i)
                    h = _memory_index(p) * np.uint32(0x9E3779B9)
                for n in names:
                    j = state.index(n) + 1
                    bits = ((hash32(h ^ np.uint32(hash32(key ^ ((j + 1) // 2))))
                             >> np.uint32(16 * (1 - j % 2)))
                            if rounding == "stochastic" else None)
                    stored[n][i][...] = float32_to_bfloat16(wide[n][i], bits)

        def _run_8bit(rule, a, names, absmaxes):
            from .formats import dequantize_blockwise, quantize_blockwise
            grads = _as_list(a["grads"])
            stored = {n: _as_list(a[n]) for n in names}
            scales = {n: _as_list(absmaxes[state.index(n)]) for n in names}
            wide = {n: [x if x is None or x.dtype != np.uint8 else
                        dequantize_blockwise(x, scales[n][i], n not in unsigned)
                        for i, x in enumerate(lst)] for n, lst in stored.items()}
            rule(**dict(a, **wide))
            for i, g in enumerate(grads):
                if g is None:
                    continue
                for n in names:
                    if stored[n][i].dtype == np.uint8:
                        codes, amax = quantize_blockwise(wide[n][i], n not in unsigned)
                        stored[n][i][...] = codes
                        scales[n][i][...] = amax

        params = list(sig.parameters.values()) + [
            inspect.Parameter("state_dtype", inspect.Parameter.KEYWORD_ONLY, default=None),
            inspect.Parameter("rounding", inspect.Parameter.KEYWORD_ONLY, default="nearest"),
            inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, default=0),
            inspect.Parameter("absmaxes", inspect.Parameter.KEYWORD_ONLY, default=None)]
        update.__signature__ = sig.replace(parameters=params)
        del update.__wrapped__
        return update
    return wrap


@_stored_state(("momentum_buffers",),
               lambda o: ("momentum_buffers",) if o["momentum"] != 0 else ())
def sgd_(params, grads, momentum_buffers=None, steps=None, *, lr=1e-3, momentum=0.0,
         dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False):
    r"""Stochastic gradient descent, with optional (Nesterov) momentum.

    .. math::
        g &\leftarrow -\nabla \text{ if maximize else } \nabla \\
        g &\leftarrow g + \lambda p \quad (\lambda = \text{weight\_decay} \neq 0) \\
        b &\leftarrow g \text{ on the first step, else } \mu b + (1-\tau) g \\
        g &\leftarrow g + \mu b \text{ if nesterov else } b \quad (\mu \neq 0) \\
        p &\leftarrow p - \gamma g

    ``momentum_buffers`` and ``steps`` are needed when momentum is nonzero; a
    parameter whose step counter is 0 has its buffer set to the gradient.
    """
    params, grads = _as_list(params), _as_list(grads)
    bufs = _as_list(momentum_buffers) if momentum != 0 else [None] * len(params)
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        if steps is not None:
            steps[i] += 1
        g = -g if maximize else g.copy()
        if weight_decay != 0:
            g = g + _scalar(weight_decay, p) * p
        if momentum != 0:
            buf = bufs[i]
            if steps[i] == 1:
                buf[...] = g
            else:
                buf[...] = buf * _scalar(momentum, p) + _scalar(1 - dampening, p) * g
            g = g + _scalar(momentum, p) * buf if nesterov else buf.copy()
        p += _scalar(-lr, p) * g


@_stored_state(("state_sums",), lambda o: ("state_sums",), unsigned=("state_sums",))
def adagrad_(params, grads, state_sums, steps, *, lr=1e-2, lr_decay=0.0,
             weight_decay=0.0, eps=1e-10, maximize=False):
    r"""AdaGrad: per-coordinate steps scaled by the root of the summed squared grads.

    .. math::
        t &\leftarrow t + 1, \quad \tilde\gamma = \gamma / (1 + (t-1)\eta) \\
        g &\leftarrow \pm\nabla + \lambda p \\
        s &\leftarrow s + g^2 \\
        p &\leftarrow p - \tilde\gamma\, g / (\sqrt{s} + \epsilon)

    ``state_sums`` start at ``initial_accumulator_value`` (the optimizer's option).
    """
    params, grads, sums = _as_list(params), _as_list(grads), _as_list(state_sums)
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        steps[i] += 1
        clr = lr / (1 + (int(steps[i]) - 1) * lr_decay)
        g = -g if maximize else g
        if weight_decay != 0:
            g = g + _scalar(weight_decay, p) * p
        s = sums[i]
        s[...] = s + g * g
        p += (_scalar(-clr, p) * g) / (np.sqrt(s) + _scalar(eps, p))


@_stored_state(("square_avgs", "grad_avgs", "momentum_buffers"),
               lambda o: ("square_avgs",) + (("grad_avgs",) if o["centered"] else ())
               + (("momentum_buffers",) if o["momentum"] > 0 else ()),
               unsigned=("square_avgs",))
def rmsprop_(params, grads, square_avgs, grad_avgs=None, momentum_buffers=None,
             steps=None, *, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
             momentum=0.0, centered=False, maximize=False):
    r"""RMSProp: steps scaled by a decayed average of squared gradients.

    .. math::
        g &\leftarrow \pm\nabla + \lambda p \\
        v &\leftarrow \alpha v + (1-\alpha) g^2 \\
        \bar g &\leftarrow \alpha \bar g + (1-\alpha) g, \quad
            d = \sqrt{v - \bar g^2} + \epsilon \quad \text{(centered)} \\
        d &= \sqrt{v} + \epsilon \quad \text{(otherwise)} \\
        b &\leftarrow \mu b + g / d, \quad p \leftarrow p - \gamma b
            \quad (\mu > 0) \\
        p &\leftarrow p - \gamma g / d \quad \text{(otherwise)}

    ``grad_avgs`` are needed when centered, ``momentum_buffers`` when momentum > 0;
    ``steps`` is optional (counted when given).
    """
    params, grads, sqs = _as_list(params), _as_list(grads), _as_list(square_avgs)
    gas = _as_list(grad_avgs) if centered else [None] * len(params)
    bufs = _as_list(momentum_buffers) if momentum > 0 else [None] * len(params)
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        if steps is not None:
            steps[i] += 1
        g = -g if maximize else g
        if weight_decay != 0:
            g = g + _scalar(weight_decay, p) * p
        sq = sqs[i]
        sq[...] = sq * _scalar(alpha, p) + (_scalar(1 - alpha, p) * g) * g
        if centered:
            ga = gas[i]
            ga[...] = _lerp(ga, g, _scalar(1 - alpha, p))
            avg = np.sqrt(sq + (-ga) * ga) + _scalar(eps, p)
        else:
            avg = np.sqrt(sq) + _scalar(eps, p)
        if momentum > 0:
            buf = bufs[i]
            buf[...] = buf * _scalar(momentum, p) + g / avg
            p += _scalar(-lr, p) * buf
        else:
            p += (_scalar(-lr, p) * g) / avg


def _adam_moments(p, g, m, v, lr, betas, weight_decay, decoupled):
    """The first part of an Adam-family step (Adam, AdamW, RAdam), in place: weight
    decay (added to the gradient, or with ``decoupled`` applied to the parameter first)
    and the two moments, ``m`` lerped towards g and ``v`` decayed towards g^2. Returns
    the gradient as the moments saw it."""
    beta1, beta2 = betas
    if weight_decay != 0:
        if decoupled:
            p *= _scalar(1 - lr * weight_decay, p)
        else:
            g = g + _scalar(weight_decay, p) * p
    m[...] = _lerp(m, g, _scalar(1 - beta1, p))
    v[...] = v * _scalar(beta2, p) + (_scalar(1 - beta2, p) * g) * g
    return g


@_stored_state(("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
               lambda o: ("exp_avgs", "exp_avg_sqs")
               + (("max_exp_avg_sqs",) if o["amsgrad"] else ()),
               unsigned=("exp_avg_sqs", "max_exp_avg_sqs"))
def adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, steps=None, *,
          lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
          maximize=False, decoupled_weight_decay=False):
    r"""Adam (L2 weight decay), or AdamW with ``decoupled_weight_decay=True``.

    .. math::
        t &\leftarrow t + 1, \quad g \leftarrow \pm\nabla \\
        g &\leftarrow g + \lambda p \quad \text{(Adam)}, \qquad
        p \leftarrow p (1 - \gamma\lambda) \quad \text{(AdamW)} \\
        m &\leftarrow m + (1-\beta_1)(g - m) \\
        v &\leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        \hat v &= \max(\hat v, v) \text{ (amsgrad) else } v \\
        p &\leftarrow p - \frac{\gamma}{1-\beta_1^t}\,
            \frac{m}{\sqrt{\hat v}\,(1-\beta_2^t)^{-1/2} + \epsilon}

    ``steps`` is required (bias corrections); ``max_exp_avg_sqs`` when amsgrad.
    torch divides ``sqrt(v)`` by ``sqrt(1 - beta2**t)``; here it is multiplied by the
    reciprocal (computed once per step in double), which saves one division per element
    and differs from torch by at most an ulp of the denominator.

    ``state_dtype="bfloat16"``: m, v (and the amsgrad maximum) in bfloat16, as every
    rule's state may be (see ``_stored_state``).
    """
    beta1, beta2 = betas
    params, grads = _as_list(params), _as_list(grads)
    ms, vs = _as_list(exp_avgs), _as_list(exp_avg_sqs)
    vmaxs = _as_list(max_exp_avg_sqs) if amsgrad else [None] * len(params)
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        steps[i] += 1
        step = float(steps[i])
        m, v = ms[i], vs[i]
        _adam_moments(p, -g if maximize else g, m, v, lr, betas, weight_decay,
                      decoupled_weight_decay)
        if amsgrad:
            np.maximum(vmaxs[i], v, out=vmaxs[i])
            v = vmaxs[i]
        step_size = lr / (1 - beta1 ** step)
        inv_bc2_sqrt = 1 / (1 - beta2 ** step) ** 0.5
        denom = np.sqrt(v) * _scalar(inv_bc2_sqrt, p) + _scalar(eps, p)
        p += (_scalar(-step_size, p) * m) / denom


def adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, steps=None, *,
           lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
           maximize=False, state_dtype=None, rounding="nearest", seed=0, absmaxes=None):
    """AdamW: :func:`adam_` with decoupled weight decay ``p *= 1 - lr*weight_decay``."""
    adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr=lr,
          betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
          maximize=maximize, decoupled_weight_decay=True, state_dtype=state_dtype,
          rounding=rounding, seed=seed, absmaxes=absmaxes)


@_stored_state(("exp_avgs", "exp_infs"), lambda o: ("exp_avgs", "exp_infs"),
               unsigned=("exp_infs",))
def adamax_(params, grads, exp_avgs, exp_infs, steps, *, lr=2e-3, betas=(0.9, 0.999),
            eps=1e-8, weight_decay=0.0, maximize=False):
    r"""Adamax: Adam with the infinity norm in place of the second moment
    (Kingma & Ba, 2015, section 7.1), as torch.optim.Adamax.

    .. math::
        t &\leftarrow t + 1, \quad g \leftarrow \pm\nabla + \lambda p \\
        m &\leftarrow m + (1-\beta_1)(g - m) \\
        u &\leftarrow \max(\beta_2 u,\ |g| + \epsilon) \\
        p &\leftarrow p - \frac{\gamma}{1-\beta_1^t}\,\frac{m}{u}

    ``steps`` is required (the bias correction). ``max`` propagates NaN, as
    ``torch.maximum``. ``u`` is never negative: 8-bit state keeps it with the unsigned
    map.
    """
    beta1, beta2 = betas
    params, grads = _as_list(params), _as_list(grads)
    ms, us = _as_list(exp_avgs), _as_list(exp_infs)
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        steps[i] += 1
        g = -g if maximize else g
        if weight_decay != 0:
            g = g + _scalar(weight_decay, p) * p
        m, u = ms[i], us[i]
        m[...] = _lerp(m, g, _scalar(1 - beta1, p))
        np.maximum(u * _scalar(beta2, p), np.abs(g) + _scalar(eps, p), out=u)
        clr = lr / (1 - beta1 ** float(steps[i]))
        p += (_scalar(-clr, p) * m) / u


@_stored_state(("square_avgs", "acc_deltas"), lambda o: ("square_avgs", "acc_deltas"),
               unsigned=("square_avgs", "acc_deltas"))
def adadelta_(params, grads, square_avgs, acc_deltas, steps, *, lr=1.0, rho=0.9, eps=1e-6,
              weight_decay=0.0, maximize=False):
    r"""Adadelta (Zeiler, 2012): steps scaled by the ratio of two decayed root mean
    squares, of past updates and of gradients, as torch.optim.Adadelta.

    .. math::
        t &\leftarrow t + 1, \quad g \leftarrow \pm\nabla + \lambda p \\
        v &\leftarrow \rho v + (1-\rho) g^2 \\
        \Delta &= \frac{\sqrt{u + \epsilon}}{\sqrt{v + \epsilon}}\, g \\
        u &\leftarrow \rho u + (1-\rho) \Delta^2 \\
        p &\leftarrow p - \gamma \Delta

    ``steps`` counts steps (torch keeps the count; the update does not use it).
    """
    params, grads = _as_list(params), _as_list(grads)
    vs, us = _as_list(square_avgs), _as_list(acc_deltas)
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        steps[i] += 1
        g = -g if maximize else g
        if weight_decay != 0:
            g = g + _scalar(weight_decay, p) * p
        v, u = vs[i], us[i]
        v[...] = v * _scalar(rho, p) + (_scalar(1 - rho, p) * g) * g
        delta = (np.sqrt(u + _scalar(eps, p)) / np.sqrt(v + _scalar(eps, p))) * g
        u[...] = u * _scalar(rho, p) + (_scalar(1 - rho, p) * delta) * delta
        p += _scalar(-lr, p) * delta


@_stored_state(("exp_avgs", "exp_avg_sqs"), lambda o: ("exp_avgs", "exp_avg_sqs"),
               unsigned=("exp_avg_sqs",))
def radam_(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr=1e-3, betas=(0.9, 0.999),
           eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, maximize=False):
    r"""RAdam (Liu et al., 2020): Adam whose adaptive step is switched on, and scaled, by
    the variance rectification once the approximated SMA length passes 5, as
    torch.optim.RAdam.

    .. math::
        m &\leftarrow m + (1-\beta_1)(g - m), \quad
            v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        \rho_\infty &= \frac{2}{1-\beta_2} - 1, \quad
            \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1-\beta_2^t} \\
        r_t &= \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}
            {(\rho_\infty-4)(\rho_\infty-2)\rho_t}} \\
        p &\leftarrow p - \gamma\,\frac{m}{1-\beta_1^t}\cdot
            \begin{cases} \frac{\sqrt{1-\beta_2^t}}{\sqrt v + \epsilon}\, r_t
            & \rho_t > 5 \\ 1 & \text{otherwise} \end{cases}

    Weight decay as Adam's (L2), or AdamW's with ``decoupled_weight_decay``. In torch's
    order: ``sqrt(1 - beta2^t) / (sqrt(v) + eps)`` is the reciprocal of the tensor
    times the number (``Tensor.__rtruediv__``).
    """
    beta1, beta2 = betas
    params, grads = _as_list(params), _as_list(grads)
    ms, vs = _as_list(exp_avgs), _as_list(exp_avg_sqs)
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        steps[i] += 1
        step = float(steps[i])
        m, v = ms[i], vs[i]
        _adam_moments(p, -g if maximize else g, m, v, lr, betas, weight_decay,
                      decoupled_weight_decay)
        bc1 = 1 - beta1 ** step
        bc2 = 1 - beta2 ** step
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * (beta2 ** step) / bc2
        bcm = m / _scalar(bc1, p)
        if rho_t > 5.0:
            rect = ((rho_t - 4) * (rho_t - 2) * rho_inf
                    / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
            adaptive = (1 / (np.sqrt(v) + _scalar(eps, p))) * _scalar(bc2 ** 0.5, p)
            p -= ((bcm * _scalar(lr, p)) * adaptive) * _scalar(rect, p)
        else:
            p -= bcm * _scalar(lr, p)


@_stored_state(("exp_avgs", "exp_avg_sqs"), lambda o: ("exp_avgs", "exp_avg_sqs"),
               unsigned=("exp_avg_sqs",))
def nadam_(params, grads, exp_avgs, exp_avg_sqs, mu_products, steps, *, lr=2e-3,
           betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, momentum_decay=4e-3,
           decoupled_weight_decay=False, maximize=False):
    r"""NAdam (Dozat, 2016): Adam with Nesterov momentum and a momentum schedule, as
    torch.optim.NAdam.

    .. math::
        \mu_t &= \beta_1 (1 - \tfrac12\, 0.96^{t \psi}), \quad
            \Pi_t = \Pi_{t-1} \mu_t \quad (\psi: \text{momentum\_decay}) \\
        m &\leftarrow m + (1-\beta_1)(g - m), \quad
            v \leftarrow \beta_2 v + (1-\beta_2) g^2, \quad
            d = \sqrt{v / (1-\beta_2^t)} + \epsilon \\
        p &\leftarrow p - \gamma \frac{1-\mu_t}{1-\Pi_t} \frac{g}{d}
            - \gamma \frac{\mu_{t+1}}{1-\Pi_t \mu_{t+1}} \frac{m}{d}

    Weight decay as Adam's, or AdamW's with ``decoupled_weight_decay``.
    ``mu_products``: the running product, one 0-d array per parameter (float32, as
    torch keeps it whatever the parameter's dtype: its product is rounded to float32
    at each step), updated in place.
    """
    params, grads = _as_list(params), _as_list(grads)
    ms, vs, mps = _as_list(exp_avgs), _as_list(exp_avg_sqs), _as_list(mu_products)
    beta2 = betas[1]
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        steps[i] += 1
        step = float(steps[i])
        mu = betas[0] * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
        mu_next = betas[0] * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
        mp = mps[i]
        mp[...] = mp * mp.dtype.type(mu)          # in the product's own dtype
        mp_value = float(mp)
        m, v = ms[i], vs[i]
        g = _adam_moments(p, -g if maximize else g, m, v, lr, betas, weight_decay,
                          decoupled_weight_decay)
        denom = np.sqrt(v / _scalar(1 - beta2 ** step, p)) + _scalar(eps, p)
        p += (_scalar(-lr * (1.0 - mu) / (1.0 - mp_value), p) * g) / denom
        p += (_scalar(-lr * mu_next / (1.0 - mp_value * mu_next), p) * m) / denom


@_stored_state(("axs",), lambda o: ("axs",))
def asgd_(params, grads, axs, etas, mus, steps, *, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6,
          weight_decay=0.0, maximize=False):
    r"""ASGD, averaged stochastic gradient descent (Polyak & Juditsky, 1992), as
    torch.optim.ASGD.

    .. math::
        p &\leftarrow p (1 - \lambda \eta) - \eta g, \quad
            \bar p \leftarrow \bar p + \mu (p - \bar p) \quad
            (\bar p \leftarrow p \text{ while } \mu = 1) \\
        \eta &\leftarrow \frac{\gamma}{(1 + \lambda \gamma t)^\alpha}, \quad
            \mu \leftarrow \frac{1}{\max(1, t - t_0)}

    ``ax`` is the running average; ``etas`` and ``mus`` (one 0-d array per parameter,
    float32 as torch keeps them) hold this step's eta and mu and are advanced for the
    next, each rounded to float32 (torch makes them with ``torch.as_tensor``).
    """
    params, grads, ax_list = _as_list(params), _as_list(grads), _as_list(axs)
    eta_list, mu_list = _as_list(etas), _as_list(mus)
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        steps[i] += 1
        step = float(steps[i])
        g = -g if maximize else g
        if weight_decay != 0:
            g = g + _scalar(weight_decay, p) * p
        eta, mu = float(eta_list[i]), float(mu_list[i])
        p *= _scalar(1 - lambd * eta, p)
        p += _scalar(-eta, p) * g
        ax = ax_list[i]
        if mu != 1:
            ax[...] = ax + (p - ax) * _scalar(mu, p)
        else:
            ax[...] = p
        eta_list[i][...] = np.float32(lr / ((1 + lambd * lr * step) ** alpha))
        mu_list[i][...] = np.float32(1 / max(1, step - t0))


def _sign(x):
    """torch.sign: (x > 0) - (x < 0) in x's dtype (0 for zeros and NaN)."""
    return (x > 0).astype(x.dtype) - (x < 0).astype(x.dtype)


@_stored_state(("prevs", "step_size_arrays"), lambda o: ("prevs", "step_size_arrays"),
               unsigned=("step_size_arrays",))
def rprop_(params, grads, prevs, step_size_arrays, steps, *, lr=1e-2, etas=(0.5, 1.2),
           step_sizes=(1e-6, 50), maximize=False):
    r"""Rprop (Riedmiller & Braun, 1993): per-element step sizes that grow by
    ``etaplus`` while the gradient keeps its sign and shrink by ``etaminus`` when it
    flips, as torch.optim.Rprop.

    .. math::
        s &= \operatorname{sign}(g \cdot g_{prev}) \\
        \eta &\leftarrow \operatorname{clamp}(\eta \cdot
            \{\eta_+ \text{ if } s > 0,\ \eta_- \text{ if } s < 0,\ 1\},\
            \eta_{min}, \eta_{max}) \\
        g &\leftarrow 0 \text{ where the factor was } \eta_- \\
        p &\leftarrow p - \operatorname{sign}(g)\, \eta, \quad g_{prev} \leftarrow g

    ``step_size_arrays`` start at ``lr`` (``lr`` itself is not used by a step). torch's
    sign is 0 for NaN: a NaN gradient leaves the parameter and its step size as they
    are, and becomes ``prev``.
    """
    etaminus, etaplus = etas
    lo, hi = step_sizes
    params, grads = _as_list(params), _as_list(grads)
    prev_list, ss_list = _as_list(prevs), _as_list(step_size_arrays)
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        steps[i] += 1
        g = -g if maximize else g
        prev, ss = prev_list[i], ss_list[i]
        s = _sign(g * prev)
        em, ep = _scalar(etaminus, p), _scalar(etaplus, p)
        factor = np.where(s > 0, ep, np.where(s < 0, em, p.dtype.type(1)))
        ss[...] = np.minimum(np.maximum(ss * factor, _scalar(lo, p)), _scalar(hi, p))
        g = np.where(factor == em, p.dtype.type(0), g)
        p += (-_sign(g)) * ss
        prev[...] = g


@_stored_state(("exp_avgs",), lambda o: ("exp_avgs",))
def lion_(params, grads, exp_avgs, steps=None, *, lr=1e-4, betas=(0.9, 0.99),
          weight_decay=0.0, maximize=False):
    r"""Lion, EvoLved Sign Momentum (Chen et al., 2023, "Symbolic Discovery of
    Optimization Algorithms", arXiv:2302.06675), as ``lion_pytorch.Lion``: the step is
    the sign of an interpolation between the momentum and the gradient, so every
    element moves by exactly ``lr``; the momentum is a second, slower average.

    .. math::
        g &\leftarrow -\nabla \text{ if maximize else } \nabla \\
        p &\leftarrow p\,(1 - \gamma\lambda) \\
        p &\leftarrow p - \gamma\,\operatorname{sign}(\beta_1 m + (1-\beta_1) g) \\
        m &\leftarrow \beta_2 m + (1-\beta_2) g

    The decay is decoupled and scaled by ``lr``, as the oracle's (its
    ``decoupled_weight_decay=True`` divides ``weight_decay`` by the initial lr: the
    classes do that before calling this). ``sign`` is torch's: 0 for zeros and NaN, so
    a NaN gradient leaves the parameter where it is (and the momentum NaN). ``steps``
    is optional (Lion counts none; it is incremented when given, and stochastic
    rounding of bfloat16 state needs it).
    """
    beta1, beta2 = betas
    params, grads, ms = _as_list(params), _as_list(grads), _as_list(exp_avgs)
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        if steps is not None:
            steps[i] += 1
        g = -g if maximize else g
        m = ms[i]
        if weight_decay != 0:
            p *= _scalar(1 - lr * weight_decay, p)
        c = m * _scalar(beta1, p) + _scalar(1 - beta1, p) * g
        p += _scalar(-lr, p) * _sign(c)
        m[...] = m * _scalar(beta2, p) + _scalar(1 - beta2, p) * g


def _oracle_weight_decay(p, g, lr, weight_decay, weight_decouple, fixed_decay):
    """pytorch_optimizer's weight decay (ADOPT, AdEMAMix, SophiaH): decoupled, ``p`` is
    multiplied by ``1 - wd * lr`` (``1 - wd`` with ``fixed_decay``) in place; else
    ``wd * p`` joins the gradient, which is returned."""
    if weight_decay == 0:
        return g
    if weight_decouple:
        p *= _scalar(1.0 - weight_decay * (1.0 if fixed_decay else lr), p)
        return g
    return g + _scalar(weight_decay, p) * p

def adopt_clip(step):
    """ADOPT's default clip of the normalized gradient: ``step ** 0.25`` (the oracle's
    ``clip_lambda``; a module-level function, so optimizers holding it pickle)."""
    return math.pow(step, 0.25)


@_stored_state(("exp_avgs", "exp_avg_sqs"), lambda o: ("exp_avgs", "exp_avg_sqs"),
               unsigned=("exp_avg_sqs",))
def adopt_(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr=1e-3, betas=(0.9, 0.9999),
           clip_lambda=adopt_clip, weight_decay=0.0, weight_decouple=False,
           fixed_decay=False, eps=1e-6, maximize=False):
    r"""ADOPT, adaptive gradient method with the optimal convergence rate (Taniguchi et
    al., 2024, "ADOPT: Modified Adam Can Converge with Any beta2 with the Optimal
    Rate", arXiv:2411.02853), as ``pytorch_optimizer.ADOPT``: the gradient is
    normalized by the *previous* second moment before it enters the momentum, which
    is what lets any beta2 converge; the first step only seeds the second moment.

    .. math::
        t = 1: \quad v &\leftarrow v + g^2 \quad \text{(nothing else moves)} \\
        t > 1: \quad n &= \operatorname{clamp}\Big(\frac{g}{\max(\sqrt{v}, \epsilon)},
            -c_t, c_t\Big), \quad c_t = \text{clip\_lambda}(t) \\
        m &\leftarrow m + (1-\beta_1)(n - m), \quad p \leftarrow p - \gamma m, \quad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2

    Weight decay: ``weight_decouple`` multiplies ``p`` by ``1 - wd * lr`` (``1 - wd``
    with ``fixed_decay``) first, else ``wd * p`` joins the gradient (also on the first
    step). ``clip_lambda``: a function of the step giving the clip (default
    :func:`adopt_clip`, ``t ** 0.25``), or None for no clip; it is called with each
    parameter's step (the classes keep one step per group, as the oracle). ``steps``
    is required.
    """
    beta1, beta2 = betas
    params, grads = _as_list(params), _as_list(grads)
    ms, vs = _as_list(exp_avgs), _as_list(exp_avg_sqs)
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        steps[i] += 1
        step = int(steps[i])
        g = _oracle_weight_decay(p, -g if maximize else g, lr, weight_decay, weight_decouple,
                                 fixed_decay)
        m, v = ms[i], vs[i]
        if step == 1:
            v += g * g
            continue
        n = g / np.maximum(np.sqrt(v), _scalar(eps, p))
        if clip_lambda is not None:
            c = _scalar(clip_lambda(step), p)
            n = np.minimum(np.maximum(n, -c), c)
        m[...] = _lerp(m, n, _scalar(1 - beta1, p))
        p += _scalar(-lr, p) * m
        v[...] = v * _scalar(beta2, p) + (_scalar(1 - beta2, p) * g) * g


def ademamix_schedules(step, alpha, t_alpha_beta3, beta1, beta3):
    """AdEMAMix's alpha and beta3 at ``step`` (its warmup over ``t_alpha_beta3`` steps,
    None: none), in double, as the oracle computes them."""
    if t_alpha_beta3 is None:
        return alpha, beta3
    alpha_t = min(step * alpha / t_alpha_beta3, alpha)
    lb1, lb3 = math.log(beta1), math.log(beta3)
    frac = step / t_alpha_beta3
    return alpha_t, min(math.exp(lb1 * lb3 / ((1.0 - frac) * lb3 + frac * lb1)), beta3)


@_stored_state(("exp_avgs", "exp_avg_sqs", "exp_avg_slows"),
               lambda o: ("exp_avgs", "exp_avg_sqs", "exp_avg_slows"),
               unsigned=("exp_avg_sqs",))
def ademamix_(params, grads, exp_avgs, exp_avg_sqs, exp_avg_slows, steps, *, lr=1e-3,
              betas=(0.9, 0.999, 0.9999), weight_decay=0.0, weight_decouple=False,
              fixed_decay=False, alpha=5.0, t_alpha_beta3=None, eps=1e-8, maximize=False):
    r"""AdEMAMix, Adam with a mixture of two first moments (Pagliardini, Ablin &
    Grangier, 2024, "The AdEMAMix Optimizer: Better, Faster, Older",
    arXiv:2409.03137), as ``pytorch_optimizer.AdEMAMix``: a fast average (beta1) and a
    slow one (beta3, e.g. 0.9999, remembering ~10k steps) of the gradients, the slow
    one added with weight alpha; both alpha and beta3 may warm up over
    ``t_alpha_beta3`` steps.

    .. math::
        m_1 &\leftarrow m_1 + (1-\beta_1)(g - m_1), \quad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2, \quad
        m_2 \leftarrow m_2 + (1-\beta_{3,t})(g - m_2) \\
        p &\leftarrow p - \gamma\,\frac{m_1 / (1-\beta_1^t) + \alpha_t m_2}
            {\sqrt{v} / \sqrt{1-\beta_2^t} + \epsilon}

    with :func:`ademamix_schedules` giving ``alpha_t`` and ``beta3_t``. Weight decay
    as :func:`adopt_`'s (``weight_decouple``, ``fixed_decay``). ``steps`` is required.
    """
    beta1, beta2, beta3 = betas
    params, grads = _as_list(params), _as_list(grads)
    ms, vs, ss = _as_list(exp_avgs), _as_list(exp_avg_sqs), _as_list(exp_avg_slows)
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        steps[i] += 1
        step = int(steps[i])
        g = _oracle_weight_decay(p, -g if maximize else g, lr, weight_decay, weight_decouple,
                                 fixed_decay)
        alpha_t, beta3_t = ademamix_schedules(step, alpha, t_alpha_beta3, beta1, beta3)
        m, v, s = ms[i], vs[i], ss[i]
        m[...] = _lerp(m, g, _scalar(1 - beta1, p))
        v[...] = v * _scalar(beta2, p) + (_scalar(1 - beta2, p) * g) * g
        s[...] = _lerp(s, g, _scalar(1.0 - beta3_t, p))
        d = np.sqrt(v) / _scalar(math.sqrt(1.0 - math.pow(beta2, step)), p) + _scalar(eps, p)
        u = m / _scalar(1.0 - math.pow(beta1, step), p) + _scalar(alpha_t, p) * s
        p += (_scalar(-lr, p) * u) / d


@_stored_state(("momentums", "hessian_moments"), lambda o: ("momentums", "hessian_moments"))
def sophiah_(params, grads, hessians, momentums, hessian_moments, steps, *, lr=6e-2,
             betas=(0.96, 0.99), weight_decay=0.0, weight_decouple=True, fixed_decay=False,
             p=1e-2, eps=1e-12, maximize=False):
    r"""SophiaH, the second-order clipped stochastic optimizer with Hutchinson's
    Hessian-diagonal estimate (Liu et al., 2023, "Sophia: A Scalable Stochastic
    Second-order Optimizer for Language Model Pre-training", arXiv:2305.14342), as
    ``pytorch_optimizer.SophiaH``: the momentum is preconditioned by an average of
    Hessian-diagonal estimates and the result clipped element-wise, so a step is a
    Newton step where the curvature is trusted and a sign step (of size ``lr * p``)
    where it is small, negative or noisy: near a saddle the negative curvature no
    longer attracts, it is clipped away.

    .. math::
        m &\leftarrow m + (1-\beta_1)(g - m) \\
        h &\leftarrow h + (1-\beta_2)(\hat h - h) \quad
            \text{(on the steps given an estimate } \hat h\text{)} \\
        p &\leftarrow p - \gamma\,\operatorname{clamp}(m / \max(h, \epsilon),\ -\rho,\ \rho)

    ``hessians``: one Hessian-diagonal estimate per parameter on the steps that update
    ``h`` (:func:`fastoptim.hessian.hutchinson_diag`, or the torch class's own), None on
    the others. Weight decay as :func:`adopt_`'s (here ``weight_decouple`` defaults to
    True). ``p`` is the oracle's name for the clip ``rho``. ``steps`` is required (it is
    counted; the classes keep one count per group, as the oracle).
    """
    rho = p
    beta1, beta2 = betas
    params, grads = _as_list(params), _as_list(grads)
    hs = _as_list(hessians) if hessians is not None else [None] * len(params)
    ms, hms = _as_list(momentums), _as_list(hessian_moments)
    for i, (w, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        steps[i] += 1
        g = _oracle_weight_decay(w, -g if maximize else g, lr, weight_decay, weight_decouple,
                                 fixed_decay)
        m, hm = ms[i], hms[i]
        m[...] = _lerp(m, g, _scalar(1 - beta1, w))
        if hs[i] is not None:
            hm[...] = _lerp(hm, hs[i], _scalar(1 - beta2, w))
        u = m / np.maximum(hm, _scalar(eps, w))
        u = np.minimum(np.maximum(u, _scalar(-rho, w)), _scalar(rho, w))
        w += _scalar(-lr, w) * u


def adamw_schedulefree_(params, grads, zs, exp_avg_sqs, steps, *, lr=0.0025,
                        betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, ckp1=1.0,
                        maximize=False):
    r"""Schedule-Free AdamW (Defazio et al., 2024, "The Road Less Scheduled",
    arXiv:2405.15682), as ``schedulefree.AdamWScheduleFree``: no learning-rate schedule;
    the optimizer keeps the base sequence ``z`` (plain AdamW-normalized steps) and the
    parameters hold ``y``, an interpolation between ``z`` and the average ``x`` of the
    ``z`` sequence, where the gradient is taken; ``x`` (the point to evaluate) is
    reached by :meth:`eval` of the classes (:func:`schedulefree_switch_`).

    .. math::
        v &\leftarrow \beta_2 v + (1-\beta_2) g^2, \quad
        \hat g = \frac{g}{\sqrt{v / (1-\beta_2^k)} + \epsilon} + \lambda y \\
        y &\leftarrow y + c_{k+1}(z - y) + \gamma_k(\beta_1(1-c_{k+1}) - 1)\,\hat g,
        \quad z \leftarrow z - \gamma_k \hat g

    ``lr`` is this step's (scheduled) learning rate and ``ckp1`` the weight of this
    step in the average, both from :func:`schedulefree_schedule` (the classes keep its
    running values in their groups, as the oracle). ``zs`` start as copies of the
    parameters; ``steps`` (required) counts k from 1 for the bias correction.
    """
    beta1, beta2 = betas
    params, grads = _as_list(params), _as_list(grads)
    z_list, vs = _as_list(zs), _as_list(exp_avg_sqs)
    for i, (y, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        steps[i] += 1
        g = -g if maximize else g
        z, v = z_list[i], vs[i]
        v[...] = v * _scalar(beta2, y) + (_scalar(1 - beta2, y) * g) * g
        d = np.sqrt(v / _scalar(1 - beta2 ** float(steps[i]), y)) + _scalar(eps, y)
        gn = g / d
        if weight_decay != 0:
            gn = gn + _scalar(weight_decay, y) * y
        y[...] = _lerp(y, z, _scalar(ckp1, y))
        y += _scalar(lr * (beta1 * (1 - ckp1) - 1), y) * gn
        z -= _scalar(lr, y) * gn


def schedulefree_schedule(k, lr, warmup_steps, r, weight_lr_power, lr_max, weight_sum):
    """Schedule-Free's per-step numbers for step ``k`` (counted from 0), as the oracle
    computes them in Python: ``(scheduled_lr, lr_max, weight_sum, ckp1)`` -- the lr
    after a linear warmup over ``warmup_steps``, the largest lr so far, the running sum
    of the average's weights ``(k+1)^r * lr_max^weight_lr_power``, and this step's
    weight in the average (0 while the sum is 0)."""
    sched = (k + 1) / warmup_steps if k < warmup_steps else 1.0
    lr = lr * sched
    lr_max = max(lr, lr_max)
    weight = ((k + 1) ** r) * (lr_max ** weight_lr_power)
    weight_sum = weight_sum + weight
    try:
        ckp1 = weight / weight_sum
    except ZeroDivisionError:
        ckp1 = 0
    return lr, lr_max, weight_sum, ckp1


def schedulefree_switch_(params, zs, weight):
    """Schedule-Free's switch between its points, in place: ``p <- lerp(p, z, w)`` for
    each parameter with a ``z`` (None: not stepped yet). ``w = 1 - beta1`` turns the
    evaluation point x into the gradient point y (``train()``), ``w = 1 - 1/beta1``
    turns y back into x (``eval()``), as the oracle does."""
    for p, z in zip(_as_list(params), _as_list(zs)):
        if z is not None:
            p[...] = _lerp(p, z, _scalar(weight, p))


# --- Adafactor: reductions in a fixed order ----------------------------------------------
# Adafactor reduces whole arrays (row and column means of g^2, the RMS of the parameter
# and of the update). A sum's rounding depends on its order, so the order is part of
# the rule here, the same on every instruction set and thread count: the compiled loops
# follow it, and the tests hold them equal to these functions bit for bit.

#: a row is summed in this many interleaved partial sums (lane l takes elements l,
#: l + 16, ...; one AVX-512 register, two AVX2 ones), added lane by lane, then the
#: elements past the last full 16 one by one
ADAFACTOR_LANES = 16
#: a vector (or 0-d) parameter's reductions treat it as rows of this many elements
ADAFACTOR_CHUNK = 4096
#: a column sum adds blocks of this many rows (each block row by row), block by block
ADAFACTOR_BLOCK = 32


def _adafactor_row_sums(x):
    """Row sums of the 2-D array ``x`` in the order described above."""
    rows, n = x.shape
    n16 = n - n % ADAFACTOR_LANES
    s = np.zeros(rows, x.dtype)
    if n16:
        lanes = np.cumsum(x[:, :n16].reshape(rows, n16 // ADAFACTOR_LANES, ADAFACTOR_LANES),
                          axis=1)[:, -1]
        s = lanes[:, 0].copy()
        for lane in range(1, ADAFACTOR_LANES):
            s = s + lanes[:, lane]
    for j in range(n16, n):
        s = s + x[:, j]
    return s


def _adafactor_flat_row_sums(x):
    """Row sums of a vector's values cut into rows of ADAFACTOR_CHUNK (the last shorter)."""
    x = x.reshape(-1)
    full = x.size // ADAFACTOR_CHUNK * ADAFACTOR_CHUNK
    sums = [_adafactor_row_sums(x[:full].reshape(-1, ADAFACTOR_CHUNK))]
    if full < x.size:
        sums.append(_adafactor_row_sums(x[full:].reshape(1, -1)))
    return np.concatenate(sums)


def _adafactor_total(row_sums):
    """Row sums added one after the other."""
    if row_sums.size == 0:
        return row_sums.dtype.type(0)
    return np.cumsum(row_sums)[-1]


def _adafactor_col_sums(x):
    """Column sums of the (B, m, n) array ``x``: blocks of ADAFACTOR_BLOCK rows, each
    summed row after row, the block sums added block after block."""
    B, m, n = x.shape
    blocks = [np.cumsum(x[:, r:r + ADAFACTOR_BLOCK], axis=1)[:, -1]
              for r in range(0, m, ADAFACTOR_BLOCK)]
    return np.cumsum(np.stack(blocks, axis=1), axis=1)[:, -1]


def _adafactor_factored_usum(x, r, c, a, rm, e2):
    """The sum of U^2 of a matrix from its factors, without U: where no element of
    V = a C is clamped (every a and C finite and positive, min(a) min(C) >= eps1^2),
    U^2 = g^2 (rm / R) (1 / C) to rounding, so the sum is
    sum_b rm_b sum_j T_bj / C_bj with T_bj = sum_i g_bij^2 (1 / R_bi) (summed as the
    column sums are). None where some element may be clamped: U must be summed."""
    one = x.dtype.type(1)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(c)) and np.all(a > 0)
            and np.all(c > 0)) or not a.min() * c.min() >= e2:
        return None
    t = _adafactor_col_sums(x * (one / r)[:, :, None])
    per = [rm[b] * _adafactor_total(t[b] / c[b]) for b in range(x.shape[0])]
    return _adafactor_total(np.array(per, x.dtype))


def adafactor_eps1(eps, params, grads):
    """The eps1 a step uses: ``eps[0]``, or when it is None the machine epsilon of the
    first parameter that has a gradient (as torch.optim.Adafactor resolves it)."""
    if eps[0] is not None:
        return float(eps[0])
    for p, g in zip(params, grads):
        if g is not None:
            return float(np.finfo(p.dtype).eps)
    return None


def adafactor_(params, grads, row_vars, col_vars, variances, steps, *, lr=1e-2,
               beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0,
               maximize=False):
    r"""Adafactor (Shazeer & Stern, 2018, "Adafactor: Adaptive Learning Rates with
    Sublinear Memory Cost", arXiv:1804.04235), as torch.optim.Adafactor (lr caps the
    relative step and scales a decoupled weight decay; eps1 is applied to the variance
    estimate, not to the factors).

    .. math::
        \hat\beta_{2,t} &= 1 - t^{\tau}, \quad \rho_t = \min(\gamma, 1/\sqrt t), \quad
        \alpha_t = \max(\epsilon_2, \mathrm{RMS}(p))\,\rho_t, \quad
        p \leftarrow p (1 - \gamma\lambda) \\
        R &\leftarrow \mathrm{lerp}(R, \mathrm{mean}_{-1}(g^2), t^{\tau}), \quad
        C \leftarrow \mathrm{lerp}(C, \mathrm{mean}_{-2}(g^2), t^{\tau}), \quad
        \hat V = \frac{R C}{\max(\mathrm{mean}_{-2}(R), \epsilon_1)} \\
        U &= \frac{g}{\sqrt{\max(\hat V, \epsilon_1^2)}}, \quad
        p \leftarrow p - \frac{\alpha_t}{\max(1, \mathrm{RMS}(U)/d)}\, U

    A parameter of two or more dimensions keeps the factors ``row_vars[i]`` (its shape
    with the last axis 1) and ``col_vars[i]`` (the second-to-last axis 1), its
    ``variances[i]`` None; a vector or 0-d parameter keeps ``variances[i]`` (its shape;
    :math:`\hat V` is its lerp toward :math:`g^2`) and no factors. Arrays are
    C-contiguous (the factors follow the last two axes). ``eps=(eps1, eps2)``: an eps1
    of None takes the machine epsilon of the first parameter with a gradient.

    Sums run in the fixed order of the functions above (torch sums in its own order,
    so results agree with torch's to rounding, not bit for bit); each mean is its sum
    divided by the count, each RMS ``sqrt(sum of squares) / sqrt(count)``, the square
    root in the arrays' dtype, the rest in double. A matrix's sum of :math:`U^2` comes
    from its factors where no element is clamped (:func:`_adafactor_factored_usum`:
    the kernel then reads the gradient twice, not three times). A matrix's :math:`\hat V` is
    :math:`(R/\mathrm{rm})\,C` and, where it is not clamped,
    :math:`U = g\,(1/\sqrt{R/\mathrm{rm}})(1/\sqrt{C})` (torch: :math:`g/\sqrt{RC/\mathrm{rm}}`,
    the same to rounding): a factor per row and per column, so that no element needs a
    division or a square root.
    """
    params, grads = _as_list(params), _as_list(grads)
    row_list, col_list = _as_list(row_vars), _as_list(col_vars)
    var_list = _as_list(variances)
    eps1 = adafactor_eps1(eps, params, grads)
    eps2 = float(eps[1])
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        steps[i] += 1
        t = float(steps[i])
        g = -g if maximize else g
        w = _scalar(t ** beta2_decay, p)
        rho = min(lr, 1 / t ** 0.5)
        g2 = g * g
        if p.ndim > 1:
            x = g2.reshape(-1, p.shape[-2], p.shape[-1])
            rows = _adafactor_row_sums(x.reshape(-1, p.shape[-1]))
            psum = _adafactor_row_sums((p * p).reshape(-1, p.shape[-1]))
        else:
            psum = _adafactor_flat_row_sums(p * p)
        rms = float(np.sqrt(_adafactor_total(psum))) / max(p.size, 1) ** 0.5
        alpha = max(eps2, rms) * rho
        if weight_decay != 0:
            p *= _scalar(1 - lr * weight_decay, p)
        e2 = _scalar(eps1 * eps1, p)
        one = _scalar(1, p)
        if p.ndim > 1:
            r, c = row_list[i], col_list[i]
            B, m, n = x.shape
            r[...] = _lerp(r, (rows / _scalar(n, p)).reshape(r.shape), w)
            c[...] = _lerp(c, (_adafactor_col_sums(x) / _scalar(m, p)).reshape(c.shape), w)
            rm = np.array([_adafactor_total(s) for s in r.reshape(B, m)]) / _scalar(m, p)
            rm = np.where(rm < _scalar(eps1, p), _scalar(eps1, p), rm)
            # V = (R / rm) C, and 1/sqrt(V) = 1/sqrt(R / rm) * 1/sqrt(C) where V is not
            # clamped: a row's and a column's factor, no division or root per element
            a = r.reshape(B, m) / rm.reshape(B, 1)
            v = (a.reshape(B, m, 1) * c.reshape(B, 1, n)).reshape(p.shape)
            with np.errstate(divide="ignore", invalid="ignore"):   # (as the kernel: inf)
                scale = ((one / np.sqrt(a)).reshape(B, m, 1)
                         * (one / np.sqrt(c)).reshape(B, 1, n)).reshape(p.shape)
                u = np.where(v < e2, g * (one / np.sqrt(e2)), g * scale)
                usum = _adafactor_factored_usum(x, r.reshape(B, m), c.reshape(B, n), a,
                                                rm, e2)
            if usum is None:
                usum = _adafactor_total(_adafactor_row_sums((u * u).reshape(-1, n)))
        else:
            var = var_list[i]
            var[...] = _lerp(var, g2, w)
            with np.errstate(divide="ignore", invalid="ignore"):
                u = g * (one / np.sqrt(np.where(var < e2, e2, var)))
            usum = _adafactor_total(_adafactor_flat_row_sums(u * u))
        urms = float(np.sqrt(usum)) / (max(p.size, 1) ** 0.5 * d)
        denom = max(1.0, urms)
        p += _scalar(-alpha / denom, p) * u


def adahessian_(params, grads, hessian_diags, exp_avgs, exp_hessian_diag_sqs, steps, *,
                lr=0.15, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.0,
                hessian_power=1.0, maximize=False):
    r"""AdaHessian (Yao et al. 2021): Adam with the squared gradient replaced by the
    squared estimate of the Hessian diagonal.

    .. math::
        t &\leftarrow t + 1, \quad g \leftarrow \pm\nabla \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g \\
        v &\leftarrow \beta_2 v + (1-\beta_2) D^2 \\
        p &\leftarrow p - \gamma \left( \frac{m / (1-\beta_1^t)}
            {\left(\sqrt{v} / \sqrt{1-\beta_2^t}\right)^k + \epsilon}
            + \lambda p \right)

    ``D`` (``hessian_diags[i]``, same shape as the parameter) estimates the diagonal
    of the Hessian, e.g. Hutchinson's :math:`z \odot (Hz)` with Rademacher ``z``
    (:func:`fastoptim.hessian.hutchinson_diag`); only :math:`D^2` enters, so its sign
    does not matter. ``k`` is ``hessian_power`` (0 to 1; 1 is the paper's default,
    a plain square root). Weight decay is decoupled, as in the authors' code. With
    ``maximize``, the gradient is negated (D is used as given). ``steps`` is required
    (bias corrections).

    The authors' code computes ``p - lr*(m/bc1/denom + wd*p)``; here the step-only
    scalars ``lr/bc1`` and ``lr*wd`` are formed first (in double), which differs
    only by rounding.
    """
    beta1, beta2 = betas
    params, grads = _as_list(params), _as_list(grads)
    diags = _as_list(hessian_diags)
    ms, vs = _as_list(exp_avgs), _as_list(exp_hessian_diag_sqs)
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        steps[i] += 1
        step = float(steps[i])
        g = -g if maximize else g
        d = diags[i]
        m, v = ms[i], vs[i]
        m[...] = m * _scalar(beta1, p) + _scalar(1 - beta1, p) * g
        v[...] = v * _scalar(beta2, p) + (_scalar(1 - beta2, p) * d) * d
        step_size = lr / (1 - beta1 ** step)
        bc2_sqrt = (1 - beta2 ** step) ** 0.5
        root = np.sqrt(v)
        if hessian_power != 1:
            root = root ** _scalar(hessian_power, p)
            bc2_sqrt = bc2_sqrt ** hessian_power
        denom = root / _scalar(bc2_sqrt, p) + _scalar(eps, p)
        update = (_scalar(step_size, p) * m) / denom
        if weight_decay != 0:
            update = update + _scalar(lr * weight_decay, p) * p
        p -= update


def _dense_hessian(h, p):
    """A Hessian (array or callable of p) as an (n, n) float64 matrix, n = p.size,
    indexing p in C order."""
    if callable(h):
        h = h(p)
    h = np.asarray(h, dtype=np.float64)
    return h.reshape(p.size, p.size)


def newton_(params, grads, hessians, steps=None, *, lr=1.0, damping=0.0,
            saddle_free=False):
    r"""Damped Newton steps for small dense problems, one Hessian block per parameter.

    .. math::
        t &\leftarrow t + 1 \\
        \tilde H &= Q\,|\Lambda|\,Q^\top \text{ where } H = Q \Lambda Q^\top
            \quad \text{(saddle\_free)}, \qquad \tilde H = H \text{ (otherwise)} \\
        p &\leftarrow p - \gamma\, (\tilde H + \delta I)^{-1} \nabla

    ``hessians[i]`` is parameter i's Hessian: an array of shape ``(n, n)`` or
    ``p.shape + p.shape`` (n = ``p.size``), or a callable ``h(p)`` returning one. It
    must be symmetric when ``saddle_free``. Plain Newton jumps to the stationary point
    of the local quadratic model: a minimum, a maximum or a saddle alike. The
    saddle-free variant (Dauphin et al. 2014) takes eigenvalues by absolute value, so
    it moves *away* along directions of negative curvature and is repelled by saddles.
    ``damping`` (δ) adds δ I, which also regularises nearly singular Hessians.
    The solve is in double precision; the step is rounded to the parameter's dtype.
    ``steps`` is optional (counted when given).
    """
    params, grads, hessians = _as_list(params), _as_list(grads), _as_list(hessians)
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        if steps is not None:
            steps[i] += 1
        h = _dense_hessian(hessians[i], p)
        if saddle_free:
            lam, q = np.linalg.eigh(h)
            h = (q * np.abs(lam)) @ q.T
        a = h + damping * np.eye(p.size)
        delta = np.linalg.solve(a, np.asarray(g, dtype=np.float64).reshape(-1))
        p -= (lr * delta).astype(p.dtype).reshape(p.shape)
