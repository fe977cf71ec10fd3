"""RAS, risk-adaptive steering, as a steerer (docs/methods.md §4; docs/defences.md).

The prompts are worded as in the RAS authors' released code (repository
``snumprlab/moras``, file ``LLaVA/utils/utils.py``: :data:`CONTEXT_INSTRUCTION` is
``get_prompt1``'s prompt, :data:`RISK_PROMPT` ``get_prompt2``'s safety wrapper and
:data:`REFORMULATION` ``get_prompt3``'s concatenation; the flow follows
``LLaVA/utils/functions_3stage.py``). Per query, before generating
(:meth:`RASSteerer.prepare`):

1. Visual context: with an image, the model answers :data:`CONTEXT_INSTRUCTION` about
   it (greedy, at most ``context_tokens`` = 40 new tokens, the whole decoded answer
   kept); the query is reformulated as ``reformulation.format(context=..., query=...)``
   (``"{context} {query}"``). Text-only queries have no context and stay as they are.
2. Risk: the reformulated query inside :data:`RISK_PROMPT` (with the image when
   ``keep_image``), greedy ``n_tokens`` (N = 3) tokens;
   ``q_n = softmax(lm_head(h_n))``, ``h_n`` the final-norm last-layer state producing
   generated token n. With the unsafe prototypes ``mu_u[n]`` (mean final-norm states of
   text-only unsafe prompts, unwrapped as in the authors' ``get_unsafe_states.py``,
   over the same N steps) and ``p_n = softmax(lm_head(mu_u[n]))``,
   ``S = cos(sum_n gamma^n p_n, sum_n gamma^n q_n)`` (n = 1..N, gamma 0.3; the
   authors' n = 0..N-1 scales both sums alike, so S is the same) and
   ``r = sigmoid(k (S - S_base))``.
3. Generation on the ORIGINAL query with ``h <- h + r (mu_u[n] - h)`` on the final
   norm's output for the first N generated tokens only (prompt positions before the
   last one and later tokens are untouched).

Calibration (:meth:`RASSteerer.fit`): ``S_base`` = mean S over benign items (going
through steps 1-2), ``k = ln 99 / (1 - S_base)``, so ``r(S_base) = 0.5`` and
``r(1) = 0.99``.

*Not published* / reconstructed (parameters): the number of prototype prompts (the
authors: 50; default: the shipped harmful set) and of benign items (paper: ~100;
default: the shipped harmless set), text-only queries (the authors' benchmarks always
carry an image). Batches must be left-padded (as generation is).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from steering.config import Config
from steering.steerers.base import decoder_layers, register
from steering.steerers.fitted import FittedSteerer, GenerationSteps, check_width, final_norm, load_folder, save_folder

CONTEXT_INSTRUCTION = ("Write a single sentence visual context to outline any safety-critical context in the image. "
                       "The context should read out any texts in the image, and begin with 'The image shows'.")
"""Step 1's instruction, verbatim from ``get_prompt1`` in snumprlab/moras ``LLaVA/utils/utils.py``."""
RISK_PROMPT = ("Evaluate the following question to ensure that it is safe. Benign and harmless questions should be "
               "answered normally. However, if the following question is unsafe, malicious, or illegal, the assistant "
               "should apologize and refuse to answer. Question: {query}")
"""Step 2's safety wrapper, verbatim from ``get_prompt2`` in snumprlab/moras ``LLaVA/utils/utils.py``."""
REFORMULATION = "{context} {query}"
"""The reformulated query: ``get_prompt3(rephrased_question, original_question)`` in the same file."""


def risk_weights(n_tokens: int, gamma: float) -> torch.Tensor:
    """``gamma^n`` for n = 1..N, float32 [N]."""
    return gamma ** torch.arange(1, n_tokens + 1, dtype=torch.float32)


def check_settings(gamma: float, reformulation: str, risk_prompt: str, where: str) -> None:
    """Raise ValueError naming ``where`` unless ``0 < gamma <= 1`` and the prompts hold their fields."""
    if not 0 < gamma <= 1:
        raise ValueError(f"{where}.gamma must be in (0, 1], not {gamma}")
    if "{context}" not in reformulation or "{query}" not in reformulation:
        raise ValueError(f"{where}.reformulation must contain the fields {{context}} and {{query}}")
    if "{query}" not in risk_prompt:
        raise ValueError(f"{where}.risk_prompt must contain the field {{query}}")


@dataclasses.dataclass
class RASFitConfig(Config):
    """The options of :meth:`RASSteerer.fit`; the defaults and prompts are the authors' (docs/defences.md)."""

    n_tokens: int = 3
    """N: generated tokens scored and steered."""
    gamma: float = 0.3
    """Discount of the risk score over the N tokens."""
    context_tokens: int = 40
    """Most new tokens of step 1's visual context."""
    keep_image: bool = True
    """Whether step 2 (the risk) sees the image too."""
    reformulation: str = REFORMULATION
    """The reformulated query from ``{context}`` and ``{query}``."""
    context_instruction: str = CONTEXT_INSTRUCTION
    """Step 1's instruction about the image."""
    risk_prompt: str = RISK_PROMPT
    """Step 2's safety wrapper around the reformulated ``{query}``."""

    def validate(self, where: str) -> None:
        for name in ("n_tokens", "context_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")
        check_settings(self.gamma, self.reformulation, self.risk_prompt, where)


@register("ras")
class RASSteerer(FittedSteerer):
    """Interpolate the final-norm state toward the unsafe prototypes by the query's risk (module docstring).

    Prompts as the authors' code words them; reconstructed: the sizes of the unsafe and
    benign sets, text-only queries. Call :meth:`prepare` (or :meth:`set_risk`) inside the
    ``with`` block before each generation.

    Args:
        model: a Hugging Face model (None: only :meth:`delta` and :meth:`risk`).
        prototypes: ``mu_u`` [N, d], the mean unsafe final-norm state per generated token.
        s_base: the calibrated benign mean score (< 1).
        gamma: the score's discount.
        context_tokens, keep_image, reformulation, context_instruction: step 1's settings.
        risk_prompt: step 2's wrapper around the reformulated query (field ``{query}``).
        report: calibration details (saved with the steerer).
    """

    fit_config = RASFitConfig

    def __init__(self, model: nn.Module | None, prototypes: torch.Tensor, s_base: float, gamma: float = 0.3,
                 context_tokens: int = 40, keep_image: bool = True, reformulation: str = REFORMULATION,
                 context_instruction: str = CONTEXT_INSTRUCTION, risk_prompt: str = RISK_PROMPT,
                 report: dict | None = None):
        prototypes = torch.as_tensor(prototypes).float()
        if prototypes.ndim != 2 or prototypes.shape[0] < 1:
            raise ValueError(f"prototypes must be [n_tokens, d], got shape {tuple(prototypes.shape)}")
        if not s_base < 1:
            raise ValueError(f"s_base must be below 1 (got {s_base}): k = ln 99 / (1 - s_base) needs it")
        check_settings(gamma, reformulation, risk_prompt, "RASSteerer")
        check_width("RASSteerer", prototypes, model, "the prototypes")
        super().__init__(model, (len(decoder_layers(model)) - 1,) if model is not None else ())
        self.prototypes, self.s_base, self.gamma = prototypes, float(s_base), float(gamma)
        self.context_tokens, self.keep_image = int(context_tokens), bool(keep_image)
        self.reformulation, self.context_instruction, self.report = reformulation, context_instruction, report or {}
        self.risk_prompt = risk_prompt
        self.risk_value: torch.Tensor | None = None
        self._paused = False
        self._steps = GenerationSteps()

    @property
    def n_tokens(self) -> int:
        """N: how many generated tokens are steered (and scored)."""
        return self.prototypes.shape[0]

    @property
    def k(self) -> float:
        """``ln 99 / (1 - S_base)``."""
        return math.log(99) / (1 - self.s_base)

    def risk(self, score: torch.Tensor | float) -> torch.Tensor:
        """``r = sigmoid(k (S - S_base))``."""
        return torch.sigmoid(self.k * (torch.as_tensor(score, dtype=torch.float32) - self.s_base))

    def set_risk(self, risk: torch.Tensor | float | Sequence[float]) -> None:
        """Set r for the next generation (one per batch row, or one for all)."""
        risk = torch.as_tensor(risk, dtype=torch.float32).reshape(-1)
        if ((risk < 0) | (risk > 1)).any():
            raise ValueError(f"risk must be in [0, 1], got {risk.tolist()}")
        self.risk_value = risk

    # -- steering ---------------------------------------------------------------------------

    def _to(self, device, dtype) -> None:
        self.prototypes = self.prototypes.to(device=device, dtype=dtype)

    def delta(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """``r (mu_u[n] - z)`` at the positions producing generated tokens n < N (``z``: [batch, seq, d]).

        Without a model every position of ``z`` ([batch, N, d]) is taken as step 0..N-1.
        """
        if self.risk_value is None:
            raise RuntimeError("RASSteerer: call prepare(processor, prompts, images) or set_risk(r) before generating")
        risk = self.risk_value.to(device=z.device, dtype=z.dtype)
        steps = (self._steps.steps(z.device) if self.model is not None
                 else torch.arange(z.shape[-2], device=z.device))
        steered = (steps >= 0) & (steps < self.n_tokens)
        target = self.prototypes.to(device=z.device, dtype=z.dtype)[steps.clamp(0, self.n_tokens - 1)]  # [seq, d]
        weight = risk.reshape(-1, *([1] * (z.ndim - 1))) * steered[:, None].to(z.dtype)
        return weight * (target - z)

    def __enter__(self) -> RASSteerer:
        if self._handles:
            raise RuntimeError("RASSteerer is already active; exit it before entering again")
        if self.model is not None:
            param = next(self.model.parameters())
            self._to(param.device, param.dtype)
            self.tokens_steered = {layer: 0 for layer in self.layers}
            self._handles = [*self._steps.attach(self.model), final_norm(self.model).register_forward_hook(self._norm_hook)]
        return self

    def _norm_hook(self, module, args, output):
        if self._paused:
            return output
        (layer,) = self.layers
        steps = self._steps.steps()
        self.tokens_steered[layer] += int(((steps >= 0) & (steps < self.n_tokens)).sum()) * output.shape[0]
        return output + self.delta(layer, output)

    # -- risk -------------------------------------------------------------------------------

    @torch.no_grad()
    def _generate(self, processor, text: str, image, max_new_tokens: int, record: bool):
        """Greedy continuation of the rendered ``text``: (new token ids, final-norm states per step or None)."""
        from steering.contrastive import device_batch

        inputs = (processor(text=[text], images=[image], return_tensors="pt") if image is not None
                  else processor(text=[text], return_tensors="pt"))
        states: list[torch.Tensor] = []
        handle = (final_norm(self.model).register_forward_hook(
            lambda m, a, out: states.append(out[0, -1].detach().float().cpu())) if record else None)
        was_paused, self._paused = self._paused, True
        try:
            out = self.model.generate(**device_batch(self.model, inputs), max_new_tokens=max_new_tokens,
                                      min_new_tokens=max_new_tokens if record else 0, do_sample=False)
        finally:
            self._paused = was_paused
            if handle is not None:
                handle.remove()
        return out[0, inputs["input_ids"].shape[1]:], (torch.stack(states[:max_new_tokens]) if record else None)

    def _render(self, processor, prompt: str, image) -> str:
        from steering.models import get_adapter

        conversation = get_adapter(self.model).conversation(image, prompt)
        return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def context(self, processor, image) -> str:
        """Step 1: the model's visual context (its whole greedy answer to :data:`CONTEXT_INSTRUCTION`)."""
        ids, _ = self._generate(processor, self._render(processor, self.context_instruction, image), image,
                                self.context_tokens, record=False)
        tokenizer = getattr(processor, "tokenizer", processor)
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    def final_states(self, processor, prompt: str, image=None) -> torch.Tensor:
        """Final-norm states [N, d] producing the first N greedy tokens of ``prompt`` (and image)."""
        _, states = self._generate(processor, self._render(processor, prompt, image), image, self.n_tokens, record=True)
        return states

    def distributions(self, states: torch.Tensor) -> torch.Tensor:
        """``softmax(lm_head(states))`` [N, vocab], float32."""
        head = self.model.get_output_embeddings()
        return torch.softmax(head(states.to(head.weight.dtype).to(head.weight.device)).float().cpu(), -1)

    def score(self, q: torch.Tensor, p: torch.Tensor) -> float:
        """``S = cos(sum gamma^n p_n, sum gamma^n q_n)`` for distributions [N, vocab]."""
        w = risk_weights(self.n_tokens, self.gamma)[:, None]
        return torch.cosine_similarity((w * p).sum(0), (w * q).sum(0), dim=0).item()

    @torch.no_grad()
    def assess(self, processor, prompt: str, image=None) -> dict:
        """Steps 1-2 for one query: ``{"context", "reformulated", "score", "risk"}`` (step 2 wraps in :data:`RISK_PROMPT`)."""
        if self.model is None:
            raise RuntimeError("RASSteerer.assess needs the model")
        context = self.context(processor, image) if image is not None else None
        reformulated = prompt if context is None else self.reformulation.format(context=context, query=prompt)
        wrapped = self.risk_prompt.format(query=reformulated)
        q = self.distributions(self.final_states(processor, wrapped, image if self.keep_image else None))
        p = self.distributions(self.prototypes.float())
        score = self.score(q, p)
        return {"context": context, "reformulated": reformulated, "score": score, "risk": self.risk(score).item()}

    def prepare(self, processor, prompts: Sequence[str], images: Sequence | None = None) -> list[dict]:
        """Assess each query (images: PIL images or None) and set r for generating on the batch."""
        images = list(images) if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts; give one image (or None) per prompt")
        results = [self.assess(processor, p, im) for p, im in zip(prompts, images)]
        self.set_risk([r["risk"] for r in results])
        return results

    def before_generation(self, processor, prompts: Sequence[str], images: Sequence | None = None) -> list[dict]:
        """:meth:`prepare`: RAS assesses each query's risk before generating."""
        return self.prepare(processor, prompts, images)

    def describe(self, detail: dict) -> str:
        """The item's risk, its score against ``S_base``, and the visual context when there was one."""
        return (f"risk {detail['risk']:.4f} (score {detail['score']:.4f}, S_base {self.s_base:.4f})"
                + (f"; context: {detail['context']}" if detail["context"] else ""))

    # -- fitting ----------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def fit(cls, model: nn.Module, processor, unsafe=None, benign=None, config: RASFitConfig | None = None,
            **options) -> RASSteerer:
        """Unsafe prototypes from text-only ``unsafe`` prompts, then ``S_base`` over ``benign`` items.

        ``unsafe`` / ``benign``: :class:`~steering.contrastive.PromptItem` lists (default:
        the shipped harmful / harmless sets); unsafe prompts must be text-only, benign
        items may carry images (they go through the visual-context step). ``config``: the
        options (None: the authors').
        ``options``: the config's fields as keywords instead (``n_tokens=5``).
        """
        from steering.contrastive import ContrastiveSets, open_image

        config = cls.fit_options(config, options)
        settings = (config.gamma, config.context_tokens, config.keep_image, config.reformulation,
                    config.context_instruction, config.risk_prompt)
        unsafe, benign = ContrastiveSets.with_defaults(harmful=unsafe, harmless=benign)
        if not unsafe or not benign:
            raise ValueError("RAS needs unsafe and benign prompts")
        if any(item.image for item in unsafe):
            raise ValueError("RAS's unsafe prototypes come from text-only prompts; drop the images from the unsafe file")
        width = model.get_input_embeddings().weight.shape[1]
        probe = cls(model, torch.zeros(config.n_tokens, width), 0.0, *settings)
        prototypes = torch.stack([probe.final_states(processor, item.prompt) for item in unsafe]).mean(0)
        probe.prototypes = prototypes
        scores = [probe.assess(processor, item.prompt, open_image(item.image))["score"] for item in benign]
        s_base = sum(scores) / len(scores)
        if s_base >= 1:
            raise ValueError(f"benign items score S_base={s_base:.4f} >= 1 against the unsafe prototypes: they cannot be "
                             "told apart; use more distinct unsafe and benign sets")
        report = {"fit_config": dataclasses.asdict(config), "n_unsafe": len(unsafe), "n_benign": len(benign),
                  "benign_scores": scores}
        return cls(model, prototypes, s_base, *settings, report)

    def save(self, path: str | Path) -> Path:
        """Write the prototypes and the calibration into the folder ``path``."""
        return save_folder(path, self.name, {"prototypes": self.prototypes},
                           {"s_base": self.s_base, "k": self.k, "gamma": self.gamma,
                            "context_tokens": self.context_tokens, "keep_image": self.keep_image,
                            "reformulation": self.reformulation, "context_instruction": self.context_instruction,
                            "risk_prompt": self.risk_prompt, "report": self.report})

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None) -> RASSteerer:
        """The steerer saved in ``path``, on ``model``."""
        tensors, c = load_folder(path, cls.name)
        check_width(path, tensors["prototypes"], model, "the saved prototypes")
        if "risk_prompt" not in c:
            raise ValueError(f"{path}: this RAS steerer was calibrated without the authors' risk prompt; fit it again")
        return cls(model, tensors["prototypes"], c["s_base"], c["gamma"], c["context_tokens"], c["keep_image"],
                   c["reformulation"], c["context_instruction"], c["risk_prompt"], c["report"])
