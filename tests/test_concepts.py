"""The concept stage on the real WordNet 3.0, through the real Beam runner."""

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import main
from transforms.concepts import ConceptsConfig, SCHEMA, select_concepts_direct

SMALL = {"roots": ["animal.n.01", "weapon.n.01"], "include_polarity_roots": False, "max_concepts": 300}


def _run_cli(out, *extra):
    assert main(["concepts", "--out", str(out), *extra]) == 0
    return pq.read_table(out / "concepts.parquet")


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The default 15,000-concept run."""
    out = tmp_path_factory.mktemp("concepts-full")
    return _run_cli(out).to_pylist()


def _config(tmp_path, **options):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"concepts": options}))
    return str(path)


def test_default_run_keeps_15000_concepts_with_design_columns(full):
    assert len(full) == 15000
    assert list(full[0]) == SCHEMA.names


def test_known_concepts_have_their_lexicographer_group(full):
    by_id = {r["concept_id"]: r for r in full}
    assert by_id["dog.n.01"]["group"] == "noun.animal"
    assert by_id["dog.n.01"]["lemma"] == "dog"
    assert by_id["car.n.01"]["group"] == "noun.artifact"
    assert by_id["apple.n.01"]["group"] == "noun.food"
    assert by_id["dog.n.01"]["hypernym_path"][:2] == ["entity.n.01", "physical_entity.n.01"]
    assert by_id["dog.n.01"]["depth"] == len(by_id["dog.n.01"]["hypernym_path"]) - 1


def test_firearms_are_undesirable_and_help_is_desirable(full):
    by_id = {r["concept_id"]: r for r in full}
    for weapon in ("firearm.n.01", "rifle.n.01", "pistol.n.01"):
        assert by_id[weapon]["polarity"] == "undesirable", weapon
    assert by_id["rifle.n.01"]["polarity_source"] == "firearm.n.01"
    assert by_id["hospital.n.01"]["polarity"] == "desirable"
    assert by_id["dog.n.01"]["polarity"] == "neutral" and by_id["dog.n.01"]["polarity_source"] == ""
    # carve-out: alcohol sits under drug_of_abuse.n.01 but is neutral
    assert by_id["beer.n.01"]["polarity"] == "neutral"


def test_abstract_undesirable_subtrees_are_included(full):
    ids = {r["concept_id"] for r in full}
    assert {"crime.n.01", "violence.n.01", "murder.n.01"} <= ids


def test_one_concept_per_lemma(full):
    lemmas = [r["lemma"] for r in full]
    assert len(lemmas) == len(set(lemmas))
    ids = [r["concept_id"] for r in full]
    assert len(ids) == len(set(ids))


def test_most_frequent_sense_wins_the_lemma(full):
    by_lemma = {r["lemma"]: r["concept_id"] for r in full}
    assert by_lemma["dog"] == "dog.n.01"          # not the 'frump' or 'cad' senses
    assert by_lemma["bank"] == "bank.n.01"        # the sloping land: 25 tags vs the building's 0


def test_exactly_n_rows_and_byte_identical_reruns(tmp_path):
    config = _config(tmp_path, **SMALL)
    first = _run_cli(tmp_path / "a", "--config", config, "--max-concepts", "123")
    assert first.num_rows == 123
    _run_cli(tmp_path / "b", "--config", config, "--max-concepts", "123")
    assert (tmp_path / "a" / "concepts.parquet").read_bytes() == (tmp_path / "b" / "concepts.parquet").read_bytes()


def test_beam_pipeline_matches_the_direct_reference(tmp_path):
    config = _config(tmp_path, **SMALL)
    beam_rows = _run_cli(tmp_path / "out", "--config", config).to_pylist()
    direct_rows, counts = select_concepts_direct(ConceptsConfig.from_dict(SMALL))
    assert sorted(beam_rows, key=lambda r: r["concept_id"]) == sorted(direct_rows, key=lambda r: r["concept_id"])
    assert counts["kept"] == 300 and counts["read"] == sum(v for k, v in counts.items() if k != "read")


def test_user_overrides_relabel_concepts_and_subtrees(tmp_path):
    overrides = tmp_path / "polarity.yaml"
    overrides.write_text(yaml.safe_dump({
        "concepts": {"rifle.n.01": "neutral"},
        "subtrees": {"dog.n.01": "desirable"},
    }))
    rows, _ = select_concepts_direct(ConceptsConfig.from_dict({**SMALL, "polarity_overrides": str(overrides)}))
    by_id = {r["concept_id"]: r for r in rows}
    assert (by_id["rifle.n.01"]["polarity"], by_id["rifle.n.01"]["polarity_source"]) == ("neutral", "rifle.n.01")
    assert by_id["pistol.n.01"]["polarity"] == "undesirable"
    assert (by_id["dog.n.01"]["polarity"], by_id["dog.n.01"]["polarity_source"]) == ("desirable", "dog.n.01")
    assert by_id["puppy.n.01"]["polarity"] == "desirable"


def test_config_errors_name_the_option(tmp_path):
    with pytest.raises(SystemExit, match="unknown option.*max_concept"):
        main(["concepts", "--out", str(tmp_path), "--config", _config(tmp_path, max_concept=3)])
    with pytest.raises(ValueError, match="not a WordNet synset"):
        select_concepts_direct(ConceptsConfig.from_dict({"roots": ["no_such_thing.n.01"]}))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"subtrees": {"dog.n.01": "good"}}))
    with pytest.raises(ValueError, match="bad.yaml.*not one of"):
        select_concepts_direct(ConceptsConfig.from_dict({**SMALL, "polarity_overrides": str(bad)}))
