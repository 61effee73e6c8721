# Part of the kernel module (included by fastoptim/_kernels.pxi): the data addresses of
# Python objects (tensors) and the identity of dict entries, read in compiled loops for
# the torch drop-in's kept steps (fastoptim/torch.py: _Reuse). Reading ``t.data_ptr()``
# from Python costs ~40 ns a tensor, five tensors a parameter every step; here it is a
# C call when the caller has a reader for the object's exact type.
#
# ``reader`` is 0 or the address of a C function ``void *reader(PyObject *)`` returning
# the object's data address (torch exposes one for inductor's compiled wrappers); it is
# called only on objects whose type is exactly one of ``exact`` (a tuple of types the
# caller checked the reader against). Any other object answers its ``data_ptr()``.
# The reader must not be called on objects that could make it fail (torch's raises a C++
# exception on a tensor without storage): the caller passes only objects it checked, in
# this step, to be dense tensors (their strides were read), or objects it holds and
# checked when it planned the step.

from cpython.object cimport PyObject, Py_TYPE
from cpython.dict cimport PyDict_GetItem

ctypedef void *(*_AddressReader)(PyObject *) noexcept nogil


cdef inline uintptr_t _address_of(object o, uintptr_t reader, tuple exact) except? 0:
    cdef object tp = <object> Py_TYPE(o)
    cdef Py_ssize_t k
    if reader != 0:
        for k in range(len(exact)):
            if tp is exact[k]:
                return <uintptr_t> (<_AddressReader> reader)(<PyObject *> o)
    return <uintptr_t> (<unsigned long long> o.data_ptr())


def addresses(list objs, uintptr_t reader=0, tuple exact=()):
    """The data address of each object (see the notes at the top of this part) as an
    int64 array, in order."""
    cdef Py_ssize_t i, n = len(objs)
    cdef cnp.ndarray out = np.empty(n, dtype=np.int64)
    cdef int64_t *o = <int64_t *> cnp.PyArray_DATA(out)
    for i in range(n):
        o[i] = <int64_t> _address_of(objs[i], reader, exact)
    return out


def addresses_equal(list objs, cnp.ndarray expected, uintptr_t reader=0, tuple exact=()):
    """Whether the data address of ``objs[i]`` is ``expected[i]`` (contiguous int64, one
    entry per object) for every i."""
    cdef Py_ssize_t i, n = len(objs)
    cdef int64_t *e
    if (cnp.PyArray_TYPE(expected) != cnp.NPY_INT64 or cnp.PyArray_SIZE(expected) != n
            or not cnp.PyArray_IS_C_CONTIGUOUS(expected)):
        raise TypeError("addresses_equal takes a contiguous int64 array, one entry an object")
    e = <int64_t *> cnp.PyArray_DATA(expected)
    for i in range(n):
        if <int64_t> _address_of(objs[i], reader, exact) != e[i]:
            return False
    return True


def kept_grads(list params, list expected, list mask):
    """The gradients (``.grad``) of those of ``params`` whose ``mask`` entry is True,
    in order, if ``params`` holds exactly the objects of ``expected`` and each has a
    gradient exactly where ``mask`` says; else None. (A kept step's first check, in
    one call: ~0.1 us a parameter less than the same in Python.)"""
    cdef Py_ssize_t i, n = len(params)
    cdef list out = []
    cdef object p, g
    if len(expected) != n or len(mask) != n:
        return None
    for i in range(n):
        p = params[i]
        if p is not expected[i]:
            return None
        g = p.grad
        if (g is not None) != (mask[i] is True):
            return None
        if g is not None:
            out.append(g)
    return out


def entries_are(list dicts, list keys, list values):
    """Whether ``dicts[i][keys[i]] is values[i]`` for every i (a missing key or an
    object that is not a dict: False). Lists of one length."""
    cdef Py_ssize_t i, n = len(dicts)
    cdef object d
    cdef PyObject *v
    if len(keys) != n or len(values) != n:
        raise ValueError("entries_are takes three lists of one length")
    for i in range(n):
        d = dicts[i]
        if type(d) is not dict:
            return False
        v = PyDict_GetItem(d, keys[i])
        if v == NULL or v != <PyObject *> values[i]:
            return False
    return True
