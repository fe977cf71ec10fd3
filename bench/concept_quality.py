"""Concept list quality (issue 15): the 15,000-concept list of this tree against a baseline
tree (default /work/main, or any checkout given with --baseline), on the checks the issue names.

Figures, each for both trees: how many of the listed everyday picturable synsets and of the
listed unpicturable ones are in the list, which sense wins hammer / cake / castle / fire,
how many labels of the polarity audit list (tests/test_polarity.py) are right, and a seeded
random sample of 40 kept concepts (id, definition) to judge by hand. Writes
bench/results/concept_quality.json; prints the everyday coverage of both trees last.

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

EVERYDAY = ["giraffe.n.01", "butterfly.n.01", "hamburger.n.01", "motorcycle.n.01", "scissors.n.01",
            "fire_engine.n.01", "fire_extinguisher.n.01", "life_jacket.n.01", "fire.n.01", "explosion.n.01",
            "sport.n.01", "sun.n.01", "moon.n.01"]
UNPICTURABLE = ["enzyme.n.01", "amino_acid.n.01", "avower.n.01", "newcomer.n.01", "asserter.n.01",
                "mitochondrion.n.01", "ribosome.n.01", "organelle.n.01"]
SENSES = {"hammer": "hammer.n.02", "cake": "cake.n.03", "castle": "not castle.n.03", "fire": "fire.n.01"}

CHILD = """
import json, random, sys, time, warnings; warnings.filterwarnings("ignore")
from transforms.concepts import ConceptsConfig, select_concepts_direct
from transforms.polarity import load_lexicon, polarity_table
from transforms.wordnet import load_wordnet
start = time.perf_counter()
rows, _ = select_concepts_direct(ConceptsConfig(max_concepts={n}))
wall = time.perf_counter() - start
rows = [r for r in rows if not r.get("reserve")]
wn = load_wordnet(None)
labels = polarity_table(wn, load_lexicon(None))
audit = json.loads(sys.argv[1])
right = sum(labels.get(wn.synset(k).name(), ("neutral", ""))[0] == v for k, v in audit.items())
sample = random.Random(0).sample(rows, 40)
print("RESULT=" + json.dumps({{"ids": [r["concept_id"] for r in rows], "lemmas": {{r["lemma"]: r["concept_id"]
      for r in rows}}, "audit_right": right, "audit_total": len(audit), "wall_s": wall,
      "sample": [[r["concept_id"], r["definition"]] for r in sample]}}))
"""


def run_tree(tree: Path, n: int) -> dict:
    """The checks for the code in ``tree`` (a fresh interpreter with that tree first on the path)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_polarity import AUDIT

    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-c", CHILD.format(n=n), json.dumps(AUDIT)], cwd=tree, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{tree}: {proc.stderr[-3000:]}")
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT="))[7:])
    ids = set(result.pop("ids"))
    lemmas = result.pop("lemmas")
    result["everyday_present"] = [c for c in EVERYDAY if c in ids]
    result["unpicturable_present"] = [c for c in UNPICTURABLE if c in ids]
    result["senses"] = {word: lemmas.get(word) for word in SENSES}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="/work/main", help="checkout whose concept stage is the baseline")
    parser.add_argument("--max-concepts", type=int, default=15000)
    args = parser.parse_args()
    results = {"this": run_tree(ROOT, args.max_concepts), "baseline": run_tree(Path(args.baseline), args.max_concepts)}
    for name, r in results.items():
        print(f"== {name} ({r['wall_s']:.0f} s in one process)")
        print(f"  everyday picturable present: {len(r['everyday_present'])}/{len(EVERYDAY)} "
              f"(missing: {sorted(set(EVERYDAY) - set(r['everyday_present']))})")
        print(f"  unpicturable present: {len(r['unpicturable_present'])}/{len(UNPICTURABLE)} {r['unpicturable_present']}")
        print(f"  senses: {r['senses']} (want {SENSES})")
        print(f"  polarity audit list right: {r['audit_right']}/{r['audit_total']}")
    print("\nrandom sample of this tree's list (judge by hand):")
    for concept_id, definition in results["this"]["sample"]:
        print(f"  {concept_id:32} {definition[:80]}")
    write_result("concept_quality", {"max_concepts": args.max_concepts, "baseline": args.baseline, **results})
    new, old = (len(results[k]["everyday_present"]) for k in ("this", "baseline"))
    print(f"everyday picturable synsets present: this tree {new}/{len(EVERYDAY)} = {new / len(EVERYDAY):.2f}, "
          f"baseline {old}/{len(EVERYDAY)} = {old / len(EVERYDAY):.2f}")


if __name__ == "__main__":
    main()
