"""Instruction-set levels: no kernel code runs, or is even imported, that the CPU cannot
execute or that FASTOPTIM_ISA rules out.

A module compiled for AVX-512 kills the process (SIGILL) on a CPU without it as soon as
it is imported: its module start-up code already uses AVX-512 instructions. So each test
here runs in a fresh subprocess, forced to one level (every level this process may run,
plus the unforced default), tours the public API -- every optimizer and option family,
the functional API, the process-wide settings, the torch drop-in, the bench and demo
modules -- and then reports which kernel modules ended up in ``sys.modules``: exactly
the baseline one (the dispatcher asks it for the CPU's features) and the chosen one.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from fastoptim import _dispatch

from rules import ISAS

TOUR = r'''
import contextlib, io, json, sys, warnings
import numpy as np
import fastoptim
from fastoptim import functional as F, landscapes, reference

fastoptim.set_serial_threshold(1000)          # process-wide settings
fastoptim.set_num_threads(1)
fastoptim.set_num_threads(None)
with contextlib.redirect_stdout(io.StringIO()):
    fastoptim.show_config()

rng = np.random.default_rng(0)


def params(dtype=np.float32):
    return [rng.standard_normal(s).astype(dtype) for s in [(), (7,), (3, 5), (5000,)]]


def grads(ps):
    return [rng.standard_normal(p.shape).astype(p.dtype) for p in ps]


configs = [
    (fastoptim.SGD, dict(lr=0.01)),
    (fastoptim.SGD, dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.1)),
    (fastoptim.Adagrad, dict(lr_decay=0.01, weight_decay=0.1)),
    (fastoptim.RMSprop, dict(momentum=0.9, centered=True)),
    (fastoptim.Adam, dict(amsgrad=True, maximize=True)),
    (fastoptim.AdamW, dict(nonfinite="skip")),
    (fastoptim.AdamW, dict(state_dtype="bfloat16")),
    (fastoptim.Adam, dict(state_dtype="bfloat16", rounding="stochastic", amsgrad=True)),
]
for dtype in (np.float32, np.float64):
    for cls, kw in configs:
        if kw.get("state_dtype") and dtype == np.float64:
            continue
        ps = params(dtype)
        opt = cls(ps, **kw)
        for _ in range(3):
            opt.step(grads(ps))
        opt.load_state_dict(opt.state_dict())
        opt.step(grads(ps))
fastoptim.set_serial_threshold(None)           # back to the calibrated thresholds
for cls, kw in configs[:6]:
    ps = params()
    opt = cls(ps, **kw)
    for _ in range(6):                         # past the calibration steps
        opt.step(grads(ps))

ps = params(np.float64)
n = len(ps)
F.sgd_(ps, grads(ps), lr=0.1)
F.adagrad_(ps, grads(ps), [np.zeros_like(p) for p in ps], np.zeros(n, np.int64))
F.rmsprop_(ps, grads(ps), [np.zeros_like(p) for p in ps])
F.adam_(ps, grads(ps), [np.zeros_like(p) for p in ps], [np.zeros_like(p) for p in ps],
        None, np.zeros(n, np.int64))
F.adamw_(ps, grads(ps), [np.zeros_like(p) for p in ps], [np.zeros_like(p) for p in ps],
         None, np.zeros(n, np.int64))
F.adahessian_(ps, grads(ps), grads(ps), [np.zeros_like(p) for p in ps],
              [np.zeros_like(p) for p in ps], np.zeros(n, np.int64))
with np.errstate(all="ignore"):
    bad = grads(ps)
    bad[1][0] = np.nan
    opt = fastoptim.Adam(ps, nonfinite="skip")
    assert opt.step(bad) is False

land = landscapes.Saddle()
x = np.array([1.0, 1e-3])
opt = fastoptim.AdaHessian([x], lr=0.1)
d = fastoptim.hutchinson_diag(lambda z: land.hvp(x, z), x, rng=rng)
opt.step([land.grad(x)], [d])
fastoptim.Newton([x], damping=1e-3, saddle_free=True).step([land.grad(x)], [land.hessian])
fastoptim.config()

import fastoptim.bench, fastoptim.demo            # the integrations' imports
try:
    import torch
except ImportError:
    torch = None
if torch is not None:
    import fastoptim.torch as fot
    from fastoptim import torch_hessian
    torch.manual_seed(0)
    for cls in (fot.SGD, fot.Adagrad, fot.RMSprop, fot.Adam, fot.AdamW):
        model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 2))
        opt = cls(model.parameters(), lr=1e-3)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 40)).square().sum().backward()
            opt.step()
        opt.load_state_dict(opt.state_dict())
    w = torch.randn(5, requires_grad=True)
    torch_hessian.hutchinson_diag((w ** 4).sum(), [w])

print(json.dumps({
    "kernel_path": fastoptim.config()["kernel_path"],
    "modules": sorted(m for m in sys.modules if m.startswith("fastoptim._kernels_")),
    "torch": torch is not None,
}))
'''


def _run(env_isa, extra_env=None, code=TOUR):
    env = dict(os.environ)
    env.pop("FASTOPTIM_ISA", None)
    if env_isa is not None:
        env["FASTOPTIM_ISA"] = env_isa
    env.update(extra_env or {})
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, (
        f"FASTOPTIM_ISA={env_isa}: exit {proc.returncode}"
        f"{' (SIGILL: an instruction this CPU lacks)' if proc.returncode == -4 else ''}\n"
        f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _expected_modules(isa):
    return sorted({"fastoptim._kernels_baseline", f"fastoptim._kernels_{isa}"})


@pytest.mark.parametrize("isa", ISAS)
def test_a_tour_of_the_api_forced_to_each_level_loads_only_that_level(isa):
    reason = _dispatch.why_not(isa)
    if reason:
        pytest.skip(reason)
    out = _run(isa)
    assert out["kernel_path"] == isa
    assert out["modules"] == _expected_modules(isa), out


def test_a_tour_of_the_api_unforced_runs_the_widest_runnable_level():
    if _dispatch.FORCED is not None:
        pytest.skip("this test process is itself forced by FASTOPTIM_ISA")
    out = _run(None)
    assert out["kernel_path"] == _dispatch.RUNNABLE[0]
    assert out["modules"] == _expected_modules(_dispatch.RUNNABLE[0]), out


@pytest.mark.parametrize("isa", ISAS)
def test_the_serial_threshold_from_the_environment_touches_only_the_chosen_level(isa):
    """FASTOPTIM_SERIAL_THRESHOLD is applied at import (it once imported every built
    module, and so killed the process on CPUs without AVX-512)."""
    reason = _dispatch.why_not(isa)
    if reason:
        pytest.skip(reason)
    code = textwrap.dedent('''
        import json, sys, fastoptim
        print(json.dumps({"kernel_path": fastoptim.config()["kernel_path"],
                          "threshold": fastoptim.get_serial_threshold(),
                          "modules": sorted(m for m in sys.modules
                                            if m.startswith("fastoptim._kernels_"))}))
    ''')
    out = _run(isa, {"FASTOPTIM_SERIAL_THRESHOLD": "1234"}, code)
    assert out["threshold"] == 1234
    assert out["modules"] == _expected_modules(isa), out


def test_a_level_the_process_may_not_run_is_refused_not_imported():
    import sys as _sys
    for isa in ISAS:
        reason = _dispatch.why_not(isa)
        if not reason:
            assert _dispatch.load(isa).build_isa() == isa
            continue
        before = set(_sys.modules)
        with pytest.raises(ImportError, match=f"refusing to import fastoptim._kernels_{isa}"):
            _dispatch.load(isa)
        assert f"fastoptim._kernels_{isa}" not in set(_sys.modules) - before
    with pytest.raises(ImportError, match="not one of"):
        _dispatch.load("avx1024")


def test_a_later_loaded_level_gets_the_settings_already_made():
    lower = [isa for isa in _dispatch.RUNNABLE if isa != _dispatch.ISA]
    if not lower:
        pytest.skip("only one kernel level may run here")
    code = textwrap.dedent(f'''
        import json, fastoptim
        from fastoptim import _dispatch
        fastoptim.set_serial_threshold(777)
        mod = _dispatch.load({lower[0]!r})
        a = mod.get_serial_threshold()
        fastoptim.set_serial_threshold(None)
        print(json.dumps([a, mod.get_serial_threshold(),
                          _dispatch.kernels.get_serial_threshold()]))
    ''')
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    a, b, c = json.loads(proc.stdout.strip().splitlines()[-1])
    assert a == 777
    assert b == c != 777             # both back to the default used before calibration


def test_a_bad_forced_level_is_an_import_error():
    env = dict(os.environ, FASTOPTIM_ISA="avx9")
    proc = subprocess.run([sys.executable, "-c", "import fastoptim"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert "FASTOPTIM_ISA='avx9' is not one of baseline, avx2, avx512" in proc.stderr
