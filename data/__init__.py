"""Data sets, transforms and samplers; build_loader(config) is the single entry point."""
from .build import DataError, build_loader, build_transform

__all__ = ['DataError', 'build_loader', 'build_transform']
