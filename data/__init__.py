"""Data sets, transforms, samplers and loaders; build_loader(config) is classification's entry point,
build_train_loader / build_eval_loader serve every task. The names are imported on first use, so that
``python -m data.shards`` and ``python -m data.digits`` run their module once."""
import importlib

__all__ = ['SeededSamples', 'build_eval_loader', 'build_loader', 'build_mixup', 'build_train_loader',
           'build_transform',
           'preprocessing']


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module('.build', __name__), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
