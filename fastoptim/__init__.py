"""fastoptim: gradient-descent optimizers whose per-element updates are compiled,
multi-threaded kernels that change NumPy arrays in place.

Layers, each calling only the one below:
``reference`` (NumPy specification) <- compiled kernels <- ``functional`` (checked
in-place functions) <- optimizer classes (``SGD``, ``Adagrad``, ``RMSprop``, ``Adam``,
``AdamW``, ``Adamax``, ``Adadelta``, ``RAdam``, ``Rprop``, ``NAdam``, ``ASGD``,
``Lion``, ``ADOPT``, ``AdEMAMix``, ``AdamWScheduleFree``, ``Adafactor``, and the
second-order
``SophiaH``, ``AdaHessian``
and ``Newton``) <- integrations (``fastoptim.torch``, ``fastoptim.bench``,
``fastoptim.demo``), imported lazily.
``fastoptim.landscapes`` holds 2-D test functions with exact gradients and Hessians.
"""
__version__ = "0.1.0"

from . import functional, reference
from ._config import (config, get_num_threads, get_serial_threshold, set_num_threads,
                      set_serial_threshold, show_config)
from .hessian import hutchinson_diag
from .optim import (ADOPT, SGD, Adadelta, Adafactor, AdaHessian, Adagrad, Adam, Adamax,
                    AdamW, AdamWScheduleFree, AdEMAMix, Lion, Newton, NAdam, Optimizer,
                    RAdam, RMSprop, Rprop, ASGD, SophiaH)
from .reference import bfloat16_to_float32, float32_to_bfloat16

__all__ = [
    "SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Adamax", "Adadelta", "RAdam", "Rprop",
    "NAdam", "ASGD", "Lion", "ADOPT", "AdEMAMix", "SophiaH", "AdamWScheduleFree",
    "Adafactor", "AdaHessian", "Newton",
    "Optimizer",
    "hutchinson_diag", "bfloat16_to_float32", "float32_to_bfloat16",
    "functional", "reference",
    "set_num_threads", "get_num_threads", "set_serial_threshold", "get_serial_threshold",
    "show_config", "config", "__version__",
]


def __getattr__(name):
    # fastoptim.torch (needs torch) is imported on first use, never by `import fastoptim`
    if name == "torch":
        import importlib
        return importlib.import_module(".torch", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
