"""Sparse autoencoder with dictionary initialisation, in SAELens's on-disk format (docs/methods.md §3).

Parameters follow SAELens: ``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae],
``W_dec`` [d_sae, d_in], ``b_dec`` [d_in];

    pre_acts(z) = (z - b_dec) @ W_enc + b_enc
    encode(z)   = TopK(pre_acts) with ReLU on the kept values   (activation="topk", default)
                | ReLU(pre_acts)                                 (activation="relu", + L1 while training)
    decode(c)   = c @ W_dec + b_dec

:meth:`SAE.from_dictionary` puts one unit-norm decoder atom per concept (rows
0..n-1 in the dictionary's order), optional seeded random unit atoms after
them, the encoder as the decoder's transpose and zero biases.

:meth:`SAE.save` writes ``sae_weights.safetensors`` + ``cfg.json`` as SAELens 6
does (``architecture`` "topk" or "standard", ``d_in``, ``d_sae``, ``dtype``,
``device``, ``apply_b_dec_to_input``, ``normalize_activations``,
``reshape_activations``, ``k``, ``rescale_acts_by_decoder_norm`` = false,
``metadata`` with ``sae_lens_version`` >= 6 so no legacy conversion runs), so
``sae_lens.SAE.load_from_disk`` reads it; SAELens does not require unit decoder
rows for inference (with ``rescale_acts_by_decoder_norm`` false the encoder
uses the raw pre-activations, as here). Concept ids and other labels live in
``metadata`` (``concept_ids``, ``daco``). :meth:`SAE.load` reads our folders and
SAELens-saved topk/standard folders (folding a decoder-norm rescale if present).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_FILENAME = "sae_weights.safetensors"
CFG_FILENAME = "cfg.json"
#: SAELens config format version written to ``metadata.sae_lens_version`` (6.x configs load without conversion).
SAELENS_FORMAT_VERSION = "6.0.0"
ACTIVATIONS = {"topk": "topk", "relu": "standard"}
_ARCH_TO_ACTIVATION = {v: k for k, v in ACTIVATIONS.items()}
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """SAELens's name for a torch dtype ("float32", ...)."""
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported SAE dtype {dtype}; use one of {sorted(_DTYPES)}")


class SAE(nn.Module):
    """A TopK or ReLU sparse autoencoder with SAELens-format parameters.

    Args:
        d_in: activation dimension.
        d_sae: number of latents (atoms).
        activation: "topk" (default) or "relu".
        k: active latents per input for TopK (required for "topk").
        l1_coefficient: L1 penalty weight used by training for "relu".
        metadata: JSON-serialisable labels saved in cfg.json (e.g. concept_ids).
    """

    def __init__(self, d_in: int, d_sae: int, activation: str = "topk", k: int | None = None,
                 l1_coefficient: float = 0.0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", metadata: dict[str, Any] | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if activation == "topk" and (k is None or not 1 <= int(k) <= d_sae):
            raise ValueError(f"a TopK SAE needs 1 <= k <= d_sae={d_sae}, got k={k}")
        if d_in < 1 or d_sae < 1:
            raise ValueError(f"d_in and d_sae must be positive, got {d_in}, {d_sae}")
        self.d_in, self.d_sae = int(d_in), int(d_sae)
        self.activation = activation
        self.k = int(k) if activation == "topk" else None
        self.l1_coefficient = float(l1_coefficient)
        self.metadata = dict(metadata or {})
        kw = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))

    # ------------------------------------------------------------------ construction
    @classmethod
    def random(cls, d_in: int, d_sae: int, activation: str = "topk", k: int | None = None,
               seed: int = 0, **kwargs) -> SAE:
        """Random unit-norm decoder rows (seeded), encoder = decoder transpose, zero biases."""
        sae = cls(d_in, d_sae, activation=activation, k=k, **kwargs)
        gen = torch.Generator().manual_seed(seed)
        atoms = torch.randn(d_sae, d_in, generator=gen, dtype=torch.float64)
        sae.set_atoms(atoms)
        return sae

    @classmethod
    def from_dictionary(cls, directions: torch.Tensor, k: int | None = None, n_extra: int = 0,
                        activation: str = "topk", seed: int = 0, concept_ids: Sequence[str] | None = None,
                        **kwargs) -> SAE:
        """An SAE whose first n atoms are the unit-normalised concept directions [n, d].

        ``n_extra`` free atoms (seeded random unit rows) follow them. The encoder is
        the decoder's transpose and both biases are zero. ``concept_ids`` (one per
        direction) are kept in ``metadata["concept_ids"]``.
        """
        directions = torch.as_tensor(directions)
        if directions.ndim != 2 or directions.shape[0] == 0:
            raise ValueError(f"directions must be a non-empty [n_concepts, d] matrix, got {tuple(directions.shape)}")
        if not torch.isfinite(directions).all():
            raise ValueError("directions contain NaN/inf values")
        norms = directions.double().norm(dim=1)
        if bool((norms == 0).any()):
            raise ValueError(f"directions {torch.nonzero(norms == 0).reshape(-1)[:5].tolist()} are all-zero")
        n, d = directions.shape
        if n_extra < 0:
            raise ValueError(f"n_extra must be >= 0, got {n_extra}")
        if concept_ids is not None and len(concept_ids) != n:
            raise ValueError(f"got {len(concept_ids)} concept_ids for {n} directions")
        metadata = dict(kwargs.pop("metadata", None) or {})
        metadata["n_concept_atoms"] = n
        if concept_ids is not None:
            metadata["concept_ids"] = [str(c) for c in concept_ids]
        sae = cls(d, n + n_extra, activation=activation, k=k, metadata=metadata, **kwargs)
        atoms = directions.double()
        if n_extra:
            gen = torch.Generator().manual_seed(seed)
            atoms = torch.cat([atoms, torch.randn(n_extra, d, generator=gen, dtype=torch.float64)])
        sae.set_atoms(atoms)
        return sae

    @torch.no_grad()
    def set_atoms(self, atoms: torch.Tensor) -> None:
        """Decoder rows = unit-normalised ``atoms``, encoder = their transpose, biases zero."""
        unit = atoms.double() / atoms.double().norm(dim=1, keepdim=True)
        self.W_dec.copy_(unit.to(self.W_dec.dtype))
        self.W_enc.copy_(unit.T.to(self.W_enc.dtype))
        self.b_enc.zero_()
        self.b_dec.zero_()

    @property
    def concept_ids(self) -> list[str] | None:
        """Concept ids of the first atoms (from_dictionary), or None."""
        return self.metadata.get("concept_ids")

    # ------------------------------------------------------------------ maths
    def pre_acts(self, z: torch.Tensor) -> torch.Tensor:
        """``(z - b_dec) @ W_enc + b_enc``."""
        return (z.to(self.W_enc.dtype) - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The activation function applied to pre-activations (dense output)."""
        if self.activation == "relu":
            return torch.relu(pre)
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent codes [..., d_sae] of activations [..., d_in]."""
        return self.activate(self.pre_acts(z))

    def decode(self, c: torch.Tensor) -> torch.Tensor:
        """``c @ W_dec + b_dec``."""
        return c @ self.W_dec + self.b_dec

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``decode(encode(z))``."""
        return self.decode(self.encode(z))

    # ------------------------------------------------------------------ disk format
    def cfg_dict(self) -> dict[str, Any]:
        """The cfg.json content (SAELens 6 inference config plus our labels in ``metadata``)."""
        metadata = {"sae_lens_version": SAELENS_FORMAT_VERSION,
                    "sae_lens_training_version": SAELENS_FORMAT_VERSION}
        metadata.update(self.metadata)
        metadata["daco"] = {"activation": self.activation, "l1_coefficient": self.l1_coefficient}
        cfg = {
            "architecture": ACTIVATIONS[self.activation],
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": dtype_name(self.W_enc.dtype),
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": metadata,
        }
        if self.activation == "topk":
            cfg["k"] = self.k
            cfg["rescale_acts_by_decoder_norm"] = False
        return cfg

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``sae_weights.safetensors`` and ``cfg.json`` into the folder ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().cpu().contiguous() for name, p in
                   (("W_enc", self.W_enc), ("b_enc", self.b_enc), ("W_dec", self.W_dec), ("b_dec", self.b_dec))}
        save_file(tensors, str(path / WEIGHTS_FILENAME))
        (path / CFG_FILENAME).write_text(json.dumps(self.cfg_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
        """Read a folder written by :meth:`save` or by SAELens (topk or standard architecture)."""
        path = Path(path)
        cfg_path, weights_path = path / CFG_FILENAME, path / WEIGHTS_FILENAME
        for p in (cfg_path, weights_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p} is missing: an SAE folder holds {CFG_FILENAME} and {WEIGHTS_FILENAME}")
        cfg = json.loads(cfg_path.read_text())
        arch = cfg.get("architecture", "standard")
        if arch not in _ARCH_TO_ACTIVATION:
            raise ValueError(f"{cfg_path}: architecture {arch!r} is not supported; "
                             f"supported: {sorted(_ARCH_TO_ACTIVATION)}")
        if cfg.get("normalize_activations", "none") != "none":
            raise ValueError(f"{cfg_path}: normalize_activations={cfg['normalize_activations']!r} is not "
                             "supported; fold the normalisation into the weights before saving")
        for key in ("d_in", "d_sae"):
            if key not in cfg:
                raise ValueError(f"{cfg_path}: missing key {key!r}")
        metadata = dict(cfg.get("metadata") or {})
        daco = metadata.pop("daco", {}) or {}
        for key in ("sae_lens_version", "sae_lens_training_version"):
            metadata.pop(key, None)
        dtype = _DTYPES.get(cfg.get("dtype", "float32"))
        if dtype is None:
            raise ValueError(f"{cfg_path}: dtype {cfg.get('dtype')!r} is not one of {sorted(_DTYPES)}")
        sae = cls(cfg["d_in"], cfg["d_sae"], activation=_ARCH_TO_ACTIVATION[arch], k=cfg.get("k"),
                  l1_coefficient=float(daco.get("l1_coefficient", 0.0)), dtype=dtype, metadata=metadata)
        state = load_file(str(weights_path))
        missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in state]
        if missing:
            raise ValueError(f"{weights_path}: missing tensor(s) {missing}")
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                param = getattr(sae, name)
                if tuple(state[name].shape) != tuple(param.shape):
                    raise ValueError(f"{weights_path}: {name} has shape {tuple(state[name].shape)}, "
                                     f"{cfg_path} implies {tuple(param.shape)}")
                param.copy_(state[name].to(dtype))
            if not cfg.get("apply_b_dec_to_input", True):
                # encode() subtracts b_dec; fold it back into b_enc so pre-activations are unchanged
                sae.b_enc.add_(sae.b_dec @ sae.W_enc)
            if cfg.get("rescale_acts_by_decoder_norm"):
                norms = sae.W_dec.norm(dim=1)
                sae.W_enc.mul_(norms)
                sae.b_enc.mul_(norms)
                sae.W_dec.div_(norms[:, None])
        return sae.to(device)
