"""What the dictionary-based steerers (actadd, mop, daco) share when they are built
(:meth:`~steering.steerers.base.Steerer.build`) from a loaded
:class:`~steering.dictionary.ConceptDictionary`.

**One strength unit (docs/defences.md).** ``gamma`` is measured in units of the mean
activation norm at each steered layer (:func:`mean_activation_norms`, measured once when
the steerer is built): every desirable concept is pushed by ``gamma * norm_l`` along its
unit direction, for all three additive methods. ActAdd adds
``gamma * norm_l * (sum_{K+} D_i/|D_i| - sum_{K-} D_i/|D_i|)``; MOP adds
``gamma * norm_l`` of each unit desirable atom; DACO gives each (unit-norm) desirable
atom the code ``gamma * norm_l``. So an equal ``gamma`` is a comparable push.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

STRENGTH_UNIT = ("gamma is in units of the mean activation norm at each steered layer: each desirable concept is "
                 "pushed by gamma x that norm along its unit direction (actadd also subtracts that much per "
                 "undesirable concept; mop and daco remove the undesirable concepts' measured codes)")
"""The strength unit, as ``daco steer`` and ``daco eval`` print it."""


@torch.no_grad()
def mean_activation_norms(model, processor, layers: Sequence[int], prompts: Sequence[str] | None = None) -> dict[int, float]:
    """Mean L2 norm of the residual stream at each of ``layers`` over the tokens of ``prompts``.

    Each prompt (default: the shipped harmless prompts, steering/data/) goes through the
    chat template alone; every position counts except the first (the attention-sink
    token, whose norm is an outlier in many models).
    """
    from steering.contrastive import ContrastiveSets
    from steering.models import get_adapter, model_inputs
    from steering.steerers.base import record_activations

    prompts = list(prompts) if prompts is not None else [item.prompt for item in ContrastiveSets.default().harmless]
    if not prompts:
        raise ValueError("mean_activation_norms needs at least one prompt")
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    totals, count = {layer: 0.0 for layer in layers}, 0
    for prompt in prompts:
        inputs = adapter.build_inputs(processor, [None], [prompt])
        hidden = record_activations(model, layers, {k: v.to(device) for k, v in model_inputs(inputs).items()})
        for layer, h in hidden.items():
            totals[layer] += h[1:].norm(dim=-1).sum().item()
        count += hidden[layers[0]].shape[0] - 1
    return {layer: total / count for layer, total in totals.items()}


def check_sae_choice(sae_dir: str | None, untrained_sae: bool) -> None:
    """Raise ValueError unless exactly one of a trained SAE folder and the explicit untrained flag is given
    (the rule ``daco steer`` and ``daco eval`` apply to daco)."""
    if bool(sae_dir) == bool(untrained_sae):
        raise ValueError("daco steers with a trained SAE: pass --sae DIR (from `daco train-sae`), or --untrained-sae "
                         "for each layer's dictionary-initialised SAE without training (one of them, not both)")


def daco_saes(dictionary, layers: Sequence[int], sae_dir: str | None = None, k: int = 32, eta: float = 0.5):
    """Per layer: the SAE (``sae_dir/layer_L/`` when given, else dictionary-initialised with TopK ``k``)
    and its undesirable / desirable atoms by docs/methods.md §3's centroid rule with threshold ``eta``.
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
        norms = saes[layer].W_dec[desirable[layer]].detach().norm(dim=-1)
        if norms.numel() and not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
            raise ValueError(f"--sae {sae_dir}: layer {layer}'s desirable atoms are not unit-norm (norms "
                             f"{norms.min().item():.4g}..{norms.max().item():.4g}); gamma's unit needs unit decoder rows: "
                             "normalise W_dec's rows (folding the norms into W_enc) before saving")
    return saes, undesirable, desirable


def strengths(options) -> dict[int, float]:
    """Per steered layer, ``options.gamma`` times the layer's mean activation norm (the unit above).

    ``options.norms`` are the norms when given, else measured with :func:`mean_activation_norms`.
    """
    norms = options.norms
    if norms is None:
        if options.processor is None:
            raise ValueError("give norms (mean activation norm per layer) or the processor to measure them")
        norms = mean_activation_norms(options.model, options.processor, options.layers)
    return {layer: options.gamma * norms[layer] for layer in options.layers}
