"""The curated polarity lexicon against a labelled audit list (docs/concepts.md, review rules)."""

import pytest

from transforms.polarity import Lexicon, load_lexicon, polarity_table
from transforms.wordnet import load_wordnet

# (synset, the label a careful annotator signs). Clear cases only; the mixed subtrees the
# lexicon used to pass down whole (medicines, persons, fireworks, sexuality) are covered.
AUDIT = {
    # weapons, violence, crime
    "gun.n.01": "undesirable", "rifle.n.01": "undesirable", "bomb.n.01": "undesirable",
    "grenade.n.01": "undesirable", "napalm.n.01": "undesirable", "gas_chamber.n.01": "undesirable",
    "electric_chair.n.01": "undesirable", "stabber.n.01": "undesirable", "murderer.n.01": "undesirable",
    "terrorist.n.01": "undesirable", "thief.n.01": "undesirable", "massacre.n.01": "undesirable",
    "sexual_assault.n.01": "undesirable", "pornography.n.01": "undesirable",
    # drugs of abuse, including their injection; legal goods are not
    "heroin.n.01": "undesirable", "cocaine.n.01": "undesirable", "fix.n.02": "undesirable",
    "beer.n.01": "neutral", "cigarette.n.01": "neutral", "firework.n.01": "neutral",
    # help and safety
    "fire_extinguisher.n.01": "desirable", "life_jacket.n.01": "desirable", "seat_belt.n.01": "desirable",
    "fireman.n.04": "desirable", "hospital.n.01": "desirable", "vaccine.n.01": "desirable",
    "ambulance.n.01": "desirable", "teacher.n.01": "desirable", "police.n.01": "desirable",
    "medicine.n.02": "desirable",
    # sexual orientation, identity groups and ordinary biology are never undesirable
    "lesbianism.n.01": "neutral", "homosexuality.n.01": "neutral", "heterosexuality.n.01": "neutral",
    "homosexual.n.01": "neutral", "reproduction.n.05": "neutral", "pregnancy.n.01": "neutral",
    "menstruation.n.01": "neutral", "kiss.n.01": "neutral", "jew.n.01": "neutral", "muslim.n.01": "neutral",
    # everyday things
    "dog.n.01": "neutral", "paring_knife.n.01": "neutral", "car.n.01": "neutral", "hammer.n.02": "neutral",
}


@pytest.fixture(scope="module")
def table():
    wn = load_wordnet(None)
    return wn, polarity_table(wn, load_lexicon(None))


def test_audit_list_labels_are_all_right(table):
    wn, labels = table
    wrong = {}
    for name, expected in AUDIT.items():
        got = labels.get(wn.synset(name).name(), ("neutral", ""))[0]
        if got != expected:
            wrong[name] = got
    assert wrong == {}


def test_protected_subtrees_are_never_undesirable(table):
    wn, labels = table
    for root in load_lexicon(None).protected:
        inside = {s.name() for s in wn.synset(root).closure(lambda s: s.hyponyms())} | {wn.synset(root).name()}
        for name in inside:
            polarity, source = labels.get(name, ("neutral", ""))
            # only an undesirable root inside the protected subtree (strictly nearer) may label it
            assert polarity != "undesirable" or source in inside, (name, source)


def test_protection_beats_an_undesirable_root_above_it(table):
    wn, _labels = table
    lexicon = Lexicon(roots={"sexual_activity.n.01": "undesirable"}, subtrees={}, concepts={},
                      protected=("homosexuality.n.01",))
    labels = polarity_table(wn, lexicon)
    assert labels["lesbianism.n.01"] == ("neutral", "protected:homosexuality.n.01")
    assert labels["sexual_activity.n.01"] == ("undesirable", "sexual_activity.n.01")


def test_exact_labels_do_not_pass_down(table):
    wn, labels = table
    assert labels["medicine.n.02"] == ("desirable", "medicine.n.02")
    assert labels.get("aspirin.n.01", ("neutral", ""))[0] == "neutral"  # under medicine.n.02, not labelled by it
