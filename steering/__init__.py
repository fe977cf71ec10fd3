"""Downstream library: load the concept dictionary, code activations over it, train and
annotate dictionary-initialised SAEs, and steer models (torch + transformers only, never Beam)."""

from steering.annotate import Annotation, annotate
from steering.dictionary import (
    DICTIONARY_SCHEMA,
    ConceptDictionary,
    DictionaryError,
    dictionary_schema,
    dictionary_table,
    load_dictionary,
    unit_rows,
    write_dictionary_parquet,
)
from steering.sae import SAE
from steering.sparse_coding import (
    ElasticNetSolver,
    LowRankLstsq,
    elastic_net,
    lstsq_lowrank,
    mop_delta,
    mop_edit,
    sklearn_alpha,
)
from steering.train import (
    TrainResult,
    evaluate_sae,
    iterate_activation_files,
    train_sae,
)

# steerers live in steering.steerers (imported on first use: they pull in transformers)
_LAZY = {name: "steering.steerers" for name in ("DacoSteerer", "MOPSteerer", "ActAddSteerer", "PromptingSteerer")}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'steering' has no attribute {name!r}")


__all__ = [
    "DICTIONARY_SCHEMA",
    "SAE",
    "Annotation",
    "ConceptDictionary",
    "DictionaryError",
    "ElasticNetSolver",
    "LowRankLstsq",
    "TrainResult",
    "annotate",
    "dictionary_schema",
    "dictionary_table",
    "elastic_net",
    "evaluate_sae",
    "iterate_activation_files",
    "load_dictionary",
    "lstsq_lowrank",
    "mop_delta",
    "mop_edit",
    "sklearn_alpha",
    "train_sae",
    "unit_rows",
    "write_dictionary_parquet",
]
