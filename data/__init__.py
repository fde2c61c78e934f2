"""The data every task shares: samplers, per-sample seeding and the loader builders
(``loaders.py``), shards (``shards/``), remote fetching (``fetch.py``) and the generated digit data
sets (``digits.py``, ``digit_canvases.py``). The names are imported on first use, so that ``python -m
data.shards`` and ``python -m data.digits`` run their module once."""
import importlib

__all__ = ['ResumableLoader', 'SeededSamples', 'build_eval_loader', 'build_train_loader']


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module('.loaders', __name__), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
