"""Compiled extensions used by the model, each in its own folder with its sources and setup.py (their
tests are in tests/test_kernels.py)."""
