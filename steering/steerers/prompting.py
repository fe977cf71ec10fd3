"""The prompting baseline: a safety system prompt before the query (docs/methods.md §4).

It changes the chat messages, not the activations: its delta is zero and it registers
no hooks.
"""

from __future__ import annotations

import torch

from steering.steerers.base import BuildOptions, Steerer, register

SAFETY_SYSTEM_PROMPT = (
    "You are a helpful and harmless assistant. If a request, or the image that comes with it, asks for "
    "anything dangerous, illegal, violent, sexual, hateful or otherwise harmful, refuse politely and "
    "briefly explain why. Otherwise answer helpfully."
)
"""The default safety system prompt (the paper's wording is *not published*)."""


@register("prompting")
class PromptingSteerer(Steerer):
    """Prepend ``system_prompt`` as a system turn (or before an existing system turn's text)."""

    @classmethod
    def build(cls, options: BuildOptions) -> PromptingSteerer:
        """The default safety prompt; prompting needs no dictionary."""
        return cls(options.model)

    def __init__(self, model=None, system_prompt: str = SAFETY_SYSTEM_PROMPT):
        if not system_prompt or not system_prompt.strip():
            raise ValueError("system_prompt is empty: give the safety instruction to prepend")
        super().__init__(None, ())
        self.model = model
        self.system_prompt = system_prompt

    def delta(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """Zero: prompting does not touch activations."""
        return torch.zeros_like(z)

    def edit_messages(self, messages: list[dict]) -> list[dict]:
        """``messages`` with the safety prompt as (the start of) the system turn; the input is not modified."""
        messages = [dict(m) for m in messages]
        if messages and messages[0].get("role") == "system":
            content = messages[0]["content"]
            if isinstance(content, str):
                messages[0]["content"] = f"{self.system_prompt}\n\n{content}"
            else:
                messages[0]["content"] = [{"type": "text", "text": self.system_prompt}, *content]
            return messages
        plain = bool(messages) and isinstance(messages[0].get("content"), str)  # follow the messages' content style
        content = self.system_prompt if plain else [{"type": "text", "text": self.system_prompt}]
        return [{"role": "system", "content": content}, *messages]
