"""Building the dictionary-based steerers (prompting, actadd, mop, daco) from a loaded
:class:`~steering.dictionary.ConceptDictionary`; shared by ``daco steer`` and ``daco eval``."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

DICTIONARY_STEERERS = ("prompting", "actadd", "mop", "daco")


def daco_saes(dictionary, layers: Sequence[int], sae_dir: str | None = None, k: int = 32, eta: float = 0.5):
    """Per layer: the SAE (``sae_dir/layer_L/`` when given, else dictionary-initialised with TopK ``k``)
    and its undesirable / desirable atoms by METHODS.md §3's centroid rule with threshold ``eta``.
    Returns (saes, undesirable, desirable), each a dict keyed by layer."""
    from steering.annotate import annotate
    from steering.sae import SAE

    saes, undesirable, desirable = {}, {}, {}
    for layer in layers:
        if sae_dir:
            folder = Path(sae_dir) / f"layer_{layer}"
            if not folder.is_dir():
                raise FileNotFoundError(f"--sae {sae_dir} has no SAE for layer {layer} (expected {folder}/)")
            saes[layer] = SAE.load(str(folder))
        else:
            saes[layer] = SAE.from_dictionary(dictionary.directions(layer), k=min(k, len(dictionary)))
        labels = annotate(saes[layer], dictionary, eta, layer)
        undesirable[layer], desirable[layer] = list(labels.undesirable), list(labels.desirable)
    return saes, undesirable, desirable


def dictionary_steerer(method: str, model, dictionary, layers: Sequence[int], *, gamma: float,
                       sae_dir: str | None = None, k: int = 32, eta: float = 0.5):
    """The steerer of a dictionary method on ``model`` at ``layers`` (see :data:`DICTIONARY_STEERERS`)."""
    from steering.steerers import ActAddSteerer, DacoSteerer, MOPSteerer, PromptingSteerer

    if method == "prompting":
        return PromptingSteerer(model)
    if method == "actadd":
        return ActAddSteerer.from_dictionary(model, dictionary, layers, coefficient=gamma)
    if method == "mop":
        return MOPSteerer.from_dictionary(model, dictionary, layers, gamma=gamma)
    if method == "daco":
        saes, undesirable, desirable = daco_saes(dictionary, layers, sae_dir, k, eta)
        return DacoSteerer(model, saes, undesirable, desirable, gamma=gamma)
    raise ValueError(f"{method!r} is not a dictionary method; those are {', '.join(DICTIONARY_STEERERS)}")
