"""Steering methods, one module each, behind the :class:`Steerer` interface (docs/methods.md §2-4).

Each steerer is a context manager over a Hugging Face model that adds ``delta(layer, z)``
to the chosen decoder layers' outputs for every token (prefill and each decode step,
KV cache on, padded batches). :data:`STEERERS` maps method names to classes.
"""

from steering.steerers.base import (DEFAULT_LAYERS, STEERERS, BuildOptions, Steerer, get_steerer, parse_layers,
                                    record_activations, register)
from steering.steerers.actadd import ActAddSteerer
from steering.steerers.daco import CalibrationReport, DacoSteerer
from steering.steerers.fitted import FittedSteerer
from steering.steerers.iar import IARSteerer
from steering.steerers.mars import MARSSteerer
from steering.steerers.mop import MOPSteerer
from steering.steerers.prompting import SAFETY_SYSTEM_PROMPT, PromptingSteerer
from steering.steerers.ras import RASSteerer
from steering.steerers.refusal import RefusalDirectionSteerer

__all__ = [
    "DEFAULT_LAYERS", "STEERERS", "BuildOptions", "FittedSteerer", "Steerer", "get_steerer", "parse_layers", "record_activations", "register",
    "ActAddSteerer", "CalibrationReport", "DacoSteerer", "MOPSteerer", "PromptingSteerer", "SAFETY_SYSTEM_PROMPT",
    "IARSteerer", "MARSSteerer", "RASSteerer", "RefusalDirectionSteerer",
]
