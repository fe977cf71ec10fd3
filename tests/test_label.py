"""`daco label`: a real (tiny, seeded, untrained) causal LM labels concepts; agreement is reported."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from transforms.label import agreement

ROWS = [("gun.n.01", "gun", "a weapon that discharges a missile", "undesirable", "gun.n.01"),
        ("dog.n.01", "dog", "a member of the genus Canis", "neutral", ""),
        ("hospital.n.01", "hospital", "a health facility where patients receive treatment", "desirable",
         "hospital.n.01"),
        ("bomb.n.01", "bomb", "an explosive device", "undesirable", "bomb.n.01")]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from steering.models import get_adapter

    model, tokenizer = get_adapter("qwen2").build_untrained(seed=0)
    folder = tmp_path_factory.mktemp("tiny-lm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_label_writes_model_labels_and_reports_agreement(tiny_lm, tmp_path, capsys):
    concepts = tmp_path / "concepts.parquet"
    names = ["concept_id", "lemma", "definition", "polarity", "polarity_source"]
    pq.write_table(pa.table({n: [r[i] for r in ROWS] for i, n in enumerate(names)}), concepts)
    out, report = tmp_path / "labelled.parquet", tmp_path / "agreement.json"
    assert main(["label", "--concepts", str(concepts), "--model", tiny_lm, "--out", str(out),
                 "--report", str(report), "--batch-size", "3"]) == 0
    labelled = pq.read_table(out).to_pylist()
    assert [r["concept_id"] for r in labelled] == [r[0] for r in ROWS]
    assert {r["polarity_source"] for r in labelled} == {f"model:{tiny_lm}"}
    assert all(r["polarity"] in ("undesirable", "desirable", "neutral") for r in labelled)
    summary = json.loads(report.read_text())
    assert summary == {"model": tiny_lm, **agreement([r[3] for r in ROWS], [r["polarity"] for r in labelled])}
    assert "agreement with the lexicon" in capsys.readouterr().out
    # batching does not change the labels
    assert main(["label", "--concepts", str(concepts), "--model", tiny_lm, "--out", str(tmp_path / "b.parquet"),
                 "--batch-size", "1"]) == 0
    assert [r["polarity"] for r in pq.read_table(tmp_path / "b.parquet").to_pylist()] == [r["polarity"] for r in labelled]


def test_agreement_counts():
    got = agreement(["undesirable", "neutral", "neutral", "desirable"], ["undesirable", "neutral", "desirable", "neutral"])
    assert got["agreement"] == 0.5 and got["per_lexicon_label"] == {"undesirable": 1.0, "desirable": 0.0, "neutral": 0.5}
    assert got["confusion"]["neutral->desirable"] == 1


def test_a_folder_that_is_no_model_is_refused(tmp_path):
    concepts = tmp_path / "c.parquet"
    pq.write_table(pa.table({"concept_id": ["dog.n.01"], "lemma": ["dog"], "definition": ["d"], "polarity": ["neutral"],
                             "polarity_source": [""]}), concepts)
    with pytest.raises(SystemExit, match="--model .*not a causal language model"):
        main(["label", "--concepts", str(concepts), "--model", str(tmp_path), "--out", str(tmp_path / "o.parquet")])
