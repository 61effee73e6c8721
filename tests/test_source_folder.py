"""Importing fastoptim from its unbuilt source folder (a fresh clone's root, where a
newcomer types the README's commands) says so and what to do, instead of a circular-
import error that points the wrong way."""
import os
import shutil
import subprocess
import sys

import pytest

import fastoptim

PACKAGE_DIR = os.path.dirname(os.path.abspath(fastoptim.__file__))


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A copy of the checkout's Python sources with no compiled module, as in a clone."""
    root = tmp_path_factory.mktemp("clone")
    shutil.copytree(PACKAGE_DIR, root / "fastoptim",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__", "*.c"))
    (root / "setup.py").write_text("# the checkout's setup.py\n")
    return root


@pytest.mark.parametrize("command", [["-c", "import fastoptim"],
                                     ["-m", "fastoptim.bench", "--quick"],
                                     ["-m", "fastoptim.demo", "--help"]])
def test_the_source_folder_gives_an_import_error_that_says_what_to_do(checkout, command):
    proc = subprocess.run([sys.executable, *command], cwd=checkout, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    err = proc.stderr
    assert "ImportError: fastoptim is being imported from" in err, err
    assert str(checkout / "fastoptim") in err, err
    assert "source checkout, which has no compiled kernels" in err, err
    assert "pip install ." in err and "fastoptim-bench" in err, err
    assert "circular import" not in err, err


def test_the_console_script_works_from_the_source_folder(checkout):
    """The README's main command, typed in the clone's root, runs the installed package
    (a console script's sys.path starts at its own folder, not the working directory)."""
    script = shutil.which("fastoptim-bench", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the fastoptim-bench console script is not installed beside this Python")
    proc = subprocess.run([script, "--help"], cwd=checkout, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower()
