"""Concept list quality (issue 15): the 15,000-concept list of this tree against a baseline
tree (default /work/main, or any checkout given with --baseline), on the checks the issue names.

Figures, each for both trees: how many of the listed everyday picturable synsets and of the
listed unpicturable ones are in the list, which senses are labelled hammer / cake / castle / fire,
how many labels of the polarity audit list (tests/test_polarity.py) are right, and a seeded
random sample of 100 kept concepts (seed 15) judged by hand in bench/concept_sample_judgements.json
(the judging criterion is written there; concepts not judged yet are printed to be judged and added).
Writes bench/results/concept_quality.json; prints the sample's picturable share and the everyday and
unpicturable coverage of both trees last.

    python bench/concept_quality.py [--baseline /work/main] [--max-concepts 15000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_result  # noqa: E402

JUDGED = json.loads((Path(__file__).resolve().parent / "concept_sample_judgements.json").read_text())

# Everyday picturable synsets (animals, foods, vehicles, tools, clothing, furniture, sports, weather,
# body parts, buildings) and unpicturable ones (enzymes, amino acids, cell parts, abstract persons,
# emotions, theories); the goals: >= 95% of the first present, <= 10% of the second.
EVERYDAY = [
    "giraffe.n.01", "butterfly.n.01", "hamburger.n.01", "motorcycle.n.01", "scissors.n.01",
    "fire_engine.n.01", "fire_extinguisher.n.01", "life_jacket.n.01", "fire.n.01", "explosion.n.01",
    "sport.n.01", "dog.n.01", "cat.n.01", "horse.n.01", "cow.n.01", "elephant.n.01", "lion.n.01",
    "tiger.n.02", "zebra.n.01", "bear.n.01", "rabbit.n.01", "duck.n.01", "owl.n.01", "penguin.n.01",
    "shark.n.01", "snake.n.01", "frog.n.01", "spider.n.01", "bee.n.01", "apple.n.01", "banana.n.02",
    "orange.n.01", "bread.n.01", "pizza.n.01", "cheese.n.01", "egg.n.02", "carrot.n.03", "tomato.n.01",
    "sandwich.n.01", "ice_cream.n.01", "cake.n.03", "coffee.n.01", "car.n.01", "bus.n.01", "bicycle.n.01",
    "airplane.n.01", "train.n.01", "boat.n.01", "truck.n.01", "helicopter.n.01", "tractor.n.01",
    "hammer.n.02", "screwdriver.n.01", "saw.n.02", "knife.n.01", "shovel.n.01", "ladder.n.01",
    "umbrella.n.01", "shirt.n.01", "dress.n.01", "shoe.n.01", "hat.n.01", "jacket.n.01", "glove.n.02",
    "sock.n.01", "chair.n.01", "table.n.02", "bed.n.01", "sofa.n.01", "lamp.n.01", "bookcase.n.01",
    "football.n.02", "basketball.n.02", "tennis.n.01", "skiing.n.01", "swimming.n.01", "baseball.n.02",
    "rain.n.01", "snow.n.02", "lightning.n.01", "rainbow.n.01", "cloud.n.02", "tornado.n.01", "hand.n.01",
    "eye.n.01", "foot.n.01", "nose.n.01", "mouth.n.01", "hair.n.01", "house.n.01", "church.n.02",
    "bridge.n.01", "tower.n.01", "skyscraper.n.01", "barn.n.01", "castle.n.02", "tree.n.01", "flower.n.01",
    "beach.n.01", "mountain.n.01", "guitar.n.01", "piano.n.01", "clock.n.01", "bottle.n.01", "cup.n.01",
    "baby.n.01", "fireman.n.04", "soldier.n.01"
]
UNPICTURABLE = [
    "enzyme.n.01", "amino_acid.n.01", "mitochondrion.n.01", "ribosome.n.01", "organelle.n.01",
    "avower.n.01", "newcomer.n.01", "asserter.n.01", "protease.n.01", "lipase.n.01", "glycine.n.01",
    "lysine.n.01", "leucine.n.01", "nucleus.n.01", "cytoplasm.n.01", "chromosome.n.01", "gene.n.01",
    "cell_membrane.n.01", "golgi_body.n.01", "lysosome.n.01", "peptide.n.01", "hormone.n.01",
    "neurotransmitter.n.01", "antibody.n.01", "antigen.n.01", "isotope.n.01", "catalyst.n.01", "ion.n.01",
    "molecule.n.01", "electron.n.01", "believer.n.01", "skeptic.n.01", "liberal.n.01", "conservative.n.01",
    "optimist.n.01", "pessimist.n.01", "successor.n.01", "predecessor.n.01", "heir.n.01",
    "beneficiary.n.01", "creditor.n.01", "debtor.n.01", "acquaintance.n.01", "ally.n.01", "rival.n.01",
    "cousin.n.01", "nephew.n.01", "stepson.n.01", "in-law.n.01", "expert.n.01", "novice.n.02",
    "happiness.n.01", "anger.n.01", "fear.n.01", "jealousy.n.01", "theory.n.01", "hypothesis.n.02",
    "relativity.n.02", "evolution.n.02", "idea.n.01", "justice.n.01", "freedom.n.01"
]
SENSES = {"hammer": "hammer.n.02", "cake": "cake.n.03", "castle": "not castle.n.03", "fire": "fire.n.01"}

CHILD = """
import json, random, sys, time, warnings; warnings.filterwarnings("ignore")
from transforms.concepts import ConceptsConfig, select_concepts_direct
from transforms.polarity import load_lexicon, polarity_table
from transforms.wordnet import load_wordnet
start, cpu = time.perf_counter(), time.process_time()
rows, _ = select_concepts_direct(ConceptsConfig(max_concepts={n}))
wall, cpu = time.perf_counter() - start, time.process_time() - cpu
rows = [r for r in rows if not r.get("reserve")]
wn = load_wordnet(None)
labels = polarity_table(wn, load_lexicon(None))
audit = json.loads(sys.argv[1])
right = sum(labels.get(wn.synset(k).name(), ("neutral", ""))[0] == v for k, v in audit.items())
sample = random.Random({seed}).sample(rows, {size})
senses = {{}}
for r in rows:
    senses.setdefault(r["lemma"], []).append(r["concept_id"])
print("RESULT=" + json.dumps({{"ids": [r["concept_id"] for r in rows], "lemmas": senses, "audit_right": right, "audit_total": len(audit), "wall_s": wall, "cpu_s": cpu,
      "sample": [[r["concept_id"], r["definition"]] for r in sample]}}))
"""


def run_tree(tree: Path, n: int) -> dict:
    """The checks for the code in ``tree`` (a fresh interpreter with that tree first on the path)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_polarity import AUDIT

    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-c", CHILD.format(n=n, seed=JUDGED["seed"], size=JUDGED["size"]), json.dumps(AUDIT)], cwd=tree, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{tree}: {proc.stderr[-3000:]}")
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT="))[7:])
    ids = set(result.pop("ids"))
    lemmas = result.pop("lemmas")
    result["everyday_present"] = [c for c in EVERYDAY if c in ids]
    result["unpicturable_present"] = [c for c in UNPICTURABLE if c in ids]
    result["senses"] = {word: lemmas.get(word) for word in SENSES}
    judged = [JUDGED["judgements"].get(concept_id) for concept_id, _definition in result["sample"]]
    result["sample_picturable"] = sum(j is True for j in judged)
    result["sample_judged"] = sum(j is not None for j in judged)
    result["sample_unjudged"] = [item for item, j in zip(result["sample"], judged) if j is None]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="/work/main", help="checkout whose concept stage is the baseline")
    parser.add_argument("--max-concepts", type=int, default=15000)
    args = parser.parse_args()
    results = {"this": run_tree(ROOT, args.max_concepts), "baseline": run_tree(Path(args.baseline), args.max_concepts)}
    for name, r in results.items():
        print(f"== {name} ({r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU in one process)")
        print(f"  everyday picturable present: {len(r['everyday_present'])}/{len(EVERYDAY)} "
              f"(missing: {sorted(set(EVERYDAY) - set(r['everyday_present']))})")
        print(f"  unpicturable present: {len(r['unpicturable_present'])}/{len(UNPICTURABLE)} {r['unpicturable_present']}")
        print(f"  senses: {r['senses']} (want among them {SENSES})")
        print(f"  polarity audit list right: {r['audit_right']}/{r['audit_total']}")
    for name, r in results.items():
        if r["sample_unjudged"]:
            print(f"\n{name}: sample concepts not in bench/concept_sample_judgements.json (judge and add them):")
            for concept_id, definition in r["sample_unjudged"]:
                print(f"  {concept_id:32} {definition[:80]}")
    write_result("concept_quality", {"max_concepts": args.max_concepts, "baseline": args.baseline, **results})
    for name, r in results.items():
        every, unpict = len(r["everyday_present"]), len(r["unpicturable_present"])
        print(f"{name}: random sample picturable {r['sample_picturable']}/{r['sample_judged']} judged "
              f"(seed {JUDGED['seed']}); everyday present {every}/{len(EVERYDAY)} = {every / len(EVERYDAY):.2f}; "
              f"unpicturable present {unpict}/{len(UNPICTURABLE)} = {unpict / len(UNPICTURABLE):.2f}")

if __name__ == "__main__":
    main()
