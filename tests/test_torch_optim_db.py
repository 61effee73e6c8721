"""fastoptim.torch against PyTorch's own optimizer test database: torch 2.13 ships it as
``torch.testing._internal.common_optimizers.optim_db`` -- for each optimizer, the option
mixes and the bad arguments that PyTorch's test/test_optim.py runs (that file itself is
not in the wheel). Every OptimizerInfo whose optimizer fastoptim.torch has is run here
on the CPU: each error input raises (or warns) as torch's class does, with the same
type and text, and each option mix steps a small model as torch's class does."""
import copy
import re
import warnings

import pytest

torch = pytest.importorskip("torch")
# (torch's test helpers import expecttest, a test extra)
pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest")
from torch.testing._internal.common_optimizers import (  # noqa: E402
    OptimizerErrorEnum, optim_db)

import fastoptim.torch as fot  # noqa: E402

INFOS = {info.optim_cls.__name__: info for info in optim_db
         if hasattr(fot, info.optim_cls.__name__)}


def test_the_database_covers_every_drop_in_of_a_torch_optim_rule():
    assert sorted(INFOS) == sorted(n for n in fot.__all__ if hasattr(torch.optim, n))
    assert len(INFOS) == 12


@pytest.mark.parametrize("name", sorted(INFOS))
def test_torch_s_error_inputs_fail_alike(name):
    """PyTorch's test_errors, with fastoptim.torch's class in place of torch's."""
    info, cls = INFOS[name], getattr(fot, name)
    inputs = info.optim_error_inputs_func(device="cpu", dtype=torch.float32)
    assert inputs
    for e in inputs:
        oi = e.optimizer_error_input
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if e.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
                    cls(oi.params, **oi.kwargs)
                else:
                    cls(oi.params, **oi.kwargs).step()
            except Exception as ex:          # noqa: BLE001 (compared below)
                assert not issubclass(e.error_type, Warning), (oi.desc, ex)
                assert isinstance(ex, e.error_type), (oi.desc, type(ex), ex)
                assert re.search(e.error_regex, str(ex)), (oi.desc, str(ex))
                continue
        assert issubclass(e.error_type, Warning), (oi.desc, "no error raised")
        assert any(issubclass(w.category, e.error_type) and re.search(e.error_regex,
                                                                       str(w.message))
                   for w in caught), (oi.desc, [str(w.message) for w in caught])


def _model(dtype, seed=0):
    """A weight, a bias and a Fortran-ordered weight: their losses are quadratic."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(10, 5, dtype=dtype, generator=g),
            torch.randn(10, dtype=dtype, generator=g),
            torch.randn(5, 10, dtype=dtype, generator=g).t(),
            torch.randn(5, dtype=dtype, generator=g))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", sorted(INFOS))
def test_every_option_mix_of_torch_s_database_steps_as_torch(name, dtype):
    """Each of the database's CPU option mixes: 20 closure steps of torch's class and
    fastoptim.torch's on the same model stay within rounding (fp64 1e-10, fp32 1e-5
    relative to the values' scale)."""
    info = INFOS[name]
    inputs = info.optim_inputs_func(device="cpu", dtype=dtype)
    assert inputs
    for oi in inputs:
        assert oi.params is None, oi.desc        # (the CPU mixes set options only)
        w, b, wt, x = _model(dtype)
        runs = []
        for cls in (info.optim_cls, getattr(fot, name)):
            params = [w.clone().requires_grad_(), b.clone().requires_grad_(),
                      wt.t().clone().t().requires_grad_()]
            opt = cls(params, **copy.deepcopy(oi.kwargs))

            def closure(opt=opt, params=params):
                opt.zero_grad()
                W, B, WT = params
                loss = ((W @ x + B) ** 2).sum() + (WT @ x).pow(2).sum()
                loss.backward()
                return loss
            for _ in range(20):
                opt.step(closure)
            runs.append(params)
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        for want, got in zip(*runs):
            want, got = want.detach(), got.detach()
            scale = max(float(want.abs().max()), 1.0)
            err = float((want - got).abs().max())
            assert err <= tol * scale, (oi.desc, oi.kwargs, err)
