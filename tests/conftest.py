import os
import sys

# tests/rules.py is a helper module shared by the test files
sys.path.insert(0, os.path.dirname(__file__))
