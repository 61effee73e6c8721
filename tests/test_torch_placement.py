"""fastoptim.torch allocates large state tensors at placed, non-aliasing offsets from
their parameter (as the NumPy classes place theirs), and again after load_state_dict;
the tensors still behave as torch's own state does, and checkpoints hold no more than
the state."""
import copy
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastoptim.torch as fot  # noqa: E402
from fastoptim import _placement  # noqa: E402

from test_torch_dropin import RICH, assert_close  # noqa: E402

ORDER = {"SGD": ("momentum_buffer",), "Adagrad": ("sum",),
         "RMSprop": ("square_avg", "momentum_buffer", "grad_avg"),
         "Adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
         "AdamW": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}


def _large(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype))
            for s in [(128, 160), (40000,), (7,)]]


def _train(opt, params, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()


def _assert_placed(opt, p, name):
    t = opt.state[p][name]
    slot = ORDER[type(opt).__name__].index(name) + 1
    assert t.shape == p.shape and t.stride() == p.stride() and t.dtype == p.dtype
    assert t.untyped_storage().nbytes() == p.numel() * p.element_size()
    assert t._base is None and t.storage_offset() == 0
    assert (t.data_ptr() - p.data_ptr() - slot * _placement.SLOT_BYTES) % 4096 == 0, name


@pytest.mark.parametrize("name", list(ORDER))
def test_large_state_is_placed_and_small_state_is_torchs(name):
    params = _large()
    opt = getattr(fot, name)(params, **RICH[name])
    _train(opt, params, 2)
    for p in params[:2]:
        for key in opt.state[p]:
            if key != "step":
                _assert_placed(opt, p, key)
    small = params[2]                               # under 64 KiB: torch's allocation
    for key, t in opt.state[small].items():
        if key != "step":
            assert t.shape == small.shape and t.stride() == small.stride()


@pytest.mark.parametrize("name", list(ORDER))
def test_placed_state_follows_torch_optim(name):
    ref, got = _large(), _large()
    ro = getattr(torch.optim, name)(ref, **RICH[name])
    go = getattr(fot, name)(got, **RICH[name])
    _train(ro, ref, 5)
    _train(go, got, 5)
    for a, b in zip(ref, got):
        assert_close(b, a, name)
        for key in ro.state[a]:
            assert_close(go.state[b][key].to(ro.state[a][key].dtype), ro.state[a][key], key)


def test_channels_last_parameter_gets_channels_last_placed_state():
    p = torch.nn.Parameter(torch.randn(8, 16, 16, 16).to(memory_format=torch.channels_last))
    opt = fot.Adam([p])
    _train(opt, [p], 2)
    _assert_placed(opt, p, "exp_avg")
    assert opt.state[p]["exp_avg"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", ["Adam", "RMSprop"])
def test_load_state_dict_places_the_state_again_and_continues(name):
    params, twin = _large(), _large()
    ro = getattr(torch.optim, name)(twin, **RICH[name])
    _train(ro, twin, 3)
    saved = copy.deepcopy(ro.state_dict())
    opt = getattr(fot, name)(params, **RICH[name])
    for p, q in zip(params, twin):
        p.data.copy_(q.data)
    opt.load_state_dict(saved)
    for i, p in enumerate(params[:2]):
        for key in opt.state[p]:
            if key != "step":
                _assert_placed(opt, p, key)
                # a copy: the checkpoint's tensors are not updated by later steps
                assert opt.state[p][key].data_ptr() != saved["state"][i][key].data_ptr()
    _train(ro, twin, 3, seed=7)
    _train(opt, params, 3, seed=7)
    for a, b in zip(twin, params):
        assert_close(b, a, name)


def test_checkpoint_holds_no_more_than_the_state_and_loads_with_weights_only():
    params = _large()
    opt = fot.Adam(params, amsgrad=True)
    _train(opt, params, 2)
    f = io.BytesIO()
    torch.save(opt.state_dict(), f)
    state_bytes = sum(t.numel() * t.element_size() for st in opt.state.values()
                      for t in st.values())
    assert state_bytes <= len(f.getvalue()) <= state_bytes + 16384
    f.seek(0)
    loaded = torch.load(f, weights_only=True)
    fresh = fot.Adam([torch.nn.Parameter(p.detach().clone()) for p in params], amsgrad=True)
    fresh.load_state_dict(loaded)
    for k, st in opt.state_dict()["state"].items():
        for key, t in st.items():
            assert torch.equal(fresh.state_dict()["state"][k][key], t)


def test_a_placed_state_tensor_behaves_as_torchs():
    params = _large()
    opt = fot.Adam(params)
    _train(opt, params, 2)
    t = opt.state[params[0]]["exp_avg"]
    before = t.clone()
    assert torch.equal(t * 2, before * 2)
    twin = copy.deepcopy(opt)                       # the optimizer, deep-copied
    assert torch.equal(twin.state[twin.param_groups[0]["params"][0]]["exp_avg"], before)
    t.share_memory_()                               # moved to shared memory
    assert t.is_shared() and torch.equal(t, before)
    arr = t.numpy()
    _train(opt, params, 1)
    assert not np.array_equal(arr, before.numpy())  # the update lands in the moved memory
    x = torch.nn.Parameter(torch.ones(4))
    loss = (x * opt.state[params[2]]["exp_avg"][:4]).sum()   # saved for backward
    _train(opt, params, 1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
