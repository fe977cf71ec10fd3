"""Refusal direction (Arditi et al., 2024) as a steerer (docs/methods.md §4; docs/defences.md).

Fit (:meth:`RefusalDirectionSteerer.fit`): for every decoder layer l and every
post-instruction position i (the chat-template tokens after the user's instruction,
counted from the end: -n..-1), ``r_{i,l} = mean(harmful) - mean(harmless)`` of the
layer's output. Each set is split in two (even items: directions, odd items:
selection). Every candidate gets three scores on the selection halves: its KL (the
mean ``KL(p || p_ablated)`` of harmless prompts' next-token distributions when it is
ablated), its induce score (mean refusal score of harmless prompts when it is added at
its layer) and its bypass score (mean refusal score of harmful prompts when it is
ablated). Selection follows the authors' released code
(``andyrdt/refusal_direction``, ``pipeline/submodules/select_direction.py``): discard
a candidate whose layer is in the last ``skip_last`` (20%) of layers
(``l >= int(L (1 - skip_last))``), whose KL exceeds ``kl_threshold`` (0.1) or whose
induce score is below ``induce_threshold`` (0.0: it must not fail to induce refusal),
then take the LOWEST bypass score (the direction whose removal most suppresses
refusal). Refusal score of a next-token distribution: ``log p(R) - log(1 - p(R))``, R
the first tokens of :data:`REFUSAL_PHRASES`. Every candidate's scores are in ``report``.

Steering (``mode``):

* ``"addition"`` (the defence, default): ``x_l <- x_l + coefficient * r`` at the
  selected layer, every position: it pushes the model toward refusing.
* ``"ablation"`` (**an attack**, Arditi et al.'s jailbreak; never a defence):
  ``x <- x - r_hat r_hat^T x`` at every layer's output and on every write into the
  residual stream (the first layer's input and each layer's attention and MLP
  outputs, when the layer has ``self_attn`` / ``mlp`` modules), so the model loses its
  refusal feature. ``daco eval`` runs it only as the method ``refusal_ablation``,
  labelled ATTACK in its output.

Reconstructed here: the paper uses the residual stream *before* each block; we use
each decoder layer's output (the project's activation convention), so layer l here is
the paper's l + 1. The even/odd split and the refusal phrases are parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from steering.config import Config
from steering.steerers.base import decoder_layers, register
from steering.steerers.fitted import FittedSteerer, check_width, load_folder, save_folder

MODES = ("addition", "ablation")
ATTACK_MODES = ("ablation",)
"""Modes that remove refusal (jailbreaks): run them to measure an attack, never as a defence."""
REFUSAL_PHRASES = ("I'm sorry", "I am sorry", "I cannot", "I can't", "Sorry", "As an AI")
"""Refusal openings whose first tokens form R (Arditi et al. use the first token of typical refusals)."""


def refusal_token_ids(tokenizer, phrases: Sequence[str] = REFUSAL_PHRASES) -> list[int]:
    """The distinct first token ids of ``phrases`` (without special tokens), sorted."""
    if not phrases:
        raise ValueError("refusal_phrases is empty: give the refusal openings whose first tokens count as refusal")
    ids = {tokenizer(p, add_special_tokens=False)["input_ids"][0] for p in phrases}
    return sorted(ids)


def refusal_score(logits: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """``log p(R) - log(1 - p(R))`` of next-token ``logits`` [..., vocab], R = ``token_ids`` (computed stably)."""
    logits = logits.float()
    inside = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    inside[list(token_ids)] = True
    return torch.logsumexp(logits[..., inside], -1) - torch.logsumexp(logits[..., ~inside], -1)


def encode_prompts(model: nn.Module, processor, prompts: Sequence[str], batch_size: int = 8) -> list:
    """Chat-formatted batches of ``prompts`` for :func:`next_token_logits`: ``(inputs, last position per row)`` each."""
    from steering.models import get_adapter

    adapter = get_adapter(model)
    batches = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        inputs = adapter.build_inputs(processor, [None] * len(chunk), chunk)
        mask = inputs["attention_mask"].bool()
        batches.append((inputs, torch.where(mask, torch.arange(mask.shape[1]).expand_as(mask), -1).amax(1)))
    return batches


@torch.no_grad()
def next_token_logits(model: nn.Module, batches: list) -> torch.Tensor:
    """Float32 logits [n, vocab] of the token after each prompt of :func:`encode_prompts`' batches (any padding side)."""
    from steering.contrastive import device_batch

    rows = []
    for inputs, last in batches:
        logits = model(**device_batch(model, inputs), use_cache=False).logits.float().cpu()
        rows.append(logits[torch.arange(len(last)), last])
    return torch.cat(rows)


def allowed_layers(n_layers: int, skip_last: float) -> list[int]:
    """The layers the selection may pick: ``l < int(n_layers * (1 - skip_last))``."""
    if not 0 <= skip_last < 1:
        raise ValueError(f"skip_last must be in [0, 1), not {skip_last}")
    return list(range(int(n_layers * (1 - skip_last))))


def select_candidate(candidates: Sequence[dict], kl_threshold: float, induce_threshold: float) -> dict:
    """Arditi et al.'s rule over candidates of allowed layers: drop NaN scores, KL above
    ``kl_threshold`` and induce score below ``induce_threshold``; keep the lowest bypass score."""
    import math

    scored = [c for c in candidates if not any(math.isnan(c[k]) for k in ("kl", "induce_score", "bypass_score"))]
    low_kl = [c for c in scored if c["kl"] <= kl_threshold]
    if not low_kl:
        smallest = min((c["kl"] for c in scored), default=float("nan"))
        raise ValueError(f"no refusal-direction candidate passes KL <= {kl_threshold} (smallest KL {smallest:.4g}); "
                         "raise kl_threshold or use more prompts")
    passing = [c for c in low_kl if c["induce_score"] >= induce_threshold]
    if not passing:
        largest = max(c["induce_score"] for c in low_kl)
        raise ValueError(f"no refusal-direction candidate with KL <= {kl_threshold} induces refusal: every induce score is "
                         f"below induce_threshold={induce_threshold} (largest {largest:.4g}); the model may not refuse at "
                         "all (e.g. untrained), or give more prompts")
    return min(passing, key=lambda c: (c["bypass_score"], c["kl"]))


@dataclasses.dataclass
class RefusalFitConfig(Config):
    """The options of :meth:`RefusalDirectionSteerer.fit`; the defaults are Arditi et al.'s (docs/defences.md)."""

    mode: str = "addition"
    """``"addition"`` (the defence) or ``"ablation"`` (**an attack**: Arditi et al.'s jailbreak)."""
    kl_threshold: float = 0.1
    """Discard candidates whose ablation KL on harmless prompts exceeds this (Arditi et al.'s 0.1)."""
    induce_threshold: float = 0.0
    """Discard candidates whose induce score is below this (Arditi et al.'s 0.0; -inf keeps all, e.g. for an
    untrained model that never refuses)."""
    skip_last: float = 0.2
    """Share of the last layers never selected (Arditi et al.'s 20%)."""
    refusal_phrases: tuple[str, ...] = REFUSAL_PHRASES
    """Refusal openings whose first tokens form the refusal token set R."""
    n_positions: int | None = None
    """Post-instruction positions tried, counted from the end (None: all of them)."""
    coefficient: float = 1.0
    """Scale of the direction added in addition mode."""
    batch_size: int = 8
    """Prompts per forward pass while fitting."""

    def validate(self, where: str) -> None:
        if self.mode not in MODES:
            raise ValueError(f"{where}.mode: {self.mode!r} is not one of {MODES}")
        if not self.kl_threshold >= 0:
            raise ValueError(f"{where}.kl_threshold must be >= 0, got {self.kl_threshold}")
        if not 0 <= self.skip_last < 1:
            raise ValueError(f"{where}.skip_last must be in [0, 1), got {self.skip_last}")
        if not self.refusal_phrases or not all(self.refusal_phrases):
            raise ValueError(f"{where}.refusal_phrases: give the non-empty refusal openings whose first tokens count "
                             "as refusal")
        for name in ("n_positions", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")


@register("refusal")
class RefusalDirectionSteerer(FittedSteerer):
    """Add the refusal direction at its layer (the defence), or ablate it everywhere (the attack).

    Reconstructed: layer outputs instead of the paper's block inputs (layer l here is the
    paper's l + 1), the even/odd extraction/selection split, the refusal phrases.

    Args:
        model: a Hugging Face model (None: only :meth:`delta` at ``layer``, e.g. for tests).
        direction: the refusal direction r [d] (unnormalised: addition adds it as is).
        layer: the layer r was taken from (the addition layer).
        mode: ``"addition"`` (defence, default) or ``"ablation"`` (attack; see :attr:`attack`).
        coefficient: scale of r in addition mode.
        position: the post-instruction position r was taken from (negative; recorded only).
        report: the fit's selection report (saved with the steerer).
    """

    fit_config = RefusalFitConfig

    def __init__(self, model: nn.Module | None, direction: torch.Tensor, layer: int, mode: str = "addition",
                 coefficient: float = 1.0, position: int = -1, report: dict | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        direction = torch.as_tensor(direction).float()
        if direction.ndim != 1 or not torch.isfinite(direction).all() or direction.norm() == 0:
            raise ValueError(f"direction must be a finite non-zero 1-D tensor [d], got shape {tuple(direction.shape)}")
        check_width("RefusalDirectionSteerer", direction, model, "the direction")
        if mode == "ablation" and model is not None:
            layers = range(len(decoder_layers(model)))
        else:
            layers = (layer,)
        super().__init__(model, layers)
        self.direction, self.layer, self.mode = direction, int(layer), mode
        self.coefficient, self.position, self.report = float(coefficient), int(position), report or {}
        self._unit = direction / direction.norm()
        self._added = self.coefficient * direction

    @property
    def attack(self) -> bool:
        """Whether this steerer removes refusal (ablation: Arditi et al.'s jailbreak) instead of defending."""
        return self.mode in ATTACK_MODES

    # -- steering -------------------------------------------------------------------------

    def _to(self, device, dtype) -> None:
        self._unit = self._unit.to(device=device, dtype=dtype)
        self._added = self._added.to(device=device, dtype=dtype)

    def ablate(self, z: torch.Tensor) -> torch.Tensor:
        """``z - r_hat r_hat^T z``."""
        unit = self._unit.to(device=z.device, dtype=z.dtype)
        return z - (z @ unit)[..., None] * unit

    def delta(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """Ablation: ``-r_hat r_hat^T z``; addition: ``coefficient * r``."""
        if self.mode == "ablation":
            return self.ablate(z) - z
        return self._added.to(device=z.device, dtype=z.dtype).expand_as(z)

    def __enter__(self) -> RefusalDirectionSteerer:
        super().__enter__()
        if self.model is None or self.mode != "ablation":
            return self
        modules = decoder_layers(self.model)
        self._handles.append(modules[0].register_forward_pre_hook(self._ablate_input, with_kwargs=True))
        for module in modules:
            for part in ("self_attn", "mlp"):
                if isinstance(getattr(module, part, None), nn.Module):
                    self._handles.append(getattr(module, part).register_forward_hook(self._ablate_output))
        return self

    def _ablate_input(self, module, args, kwargs):
        if args:
            return (self.ablate(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.ablate(kwargs["hidden_states"])}

    def _ablate_output(self, module, args, output):
        if isinstance(output, tuple):
            return (self.ablate(output[0]), *output[1:])
        return self.ablate(output)

    # -- fitting ----------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def fit(cls, model: nn.Module, processor, harmful=None, harmless=None,
            config: RefusalFitConfig | None = None, **options) -> RefusalDirectionSteerer:
        """Extract the candidates and select one by the rule in the module docstring.

        ``harmful`` / ``harmless``: lists of :class:`steering.contrastive.PromptItem`
        (default: the shipped sets); at least 2 of each (one for directions, one for
        selection). ``config``: the options (None: Arditi et al.'s; an untrained model that
        never refuses needs ``induce_threshold=-math.inf``). Raises ValueError when no
        candidate passes the filters, naming the filter.
        ``options``: the config's fields as keywords instead (``induce_threshold=-math.inf``).
        """
        from steering.contrastive import ContrastiveSets, post_instruction_positions, prompt_states

        config = cls.fit_options(config, options)
        batch_size = config.batch_size
        harmful, harmless = ContrastiveSets.with_defaults(harmful=harmful, harmless=harmless)
        if len(harmful) < 2 or len(harmless) < 2:
            raise ValueError("fit needs at least 2 harmful and 2 harmless prompts (half extract, half select)")
        if any(item.image for item in (*harmful, *harmless)):
            raise ValueError("the refusal direction is fitted on text-only prompts; drop the images from the prompt files")
        n_layers = len(decoder_layers(model))
        allowed = allowed_layers(n_layers, config.skip_last)
        if not allowed:
            raise ValueError(f"skip_last={config.skip_last} leaves no layer of {n_layers} to choose from")
        available = post_instruction_positions(model, processor)
        n_positions = available if config.n_positions is None else min(config.n_positions, available)
        if n_positions < 1:
            raise ValueError("the chat template puts no token after the instruction; cannot take post-instruction positions")
        layers = range(n_layers)
        mean_harmful = {l: s.mean(0) for l, s in prompt_states(model, processor, harmful[0::2], layers, n_positions,
                                                               batch_size=batch_size).items()}
        mean_harmless = {l: s.mean(0) for l, s in prompt_states(model, processor, harmless[0::2], layers, n_positions,
                                                                batch_size=batch_size).items()}
        tokenizer = getattr(processor, "tokenizer", processor)
        ids = refusal_token_ids(tokenizer, config.refusal_phrases)
        select_harmful = encode_prompts(model, processor, [item.prompt for item in harmful[1::2]], batch_size)
        select_harmless = encode_prompts(model, processor, [item.prompt for item in harmless[1::2]], batch_size)
        base = torch.log_softmax(next_token_logits(model, select_harmless), -1)

        candidates = []
        for layer in allowed:
            for i in range(n_positions):
                direction = mean_harmful[layer][i] - mean_harmless[layer][i]
                if direction.norm() == 0:
                    continue
                with cls(model, direction, layer, "ablation"):
                    ablated = torch.log_softmax(next_token_logits(model, select_harmless), -1)
                    bypass = refusal_score(next_token_logits(model, select_harmful), ids)
                with cls(model, direction, layer, "addition", config.coefficient):
                    induce = refusal_score(next_token_logits(model, select_harmless), ids)
                kl = (base.exp() * (base - ablated)).sum(-1).mean().item()
                candidates.append({"layer": layer, "position": i - n_positions, "kl": kl,
                                   "induce_score": induce.mean().item(), "bypass_score": bypass.mean().item(),
                                   "direction": direction})
        best = select_candidate(candidates, config.kl_threshold, config.induce_threshold)
        report = {"fit_config": dataclasses.asdict(config), "allowed_layers": allowed, "n_layers": n_layers,
                  "n_positions": n_positions, "refusal_token_ids": ids,
                  "candidates": [{k: v for k, v in c.items() if k != "direction"} for c in candidates]}
        return cls(model, best["direction"], best["layer"], config.mode, config.coefficient, best["position"], report)

    # -- storage ----------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the direction and the parameters (and the selection report) into the folder ``path``."""
        return save_folder(path, self.name, {"direction": self.direction},
                           {"layer": self.layer, "position": self.position, "mode": self.mode,
                            "coefficient": self.coefficient, "report": self.report})

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None, mode: str | None = None,
             coefficient: float | None = None) -> RefusalDirectionSteerer:
        """The steerer saved in ``path``, on ``model``; ``mode`` / ``coefficient`` override the saved ones."""
        tensors, config = load_folder(path, cls.name)
        check_width(path, tensors["direction"], model, "the saved direction")
        return cls(model, tensors["direction"], config["layer"], mode or config["mode"],
                   config["coefficient"] if coefficient is None else coefficient, config["position"], config["report"])
