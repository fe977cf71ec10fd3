"""``daco train-sae`` (issue 14): token capture, the shuffle buffer, the planted check, the command end to
end with an interruption and ``--resume``, and the trained SAE in ``daco steer``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from steering.models import get_adapter, model_inputs
from steering.sae import SAE
from steering.token_activations import ShuffleBuffer, TokenCapture, select_tokens
from steering.train import SAETrainer, TrainConfig, evaluate_sae


# --------------------------------------------------------------------------- capture

def test_token_capture_equals_the_full_forwards_hidden_states_at_the_selected_attended_positions():
    adapter = get_adapter("qwen2_vl")
    model, processor = adapter.build_untrained(seed=0)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)) for _ in range(2)]
    inputs = adapter.build_inputs(processor, images, ["a red dog", "two people riding a horse near the river"],
                                  "{caption}")
    with torch.inference_mode():
        hidden = model(**model_inputs(inputs), output_hidden_states=True).hidden_states
    attended = inputs["attention_mask"].bool()
    assert not attended.all()  # the shorter caption is padded: padding must never be recorded
    every = select_tokens(inputs["attention_mask"])
    assert torch.equal(every, attended)
    sampled = select_tokens(inputs["attention_mask"], per_stimulus=5, generator=torch.Generator().manual_seed(0))
    assert sampled.sum(1).tolist() == [5, 5] and not (sampled & ~attended).any()
    with TokenCapture(model, adapter, [2, 0]) as cap:
        for selected in (every, sampled):
            rows = cap.run(inputs, selected)
            assert rows.shape == (int(selected.sum()), 2, hidden[0].shape[-1])
            for i, layer in enumerate([0, 2]):
                torch.testing.assert_close(rows[:, i], hidden[layer + 1][selected].float())


# --------------------------------------------------------------------------- shuffle buffer

def test_shuffle_buffer_emits_every_row_once_mixed_with_bounded_memory_and_resumes_exactly():
    rows = torch.arange(1000, dtype=torch.float32).reshape(-1, 1, 1)

    def stream(buffer, start=0, stop=1000, out=None):
        out = [] if out is None else out
        for chunk in rows[start:stop].split(37):
            while chunk.shape[0]:
                chunk = buffer.add(chunk)
                if buffer.full:
                    out.extend(buffer.drain())
        return out

    buffer = ShuffleBuffer(128, 16, (1, 1), seed=3)
    batches = stream(buffer)
    batches += list(buffer.drain(final=True))
    got = torch.cat(batches).reshape(-1)
    assert sorted(got.tolist()) == list(range(1000))
    assert all(b.shape[0] == 16 for b in batches[:-1])
    assert (got[:100] > 300).sum() < 10  # early batches come from early rows...
    assert not torch.equal(got, torch.arange(1000.0))  # ...but shuffled
    assert buffer.storage.shape[0] == 128  # the buffer never grows

    # interrupted at a chunk boundary and restored into a new buffer: the same batches
    first = ShuffleBuffer(128, 16, (1, 1), seed=3)
    part = stream(first, 0, 37 * 12)
    resumed = ShuffleBuffer(128, 16, (1, 1), seed=99)
    resumed.load_state_dict(first.state_dict())
    part = stream(resumed, 37 * 12, 1000, part) + list(resumed.drain(final=True))
    assert torch.equal(torch.cat(part), torch.cat(batches))


# --------------------------------------------------------------------------- the planted check

def _planted(n: int, features: torch.Tensor, seed: int) -> torch.Tensor:
    """Each activation: 3 of the features with coefficients in [0.5, 2.5], plus small noise."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n, features.shape[0], generator=g).argsort(dim=1)[:, :3]
    coef = torch.zeros(n, features.shape[0]).scatter(1, idx, torch.rand(n, 3, generator=g) * 2 + 0.5)
    return coef @ features + 0.01 * torch.randn(n, features.shape[1], generator=g)


def planted_training(init: str, steps: int = 600, d: int = 64, n_concepts: int = 24, n_extra_features: int = 8):
    """Train on sparse combinations of dictionary directions D plus features E the dictionary lacks;
    returns (D, E, the initial atoms, the trained SAE, its held-out FVU)."""
    g = torch.Generator().manual_seed(0)
    D = torch.nn.functional.normalize(torch.randn(n_concepts, d, generator=g), dim=1)
    E = torch.nn.functional.normalize(torch.randn(n_extra_features, d, generator=g), dim=1)
    features = torch.cat([D, E])
    width = n_concepts + 2 * n_extra_features
    sae = SAE.from_dictionary(D, k=3, n_extra=2 * n_extra_features, seed=1) if init == "dictionary" \
        else SAE.random(d, width, k=3, seed=1)
    initial = sae.W_dec.detach().clone()
    trainer = SAETrainer(sae, TrainConfig(lr=1e-3, batch_size=256, k_aux=16, log_every=10**9))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is faster, and much faster on a busy machine
    try:
        for batch in _planted(steps * 256, features, seed=1).split(256):
            trainer.train_step(batch)
    finally:
        torch.set_num_threads(threads)
    return D, E, initial, sae, evaluate_sae(sae, _planted(8000, features, seed=2))["fvu"]


def test_planted_free_atoms_recover_the_extra_features_and_concept_atoms_stay_put():
    D, E, initial, sae, fvu = planted_training("dictionary")  # dictionary-initialised, 2 free atoms per extra feature
    atoms = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    n = D.shape[0]
    recovered = (E @ atoms[n:].T).max(dim=1).values
    stayed = (atoms[:n] * initial[:n]).sum(1)
    assert recovered.min() > 0.9, recovered
    assert stayed.min() > 0.9, stayed
    assert 1 - fvu > 0.99  # FVE against random initialisation at equal tokens: bench/train_sae_memory.py


def test_folding_the_normalisation_keeps_unit_decoder_rows_and_the_scaled_reconstruction():
    from pipeline.train_sae import fold_scale

    g = torch.Generator().manual_seed(0)
    sae = SAE.random(16, 40, k=5, seed=0)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(40, generator=g))
        sae.b_dec.copy_(torch.randn(16, generator=g))
    x = 3 * torch.randn(50, 16, generator=g)
    scale = 0.37
    scaled_recon = sae(x * scale) / scale
    scaled_codes = sae.encode(x * scale)
    fold_scale(sae, scale)
    torch.testing.assert_close(sae(x), scaled_recon)
    torch.testing.assert_close(sae.encode(x), scaled_codes / scale)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40))


def test_sae_config_rejects_unknown_and_bad_options():
    from pipeline.train_sae import SAEConfig

    with pytest.raises(ValueError, match=r"unknown option\(s\) \['kk'\]"):
        SAEConfig.from_dict({"kk": 3}, where="x.yaml: sae")
    with pytest.raises(ValueError, match="normalize_activations"):
        SAEConfig.from_dict({"normalize_activations": "layer_norm"}, where="sae")
    with pytest.raises(ValueError, match="shuffle_buffer"):
        SAEConfig.from_dict({"shuffle_buffer": 100, "batch_size": 64}, where="sae")


# --------------------------------------------------------------------------- the command

SAE_SECTION = {"k": 4, "n_extra": 8, "tokens_per_stimulus": 8, "tokens": 400, "shuffle_buffer": 64, "batch_size": 16,
               "log_every": 5, "checkpoint_every": 5}


@pytest.fixture(scope="module")
def train_config(tiny_build, tmp_path_factory):
    from tests.conftest import TINY_BUILD

    path = tmp_path_factory.mktemp("train_sae") / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY_BUILD, "sae": SAE_SECTION}))
    return path


def test_train_sae_end_to_end_interrupted_and_resumed_equals_uninterrupted(tiny_build, train_config, tmp_path,
                                                                             capsys):
    from pipeline.cli import main as daco

    base = ["train-sae", "--dictionary", str(tiny_build / "a"), "--config", str(train_config)]
    assert daco([*base, "--out", str(tmp_path / "whole")]) == 0
    printed = capsys.readouterr()
    assert "UNTRAINED" in printed.out and "[train-sae] step 5 layer 1: fvu" in printed.err

    assert daco([*base, "--out", str(tmp_path / "parts"), "--stop-after-steps", "18"]) == 3  # 256 tokens a pass:
    assert (tmp_path / "parts" / "checkpoint.pt").is_file()                                  # stops in pass 2
    with pytest.raises(SystemExit, match="exists; pass --resume"):
        daco([*base, "--out", str(tmp_path / "parts")])
    assert daco([*base, "--out", str(tmp_path / "parts"), "--resume"]) == 0
    assert not (tmp_path / "parts" / "checkpoint.pt").exists()

    for layer in (1, 2):
        for name in ("sae_weights.safetensors", "cfg.json", "annotation.parquet"):
            assert (tmp_path / "whole" / f"layer_{layer}" / name).read_bytes() == \
                (tmp_path / "parts" / f"layer_{layer}" / name).read_bytes(), (layer, name)
    info = json.loads((tmp_path / "whole" / "training.json").read_text())
    assert info["untrained"] and info["counts"]["tokens_trained"] == 400 and info["counts"]["stimuli"] > 32
    assert info["counts"]["deadletter_missing_record"] == info["counts"]["deadletter_inference"] == 0
    assert info["layers"]["1"]["steps"] == 25 and 0 < info["layers"]["1"]["fvu"]
    sae = SAE.load(tmp_path / "whole" / "layer_1")
    assert sae.d_sae == 12 + 8 and sae.k == 4 and sae.metadata["untrained_model"] and len(sae.concept_ids) == 12
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(20))
    card = (tmp_path / "whole" / "README.md").read_text()
    assert "UNTRAINED MODEL" in card and "| 2 |" in card

    with pytest.raises(SystemExit, match="nothing to resume"):
        daco([*base, "--out", str(tmp_path / "fresh"), "--resume"])


def test_steer_uses_the_trained_sae_and_publish_puts_it_beside_the_dataset(tiny_build, train_config, tmp_path, capsys):
    from pipeline.cli import main as daco

    assert daco(["train-sae", "--dictionary", str(tiny_build / "a"), "--config", str(train_config),
                 "--out", str(tmp_path / "sae")]) == 0
    steer = ["steer", "--untrained-family", "qwen2_vl", "--dictionary", str(tiny_build / "a"), "--prompt", "a dog",
             "--layers", "1-2", "--max-new-tokens", "2"]
    capsys.readouterr()
    assert daco([*steer, "--sae", str(tmp_path / "sae")]) == 0
    assert f"SAE: trained, {tmp_path / 'sae'}" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="pass --sae DIR"):
        daco(steer)
    assert daco([*steer, "--untrained-sae"]) == 0
    assert "SAE: untrained dictionary-initialised" in capsys.readouterr().out

    # daco publish --sae --dry-run: the SAE files under sae/ and a card that says where they go
    assert daco(["publish", str(tiny_build / "a"), "--repo-id", "org/daco", "--sae", str(tmp_path / "sae"),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sae/layer_1/sae_weights.safetensors" in out and "sae/layer_2/annotation.parquet" in out
    assert "Where: https://huggingface.co/datasets/org/daco/tree/main/sae" in out
    (tmp_path / "sae" / "layer_2" / "annotation.parquet").unlink()
    assert daco(["publish", str(tiny_build / "a"), "--repo-id", "org/daco", "--sae", str(tmp_path / "sae"),
                 "--dry-run"]) == 2
    assert "annotation.parquet is missing" in capsys.readouterr().err


def test_eval_names_the_sae_daco_ran_with_and_wants_a_flag_for_the_untrained_one(tmp_path):
    from steering.eval.run import EvalConfig, EvalError, markdown_table, run_eval, summarise

    base = dict(model="untrained:qwen2", benches=[], out=str(tmp_path / "o"), dictionary=str(tmp_path))
    with pytest.raises(EvalError, match="pass --sae DIR"):
        run_eval(EvalConfig(methods=["none", "daco"], **base))
    with pytest.raises(EvalError, match="not both"):
        run_eval(EvalConfig(methods=["daco"], sae="x", untrained_sae=True, **base))
    with pytest.raises(EvalError, match="no benchmarks"):  # the flag passes the SAE check
        run_eval(EvalConfig(methods=["daco"], untrained_sae=True, **base))
    metrics = summarise([], ["none", "daco"]) | {"daco_sae": "trained: /x/sae"}
    assert "daco SAE: trained: /x/sae." in markdown_table(metrics)
