"""Image classification: a task of the run engine (``task.py``) with its data (``data.py``; NVIDIA
DALI's loader in ``dali.py``), its distillation teachers (``distill.py``), its config section
(``config.py``) and its tools, --throughput (``throughput.py``) and --export (``export.py``).
``main.py`` is its entry point."""
from .config import classification_defaults, get_config
from .export import export
from .task import Classification
from .throughput import throughput

__all__ = ['Classification', 'classification_defaults', 'export', 'get_config', 'throughput']
