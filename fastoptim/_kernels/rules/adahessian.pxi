# Second-order rules: the per-element AdaHessian update.
#
# Included by _kernels.pxi, so it is compiled into every per-ISA module and reuses the
# shared machinery (_kernels/runtime.pxi, step.pxi, checks.pxi) unchanged: ``Step`` and ``Batch`` (the prepared,
# checked multi-tensor step), ``Step._gather`` (every array check, the overlap check,
# the pointer tables) and ``_run_batch`` (one parallel region over the concatenation
# of all arrays). Only the element loop and the per-array scalars are new here.
#
# Design, point by point:
#
# * AdaHessian (Yao et al. 2021) is Adam with the squared gradient replaced by the
#   squared Hutchinson estimate D of the Hessian diagonal. D is an *input* of the step
#   (like the gradient), not state: it is estimated by the caller from Hessian-vector
#   products (fastoptim.hessian.hutchinson_diag, fastoptim.torch_hessian).
# * Roles: param, grad, exp_avg, exp_hessian_diag_sq (both updated in place) and
#   hessian_diag (read only). ``Step._gather`` checks roles after the gradient as
#   updated arrays (writeable, contiguous in the parameter's order, no overlap). The
#   Hessian diagonal is only read, so ``prepare_adahessian`` first replaces any entry
#   that would fail those checks for a reason that does not matter when reading it
#   (read-only, another memory order, misaligned, or the gradient array itself) by a
#   contiguous copy, the same treatment ``_gather`` gives gradients.
# * hessian_power == 1 (the default) is a plain square root, the same loop as Adam's,
#   and vectorizes; any other power goes through pow/powf per element (libm's scalar
#   pow: not vectorized, and not bit-identical to NumPy's, which may use SVML).
# * Per element, the operations are those of fastoptim.reference.adahessian_, in the
#   same order and dtype:
#       m = m*b1 + (1-b1)*g
#       v = v*b2 + ((1-b2)*D)*D
#       denom = sqrt(v)^k / sqrt(bc2)^k + eps
#       p = p - ((lr/bc1)*m / denom + (lr*wd)*p)
#   The step-only scalars lr/bc1 and sqrt(bc2)^k are computed once per array in
#   double (``_adahessian_scalars``) and rounded to the array's dtype.

from libc.math cimport powf

cdef enum:
    AH_EXP_AVG = 2
    AH_EXP_HESS = 3
    AH_HESS_DIAG = 4


cdef inline floating _pow(floating x, floating y) noexcept nogil:
    if floating is float:
        return powf(x, y)
    else:
        return pow(x, y)


cdef inline double _hessian_power(const Batch *b) noexcept nogil:
    return b.hessian_power


cdef inline void _adahessian_loop(floating *p, const floating *g, floating *m, floating *v,
                                  const floating *h, Py_ssize_t n, floating step_size,
                                  floating bc2_k, floating beta1, floating one_minus_b1,
                                  floating beta2, floating one_minus_b2, floating eps,
                                  floating lr_wd, floating k, bint has_wd, bint plain_sqrt,
                                  bint maximize) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi, di, pi, mi, vi, root, denom, upd
    for i in range(n):
        gi = -g[i] if maximize else g[i]
        di = h[i]
        pi = p[i]
        mi = m[i] * beta1 + one_minus_b1 * gi
        m[i] = mi
        vi = v[i] * beta2 + (one_minus_b2 * di) * di
        v[i] = vi
        root = _sqrt(vi)
        if not plain_sqrt:
            root = _pow(root, k)
        denom = root / bc2_k + eps
        upd = (step_size * mi) / denom
        if has_wd:
            upd = upd + lr_wd * pi
        p[i] = pi - upd


cdef inline void _adahessian_typed(const Batch *b, Py_ssize_t t, Py_ssize_t lo,
                                   Py_ssize_t hi, floating *p, const floating *g,
                                   floating *m, floating *v,
                                   const floating *h) noexcept nogil:
    cdef double k = _hessian_power(b)
    cdef bint has_wd = b.weight_decay != 0.0
    cdef floating step_size = <floating> b.ts0[t], bc2_k = <floating> b.ts1[t]
    cdef floating b1 = <floating> b.beta1, omb1 = <floating> (1.0 - b.beta1)
    cdef floating b2 = <floating> b.beta2, omb2 = <floating> (1.0 - b.beta2)
    cdef floating eps = <floating> b.eps
    cdef floating lr_wd = <floating> (b.lr * b.weight_decay)
    cdef Py_ssize_t n = hi - lo
    p += lo
    g += lo
    m += lo
    v += lo
    h += lo
    if k == 1.0:
        _adahessian_loop(p, g, m, v, h, n, step_size, bc2_k, b1, omb1, b2, omb2, eps,
                         lr_wd, <floating> k, has_wd, True, b.maximize)
    else:
        _adahessian_loop(p, g, m, v, h, n, step_size, bc2_k, b1, omb1, b2, omb2, eps,
                         lr_wd, <floating> k, has_wd, False, b.maximize)


cdef void _adahessian_segment(const Batch *b, Py_ssize_t t, Py_ssize_t lo,
                              Py_ssize_t hi) noexcept nogil:
    if b.is_double[t]:
        _adahessian_typed(b, t, lo, hi, <double *> b.ptr[ROLE_PARAM][t],
                          <const double *> b.ptr[ROLE_GRAD][t],
                          <double *> b.ptr[AH_EXP_AVG][t], <double *> b.ptr[AH_EXP_HESS][t],
                          <const double *> b.ptr[AH_HESS_DIAG][t])
    else:
        _adahessian_typed(b, t, lo, hi, <float *> b.ptr[ROLE_PARAM][t],
                          <const float *> b.ptr[ROLE_GRAD][t],
                          <float *> b.ptr[AH_EXP_AVG][t], <float *> b.ptr[AH_EXP_HESS][t],
                          <const float *> b.ptr[AH_HESS_DIAG][t])


cdef void _adahessian_scalars(Batch *b, Py_ssize_t t) noexcept nogil:
    cdef double step = <double> b.steps[b.index[t]]
    cdef double bc1 = 1.0 - pow(b.beta1, step)
    cdef double bc2 = 1.0 - pow(b.beta2, step)
    cdef double k = _hessian_power(b)
    b.ts0[t] = b.lr / bc1                                    # step size
    b.ts1[t] = sqrt(bc2) if k == 1.0 else pow(sqrt(bc2), k)  # sqrt(bc2)^k


cdef list _readable_hessian_diags(list params, list grads, object hessian_diags):
    """The Hessian diagonals as ``_gather`` can take them as an updated role: entries
    that are only unsuitable for writing (read-only, other memory order, misaligned,
    sharing memory with the gradient) are replaced by contiguous copies."""
    cdef Py_ssize_t n = len(params), i
    cdef cnp.ndarray p, h
    cdef list out
    if hessian_diags is None:
        raise ValueError("hessian_diags is required (one Hessian-diagonal estimate per "
                         "parameter)")
    out = list(hessian_diags)
    if len(out) != n:
        raise ValueError(f"hessian_diags has {len(out)} entries, expected {n} "
                         f"(one per parameter)")
    if len(grads) != n:
        return out            # _gather reports the length mismatch of grads
    for i in range(n):
        if grads[i] is None:
            continue
        if out[i] is None:
            raise ValueError(f"hessian_diags[{i}] is None but grads[{i}] is not; a "
                             f"Hessian-diagonal estimate is needed for every updated "
                             f"parameter")
        p = _check_array(params[i], "params", i, True, None, None)
        h = _check_array(out[i], "hessian_diags", i, False, p, "params")
        lay_h = _layout(h)
        lay_p = _layout(p)
        if (not cnp.PyArray_ISWRITEABLE(h) or not cnp.PyArray_ISALIGNED(h)
                or lay_h == "" or (lay_h != "A" and lay_p != "A" and lay_h != lay_p)
                or np.may_share_memory(h, grads[i])):
            out[i] = np.array(h, order="F" if lay_p == "F" else "C")
    return out


def prepare_adahessian(params, grads, hessian_diags, exp_avgs, exp_hessian_diag_sqs,
                       steps, lr, betas, eps, weight_decay, hessian_power, maximize):
    cdef Step s = Step()
    s.b.lr = _nonneg("learning rate", lr)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    s.b.beta1 = _real("beta parameter at index 0", betas[0], 0.0, False, 1.0, True)
    s.b.beta2 = _real("beta parameter at index 1", betas[1], 0.0, False, 1.0, True)
    s.b.eps = _nonneg("epsilon value", eps)
    s.b.weight_decay = _nonneg("weight_decay value", weight_decay)
    s.b.hessian_power = _real("Hessian power value", hessian_power, 0.0, False, 1.0, False)
    s.b.maximize = _flag("maximize", maximize)
    params, grads = _arrays("params", params), _arrays("grads", grads)
    exp_avgs = _arrays("exp_avgs", exp_avgs)
    exp_hessian_diag_sqs = _arrays("exp_hessian_diag_sqs", exp_hessian_diag_sqs)
    hessian_diags = _arrays("hessian_diags", hessian_diags)
    if steps is None:
        raise ValueError("steps is required")
    diags = _readable_hessian_diags(params, grads, hessian_diags)
    s._gather(("params", "grads", "exp_avgs", "exp_hessian_diag_sqs", "hessian_diags"),
              (params, grads, exp_avgs, exp_hessian_diag_sqs, diags),
              (True, False, True, True, False), steps)
    s.kind = KIND_ADAHESSIAN
    s.segment = _adahessian_segment
    s.scalars = _adahessian_scalars
    return s
