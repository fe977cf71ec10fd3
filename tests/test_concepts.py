"""The concept stage on the real WordNet 3.0, through the real Beam runner."""

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import main
from transforms.concepts import ConceptSelector, ConceptsConfig, SCHEMA, select_concepts_direct, to_table
from transforms.picturability import Evidence

SMALL = {"roots": ["animal.n.01", "weapon.n.01"], "include_polarity_roots": False, "max_concepts": 300}


def _run_cli(out, *extra):
    assert main(["concepts", "--out", str(out), *extra]) == 0
    return pq.read_table(out / "concepts.parquet")


@pytest.fixture(scope="module")
def full_with_reserve(tmp_path_factory):
    """The default 15,000-concept run, its reserve included."""
    out = tmp_path_factory.mktemp("concepts-full")
    return _run_cli(out).to_pylist()


@pytest.fixture(scope="module")
def full(full_with_reserve):
    """The 15,000 kept concepts of the default run."""
    return [r for r in full_with_reserve if not r["reserve"]]


def _config(tmp_path, **options):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"concepts": options}))
    return str(path)


def test_default_run_keeps_15000_concepts_with_design_columns(full, full_with_reserve):
    assert len(full) == 15000
    assert list(full[0]) == SCHEMA.names
    assert sorted(r["rank"] for r in full) == list(range(15000))
    reserve = [r for r in full_with_reserve if r["reserve"]]
    assert 0 < len(reserve) <= 1500 and min(r["rank"] for r in reserve) == 15000


# Everyday picturable synsets the issue names, and unpicturable kinds it found in the old list.
EVERYDAY = ["giraffe.n.01", "butterfly.n.01", "hamburger.n.01", "motorcycle.n.01", "scissors.n.01",
            "fire_engine.n.01", "fire_extinguisher.n.01", "life_jacket.n.01", "fire.n.01", "explosion.n.01",
            "sport.n.01", "sun.n.01", "moon.n.01", "dog.n.01", "car.n.01", "apple.n.01"]
UNPICTURABLE = ["enzyme.n.01", "amino_acid.n.01", "avower.n.01", "newcomer.n.01", "asserter.n.01",
                "mitochondrion.n.01", "ribosome.n.01"]


def test_everyday_things_actions_and_instances_are_in_unpicturable_ones_are_not(full):
    ids = {r["concept_id"] for r in full}
    assert [c for c in EVERYDAY if c not in ids] == []
    assert [c for c in UNPICTURABLE if c in ids] == []


def test_rank_follows_the_picturability_score_and_ratings_are_columns(full):
    by_id = {r["concept_id"]: r for r in full}
    giraffe = by_id["giraffe.n.01"]
    assert giraffe["concreteness"] == pytest.approx(4.73, abs=0.01) and giraffe["visual"] == pytest.approx(4.22, abs=0.01)
    neutral = sorted((r for r in full if r["polarity"] != "undesirable"), key=lambda r: r["rank"])
    scores = [r["picturability"] for r in neutral]
    assert scores == sorted(scores, reverse=True)


def test_group_factor_lowers_persons_and_abstract_persons_are_out(full):
    """A person's score is its rating score times noun.person's factor 0.5; relations are not kept."""
    persons = [r for r in full if r["group"] == "noun.person" and r["concreteness"] and r["visual"]]
    assert persons
    for r in persons[:50]:
        raw = (r["concreteness"] - 1) / 4 * r["visual"] / 5 * min(r["zipf"], 7) / 7
        assert r["picturability"] == pytest.approx(0.5 * raw, rel=1e-5)
    ids = {r["concept_id"] for r in full}
    assert not ids & {"cousin.n.01", "nephew.n.01", "stepson.n.01", "creditor.n.01", "rival.n.01"}


def test_subtree_factors_give_visible_acts_and_the_outside_of_the_body_full_weight():
    """noun.act, noun.body and noun.substance are lowered, but sports, games, locomotion and the outside
    of the body keep full weight (``subtree_weights``); the most specific listed subtree wins."""
    selector = ConceptSelector(ConceptsConfig())

    def factor(sel, name):
        return sel.group_weight(sel.wn.synset(name))

    assert [factor(selector, n) for n in ("swimming.n.01", "tennis.n.01", "walk.n.01", "eye.n.01", "hand.n.01",
                                          "tooth.n.01")] == [1.0] * 6
    assert factor(selector, "visit.n.03") == factor(selector, "occupation.n.01") == 0.5      # noun.act
    assert factor(selector, "quadriceps.n.01") == 0.7 and factor(selector, "potash.n.01") == 0.7
    nested = ConceptSelector(ConceptsConfig(subtree_weights={"act.n.02": 0.2, "sport.n.01": 0.9}))
    assert factor(nested, "swimming.n.01") == 0.9 and factor(nested, "occupation.n.01") == 0.2
    assert factor(nested, "eye.n.01") == 0.7                                                  # back to noun.body's
    with pytest.raises(ValueError, match="subtree_weights: 'no_such.n.01' is not a WordNet synset"):
        ConceptSelector(ConceptsConfig(subtree_weights={"no_such.n.01": 1.0}))
    with pytest.raises(ValueError, match="subtree_weights must be in"):
        ConceptsConfig.from_dict({"subtree_weights": {"sport.n.01": 1.5}})


def test_a_synset_is_rated_by_its_first_rated_lemma_so_rare_synonyms_do_not_pull_it_down(full):
    """person.n.01 is person, individual, someone, somebody, mortal, soul: the mean of their visual
    strengths (2.8) is under min_visual, the first lemma's (4.45) is not."""
    from transforms.picturability import combine_words

    words = [(0.9, 0.9, 0.8), (0.2, 0.1, 0.6), (None, 0.5, 0.5)]
    assert combine_words(words, "first") == Evidence(0.9, 0.9, 0.8)
    assert combine_words(words, "mean") == Evidence(pytest.approx(0.55), pytest.approx(0.5), 0.8)
    ids = {r["concept_id"] for r in full}
    assert {"person.n.01", "girl.n.01"} <= ids
    mean = ConceptSelector(ConceptsConfig(lemma_combine="mean"))
    assert mean.evaluate("person.n.01") == (None, "picturability")


def test_unrated_leaves_inherit_a_rated_hypernym_and_only_when_asked():
    from transforms.picturability import Ratings

    rows, _ = select_concepts_direct(ConceptsConfig.from_dict(SMALL))
    ratings = Ratings()
    inherited = [r for r in rows if ratings.synset([lemma.replace(" ", "_") for lemma in r["lemmas"]]) is None]
    assert inherited
    plain = ConceptSelector(ConceptsConfig.from_dict({**SMALL, "inherit_levels": 0}))
    assert {plain.evaluate(r["concept_id"])[1] for r in inherited} == {"picturability"}
    selector = ConceptSelector(ConceptsConfig.from_dict(SMALL))
    for r in inherited[:20]:  # the ratings of a hypernym one or two levels up
        synset = selector.wn.synset(r["concept_id"])
        up = {h.name() for h in synset.hypernyms()} | {g.name() for h in synset.hypernyms() for g in h.hypernyms()}
        _evidence, hypernym = selector.inherited(synset)
        rated = ratings.synset([lemma.name() for lemma in selector.wn.synset(hypernym).lemmas()])
        assert hypernym in up and r["concreteness"] == pytest.approx(1 + 4 * rated.concreteness, rel=1e-5)


def test_instances_keep_their_proper_name_and_do_not_take_the_common_noun(full):
    by_lemma = {r["lemma"]: r["concept_id"] for r in full}
    assert by_lemma["Sun"] == "sun.n.01" and by_lemma["Moon"] == "moon.n.01"
    assert by_lemma.get("sun") != "sun.n.01"
    ids = {r["concept_id"] for r in full}
    assert not ids & {"paris.n.01", "einstein.n.01"}  # people and places: not in instance_groups


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


def _senses(rows) -> dict[str, set[str]]:
    """{lemma: the concept ids labelled with it}."""
    senses: dict[str, set[str]] = {}
    for r in rows:
        senses.setdefault(r["lemma"], set()).add(r["concept_id"])
    return senses


def test_a_word_keeps_its_strong_senses_and_drops_weak_ones(full):
    """Both the plant and the fruit are "banana"; a sense with under a third of the winner's evidence,
    fire as 'a severe trial', is out; the chess piece keeps its own word; ids stay unique."""
    ids = [r["concept_id"] for r in full]
    assert len(ids) == len(set(ids))
    senses, by_id = _senses(full), {r["concept_id"]: r for r in full}
    assert {"banana.n.01", "banana.n.02"} <= senses["banana"]
    assert {"basketball.n.01", "basketball.n.02"} <= senses["basketball"]  # the game and the ball
    assert "fire.n.08" not in by_id and "cake.n.01" not in senses["cake"]  # the soap block is at most a "bar"
    assert "castle.n.03" not in senses["castle"] and by_id["castle.n.03"]["lemma"] == "rook"
    assert "castle.n.02" in senses["castle"]  # the fortress, a second sense of the word palace.n.01 won


def test_the_sense_with_the_most_rated_evidence_takes_the_word(full):
    selector = ConceptSelector(ConceptsConfig())
    evidence = lambda name: selector.sense_evidence(selector.wn.synset(name))  # noqa: E731
    by_id = {r["concept_id"]: r for r in full}
    for word, best, others in [
        ("dog", "dog.n.01", ["frump.n.01", "cad.n.01"]),      # not the 'frump' or 'cad' senses
        ("hammer", "hammer.n.02", ["hammer.n.01"]),          # the hand tool, not the gunlock part
        ("cake", "cake.n.03", ["cake.n.01"]),                # baked goods, not a block of soap
        ("fire", "fire.n.03", ["fire.n.02"]),                # burning (combustion), not firing weapons
        ("castle", "palace.n.01", ["castle.n.03"]),          # never the chess piece (palace.n.01 is "palace")
    ]:
        assert best in by_id and word in by_id[best]["lemmas"], word
        assert all(evidence(best) > evidence(other) for other in others), word
    assert by_id["fire.n.01"]["lemma"] == "fire"  # the burning event is kept too, a second sense of "fire"


def test_second_senses_enter_with_a_fraction_of_the_winners_evidence():
    from transforms.concepts import is_second_sense, label_concept

    best = (-1.0, 0, 1, "w.n.01", 0)
    strong, weak = (-0.4, 0, 2, "x.n.01", 0), (-0.3, 0, 2, "x.n.01", 0)
    assert is_second_sense(strong, best, 0.33) and not is_second_sense(weak, best, 0.33)
    assert not is_second_sense(strong, best, None) and not is_second_sense((0.0, 0, 2, "x.n.01", 0), (0.0,) + best[1:], 0.33)
    candidate = {"concept_id": "x.n.01", "lemmas": ["a"], "_rated_by": "lemmas"}
    assert label_concept(candidate, [("a", strong, best)], ConceptsConfig())["lemma"] == "a"
    assert label_concept(candidate, [("a", weak, best)], ConceptsConfig()) is None
    assert label_concept(candidate, [("a", strong, best)], ConceptsConfig(second_sense_fraction=None)) is None


def test_visible_natural_objects_and_near_visual_concrete_things_are_in(full):
    """rainbow (filed under shape) enters through include_groups; mouth and tea (visual strength 2.95,
    2.94) through the compensated visual test, which internal organs such as the kidney fail."""
    from transforms.concepts import visual_enough
    from transforms.picturability import Evidence

    ids = {r["concept_id"] for r in full}
    assert {"rainbow.n.01", "mouth.n.01", "tea.n.01"} <= ids
    cfg = ConceptsConfig()
    assert visual_enough(Evidence(0.935, 2.95 / 5, 0.7), cfg)       # mouth
    assert not visual_enough(Evidence(0.99, 2.47 / 5, 0.7), cfg)    # kidney: c * v = 0.49
    assert not visual_enough(Evidence(1.0, 2.4 / 5, 0.7), cfg)      # under compensated_visual
    assert not visual_enough(Evidence(0.935, 2.95 / 5, 0.7), ConceptsConfig(compensated_product=None))
    assert ConceptSelector(ConceptsConfig(include_groups=[])).evaluate("rainbow.n.01") == (None, "root")


def test_exactly_n_rows_and_byte_identical_reruns(tmp_path):
    config = _config(tmp_path, **SMALL)
    first = _run_cli(tmp_path / "a", "--config", config, "--max-concepts", "123")
    assert first.num_rows == 123 + 13 and sum(not r for r in first.column("reserve").to_pylist()) == 123
    _run_cli(tmp_path / "b", "--config", config, "--max-concepts", "123")
    assert (tmp_path / "a" / "concepts.parquet").read_bytes() == (tmp_path / "b" / "concepts.parquet").read_bytes()


def test_beam_pipeline_matches_the_direct_reference(tmp_path):
    config = _config(tmp_path, **SMALL)
    beam_rows = _run_cli(tmp_path / "out", "--config", config).to_pylist()
    direct_rows, counts = select_concepts_direct(ConceptsConfig.from_dict(SMALL))
    assert beam_rows == to_table(direct_rows).to_pylist()  # both sorted by id, floats as stored (float32)
    assert counts["kept"] == 300 and counts["reserve"] == 30
    assert counts["read"] == sum(v for k, v in counts.items() if k != "read")


def test_user_overrides_relabel_concepts_and_subtrees(tmp_path):
    overrides = tmp_path / "polarity.yaml"
    overrides.write_text(yaml.safe_dump({
        "concepts": {"rifle.n.01": "neutral"},
        "subtrees": {"dog.n.01": "desirable"},
    }))
    # 1,000: the undesirable weapons (named guns included, rated through their hypernyms) rank first,
    # and rifle, relabelled neutral, must still make the list.
    rows, _ = select_concepts_direct(ConceptsConfig.from_dict({**SMALL, "max_concepts": 1000,
                                                               "polarity_overrides": str(overrides)}))
    by_id = {r["concept_id"]: r for r in rows}
    assert (by_id["rifle.n.01"]["polarity"], by_id["rifle.n.01"]["polarity_source"]) == ("neutral", "rifle.n.01")
    assert by_id["pistol.n.01"]["polarity"] == "undesirable"
    assert (by_id["dog.n.01"]["polarity"], by_id["dog.n.01"]["polarity_source"]) == ("desirable", "dog.n.01")
    assert by_id["puppy.n.01"]["polarity"] == "desirable"


def test_config_errors_name_the_option(tmp_path):
    with pytest.raises(SystemExit, match="unknown option.*max_concept"):
        main(["concepts", "--out", str(tmp_path), "--config", _config(tmp_path, max_concept=3)])
    with pytest.raises(ValueError, match="weights must give each of concreteness, visual, frequency"):
        ConceptsConfig.from_dict({"weights": {"concreteness": 1.0}})
    with pytest.raises(ValueError, match="lemma_combine must be one of"):
        ConceptsConfig.from_dict({"lemma_combine": "median"})
    with pytest.raises(ValueError, match="instance_groups.*noun.objects"):
        ConceptsConfig.from_dict({"instance_groups": ["noun.objects"]})
    with pytest.raises(ValueError, match="group_weights.*noun.persons"):
        ConceptsConfig.from_dict({"group_weights": {"noun.persons": 0.5}})
    with pytest.raises(ValueError, match="group_weights must be in"):
        ConceptsConfig.from_dict({"group_weights": {"noun.person": 2.0}})
    with pytest.raises(ValueError, match="include_groups.*noun.objects"):
        ConceptsConfig.from_dict({"include_groups": ["noun.objects"]})
    with pytest.raises(ValueError, match="second_sense_fraction must be in"):
        ConceptsConfig.from_dict({"second_sense_fraction": 0})
    with pytest.raises(ValueError, match="compensated_product must be in"):
        ConceptsConfig.from_dict({"compensated_product": 1.5})
    with pytest.raises(ValueError, match="inherit_levels must be >= 0"):
        ConceptsConfig.from_dict({"inherit_levels": -1})
    with pytest.raises(ValueError, match="not a WordNet synset"):
        select_concepts_direct(ConceptsConfig.from_dict({"roots": ["no_such_thing.n.01"]}))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"subtrees": {"dog.n.01": "good"}}))
    with pytest.raises(ValueError, match="bad.yaml.*not one of"):
        select_concepts_direct(ConceptsConfig.from_dict({**SMALL, "polarity_overrides": str(bad)}))


def test_rating_by_won_lemmas_rates_a_synset_by_the_words_it_won_only():
    """A synset that wins "b" but loses "a" is rated by "b" alone with ``rate_by_won_lemmas``; by both otherwise."""
    from transforms.concepts import label_concept

    a, b = (1.0, 1.0, 1.0), (0.5, 0.5, 0.5)  # normalised (c, v, f) of the two lemmas
    candidate = {"concept_id": "x.n.01", "lemmas": ["a", "b"], "concreteness": 4.0, "visual": 3.75, "zipf": 7.0,
                 "picturability": 0.42, "_words": [a, b], "_factor": 0.5, "_rated_by": "lemmas"}
    vote = (0.0, 0, 1, "x.n.01", 1)
    won = [("b", vote, vote)]  # (lemma, the candidate's vote, the lemma's best vote): it won "b"
    row = label_concept(candidate, won, ConceptsConfig(rate_by_won_lemmas=True))
    assert row["lemma"] == "b" and row["concreteness"] == pytest.approx(3.0) and row["visual"] == pytest.approx(2.5)
    assert row["zipf"] == pytest.approx(3.5) and row["picturability"] == pytest.approx(0.5 * 0.5 ** 3)
    assert label_concept(candidate, won, ConceptsConfig())["picturability"] == 0.42
    assert label_concept(candidate, [], ConceptsConfig(rate_by_won_lemmas=True)) is None
