"""Data sets, transforms, samplers and loaders; build_loader(config) is classification's entry point,
build_train_loader / build_eval_loader serve every task."""
from .build import (SeededSamples, build_eval_loader, build_loader, build_mixup, build_train_loader,
                    build_transform)

__all__ = ['SeededSamples', 'build_eval_loader', 'build_loader', 'build_mixup', 'build_train_loader',
           'build_transform']
