"""steering.sae / steering.train / steering.annotate: dictionary-initialised SAEs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from steering.annotate import annotate
from steering.dictionary import load_dictionary, write_dictionary_parquet
from steering.sae import SAE
from steering.train import TrainConfig, evaluate_sae, iterate_activation_files, train_sae

ROOT = Path(__file__).resolve().parents[1]
SAELENS_PYTHON = ROOT / "bench" / ".venvs" / "saelens" / "bin" / "python"


@pytest.fixture(autouse=True)
def one_thread():
    """These problems are tiny: one intra-op thread avoids waiting on a second core (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def orthonormal(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64))
    return q.T.contiguous().float()


def planted_activations(D, n_samples, support, seed=0, noise=0.0):
    """Sparse non-negative combinations of the rows of D (plus optional noise)."""
    g = torch.Generator().manual_seed(seed)
    n, d = D.shape
    idx = torch.rand(n_samples, n, generator=g).argsort(1)[:, :support]
    C = torch.zeros(n_samples, n).scatter(1, idx, torch.rand(n_samples, support, generator=g) + 0.5)
    return C, C @ D + noise * torch.randn(n_samples, d, generator=g)


def test_from_dictionary_atoms_are_unit_copies_and_encoder_is_transpose():
    g = torch.Generator().manual_seed(1)
    directions = torch.randn(6, 16, generator=g) * torch.arange(1, 7)[:, None]
    sae = SAE.from_dictionary(directions, k=3, n_extra=4, concept_ids=[f"c{i}" for i in range(6)])
    assert sae.d_sae == 10 and sae.d_in == 16 and sae.concept_ids == [f"c{i}" for i in range(6)]
    unit = directions / directions.norm(dim=1, keepdim=True)
    torch.testing.assert_close(sae.W_dec[:6], unit)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(10))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    assert not sae.b_enc.any() and not sae.b_dec.any()
    # free atoms are seeded
    again = SAE.from_dictionary(directions, k=3, n_extra=4, seed=0)
    other = SAE.from_dictionary(directions, k=3, n_extra=4, seed=1)
    assert torch.equal(again.W_dec, sae.W_dec) and not torch.equal(other.W_dec[6:], sae.W_dec[6:])
    with pytest.raises(ValueError, match="all-zero"):
        SAE.from_dictionary(torch.zeros(2, 4), k=1)
    with pytest.raises(ValueError, match="k <= d_sae"):
        SAE.from_dictionary(directions, k=0)


def test_encode_recovers_planted_coefficients():
    D = orthonormal(12, 32)
    C, Z = planted_activations(D, 50, support=3)
    for k in (3, 5):
        sae = SAE.from_dictionary(D, k=k)
        torch.testing.assert_close(sae.encode(Z), C, atol=1e-5, rtol=0)
        torch.testing.assert_close(sae(Z), Z, atol=1e-5, rtol=0)
    relu = SAE.from_dictionary(D, activation="relu")
    torch.testing.assert_close(relu.encode(Z), C, atol=1e-5, rtol=0)


def test_save_load_round_trip_is_exact(tmp_path):
    g = torch.Generator().manual_seed(2)
    sae = SAE.from_dictionary(torch.randn(5, 8, generator=g), k=2, n_extra=3, concept_ids=list("abcde"),
                              metadata={"layer": 16, "untrained": True})
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(8, generator=g))
        sae.b_dec.copy_(torch.randn(8, generator=g))
    sae.save(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 2 and cfg["d_in"] == 8 and cfg["d_sae"] == 8
    assert cfg["metadata"]["concept_ids"] == list("abcde") and cfg["metadata"]["sae_lens_version"].startswith("6")
    loaded = SAE.load(tmp_path / "sae")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name)), name
    assert loaded.k == 2 and loaded.concept_ids == list("abcde") and loaded.metadata["untrained"] is True
    x = torch.randn(4, 8, generator=g)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    relu = SAE.from_dictionary(torch.randn(3, 8, generator=g), activation="relu", l1_coefficient=0.3)
    relu.save(tmp_path / "relu")
    back = SAE.load(tmp_path / "relu")
    assert back.activation == "relu" and back.l1_coefficient == 0.3 and torch.equal(back.W_dec, relu.W_dec)
    (tmp_path / "relu" / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors"):
        SAE.load(tmp_path / "relu")


def test_train_reduces_fvu_and_reports_l0_and_dead_fraction():
    D = orthonormal(24, 32, seed=3)
    _, X = planted_activations(D, 4096, support=3, seed=1, noise=0.02)
    sae = SAE.random(32, 48, k=3, seed=0)
    before = evaluate_sae(sae, X)["fvu"]
    result = train_sae(sae, X, TrainConfig(lr=3e-3, batch_size=256, log_every=40), steps=80, progress=False)
    after = evaluate_sae(sae, X)
    assert result.steps == 80 and len(result.history) == 2
    assert after["fvu"] < 0.5 * before and result.fvu < 0.5
    assert result.l0 == pytest.approx(3.0) and 0.0 <= result.dead_fraction < 1.0
    assert result.activations_per_s > 0
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(48), atol=1e-5, rtol=0)


def test_auxk_revives_dead_latents():
    D = orthonormal(16, 32, seed=4)
    _, X = planted_activations(D, 2048, support=2, seed=2, noise=0.01)
    results = {}
    for remedy in ("none", "auxk"):
        sae = SAE.random(32, 64, k=2, seed=5)
        with torch.no_grad():  # push half of the latents far below the others: dead from the start
            sae.b_enc[32:] = -1.0
        config = TrainConfig(lr=3e-3, batch_size=256, dead_latent_remedy=remedy, dead_window=512, aux_coefficient=1.0)
        results[remedy] = train_sae(sae, X, config, steps=60, progress=False)
    assert results["none"].dead_fraction >= 0.5
    assert results["auxk"].dead_fraction < results["none"].dead_fraction


def test_relu_training_with_resampling_and_files(tmp_path):
    D = orthonormal(8, 16, seed=6)
    _, X = planted_activations(D, 1000, support=2, seed=3)
    np.save(tmp_path / "a.npy", X[:600].numpy())
    pq.write_table(pa.table({"key": [str(i) for i in range(400)],
                             "z": pa.FixedSizeListArray.from_arrays(pa.array(X[600:].reshape(-1).numpy()), 16)}),
                   tmp_path / "b.parquet")
    batches = list(iterate_activation_files(tmp_path, batch_size=256))
    assert [b.shape[0] for b in batches] == [256, 256, 256, 232]
    torch.testing.assert_close(torch.cat(batches), X)
    sae = SAE.random(16, 16, activation="relu", l1_coefficient=1e-3, seed=1)
    before = evaluate_sae(sae, tmp_path)["fvu"]
    result = train_sae(sae, tmp_path, TrainConfig(lr=3e-3, batch_size=256, resample_every=20), epochs=10, progress=False)
    assert result.steps == 40 and evaluate_sae(sae, X)["fvu"] < before
    with pytest.raises(ValueError, match="auxk"):
        train_sae(sae, X, TrainConfig(dead_latent_remedy="auxk"), steps=1)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train_sae(sae, tmp_path / "nowhere", steps=1)


def test_one_shot_iterator_runs_out_with_a_warning():
    sae = SAE.random(8, 8, k=2)
    batches = (torch.randn(16, 8) for _ in range(3))
    with pytest.warns(UserWarning, match="ran out after 3 of 5 steps"):
        result = train_sae(sae, batches, TrainConfig(batch_size=16), steps=5, progress=False)
    assert result.steps == 3
    with pytest.raises(ValueError, match="d_in=8"):
        train_sae(sae, [torch.randn(4, 6)], steps=1, progress=False)


def test_annotate_labels_atoms_from_undesirable_concepts(tmp_path):
    ids = ["gun.n.01", "knife.n.01", "bomb.n.01", "hug.n.01", "gift.n.01", "tree.n.01", "cup.n.01", "dog.n.01"]
    polarity = ["undesirable"] * 3 + ["desirable"] * 2 + ["neutral"] * 3
    D = orthonormal(8, 24, seed=7)
    pq.write_table(pa.table({"concept_id": ids, "group": ["g"] * 8, "polarity": polarity}),
                   tmp_path / "concepts.parquet")
    write_dictionary_parquet(tmp_path / "dictionary" / "l15.parquet",
                             [{"concept_id": c, "layer": 15, "direction": (3.0 * D[i]).numpy(),
                               "n_pos": 27, "n_neg": 27} for i, c in enumerate(ids)])
    dic = load_dictionary(tmp_path)
    sae = SAE.from_dictionary(dic.directions(15), k=2, n_extra=2, concept_ids=dic.concept_ids)
    ann = annotate(sae, dic, eta=0.5)  # cos to a 3-concept centroid is 1/sqrt(3) = 0.577
    assert ann.undesirable == [0, 1, 2] and ann.desirable == [3, 4]
    assert ann.labels[5:8] == ["neutral"] * 3
    assert ann.nearest_concept[:8] == ids and ann.similarity[0] == pytest.approx(1.0)
    rows = ann.to_pylist()
    assert rows[1]["label"] == "undesirable" and rows[1]["nearest_concept"] == "knife.n.01"
    assert annotate(sae, dic, eta=0.6, layer=15).undesirable == []  # eta above 1/sqrt(3)
    # an atom between the two centroids takes the larger cosine
    mixed = torch.stack([D[0] + 0.3 * D[3], D[3] + 0.2 * D[0]])
    assert annotate(mixed, dic, eta=0.1).labels == ["undesirable", "desirable"]


def test_saelens_loads_our_folder(tmp_path):
    """SAELens (in its own venv; see bench/saelens_compat.py) reads SAE.save output identically, and back."""
    if not SAELENS_PYTHON.exists():
        pytest.skip("bench/.venvs/saelens is absent: run `.venv/bin/python bench/saelens_compat.py --setup` "
                    "once to create SAELens's environment")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "saelens_compat.py"), "--json",
                          str(tmp_path / "r.json")], check=False, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    cases = json.loads((tmp_path / "r.json").read_text())["cases"]
    assert cases["ours_topk"]["saelens_class"] == "TopKSAE" and cases["ours_relu"]["saelens_class"] == "StandardSAE"
    for name in ("ours_topk", "ours_relu"):
        assert cases[name]["encode"] <= 1e-6 and cases[name]["decode"] <= 1e-6, cases
    # SAELens's decoder-norm rescaling is folded on load: equal up to float32 rounding
    assert cases["theirs_topk"]["encode"] <= 1e-4 and cases["theirs_topk"]["decode"] <= 1e-4, cases
