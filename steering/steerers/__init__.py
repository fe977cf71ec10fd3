"""Steering methods, one module each, behind the :class:`Steerer` interface (docs/methods.md §2-4).

Each steerer is a context manager over a Hugging Face model that adds ``delta(layer, z)``
to the chosen decoder layers' outputs for every token (prefill and each decode step,
KV cache on, padded batches). :data:`STEERERS` maps method names to classes; each fitted
defence's options dataclass (its ``fit_config``: ``IARFitConfig``, ...) is exported too.

Every module of this package is imported here, so each method registers itself
(:func:`register`) and its class is exported under its own name: a new method is one new
module, nothing to add here.
"""

import importlib
import pkgutil

from steering.steerers.base import (DEFAULT_LAYERS, STEERERS, BuildOptions, Steerer, get_steerer, parse_layers,
                                    record_activations, register)
from steering.steerers.daco import CalibrationReport
from steering.steerers.fitted import FittedSteerer
from steering.steerers.prompting import SAFETY_SYSTEM_PROMPT

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
globals().update({cls.__name__: cls for cls in STEERERS.values()})
globals().update({cls.fit_config.__name__: cls.fit_config for cls in STEERERS.values() if cls.fitted})

__all__ = [
    "DEFAULT_LAYERS", "STEERERS", "BuildOptions", "CalibrationReport", "FittedSteerer", "SAFETY_SYSTEM_PROMPT",
    "Steerer", "get_steerer", "parse_layers", "record_activations", "register",
    *sorted(cls.__name__ for cls in STEERERS.values()),
    *sorted(cls.fit_config.__name__ for cls in STEERERS.values() if cls.fitted),
]
