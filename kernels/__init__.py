"""Compiled extensions used by the model; each in its own folder with sources, setup.py and a test."""
