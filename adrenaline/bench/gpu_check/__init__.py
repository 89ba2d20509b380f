"""The GPU check, one module per stage; run.py runs them (see its docstring)."""
