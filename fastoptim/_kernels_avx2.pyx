# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
# Kernel module compiled for the avx2 instruction-set level; the code is in _kernels.pxi.
include "_kernels.pxi"
