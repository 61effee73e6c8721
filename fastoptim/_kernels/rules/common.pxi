# Part of the kernel module (included by fastoptim/_kernels.pxi): element helpers
# the rules share.

# ---------------------------------------------------------------------------------
# Element rules. Each loop reads like fastoptim/reference.py with types.
# ---------------------------------------------------------------------------------

cdef inline floating _sqrt(floating x) noexcept nogil:
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef inline floating _lerp(floating start, floating end, floating w) noexcept nogil:
    # torch.lerp: start + w*(end-start) for w < 0.5, else end - (end-start)*(1-w)
    # (<floating> 1): a bare 1 would become the C double 1.0 and promote the product
    cdef floating one = 1
    if w < 0.5:
        return start + w * (end - start)
    return end - (end - start) * (one - w)


# Flags that decide which arrays a loop touches (momentum, centered, amsgrad) are
# literal constants at every call site, so the compiler emits one branch-free,
# vectorized copy of the loop per combination. The other flags only choose between
# values and become vector blends.


cdef inline double _oracle_decay(const Batch *b) noexcept nogil:
    # pytorch_optimizer's decoupled weight decay multiplier (ADOPT, AdEMAMix, SophiaH):
    # 1 - wd * lr, or 1 - wd with fixed_decay
    return 1.0 - b.weight_decay * (1.0 if b.fixed_decay else b.lr)
