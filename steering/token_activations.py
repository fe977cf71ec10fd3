"""Per-token residual-stream activations for SAE training, and the shuffle buffer they flow through.

    with TokenCapture(model, adapter, layers=[15, 16]) as cap:
        selected = select_tokens(inputs["attention_mask"], per_stimulus=64, generator=g)
        rows = cap.run(inputs, selected)          # [n_selected, n_layers, hidden] float32, CPU

What is captured is what :mod:`steering.capture` pools (the output of decoder layer
``l``, from the model's own forward stopped after the deepest requested layer), but
kept per token instead of averaged: every attended position (image, template and
caption tokens; never padding), or ``per_stimulus`` of them drawn uniformly without
replacement from each stimulus's attended positions with a seeded generator.

:class:`ShuffleBuffer` mixes token rows from many stimuli before they reach the
trainer (consecutive tokens of one stimulus are highly correlated): rows fill a
fixed ``capacity``; when it is full a seeded permutation sends half of it out in
batches and keeps the other half. Memory is the buffer's, whatever the number of
tokens streamed. Its :meth:`ShuffleBuffer.state_dict` (the kept rows, the partial
batch and the generator) makes a resumed stream continue exactly.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from steering.capture import LayerHooks
from steering.models.base import ModelAdapter


def select_tokens(attention_mask: torch.Tensor, per_stimulus: int | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """``[batch, seq]`` bool mask of the positions to record: every attended one (``per_stimulus`` None),
    or ``per_stimulus`` of each row's attended positions drawn without replacement (all when fewer)."""
    attended = attention_mask.bool().cpu()
    if per_stimulus is None:
        return attended
    if per_stimulus < 1:
        raise ValueError(f"per_stimulus must be >= 1 or None (every attended token), got {per_stimulus}")
    selected = torch.zeros_like(attended)
    for row in range(attended.shape[0]):
        positions = attended[row].nonzero().reshape(-1)
        if positions.numel() > per_stimulus:
            positions = positions[torch.randperm(positions.numel(), generator=generator)[:per_stimulus]]
        selected[row, positions] = True
    return selected


class TokenCapture(LayerHooks):
    """Context manager: hooks on chosen decoder layers that keep the selected token positions.

    ``run(inputs, selected)`` returns ``[n_selected, len(layers), hidden]`` float32 on the CPU,
    rows in (batch item, position) order, layers in ascending order.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, layers: Sequence[int]):
        super().__init__(model, adapter, layers)
        self._selected: torch.Tensor | None = None

    def keep(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[self._selected.to(hidden.device)].float().cpu()

    def run(self, inputs: Mapping[str, Any], selected: torch.Tensor) -> torch.Tensor:
        """One stopped forward over a ``build_inputs`` batch; the selected tokens' activations."""
        if tuple(selected.shape) != tuple(inputs["attention_mask"].shape):
            raise ValueError(f"selected has shape {tuple(selected.shape)}, the batch "
                             f"{tuple(inputs['attention_mask'].shape)}")
        self._selected = selected.bool()
        try:
            rows = self._forward(inputs)
        finally:
            self._selected = None
        return torch.stack([rows[layer] for layer in self.layers], dim=1)


class ShuffleBuffer:
    """A fixed-size mixing buffer of token rows ``[capacity, *row_shape]`` (float32).

    ``add(rows)`` stores what fits and returns the rest; once :attr:`full`, ``drain()``
    yields ``batch_size`` batches of a seeded random half of the buffer (a batch left
    short waits for the next drain); ``drain(final=True)`` empties everything, the last
    batch possibly short.
    """

    def __init__(self, capacity: int, batch_size: int, row_shape: Sequence[int], seed: int = 0):
        if batch_size < 1 or capacity < 2:
            raise ValueError(f"need batch_size >= 1 and capacity >= 2, got {batch_size}, {capacity}")
        self.capacity, self.batch_size = int(capacity), int(batch_size)
        self.storage = torch.empty(self.capacity, *row_shape, dtype=torch.float32)
        self.count = 0
        self.pending = self.storage.new_empty(0, *row_shape)
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def full(self) -> bool:
        """Whether the buffer holds ``capacity`` rows."""
        return self.count == self.capacity

    def contents(self) -> torch.Tensor:
        """The rows held now (a view)."""
        return self.storage[:self.count]

    def add(self, rows: torch.Tensor) -> torch.Tensor:
        """Copy the first rows that fit into the buffer; return those that did not."""
        take = min(self.capacity - self.count, rows.shape[0])
        self.storage[self.count:self.count + take] = rows[:take]
        self.count += take
        return rows[take:]

    def drain(self, final: bool = False) -> Iterator[torch.Tensor]:
        """Batches of a random half of the buffer (everything, when ``final``)."""
        order = torch.randperm(self.count, generator=self.generator)
        out = self.count if final else self.count // 2
        emitted = torch.cat([self.pending, self.storage[order[:out]]])
        kept = self.storage[order[out:]].clone()
        self.storage[:kept.shape[0]] = kept
        self.count = kept.shape[0]
        whole = emitted.shape[0] if final else emitted.shape[0] - emitted.shape[0] % self.batch_size
        self.pending = emitted[whole:].clone()
        for start in range(0, whole, self.batch_size):
            yield emitted[start:start + self.batch_size]

    def state_dict(self) -> dict:
        """The kept rows, the partial batch and the generator state."""
        return {"rows": self.contents().clone(), "pending": self.pending.clone(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` into a buffer of the same capacity and row shape."""
        rows = state["rows"]
        self.storage[:rows.shape[0]] = rows
        self.count = rows.shape[0]
        self.pending = state["pending"].clone()
        self.generator.set_state(state["generator"])
