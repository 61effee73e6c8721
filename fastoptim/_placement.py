"""Where large optimizer state goes in memory (the NumPy classes and fastoptim.torch).

A step streams a parameter and its state arrays together. glibc maps each large array
just below the previous one, so arrays allocated back to back sit a large power of two
(plus a page) apart: their elements then share the low 12 address bits (4K aliasing of
loads against earlier stores) and the same cache sets, and a step runs measurably
slower. So each state array of a large parameter (slot 1, 2, 3: its place in the rule's
state) starts ``slot * SLOT_BYTES`` (1 KiB + one cache line) further round the 4 KiB
page than the parameter, whatever addresses the allocator hands out.
"""
import numpy as np

#: state smaller than this is allocated plainly
MIN_BYTES = 1 << 16
#: distance, modulo 4096, between consecutive state arrays of one parameter
SLOT_BYTES = 1088


def placed_buffer(address, nbytes, slot):
    """A zeroed uint8 array of ``nbytes`` bytes whose address is ``address + slot *
    SLOT_BYTES`` modulo 4096 (a view into an allocation 4 KiB larger; the view is what
    the caller keeps and shares)."""
    buf = np.zeros(nbytes + 4096, np.uint8)
    target = (address + slot * SLOT_BYTES) % 4096
    offset = (target - buf.__array_interface__["data"][0]) % 4096
    return buf[offset:offset + nbytes]
