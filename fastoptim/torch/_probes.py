"""What a kept step reads through torch internals, each probed at import against
the public way and left out (0 / None) where it disagrees or is missing."""
import torch

from .. import _config


# A kept step (_Reuse) reads the data addresses of every parameter, state tensor and
# gradient at each step. ``t.data_ptr()`` costs ~40 ns from Python; torch exposes the C
# function behind it (for inductor's compiled wrappers), which the kernel module's
# ``addresses`` calls in a C loop (~5 ns) on tensors of exactly these types. _READER is
# its address, or 0 (then ``data_ptr()`` is called) when this torch lacks it or it
# disagrees with ``data_ptr()`` on the probes below.
_EXACT = (torch.Tensor, torch.nn.Parameter)


def _address_reader():
    try:
        from torch._C._dynamo.guards import (
            _torchinductor_pyobject_tensor_data_ptr as addr)
    except (ImportError, AttributeError):
        return 0
    if not isinstance(addr, int) or isinstance(addr, bool) or addr <= 0:
        return 0
    base = torch.arange(24.0)
    probes = [base, base[5:], base.view(4, 6).t(), base[:0], torch.tensor(1.5),
              torch.nn.Parameter(torch.ones(2, 3, dtype=torch.float64)),
              torch.zeros(3, dtype=torch.complex64)]
    try:
        got = _config._kernels.addresses(probes, addr, _EXACT).tolist()
    except Exception:                        # pragma: no cover - a torch that changed
        return 0
    return addr if got == [t.data_ptr() for t in probes] else 0


_READER = _address_reader()


# A kept step also checks that every parameter and gradient keeps its exact type, dtype,
# device, dispatch keys (so: no conjugate/negative bit, dense), shape and strides.
# From Python that is five attribute reads per tensor (~0.4 us a parameter); torch's
# dynamo has the same check compiled (``TensorGuards``, ~60 ns a tensor), built from
# example tensors with their sizes and strides given. _LAYOUT_GUARD makes one for a list
# of tensors, or is None (then the Python reads run) when this torch lacks it or it does
# not tell the changes below apart on probe tensors.
def _layout_guard():
    try:
        from torch._C._dynamo.guards import TensorGuards
    except (ImportError, AttributeError):
        return None

    def guard(tensors):
        return TensorGuards(*tensors,
                            dynamic_dims_sizes=[list(t.shape) for t in tensors],
                            dynamic_dims_strides=[list(t.stride()) for t in tensors])

    base = torch.zeros(4, 3)
    kept = [base, torch.nn.Parameter(torch.zeros(5, dtype=torch.float64)), torch.tensor(1.0)]
    changed = [
        [torch.zeros(3, 4).t(), kept[1], kept[2]],                           # strides
        [torch.zeros(4, 2), kept[1], kept[2]],                               # shape
        [base, torch.zeros(5, dtype=torch.float64), kept[2]],                # type
        [base, torch.nn.Parameter(torch.zeros(5)), kept[2]],                 # dtype
        [base, kept[1], torch.zeros(1)],                                     # 0-d vs 1-d
        [base, kept[1], torch.tensor(1.0).to_sparse()],                      # layout
        [base, kept[1], None],                                               # not a tensor
        [base._neg_view(), kept[1], kept[2]],                                # negative bit
    ]
    try:
        with torch.no_grad():
            g = guard(kept)
            same = g.check(*kept) and g.check(torch.ones(4, 3), torch.nn.Parameter(
                torch.ones(5, dtype=torch.float64)), torch.tensor(2.0))
            if not same or any(g.check(*c) for c in changed):
                return None
    except Exception:                        # pragma: no cover - a torch that changed
        return None
    return guard


_LAYOUT_GUARD = _layout_guard()
