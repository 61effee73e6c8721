import os
import sys

# tests/rules.py is a helper module shared by the test files
sys.path.insert(0, os.path.dirname(__file__))

import pytest


@pytest.fixture(autouse=True, scope="session")
def _run_outside_the_source_tree(tmp_path_factory):
    """Tests (and the Python subprocesses some of them start, whose sys.path begins with
    the working directory) must import the installed fastoptim, not the source folder
    of the checkout, which has no compiled modules in a fresh clone."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)
