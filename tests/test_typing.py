"""Typing: the package ships py.typed and stubs for its compiled modules; the stubs
match the built modules (mypy's stubtest), and mypy checks a user script that uses
the public API -- and catches a type error in one, so the stubs are really read.

Skipped when mypy is not installed (it is in the ``test`` extra).
"""
import importlib.util
import os
import re
import subprocess
import sys
import sysconfig
import textwrap

import pytest

import fastoptim
from fastoptim import _dispatch

PACKAGE_DIR = os.path.dirname(os.path.abspath(fastoptim.__file__))
ROOT = os.path.dirname(PACKAGE_DIR)

USER_SCRIPT = '''
import numpy as np
import fastoptim
from fastoptim import functional as F
from fastoptim import _kernels_baseline as K


def train(w: np.ndarray, steps: int) -> float:
    opt = fastoptim.AdamW([w], lr=1e-3, weight_decay=1e-2)
    for _ in range(steps):
        opt.step([2.0 * w])
        opt.param_groups[0]["lr"] *= 0.99
    saved = opt.state_dict()
    opt.load_state_dict(saved)
    return float(np.abs(w).sum())


def prepared(w: np.ndarray, g: np.ndarray) -> int:
    counters = np.zeros(1, np.int64)
    step = K.prepare_adam([w], [g], [np.zeros_like(w)], [np.zeros_like(w)], None,
                          counters, 1e-3, (0.9, 0.999), 1e-8, 0.0, False, False, False)
    step.run(fastoptim.get_num_threads())
    n: int = step.size + step.count
    level: int = K.cpu_isa_level()
    flags: str = K.build_cflags()
    return n + level + len(flags)


w = np.ones(8, np.float32)
print(train(w, 3), prepared(w, np.ones(8, np.float32)), fastoptim.__version__)
F.sgd_([w], [np.ones(8, np.float32)], lr=0.1)
fastoptim.set_num_threads(1)
'''

BAD_SCRIPT = '''
from fastoptim import _kernels_avx2 as K
from fastoptim._kernels_baseline import Step

def f(s: Step) -> str:
    return s.size            # int, not str

K.cpu_isa_level() + "x"      # int + str
K.prepare_sgd([], [], None, None, 0.1, 0.0, 0.0, False, 0.0, "no")   # bool expected
reveal_type(K.openmp_enabled())
'''


def _mypy_env():
    env = dict(os.environ)
    env.pop("MYPYPATH", None)
    purelib = os.path.realpath(sysconfig.get_paths()["purelib"])
    if os.path.realpath(ROOT) != purelib:
        env["MYPYPATH"] = ROOT           # the source tree (mypy refuses site-packages here)
    return env


def _mypy(tmp_path, source, *flags):
    pytest.importorskip("mypy", reason="mypy is not installed (pip install '.[test]')")
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(source))
    cmd = [sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir",
           str(tmp_path / ".mypy_cache"), "--python-executable", sys.executable,
           "--follow-imports=silent", *flags, str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path,
                          env=_mypy_env(), timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def test_py_typed_and_a_stub_for_every_compiled_module_are_shipped():
    assert os.path.isfile(os.path.join(PACKAGE_DIR, "py.typed"))
    for isa in ("baseline", "avx2", "avx512"):
        assert os.path.isfile(os.path.join(PACKAGE_DIR, f"_kernels_{isa}.pyi")), isa
    for isa in _dispatch.BUILT:      # and the compiled modules they describe (found, not
        spec = importlib.util.find_spec(f"fastoptim._kernels_{isa}")   # imported: the
        assert os.path.dirname(os.path.abspath(spec.origin)) == PACKAGE_DIR  # CPU may lack it


def test_mypy_accepts_a_user_script(tmp_path):
    code, out = _mypy(tmp_path, USER_SCRIPT, "--check-untyped-defs", "--warn-unused-ignores",
                      "--disallow-untyped-defs")
    assert code == 0, out
    assert "Success" in out


def test_mypy_reads_the_stubs_and_reports_type_errors(tmp_path):
    code, out = _mypy(tmp_path, BAD_SCRIPT)
    assert code == 1, out
    assert 'Incompatible return value type (got "int", expected "str")' in out, out
    assert 'Unsupported operand types for + ("int" and "str")' in out, out
    assert 'has incompatible type "str"; expected "bool"' in out, out
    assert re.search(r'Revealed type is "(builtins\.)?bool"', out), out


def test_stubs_match_the_compiled_modules():
    """stubtest imports each module this process may run and compares every name and
    signature (a module the CPU cannot run is never imported: its start-up code alone
    would kill the process; the stubs of all levels are one and the same)."""
    pytest.importorskip("mypy.stubtest", reason="mypy is not installed")
    modules = [f"fastoptim._kernels_{isa}" for isa in _dispatch.RUNNABLE]
    help_text = subprocess.run([sys.executable, "-m", "mypy.stubtest", "--help"],
                               capture_output=True, text=True, timeout=120).stdout
    flags = ["--ignore-disjoint-bases"] if "--ignore-disjoint-bases" in help_text else []
    allowlist = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             "stubtest_allowlist.txt")
    env = _mypy_env()
    env["PYTHONPATH"] = ROOT
    proc = subprocess.run([sys.executable, "-m", "mypy.stubtest", "--concise",
                           "--allowlist", allowlist, *flags, *modules],
                          capture_output=True, text=True, env=env, timeout=600,
                          cwd=os.path.dirname(allowlist))
    assert proc.returncode == 0, proc.stdout + proc.stderr
