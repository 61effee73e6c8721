"""Hutchinson's estimate of a Hessian's diagonal from Hessian-vector products.

For a symmetric H and a Rademacher vector z (entries +1 or -1 with equal
probability), ``E[z * (H z)] = diag(H)``: the off-diagonal terms ``z_i z_j H_ij``
average out. One sample costs one Hessian-vector product, which autograd gives at
about the cost of a gradient (see :mod:`fastoptim.torch_hessian`), so AdaHessian can
precondition by curvature without ever forming H.
"""
import numbers

import numpy as np

__all__ = ["hutchinson_diag", "rademacher", "spatial_average"]


def _rng(rng):
    if rng is None or isinstance(rng, (numbers.Integral, np.random.SeedSequence)):
        return np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):
        return rng
    raise TypeError(f"rng must be None, an int seed or a numpy.random.Generator, got "
                    f"{type(rng).__name__}")


def rademacher(shape, dtype=np.float64, rng=None):
    """An array of +1/-1 with equal probability."""
    return (_rng(rng).integers(0, 2, size=shape) * 2 - 1).astype(dtype)


def spatial_average(d):
    """AdaHessian's spatial averaging: for a parameter with 3 or more dimensions (a
    convolution kernel: out, in, *spatial), replace the estimate by the mean of its
    absolute value over the spatial dimensions (axes 2 and beyond), broadcast back to
    the full shape, as the authors' code does for 4-D kernels. Arrays of up to 2
    dimensions are returned unchanged."""
    d = np.asarray(d)
    if d.ndim < 3:
        return d
    axes = tuple(range(2, d.ndim))
    return np.broadcast_to(np.abs(d).mean(axis=axes, keepdims=True), d.shape).copy()


_spatial_average = spatial_average     # hutchinson_diag's keyword shadows the name


def hutchinson_diag(hvp, params, n_samples=1, rng=None, *, spatial_average=False):
    """Estimate the Hessian diagonal as the mean of ``z * hvp(z)`` over Rademacher z.

    Parameters
    ----------
    hvp : callable
        The Hessian-vector product: called with arrays shaped like ``params`` (one
        ndarray, or a list of them if ``params`` is a list) and returning H z in the
        same structure.
    params : ndarray or list of ndarrays
        The parameters (only their shapes and dtypes are used).
    n_samples : int
        Number of Rademacher vectors to average (variance falls as 1/n_samples).
    rng : None, int or numpy.random.Generator
        Source of the Rademacher vectors.
    spatial_average : bool
        Apply :func:`spatial_average` to each estimate (for convolution kernels).

    Returns
    -------
    An estimate of the Hessian diagonal for each parameter, in the same structure
    (an ndarray, or a list) and dtypes as ``params``. Each sample is unbiased; with
    a diagonal H every sample is exact.
    """
    if not callable(hvp):
        raise TypeError(f"hvp must be callable, got {type(hvp).__name__}")
    if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) \
            or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    single = isinstance(params, np.ndarray)
    plist = [params] if single else list(params)
    for i, p in enumerate(plist):
        if not isinstance(p, np.ndarray) or p.dtype.kind != "f":
            raise TypeError(f"params[{i}] must be a floating-point numpy.ndarray")
    gen = _rng(rng)
    acc = [np.zeros(p.shape, dtype=np.float64) for p in plist]
    for _ in range(n_samples):
        zs = [rademacher(p.shape, p.dtype, gen) for p in plist]
        hz = hvp(zs[0] if single else zs)
        hz = [hz] if single else list(hz)
        if len(hz) != len(plist):
            raise ValueError(f"hvp returned {len(hz)} arrays, expected {len(plist)}")
        for i, (a, z, h) in enumerate(zip(acc, zs, hz)):
            h = np.asarray(h)
            if h.shape != z.shape:
                raise ValueError(f"hvp returned shape {h.shape} for params[{i}] of shape "
                                 f"{z.shape}")
            a += z * h
    out = []
    for a, p in zip(acc, plist):
        d = a / n_samples
        if spatial_average:
            d = _spatial_average(d)
        out.append(d.astype(p.dtype))
    return out[0] if single else out
