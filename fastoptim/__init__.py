"""fastoptim: gradient-descent optimizers whose per-element updates are compiled,
multi-threaded kernels that change NumPy arrays in place.

Layers, each calling only the one below:
``reference`` (NumPy specification) <- compiled kernels <- ``functional`` (checked
in-place functions) <- optimizer classes (``SGD``, ``Adagrad``, ``RMSprop``, ``Adam``,
``AdamW``) <- integrations (``fastoptim.torch``, ``fastoptim.bench``), imported lazily.
"""
__version__ = "0.1.0"

from . import functional, reference
from ._config import (config, get_num_threads, get_serial_threshold, set_num_threads,
                      set_serial_threshold, show_config)
from .optim import SGD, Adagrad, Adam, AdamW, Optimizer, RMSprop

__all__ = [
    "SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Optimizer",
    "functional", "reference",
    "set_num_threads", "get_num_threads", "set_serial_threshold", "get_serial_threshold",
    "show_config", "config", "__version__",
]
