"""Array layout: the arrays every contender of a case shares, carved out of one
buffer at staggered, non-colliding offsets."""
import numpy as np


#: Arrays start on a 4 KiB page plus (k mod 7) * 576 bytes, k counting arrays in order.
STAGGER_BYTES = 576
STAGGER_SLOTS = 7
_PAGE = 4096
_BASE_ALIGN = 2 << 20


def carve_arrays(shapes, dtype, n_roles):
    """Carve ``n_roles`` arrays per shape out of one buffer, at non-colliding offsets.

    Returns ``roles``: a list of ``n_roles`` lists, ``roles[r][i]`` of shape
    ``shapes[i]`` (role 0 the parameters, 1 the gradients, then the state arrays),
    uninitialized.

    The choice: one buffer, aligned to 2 MiB (so transparent huge pages, where the
    kernel uses them, cover every layout alike), in which the arrays of a parameter
    follow each other (p, g, state...; then the next parameter). Array number k starts
    on a 4 KiB boundary plus ``(k mod 7) * 576`` bytes (9 cache lines). So every array
    is 64-byte aligned, and no two arrays streamed together are a multiple of 4 KiB
    (or of any larger power of two) apart. Allocated back to back, glibc maps large
    arrays exactly 2^27 + 4 KiB apart for 2^25 float32 elements; on this machine a
    fused torch Adam step took 17 ms there, 17 ms at exactly 2^27 or 2^27 + 4 KiB
    spacing, 15.5 ms with 64-byte staggers and 14 ms with staggers of 320-1088 bytes
    (fastoptim: 16.6 -> 12.5-13.5 ms), measured interleaved in one process.
    """
    dtype = np.dtype(dtype)
    shapes = [tuple(int(d) for d in s) if isinstance(s, (tuple, list)) else (int(s),)
              for s in shapes]
    offsets = []
    cursor, k = 0, 0
    for shape in shapes:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        per = []
        for _r in range(n_roles):
            start = -(-cursor // _PAGE) * _PAGE + (k % STAGGER_SLOTS) * STAGGER_BYTES
            per.append((start, nbytes))
            cursor = start + nbytes
            k += 1
        offsets.append(per)
    raw = np.empty(cursor + _BASE_ALIGN, dtype=np.uint8)
    base = (-raw.ctypes.data) % _BASE_ALIGN
    roles = [[None] * len(shapes) for _ in range(n_roles)]
    for i, (shape, per) in enumerate(zip(shapes, offsets)):
        for r, (start, nbytes) in enumerate(per):
            roles[r][i] = raw[base + start: base + start + nbytes].view(dtype).reshape(shape)
    return roles


def _fill_normal(arrays, rng, scale=1.0):
    for a in arrays:
        flat = a.reshape(-1)
        if a.dtype == np.float32:
            rng.standard_normal(flat.size, dtype=np.float32, out=flat)
        else:
            rng.standard_normal(flat.size, out=flat)
        if scale != 1.0:
            flat *= scale


class Arrays:
    """The arrays of one case: parameters, gradients and state lists, shared by every
    contender (the ceiling loop included)."""

    def __init__(self, shapes, dtype, n_state, seed=0):
        rng = np.random.default_rng(seed)
        self.shapes = shapes
        self.dtype = np.dtype(dtype)
        self.n_state = n_state
        roles = carve_arrays(shapes, dtype, 2 + n_state)
        self.params, self.grads, self.states = roles[0], roles[1], roles[2:]
        _fill_normal(self.params, rng)
        _fill_normal(self.grads, rng, 1e-2)
        self.reset_state()          # also touches every page now, not in a timed block

    @property
    def size(self):
        return sum(a.size for a in self.params)

    def reset_state(self):
        for role in self.states:
            for a in role:
                a.fill(0)

    def view(self, n_state, prefix=None):
        """(params, grads, states) for a rule with ``n_state`` state arrays; with
        ``prefix``, views of the first elements of the first array only (used for
        warm-up calls)."""
        def cut(lst):
            if prefix is None:
                return list(lst)
            return [lst[0].reshape(-1)[:prefix]]
        return cut(self.params), cut(self.grads), [cut(s) for s in self.states[:n_state]]
