"""Data sets, transforms and samplers; build_loader(config) is the single entry point."""
from .build import build_loader, build_transform

__all__ = ['build_loader', 'build_transform']
