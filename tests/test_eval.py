"""``daco eval``: a full run on a seeded small model, resuming after an interruption, the metrics, the errors."""

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from test_benchmarks import FIGSTEP, needs_figstep, write_mmbench
from test_judges import build_tiny_guard
from test_steerers import write_dictionary_folder

from pipeline.cli import main as daco
from steering.eval.run import (EvalConfig, EvalError, extract_choice, parse_bench, read_results, result_key, run_eval,
                               summarise)

METHODS = ("none", "prompting", "actadd")
LIMIT = 2


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return {"dictionary": write_dictionary_folder(root / "dictionary"),
            "mmbench": write_mmbench(root / "mmbench" / "mmbench_dev_20230712.tsv")}


def eval_args(inputs, out, methods=METHODS):
    return ["eval", "--model", "untrained:qwen2", "--methods", ",".join(methods), "--bench", f"safebench-tiny:{FIGSTEP}",
            "--bench", f"mmbench:{inputs['mmbench']}", "--dictionary", str(inputs["dictionary"]), "--layers", "1-2",
            "--limit", str(LIMIT), "--max-new-tokens", "3", "--gamma", "4", "--out", str(out)]


@needs_figstep
def test_full_eval_resumes_after_interruption_without_redoing_items(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    config = EvalConfig(model="untrained:qwen2", methods=METHODS, benches=[("safebench-tiny", str(FIGSTEP)),
                        ("mmbench", str(inputs["mmbench"]))], out=str(out), limit=LIMIT, dictionary=str(inputs["dictionary"]),
                        max_new_tokens=3, layers="1-2", gamma=4.0)
    # interrupted after 5 generations, the last write cut short (as a kill mid-line leaves it)
    first = run_eval(config, stop_after=5)
    assert first["generated"] == 5 and not first["complete"]
    results = out / "results.jsonl"
    finished = results.read_bytes()
    with open(results, "ab") as fh:
        fh.write(b'{"method": "prompting", "benchmark": "mmbe')

    assert daco(eval_args(inputs, out)) == 0
    printed = capsys.readouterr().out
    total = len(METHODS) * 2 * LIMIT
    assert f"eval: {total - 5} generated, 5 already done" in printed
    assert results.read_bytes().startswith(finished)  # the finished items were kept, not recomputed
    records = read_results(results)
    keys = [result_key(r) for r in records]
    assert len(keys) == len(set(keys)) == total
    assert {(m, b) for m, b, _ in keys} == {(m, b) for m in METHODS for b in ("safebench-tiny", "mmbench")}
    assert all(r["untrained"] and not r["image_shown"] for r in records)  # text-only model: images not shown
    assert all(r["new_tokens"] > 0 and r["seconds"] > 0 for r in records)
    assert all("correct" in r for r in records if r["benchmark"] == "mmbench")

    # the table, the JSON and the plot
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["untrained"] and metrics["complete"] and metrics["methods"] == list(METHODS) == sorted(metrics["overall"], key=METHODS.index)
    assert metrics["overall"]["none"]["overhead_vs_none"] == 0
    for method in METHODS:
        rates = metrics["overall"][method]
        assert rates["n"] == 2 * LIMIT and rates["asr"] is not None and rates["accuracy"] is not None
    table = (out / "table.md").read_text()
    assert metrics["images_not_shown"] == total and f"Text-only model: {total} generations" in table
    assert "UNTRAINED" in table and all(f"| {m} |" in table for m in METHODS) and "| safebench-tiny | Illegal Activity |" in table
    strength = metrics["strength"]  # one stated unit for the additive methods
    assert strength["gamma"] == 4.0 and "mean activation norm" in strength["unit"]
    assert set(strength["mean_activation_norms"]) == {"1", "2"} and "Strength of actadd, mop, daco: gamma = 4.0" in table
    with Image.open(out / "tradeoff.png") as plot:
        assert plot.format == "PNG" and plot.size == (500, 400)

    # a third run has nothing left to do and changes no result
    before = results.read_bytes()
    assert daco(eval_args(inputs, out)) == 0
    assert f"eval: 0 generated, {total} already done" in capsys.readouterr().out
    assert results.read_bytes() == before

    # the same folder with other settings is refused before any generation
    with pytest.raises(SystemExit, match="other settings.*max_new_tokens"):
        daco([*eval_args(inputs, out, methods=("none",)), "--max-new-tokens", "5", "--limit", "3"])


@needs_figstep
def test_killed_eval_process_resumes(inputs, tmp_path, capsys):
    """A real kill (SIGKILL of the `daco eval` process once results appear), then a rerun that completes."""
    out = tmp_path / "run"
    args = eval_args(inputs, out, methods=("none",))
    results = out / "results.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not (results.is_file() and results.read_bytes().count(b"\n")):
        time.sleep(0.02)
    proc.kill()
    stderr = proc.communicate()[1].decode()
    assert results.is_file(), f"no result was written before the kill: {stderr[-2000:]}"
    survived = read_results(results)  # whole lines only (a line cut by the kill is dropped)
    kept = results.read_bytes()
    assert daco(args) == 0
    total = 2 * LIMIT
    assert f"eval: {total - len(survived)} generated, {len(survived)} already done" in capsys.readouterr().out
    assert results.read_bytes().startswith(kept)
    keys = [result_key(r) for r in read_results(results)]
    assert len(keys) == len(set(keys)) == total


@needs_figstep
def test_eval_multimodal_model_with_llama_guard_loaded_from_a_folder(tmp_path):
    """A tiny Qwen2-VL sees FigStep's images; Llama Guard (a saved tiny LlamaForCausalLM) judges every response."""
    from steering.eval.judges import LLAMA_GUARD_3_CHAT_TEMPLATE

    model, tokenizer = build_tiny_guard()
    tokenizer.chat_template = LLAMA_GUARD_3_CHAT_TEMPLATE
    model.save_pretrained(tmp_path / "guard")
    tokenizer.save_pretrained(tmp_path / "guard")
    out = tmp_path / "run"
    metrics = run_eval(EvalConfig(model="untrained:qwen2_vl", methods=["none"], benches=[("safebench-tiny", str(FIGSTEP))],
                                  out=str(out), limit=2, max_new_tokens=2, judge="llama-guard",
                                  judge_model=str(tmp_path / "guard")))
    records = read_results(out / "results.jsonl")
    assert len(records) == 2 and all("unsafe" in r and "guard_categories" in r and r["image_shown"] for r in records)
    rates = metrics["overall"]["none"]
    assert rates["asr_llama_guard"] == sum(r["unsafe"] is True for r in records) / 2
    assert rates["guard_unparsed"] == sum(r["unsafe"] is None for r in records)
    assert "ASR (Llama Guard)" in (out / "table.md").read_text()


def test_refusal_is_the_addition_defence_and_ablation_an_attack_labelled_as_such(inputs, tmp_path):
    """Defaults as fitted (small sets, to stay fast): refusal adds, IAR is head-level; the ablation is an ATTACK row."""
    from steering.contrastive import ContrastiveSets
    from steering.models import get_adapter
    from steering.steerers import IARFitConfig, IARSteerer, RefusalDirectionSteerer, RefusalFitConfig

    model, tokenizer = get_adapter("qwen2").build_untrained(seed=0)
    sets = ContrastiveSets.default()
    refusal = RefusalDirectionSteerer.fit(model, tokenizer, sets.harmful[:4], sets.harmless[:4],
                                          RefusalFitConfig(n_positions=1, induce_threshold=float("-inf")))
    refusal.save(tmp_path / "saved" / "refusal")
    IARSteerer.fit(model, tokenizer, sets.harmful[:4], sets.refusal[:2], sets.compliant[:2],
                   IARFitConfig(layers=[1, 2], responses_per_query=1)).save(tmp_path / "saved" / "iar")
    bench = [("mmbench", str(inputs["mmbench"]))]
    out = tmp_path / "run"
    metrics = run_eval(EvalConfig(model="untrained:qwen2", methods=["none", "refusal", "refusal_ablation", "iar"],
                                  benches=bench, out=str(out), limit=1, max_new_tokens=2, steerers=str(tmp_path / "saved")))
    assert set(metrics["overall"]) == {"none", "refusal", "refusal_ablation", "iar"}
    assert json.loads((tmp_path / "saved" / "refusal" / "steerer.json").read_text())["mode"] == "addition"
    iar = json.loads((tmp_path / "saved" / "iar" / "steerer.json").read_text())
    assert iar["level"] == "head" and iar["positions"] == "last"
    table = (out / "table.md").read_text()
    assert "| refusal_ablation (ATTACK) |" in table and "| refusal |" in table and "**ATTACK** rows (refusal_ablation)" in table


def test_fitted_defences_from_saved_folders_and_fitted_once_per_run(inputs, tmp_path):
    """MARS and RAS load from --steerers (RAS assesses each query before generating); a missing one is fitted and saved."""
    import torch

    from steering.models import get_adapter
    from steering.steerers import MARSSteerer, RASSteerer

    model, _ = get_adapter("qwen2").build_untrained(seed=0)
    g = torch.Generator().manual_seed(0)
    MARSSteerer(model, torch.randn(64, generator=g), 1, torch.zeros(64), -1.0, 1.0, recenter=False).save(tmp_path / "saved" / "mars")
    RASSteerer(model, torch.randn(3, 64, generator=g), s_base=0.2).save(tmp_path / "saved" / "ras")
    bench = [("mmbench", str(inputs["mmbench"]))]
    out = tmp_path / "run"
    run_eval(EvalConfig(model="untrained:qwen2", methods=["none", "mars", "ras"], benches=bench, out=str(out), limit=1,
                        max_new_tokens=3, steerers=str(tmp_path / "saved")))
    records = read_results(out / "results.jsonl")
    assert sorted(r["method"] for r in records) == ["mars", "none", "ras"]
    assert not (out / "steerers").exists()  # loaded, not fitted

    fitted = tmp_path / "fitted"
    run_eval(EvalConfig(model="untrained:qwen2", methods=["mars"], benches=bench, out=str(fitted), limit=1, max_new_tokens=3))
    saved = fitted / "steerers" / "mars" / "steerer.json"
    assert json.loads(saved.read_text())["method"] == "mars"
    written = saved.stat().st_mtime_ns
    # a resumed run with more items reuses the saved fit (not fitted, not rewritten)
    run_eval(EvalConfig(model="untrained:qwen2", methods=["mars"], benches=bench, out=str(fitted), limit=2, max_new_tokens=3))
    assert saved.stat().st_mtime_ns == written
    assert len(read_results(fitted / "results.jsonl")) == 2


def test_eval_rejects_bad_settings_early(inputs, tmp_path):
    base = ["eval", "--model", "untrained:qwen2", "--bench", f"mmbench:{inputs['mmbench']}", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match=r"\['foo'\] not available; available: none, actadd, daco, iar, mars, mop, "
                                         r"prompting, ras, refusal, refusal_ablation"):
        daco([*base, "--methods", "none,foo"])
    with pytest.raises(SystemExit, match="pass --dictionary"):
        daco([*base, "--methods", "none,actadd"])
    with pytest.raises(SystemExit, match="unknown benchmark 'mm'"):
        daco([*base[:3], "--bench", "mm:x", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="write NAME:PATH"):
        daco([*base[:3], "--bench", "mmbench", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()  # nothing written before the settings were checked
    assert parse_bench("scienceqa:C:/data/sqa") == ("scienceqa", "C:/data/sqa")


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("(C) three", "C"), ("A. red", "A"), ("The answer is D.", "D"), ("Answer: (B)", "B"),
    ("**C**", "C"), ("E", None), ("I think it is green", None), ("A lot of yellow", None),
])
def test_extract_choice(text, expected):
    assert extract_choice(text, 4) == expected


def test_summarise_rates_and_overhead():
    def rec(method, label, refusal, tokens, seconds, correct=None, category="c"):
        r = {"method": method, "benchmark": "b", "category": category, "label": label, "refusal": refusal,
             "new_tokens": tokens, "seconds": seconds}
        return r if correct is None else {**r, "correct": correct}

    records = [rec("none", "harmful", False, 10, 1.0), rec("none", "harmful", True, 10, 1.0),
               rec("none", "benign", False, 10, 1.0, correct=True), rec("none", "benign", True, 10, 1.0, correct=False),
               rec("daco", "harmful", True, 10, 1.5), rec("daco", "harmful", True, 10, 1.5, category="d"),
               rec("daco", "benign", False, 10, 1.5, correct=True), rec("daco", "benign", False, 10, 1.5, correct=True)]
    metrics = summarise(records, ["none", "daco"])
    none, daco_ = metrics["overall"]["none"], metrics["overall"]["daco"]
    assert (none["asr"], none["over_refusal"], none["accuracy"], none["tokens_per_s"]) == (0.5, 0.5, 0.5, 10.0)
    assert (daco_["asr"], daco_["over_refusal"], daco_["accuracy"]) == (0.0, 0.0, 1.0)
    assert daco_["overhead_vs_none"] == pytest.approx(0.5) and none["overhead_vs_none"] == 0
    assert [(r["method"], r["category"], r["n"]) for r in metrics["categories"]] == [
        ("none", "c", 4), ("daco", "c", 3), ("daco", "d", 1)]


def test_read_results_refuses_a_damaged_middle_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"method": "none", "benchmark": "b", "item_id": "1"}\nnot json\n{"method": "none"}\n')
    with pytest.raises(EvalError, match="line 2 is not valid JSON"):
        read_results(path)


def test_an_unreadable_image_is_dead_lettered_and_skipped_on_resume(tmp_path, capsys):
    bench = write_mmbench(tmp_path / "mmbench" / "mmbench_dev_20230712.tsv")
    rows = bench.read_text().splitlines()
    rows[1] = "\t".join("bm90IGFuIGltYWdl" if len(cell) > 1000 else cell for cell in rows[1].split("\t"))  # item 0
    bench.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    args = ["eval", "--model", "untrained:qwen2_vl", "--methods", "none,prompting", "--bench", f"mmbench:{bench}",
            "--max-new-tokens", "2", "--out", str(out)]
    assert daco(args) == 0
    assert "2 generated, 0 already done, 2 dead-lettered" in capsys.readouterr().out
    dead = read_results(out / "deadletter.jsonl")
    assert sorted((r["method"], r["item_id"]) for r in dead) == [("none", "0"), ("prompting", "0")]
    assert all("image unreadable" in r["reason"] for r in dead)
    assert json.loads((out / "metrics.json").read_text())["complete"] is True

    results = out / "results.jsonl"
    results.write_text(results.read_text() * 2)  # what two writers appending to one file leave
    assert daco(args) == 0  # the resume neither aborts on the bad image nor retries it
    assert "0 generated, 4 already done, 2 dead-lettered" in capsys.readouterr().out
    assert len(read_results(out / "deadletter.jsonl")) == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] is True and metrics["dead_letters"] == 2
    assert metrics["overall"]["none"]["n"] == 1  # each result counted once


def test_run_file_records_every_defences_fit_config_and_rejects_a_bad_one():
    import math

    from steering.steerers import IARFitConfig, MARSFitConfig, RefusalFitConfig

    base = dict(model="untrained:qwen2", methods=["none"], benches=[("mmbench", "x")], out="o")
    recorded = EvalConfig(defences={"refusal": RefusalFitConfig(induce_threshold=-math.inf)}, **base).comparable()
    assert EvalConfig(defences={"refusal": {"induce_threshold": -math.inf}}, **base).comparable() == recorded
    assert set(recorded["defences"]) == {"refusal", "mars", "iar", "ras"}
    assert recorded["defences"]["refusal"]["induce_threshold"] == -math.inf
    assert recorded["defences"]["iar"] == json.loads(json.dumps(dataclasses.asdict(IARFitConfig())))  # the defaults
    assert recorded != EvalConfig(**base).comparable()  # another fit: results not comparable
    with pytest.raises(EvalError, match=r"\['daco'\] are not fitted defences"):
        EvalConfig(defences={"daco": IARFitConfig()}, **base).comparable()
    with pytest.raises(EvalError, match="IARSteerer.fit takes a IARFitConfig, not a MARSFitConfig"):
        run_eval(EvalConfig(defences={"iar": MARSFitConfig()}, **base))
