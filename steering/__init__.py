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
    TrainConfig,
    TrainResult,
    evaluate_sae,
    iterate_activation_files,
    train_sae,
)


def __getattr__(name):
    """Everything ``steering.steerers`` exports (imported on first use: the steerers pull in transformers)."""
    import importlib

    steerers = importlib.import_module("steering.steerers")
    if name in steerers.__all__:
        return getattr(steerers, name)
    raise AttributeError(f"module 'steering' has no attribute {name!r}")


__all__ = [
    "DICTIONARY_SCHEMA",
    "SAE",
    "Annotation",
    "ConceptDictionary",
    "DictionaryError",
    "ElasticNetSolver",
    "LowRankLstsq",
    "TrainConfig",
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
