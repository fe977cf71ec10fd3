"""CLIP models for the pipeline: configuration (:class:`ClipConfig`), finding the weights and
loading the model (:func:`load_clip`), used by the embedding stage (:mod:`transforms.embed`),
concept prompts (:mod:`transforms.concept_prompts`) and the commands.

Models: an open_clip architecture name with a pretrained tag
(looked up in open_clip's cache, downloaded when allowed) or a local checkpoint file.
Without weights, ``allow_untrained`` builds the same architecture with random weights
from ``seed``; every output then says ``untrained: true``. ``daco-tiny-clip`` (shipped in
``transforms/clip_configs/``) is a small architecture for fast offline runs; the
embedded demo uses it (:data:`DEMO_CLIP`).
"""

from __future__ import annotations

import difflib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from steering.config import Config
from transforms.config import DEVICE_PATTERN, resolve_device, validate_accelerator

CONFIG_DIR = Path(__file__).parent / "clip_configs"
PRECISIONS = ("auto", "fp32", "amp_bf16", "amp_fp16")


class ClipLoadError(RuntimeError):
    """A CLIP model could not be set up as configured (the message says what was looked for and the fix)."""


@dataclass
class ClipConfig(Config):
    """Options of the embedding stage (the ``clip:`` section of a config file).

    Attributes:
        model_name: an open_clip architecture ("ViT-L-14", "ViT-B-32", ...) or one shipped
            in ``transforms/clip_configs/`` ("daco-tiny-clip").
        pretrained: an open_clip pretrained tag of that architecture (e.g.
            "laion2b_s32b_b82k"), or a local checkpoint file; None: no weights.
        allow_untrained: when the weights are unavailable (or ``pretrained`` is None), build
            the architecture with random weights from ``seed`` and mark every output
            ``untrained``; otherwise a missing checkpoint is an error.
        download: try to download a tag that is not in the cache (set False, or
            HF_HUB_OFFLINE=1, to fail fast on machines without network).
        cache_dir: open_clip's download cache (None: its default, ~/.cache/huggingface).
        batch_size: records per model call.
        device: "auto" (a GPU when present), "cpu", "cuda", "cuda:1", ...
        precision: "auto" (fp32 on CPU, amp_bf16 on GPU), "fp32", "amp_bf16", "amp_fp16".
        seed: seed of the random weights of an untrained model.
        accelerator: Beam accelerator resource hint put on the RunInference step only
            (e.g. "type:nvidia-l4;count:1;install-nvidia-driver"); None: no hint (local runs).
    """

    model_name: str = "ViT-L-14"
    pretrained: str | None = "laion2b_s32b_b82k"
    allow_untrained: bool = False
    download: bool = True
    cache_dir: str | None = None
    batch_size: int = 64
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    accelerator: str | None = None

    def validate(self, where: str) -> None:
        if self.batch_size < 1:
            raise ValueError(f"{where}.batch_size must be >= 1, got {self.batch_size}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"{where}.precision: {self.precision!r} is not one of {PRECISIONS}")
        if not re.fullmatch(DEVICE_PATTERN, self.device):
            raise ValueError(f"{where}.device: {self.device!r} is not auto, cpu, cuda or cuda:N")
        validate_accelerator(self.accelerator, where)


DEMO_CLIP = ClipConfig(model_name="daco-tiny-clip", pretrained=None, allow_untrained=True, batch_size=32, seed=0)
"""The embedded demo's model: the tiny shipped architecture, random weights from seed 0 (untrained)."""


def _open_clip():
    """open_clip with this package's architectures registered."""
    import open_clip

    if str(CONFIG_DIR) not in map(str, open_clip.factory._MODEL_CONFIG_PATHS):
        open_clip.add_model_config(CONFIG_DIR)
    return open_clip


def model_config(cfg: ClipConfig) -> dict:
    """open_clip's architecture config of ``cfg.model_name``; a clear error for an unknown name."""
    open_clip = _open_clip()
    config = open_clip.get_model_config(cfg.model_name)
    if config is None:
        close = difflib.get_close_matches(cfg.model_name, open_clip.list_models(), n=5)
        raise ClipLoadError(
            f"clip.model_name: {cfg.model_name!r} is not an open_clip architecture"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
            + f"; architectures ship in open_clip and in {CONFIG_DIR}"
        )
    return config


def _pretrained_tag_cfg(cfg: ClipConfig) -> dict:
    """open_clip's record of ``cfg.pretrained`` as a tag of the model ({} when it is not a tag)."""
    if not cfg.pretrained:
        return {}
    return _open_clip().get_pretrained_cfg(cfg.model_name, cfg.pretrained)


def _cached_tag_file(tag_cfg: dict, cache_dir: str | None) -> str | None:
    """The checkpoint of a pretrained tag if it is already in the local cache (no network)."""
    from huggingface_hub import try_to_load_from_cache
    from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives

    if tag_cfg.get("hf_hub"):
        repo_id, filename = os.path.split(tag_cfg["hf_hub"])  # as open_clip's download_pretrained
        filename = filename or HF_WEIGHTS_NAME
        for name in (*_get_safe_alternatives(filename), filename):
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    if tag_cfg.get("url"):
        path = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(tag_cfg["url"]))
        if os.path.isfile(path):
            return path
    return None


def _download_allowed(cfg: ClipConfig) -> bool:
    from huggingface_hub import constants

    return cfg.download and not constants.HF_HUB_OFFLINE


def find_weights(cfg: ClipConfig) -> tuple[str | None, str]:
    """(checkpoint file or None, what was looked for). A tag is looked up in open_clip's cache
    first and downloaded only when ``cfg.download``; a path must be an existing file."""
    if not cfg.pretrained:
        return None, "no pretrained weights configured (clip.pretrained is empty)"
    tag_cfg = _pretrained_tag_cfg(cfg)
    if not tag_cfg:
        if os.path.isfile(cfg.pretrained):
            return cfg.pretrained, f"checkpoint file {cfg.pretrained}"
        tags = _open_clip().list_pretrained_tags_by_model(cfg.model_name)
        raise ClipLoadError(
            f"clip.pretrained: {cfg.pretrained!r} is neither a pretrained tag of {cfg.model_name} "
            f"(its tags: {tags or 'none'}) nor an existing checkpoint file"
        )
    source = tag_cfg.get("hf_hub") or tag_cfg.get("url")
    looked = f"open_clip tag {cfg.model_name}/{cfg.pretrained} ({source}) in the cache"
    found = _cached_tag_file(tag_cfg, cfg.cache_dir)
    if found or not _download_allowed(cfg):
        return found, looked + ("" if _download_allowed(cfg) else "; download disabled")
    from open_clip.pretrained import download_pretrained

    try:
        return download_pretrained(tag_cfg, cache_dir=cfg.cache_dir) or None, looked + " and online"
    except Exception as exc:  # noqa: BLE001 - any download failure means "not available"
        return None, f"{looked} and online ({type(exc).__name__}: {str(exc)[:200]})"


def resolve_clip_config(cfg: ClipConfig) -> ClipConfig:
    """The config every worker loads: unchanged when the weights are found; ``pretrained=None``
    (random weights from ``seed``) when they are not and ``allow_untrained``; otherwise a
    :class:`ClipLoadError` saying what was looked for and how to fix it.

    Resolving once, before the pipeline runs, means all workers load the same weights and
    the error comes before any work."""
    model_config(cfg)
    if not cfg.pretrained and not cfg.allow_untrained:
        raise ClipLoadError(f"clip.pretrained is empty for {cfg.model_name}: set a pretrained tag or checkpoint "
                            "file (clip.pretrained in a build config, --clip-pretrained with daco embed), or allow random "
                            "weights (clip.allow_untrained: true in a build config, --clip-allow-untrained with daco embed)")
    checkpoint, looked = find_weights(cfg)
    if checkpoint:
        return cfg
    if cfg.allow_untrained:
        if cfg.pretrained:
            warnings.warn(f"CLIP weights not found ({looked}); using {cfg.model_name} with random weights "
                          f"(seed {cfg.seed}), marked untrained", stacklevel=2)
        return cfg.replace(pretrained=None)
    raise ClipLoadError(
        f"CLIP weights not found: looked for {looked}. Fix: run once with network so open_clip caches "
        f"them (python -c \"import open_clip; open_clip.create_model_and_transforms('{cfg.model_name}', "
        f"pretrained='{cfg.pretrained}')\"), or set clip.pretrained to a local checkpoint file "
        f"(in a build config; --clip-pretrained with daco embed), or allow random weights for offline tests with "
        f"clip.allow_untrained: true (in a build config; --clip-allow-untrained with daco embed; outputs are then "
        f"marked untrained)"
    )


def preprocess_config(cfg: ClipConfig) -> dict:
    """Image preprocessing (open_clip's PreprocessCfg fields) of the model and its pretrained tag."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    pp = merge_preprocess_dict(PreprocessCfg(), _pretrained_tag_cfg(cfg))
    pp["size"] = model_config(cfg)["vision_cfg"]["image_size"]
    return pp


def clip_preprocess(cfg: ClipConfig):
    """(image preprocess, tokenizer) of a model, without building the model."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    open_clip = _open_clip()
    preprocess = image_transform_v2(PreprocessCfg(**preprocess_config(cfg)), is_train=False)
    return preprocess, open_clip.get_tokenizer(cfg.model_name)


def resolve_precision(cfg: ClipConfig, device: str) -> str:
    """fp32 on CPU, bf16 autocast on GPU unless the config says otherwise."""
    if cfg.precision != "auto":
        return cfg.precision
    return "fp32" if device == "cpu" else "amp_bf16"


@dataclass
class LoadedClip:
    """A CLIP model ready to embed: the model, its preprocess and tokenizer, and provenance."""

    model: Any
    preprocess: Any
    tokenizer: Any
    untrained: bool
    embed_dim: int
    device: str
    precision: str
    cfg: ClipConfig

    def _autocast(self):
        import contextlib

        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "amp_bf16" else torch.float16
        return torch.autocast(device_type=self.device.split(":")[0], dtype=dtype)

    def encode_images(self, images) -> np.ndarray:
        """L2-normalised float32 embeddings of a batch of preprocessed images [B, 3, H, W]."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode(), self._autocast():
            out = self.model.encode_image(images.to(self.device))
        return F.normalize(out.float(), dim=-1).cpu().numpy()

    def encode_texts(self, tokens) -> np.ndarray:
        """L2-normalised float32 embeddings of a batch of token ids [B, context_length]."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode(), self._autocast():
            out = self.model.encode_text(tokens.to(self.device))
        return F.normalize(out.float(), dim=-1).cpu().numpy()

    def embed_pairs(self, images, tokens) -> tuple[np.ndarray, np.ndarray]:
        """(image, text) embeddings of a batch of pairs; one call, so that a model shared
        across processes is reached once per batch."""
        return self.encode_images(images), self.encode_texts(tokens)


def load_clip(cfg: ClipConfig) -> LoadedClip:
    """Load a CLIP model with open_clip (see :func:`resolve_clip_config` for where weights come
    from). Random weights are drawn on the CPU from ``cfg.seed`` without touching the global
    torch RNG, so the same seed gives the same model on every worker."""
    import torch

    cfg = resolve_clip_config(cfg)
    open_clip = _open_clip()
    checkpoint = find_weights(cfg)[0] if cfg.pretrained else None
    pp = preprocess_config(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model, _, preprocess = open_clip.create_model_and_transforms(
            cfg.model_name, pretrained=checkpoint, device="cpu", precision="fp32",
            image_mean=pp["mean"], image_std=pp["std"], image_interpolation=pp["interpolation"],
            image_resize_mode=pp["resize_mode"], pretrained_text=False, pretrained_image=False,
        )
    device = resolve_device(cfg.device)
    model = model.to(device).eval()
    return LoadedClip(
        model=model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(cfg.model_name),
        untrained=checkpoint is None, embed_dim=int(model_config(cfg)["embed_dim"]), device=device,
        precision=resolve_precision(cfg, device), cfg=cfg,
    )
