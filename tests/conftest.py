import os
import sys

# tests/ is not a package; make its helpers importable as `proc`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
