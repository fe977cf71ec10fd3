"""Steerers (steering/steerers/): planted concept removal, the DACO fast path, and hooks on a real model.

Planted data: concept directions D (orthonormal, or correlated through a shared
component), activations ``Z = C D`` with known sparse non-negative C. Coefficients
after steering are measured by least squares on D, so what each method removes and
what else it moves is read off exactly.
"""

from __future__ import annotations

import pytest
import torch

from steering.dictionary import unit_rows
from steering.models import get_adapter
from steering.sae import SAE
from steering.steerers import (STEERERS, ActAddSteerer, DacoSteerer, MOPSteerer, PromptingSteerer, get_steerer,
                               parse_layers, record_activations)

N_CONCEPTS, D_MODEL, ACTIVE = 48, 96, 4
UNDESIRABLE = list(range(6))
DESIRABLE = [6, 7]


def planted(kind: str, n_tokens: int = 512, seed: int = 0):
    """(D [n, d] unit rows, C [tokens, n] sparse non-negative, Z = C D); half the tokens carry an undesirable concept."""
    g = torch.Generator().manual_seed(seed)
    if kind == "orthonormal":
        D = torch.linalg.qr(torch.randn(D_MODEL, N_CONCEPTS, generator=g))[0].T.contiguous()
    else:  # every pair shares a common direction: cosine similarity about 0.5
        D = unit_rows(unit_rows(torch.randn(N_CONCEPTS, D_MODEL, generator=g)) + unit_rows(torch.randn(1, D_MODEL, generator=g)))
    C = torch.zeros(n_tokens, N_CONCEPTS)
    for t in range(n_tokens):
        pool = torch.arange(N_CONCEPTS) if t % 2 else torch.arange(len(UNDESIRABLE), N_CONCEPTS)
        chosen = pool[torch.randperm(len(pool), generator=g)[:ACTIVE]]
        C[t, chosen] = 1.0 + 2.0 * torch.rand(ACTIVE, generator=g)
    return D, C, C @ D


def measured(D: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """Least-squares coefficients of Z on D's rows."""
    return torch.linalg.lstsq(D.T.double(), Z.T.double()).solution.T.float()


def planted_sae(D: torch.Tensor, activation: str = "topk") -> SAE:
    """A dictionary-initialised SAE whose encoder is D's dual basis (what training reaches on noiseless planted data)."""
    sae = SAE.from_dictionary(D, k=ACTIVE, activation=activation)
    with torch.no_grad():
        sae.W_enc.copy_(torch.linalg.pinv(D))
    return sae


def movement(C0, C1, concepts):
    """Summed |change| of the given concepts' coefficients relative to their summed |value| before."""
    return ((C1[:, concepts] - C0[:, concepts]).abs().sum() / C0[:, concepts].abs().sum()).item()


@pytest.mark.parametrize("kind", ["orthonormal", "correlated"])
def test_planted_daco_removes_undesirable_and_leaves_the_rest(kind):
    D, C, Z = planted(kind)
    C0 = measured(D, Z)
    assert torch.allclose(C0, C, atol=1e-4)
    off_target = [i for i in range(N_CONCEPTS) if i not in UNDESIRABLE]
    neutral = [i for i in off_target if i not in DESIRABLE]

    daco = DacoSteerer(None, {0: planted_sae(D)}, UNDESIRABLE, DESIRABLE, gamma=0.0)
    C_daco = measured(D, Z + daco.delta(0, Z))
    daco_removed = 1 - C_daco[:, UNDESIRABLE].abs().sum().item() / C0[:, UNDESIRABLE].abs().sum().item()
    daco_off = movement(C0, C_daco, off_target)

    # ActAdd at the coefficient that removes an average undesirable concept
    c = C[:, UNDESIRABLE][C[:, UNDESIRABLE] > 0].mean().item()
    actadd = ActAddSteerer.from_directions(None, {0: D}, UNDESIRABLE, DESIRABLE, coefficient=c)
    C_act = measured(D, Z + actadd.delta(0, Z))
    carrying = C[:, UNDESIRABLE].sum(1) > 0
    present = C[:, UNDESIRABLE] > 0
    act_removed = 1 - (C_act[:, UNDESIRABLE][present].abs().sum() / C0[:, UNDESIRABLE][present].abs().sum()).item()

    print(f"\n[{kind}] DACO: removed {daco_removed:.4f} of the undesirable coefficients, off-target moved {daco_off:.4f}; "
          f"ActAdd (c={c:.2f}): removed {act_removed:.4f} where an undesirable concept is present, "
          f"pushed it to -{c:.2f} where absent; off-target moved {movement(C0, C_act, off_target):.4f} "
          f"(neutral {movement(C0, C_act, neutral):.4f}, desirable +{c:.2f} each)")
    assert daco_removed >= 0.95
    assert daco_off <= 0.05
    # ActAdd moves every token's coefficients by the same constant c (e_K+ - e_K-), whatever the token holds:
    shift = torch.zeros(N_CONCEPTS)
    shift[DESIRABLE], shift[UNDESIRABLE] = c, -c
    assert torch.allclose(C_act - C0, shift.expand_as(C0), atol=1e-3)
    # so on tokens that never held an undesirable concept it pushes them to -c, where DACO leaves them at 0
    clean = ~carrying
    assert torch.allclose(C_act[clean][:, UNDESIRABLE], torch.full_like(C_act[clean][:, UNDESIRABLE], -c), atol=1e-3)
    assert C_daco[clean][:, UNDESIRABLE].abs().max() < 1e-4


def test_planted_daco_adds_gamma_of_each_desirable_atom():
    D, C, Z = planted("correlated")
    gamma = 1.5
    daco = DacoSteerer(None, {0: planted_sae(D)}, UNDESIRABLE, DESIRABLE, gamma=gamma)
    moved = measured(D, Z + daco.delta(0, Z)) - measured(D, Z)
    assert torch.allclose(moved[:, DESIRABLE], torch.full_like(moved[:, DESIRABLE], gamma), atol=1e-3)
    neutral = [i for i in range(N_CONCEPTS) if i not in UNDESIRABLE + DESIRABLE]
    assert moved[:, neutral].abs().max() < 1e-3


def test_planted_mop_removes_undesirable():
    D, C, Z = planted("correlated", n_tokens=128)
    C0 = measured(D, Z)
    mop = MOPSteerer(None, {0: D}, UNDESIRABLE, solver="elastic_net", alpha=1e-3)
    C1 = measured(D, Z + mop.delta(0, Z))
    removed = 1 - C1[:, UNDESIRABLE].abs().sum().item() / C0[:, UNDESIRABLE].abs().sum().item()
    off = movement(C0, C1, list(range(len(UNDESIRABLE), N_CONCEPTS)))
    print(f"\nMOP (elastic net, alpha 1e-3): removed {removed:.4f}, off-target moved {off:.4f}")
    assert removed >= 0.95 and off <= 0.05


def relu_sae(seed: int = 0) -> SAE:
    g = torch.Generator().manual_seed(seed)
    sae = SAE.from_dictionary(torch.randn(200, 64, generator=g), k=16, n_extra=56, activation="relu")
    with torch.no_grad():
        sae.W_enc.add_(0.05 * torch.randn(sae.W_enc.shape, generator=g))
        sae.b_enc.copy_(-0.5 * torch.rand(sae.b_enc.shape, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(sae.b_dec.shape, generator=g))
    return sae


def test_daco_relu_slice_equals_the_full_encode():
    """A ReLU SAE's undesirable codes from a W_enc slice are exact, so even the default exact mode uses the slice."""
    sae = relu_sae()
    z = torch.randn(3, 40, 64, generator=torch.Generator().manual_seed(1))
    neg, pos = list(range(0, 256, 9)), [3, 100, 250]
    steerer = DacoSteerer(None, {0: sae}, neg, pos, gamma=0.7)
    assert steerer.mode == "exact" and steerer.uses_fast_path(0)
    codes = steerer.undesirable_codes(0, z)
    full = steerer._exact_codes(0, z)
    assert (codes > 0).any() and (codes == 0).any()  # some atoms fire, some do not
    assert torch.equal(codes > 0, full > 0)
    assert torch.allclose(codes, full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(steerer.delta(0, z), dense_delta(steerer, 0, z), rtol=1e-5, atol=1e-5)


def dense_delta(steerer: DacoSteerer, layer: int, z: torch.Tensor) -> torch.Tensor:
    """docs/methods.md §3 written out densely: c_hat over every atom (-c* on K-, gamma on K+), then c_hat @ W_dec."""
    sae = steerer.saes[layer]
    codes = sae.encode(z)
    c_hat = torch.zeros_like(codes)
    c_hat[..., steerer.undesirable[layer]] = -codes[..., steerer.undesirable[layer]]
    c_hat[..., steerer.desirable[layer]] = steerer.gamma[layer]
    return c_hat @ sae.W_dec


def test_daco_exact_topk_delta_equals_the_dense_formula():
    """The default exact mode decodes only the firing undesirable atoms: the same delta as the dense formula."""
    D, C, Z = planted("correlated", n_tokens=256)
    steerer = DacoSteerer(None, {0: planted_sae(D)}, UNDESIRABLE, DESIRABLE, gamma=0.5)
    z = Z.reshape(4, 64, -1)
    torch.testing.assert_close(steerer.delta(0, z), dense_delta(steerer, 0, z), rtol=1e-5, atol=1e-5)


def test_daco_topk_calibration_reports_agreement():
    D, C, Z = planted("correlated", n_tokens=2048)
    Z = Z + 0.1 * torch.randn(Z.shape, generator=torch.Generator().manual_seed(5))
    sae = planted_sae(D)
    steerer = DacoSteerer(None, {0: sae}, UNDESIRABLE, DESIRABLE, gamma=0.5, mode="fast")
    with pytest.raises(RuntimeError, match="calibrate"):
        steerer.delta(0, Z[:4])
    default = DacoSteerer(None, {0: sae}, UNDESIRABLE, DESIRABLE)
    default.calibrate(Z, holdout=0.25)
    assert default.mode == "exact" and not default.uses_fast_path(0)  # calibrated or not, the default stays exact
    report = steerer.calibrate(Z, holdout=0.25)[0]
    print(f"\nTopK -> JumpReLU calibration (noisy planted data, held out): {report}")
    assert report.n_fit == 1536 and report.n_eval == 512
    assert report.agreement >= 0.99 and report.recall >= 0.95 and report.precision >= 0.95
    exact = DacoSteerer(None, {0: sae}, UNDESIRABLE, DESIRABLE, gamma=0.5, mode="exact")
    agree = (steerer.undesirable_codes(0, Z) - exact.undesirable_codes(0, Z)).abs().amax(-1) < 1e-5
    assert agree.float().mean() >= 0.98
    torch.testing.assert_close(steerer.delta(0, Z[agree]), exact.delta(0, Z[agree]), rtol=1e-4, atol=1e-4)
    note = steerer.agreement_note()  # printed on entering a fast steerer
    assert "APPROXIMATION" in note and f"tokens fully agreeing {report.token_agreement:.3f}" in note


def test_daco_calibration_report_is_truthful_when_topk_is_far_from_a_threshold():
    D, C, Z = planted("correlated", n_tokens=1024)
    sae = SAE.from_dictionary(D, k=ACTIVE)  # encoder = D^T: correlated atoms compete inside the TopK
    steerer = DacoSteerer(None, {0: sae}, UNDESIRABLE, [], mode="fast")
    report = steerer.calibrate(Z, holdout=0.0)[0]
    print(f"\nTopK -> JumpReLU calibration (TopK far from a threshold): {report}")
    calibrated = steerer.undesirable_codes(0, Z)
    exact = DacoSteerer(None, {0: sae}, UNDESIRABLE, [], mode="exact").undesirable_codes(0, Z)
    same = ((calibrated != 0) == (exact != 0)) & torch.isclose(calibrated, exact, rtol=1e-5, atol=1e-6)
    assert report.agreement == pytest.approx(same.float().mean().item())
    assert report.token_agreement == pytest.approx(same.all(-1).float().mean().item())
    assert report.recall == pytest.approx(((calibrated != 0) & (exact != 0)).sum().item() / (exact != 0).sum().item())
    assert report.token_agreement < 0.95  # the report does show the poor fit


def test_calibrated_thresholds_recover_a_jumprelu_exactly():
    from steering.steerers.daco import fit_thresholds

    pre = torch.randn(1000, 7, generator=torch.Generator().manual_seed(0))
    theta = torch.linspace(0.0, 1.5, 7)
    fitted = fit_thresholds(pre, pre > theta)
    assert torch.equal(pre > fitted, pre > theta)


def test_index_and_layer_errors(tiny):
    model, _ = tiny
    sae = relu_sae()
    with pytest.raises(ValueError, match="outside 0..255"):
        DacoSteerer(None, {0: sae}, [256], [])
    with pytest.raises(ValueError, match="both undesirable and desirable"):
        DacoSteerer(None, {0: sae}, [1, 2], [2])
    with pytest.raises(ValueError, match="no entry for layer 1"):
        DacoSteerer(None, {0: sae, 1: sae}, {0: [1]}, [])
    with pytest.raises(ValueError, match="valid layers are 0..3"):
        ActAddSteerer(model, {layer: torch.zeros(64) for layer in parse_layers(None)})  # default 15-19, model has 4
    assert parse_layers("15-19") == (15, 16, 17, 18, 19) and parse_layers("3,5,8-9") == (3, 5, 8, 9)
    with pytest.raises(ValueError, match="15-19"):
        parse_layers("19-15")
    assert {"daco", "mop", "actadd", "prompting"} <= set(STEERERS) and get_steerer("mop") is MOPSteerer
    with pytest.raises(ValueError, match="unknown steering method 'dacoo'"):
        get_steerer("dacoo")


# ------------------------------------------------------------------ on a seeded Hugging Face model

LAYERS = (1, 2)
PROMPTS = ["a dog on the beach", "a red car in the city street at night with many people"]


@pytest.fixture(scope="module")
def tiny():
    """A seeded 4-layer Qwen2ForCausalLM (hidden 64, untrained) and its offline tokenizer (left padding)."""
    return get_adapter("qwen2").build_untrained(seed=0)


@pytest.fixture(scope="module")
def tiny_saes(tiny):
    g = torch.Generator().manual_seed(3)
    return {layer: SAE.from_dictionary(torch.randn(96, 64, generator=g), k=8) for layer in LAYERS}


def batch(tokenizer, prompts):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    return tokenizer(texts, return_tensors="pt", padding=True)


def generate(model, inputs, use_cache=True, new=8):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=use_cache)


def test_steering_changes_generation_and_empty_sets_change_nothing(tiny, tiny_saes):
    model, tokenizer = tiny
    inputs = batch(tokenizer, PROMPTS)
    assert inputs["attention_mask"][0, 0] == 0  # the batch is really padded (left)
    plain = generate(model, inputs)
    with DacoSteerer(model, tiny_saes, list(range(10)), list(range(10, 16)), gamma=4.0):
        steered = generate(model, inputs)
    assert not torch.equal(steered, plain)
    with DacoSteerer(model, tiny_saes, [], [], gamma=4.0) as empty:
        unchanged = generate(model, inputs)
    assert torch.equal(unchanged, plain)
    assert all(count > 0 for count in empty.tokens_steered.values())  # the hooks did run
    with MOPSteerer(model, {layer: sae.W_dec for layer, sae in tiny_saes.items()}, [], [], max_iter=10):
        assert torch.equal(generate(model, inputs, new=3), plain[:, : plain.shape[1] - 5])


def test_mop_on_a_bf16_model_solves_in_float32_and_matches_the_fp32_delta(tiny_saes):
    """A bf16 solve is off by about a third; the float32 solve's delta, cast to bf16, matches fp32's."""
    model, tokenizer = get_adapter("qwen2").build_untrained(seed=0)
    model = model.to(torch.bfloat16)
    dictionary = {layer: sae.W_dec for layer, sae in tiny_saes.items()}
    reference = MOPSteerer(None, dictionary, list(range(10)), list(range(10, 16)), gamma=0.5, alpha=0.01, max_iter=300)
    with MOPSteerer(model, dictionary, list(range(10)), list(range(10, 16)), gamma=0.5, alpha=0.01, max_iter=300) as mop:
        z = torch.randn(7, 64, generator=torch.Generator().manual_seed(0)).mul(3).to(torch.bfloat16)
        delta = mop.delta(LAYERS[0], z)
        assert all(d.dtype == torch.float32 for d in mop.dictionary.values())
        with torch.no_grad():
            logits = model(**batch(tokenizer, PROMPTS[:1])).logits  # the hook steers a bf16 forward pass
    assert delta.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    exact = reference.delta(LAYERS[0], z.float())
    error = ((delta.float() - exact).norm() / exact.norm()).item()
    naive = MOPSteerer(None, {LAYERS[0]: dictionary[LAYERS[0]].to(torch.bfloat16).float()}, list(range(10)),
                       list(range(10, 16)), gamma=0.5, alpha=0.01, max_iter=300)
    naive.dictionary = {LAYERS[0]: naive.dictionary[LAYERS[0]].to(torch.bfloat16)}  # what a bf16 solve did before
    bf16_error = ((naive.delta(LAYERS[0], z).float() - exact).norm() / exact.norm()).item()
    print(f"\nMOP delta on bf16 activations vs fp32: relative error {error:.4f} (a bf16 solve: {bf16_error:.4f})")
    assert error < 0.01 < bf16_error


@pytest.mark.parametrize("method", ["daco", "mop", "actadd"])
def test_steering_every_token_in_padded_batches_with_kv_cache(tiny, tiny_saes, method):
    model, tokenizer = tiny
    inputs = batch(tokenizer, PROMPTS)
    dictionary = {layer: sae.W_dec for layer, sae in tiny_saes.items()}
    steerer = {
        "daco": lambda: DacoSteerer(model, tiny_saes, list(range(10)), list(range(10, 16)), gamma=4.0),
        # tol=0: every solve runs max_iter iterations, so a token's code does not depend on the batch it is solved in
        "mop": lambda: MOPSteerer(model, dictionary, list(range(10)), list(range(10, 16)), gamma=4.0, max_iter=20, tol=0.0),
        "actadd": lambda: ActAddSteerer.from_directions(model, dictionary, list(range(10)), list(range(10, 16)), 4.0),
    }[method]()
    new = 6
    with steerer:
        cached = generate(model, inputs, new=new)
        counted = dict(steerer.tokens_steered)
        uncached = generate(model, inputs, use_cache=False, new=new)
        alone = [generate(model, batch(tokenizer, [p]), new=new)[0, -new:] for p in PROMPTS]
    # prefill steers every prompt position, then each decode step steers the one new token per sequence
    assert counted == {layer: inputs["input_ids"].numel() + (new - 1) * len(PROMPTS) for layer in LAYERS}
    # with the cache on, each new token was steered exactly as a full recomputation steers it
    assert torch.equal(cached, uncached)
    # padding never leaks: each sequence of the padded batch equals the same prompt steered alone
    assert all(torch.equal(cached[i, -new:], alone[i]) for i in range(len(PROMPTS)))
    assert not steerer.active and all(not model.model.layers[layer]._forward_hooks for layer in LAYERS)


def test_hooks_removed_on_exit_even_after_an_error(tiny, tiny_saes):
    model, tokenizer = tiny
    steerer = DacoSteerer(model, tiny_saes, [0, 1], [])
    with pytest.raises(KeyError):
        with steerer:
            assert steerer.active and all(len(model.model.layers[layer]._forward_hooks) == 1 for layer in LAYERS)
            raise KeyError("boom")
    assert not steerer.active and all(not layer._forward_hooks for layer in model.model.layers)
    with steerer:  # re-entrant after exit, not while active
        with pytest.raises(RuntimeError, match="already active"):
            steerer.__enter__()
    assert all(not layer._forward_hooks for layer in model.model.layers)


def test_actadd_from_prompts_is_the_pooled_difference(tiny):
    from steering.steerers import record_activations

    model, tokenizer = tiny
    steerer = ActAddSteerer.from_prompts(model, tokenizer, "blood weapon crime", "calm flower field", layers=LAYERS,
                                         coefficient=2.0)
    adapter = get_adapter(model)
    for text, sign in (("blood weapon crime", 1), ("calm flower field", -1)):
        inputs = {k: v for k, v in adapter.build_inputs(tokenizer, [None], [text]).items() if k != "caption_mask"}
        pooled = record_activations(model, LAYERS, inputs, pooling="mean")
        for layer in LAYERS:
            steerer.vectors[layer] = steerer.vectors[layer] - sign * pooled[layer][0]
    assert all(v.abs().max() < 1e-5 for v in steerer.vectors.values())


def test_prompting_edits_messages_only(tiny):
    model, _ = tiny
    steerer = PromptingSteerer(model, system_prompt="Be safe.")
    user = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert steerer.edit_messages(user) == [{"role": "system", "content": [{"type": "text", "text": "Be safe."}]}, *user]
    plain = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hi"}]
    assert steerer.edit_messages(plain)[0]["content"] == "Be safe.\n\nAnswer briefly."
    assert plain[0]["content"] == "Answer briefly."  # the input is not modified
    z = torch.randn(2, 3, 64)
    assert torch.equal(steerer.delta(17, z), torch.zeros_like(z))
    with steerer:
        assert all(not layer._forward_hooks for layer in model.model.layers)


# ------------------------------------------------------------------ the command


def write_dictionary_folder(root, d=64, layers=LAYERS, seed=0):
    """A minimal output folder: concepts.parquet (ids, groups, polarity) + dictionary/layer_<l>.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from steering.dictionary import write_dictionary_parquet

    concepts = [("gun.n.01", "undesirable"), ("knife.n.01", "undesirable"), ("hug.n.01", "desirable"),
                ("dog.n.01", "neutral"), ("tree.n.01", "neutral"), ("car.n.01", "neutral")]
    root.mkdir(parents=True)
    pq.write_table(pa.table({"concept_id": [c for c, _ in concepts], "group": ["noun.artifact"] * len(concepts),
                             "polarity": [p for _, p in concepts]}), root / "concepts.parquet")
    g = torch.Generator().manual_seed(seed)
    for layer in layers:
        write_dictionary_parquet(root / "dictionary" / f"layer_{layer}.parquet",
                                 [{"concept_id": c, "layer": layer, "direction": 8 * torch.randn(d, generator=g).numpy(),
                                   "n_pos": 27, "n_neg": 27} for c, _ in concepts])
    return root


def test_one_strength_unit_for_actadd_mop_and_daco(tmp_path, tiny):
    """gamma in units of the layer's mean activation norm: each method pushes the desirable concept equally."""
    from steering.dictionary import load_dictionary
    from steering.steerers import BuildOptions, get_steerer
    from steering.steerers.from_dictionary import mean_activation_norms

    model, tokenizer = tiny
    dictionary = load_dictionary(str(write_dictionary_folder(tmp_path / "out")), layers=LAYERS)
    norms = mean_activation_norms(model, tokenizer, LAYERS, prompts=["a dog on the beach", "hello there"])
    adapter = get_adapter(model)
    rows = []
    for prompt in ("a dog on the beach", "hello there"):
        inputs = {k: v for k, v in adapter.build_inputs(tokenizer, [None], [prompt]).items() if k != "caption_mask"}
        rows.append(record_activations(model, LAYERS, inputs))
    for layer in LAYERS:  # every position but each prompt's first
        expected = torch.cat([r[layer][1:] for r in rows]).norm(dim=-1).mean().item()
        assert norms[layer] == pytest.approx(expected, rel=1e-5)
    hug = dictionary.desirable()[0]
    z = torch.zeros(1, 64)  # no concept present: only the desirable push remains (actadd also subtracts K-)
    for method in ("actadd", "mop", "daco"):
        steerer = get_steerer(method).build(BuildOptions(model, tokenizer, LAYERS, dictionary, gamma=0.3, norms=norms))
        for layer in LAYERS:
            unit = dictionary.directions(layer, unit=True)
            delta = steerer.delta(layer, z)[0]
            push = (delta @ unit[hug]).item() if method != "actadd" else (
                delta + 0.3 * norms[layer] * unit[dictionary.undesirable()].sum(0)) @ unit[hug]
            assert float(push) == pytest.approx(0.3 * norms[layer], rel=1e-3), (method, layer)


@pytest.mark.parametrize("method", ["daco", "prompting"])
def test_daco_steer_command_prints_both_generations(tmp_path, capsys, method):
    from pipeline.cli import main as daco

    folder = write_dictionary_folder(tmp_path / "out")
    assert daco(["steer", "--untrained-family", "qwen2", "--dictionary", str(folder), "--prompt", "a man with a gun",
                 "--method", method, "--layers", "1-2", "--gamma", "8", "--max-new-tokens", "4",
                 *(["--untrained-sae"] if method == "daco" else [])]) == 0
    out = capsys.readouterr().out
    assert "UNTRAINED" in out and "hidden 64, 3 layers" in out
    assert f"steered ({method})" in out and "unsteered" in out and "6 concepts, d=64" in out


def test_daco_steer_command_rejects_bad_options_early(tmp_path):
    from pipeline.cli import main as daco

    folder = write_dictionary_folder(tmp_path / "out")
    with pytest.raises(SystemExit, match=r"layer\(s\) \[15, 16, 17, 18, 19\] not in"):
        daco(["steer", "--untrained-family", "qwen2", "--dictionary", str(folder), "--prompt", "hi", "--untrained-sae"])
    with pytest.raises(SystemExit, match="exactly one of --model"):
        daco(["steer", "--dictionary", str(folder), "--prompt", "hi", "--layers", "1-2"])
    with pytest.raises(SystemExit, match="text-only"):
        image = tmp_path / "x.png"
        image.write_bytes(b"not read before the check")
        daco(["steer", "--untrained-family", "qwen2", "--dictionary", str(folder), "--prompt", "hi", "--layers", "1-2",
              "--image", str(image), "--untrained-sae"])


# ------------------------------------------------------------------ the registry is the one list of methods


def test_every_steerer_is_exported_from_steering_and_buildable():
    import inspect

    import steering
    import steering.steerers as steerers

    assert {cls.__name__ for cls in STEERERS.values()} <= set(steerers.__all__)  # found without a line per method
    for name in steerers.__all__:
        assert getattr(steering, name) is getattr(steerers, name), name
    for method, cls in STEERERS.items():
        assert not inspect.isabstract(cls), f"{method} does not implement build"
        assert not (cls.fitted and cls.needs_dictionary), method
    assert {m for m, c in STEERERS.items() if c.needs_dictionary} == {"actadd", "mop", "daco"}
    assert {m for m, c in STEERERS.items() if c.fitted} == {"refusal", "mars", "iar", "ras"}
    with pytest.raises(AttributeError, match="no attribute 'NoSuchSteerer'"):
        steering.NoSuchSteerer  # noqa: B018


@pytest.mark.parametrize("needs_dictionary", [False, True])
def test_a_new_method_reaches_steer_and_eval_through_its_registration_alone(tmp_path, capsys, needs_dictionary):
    """Adding a method is its module (here: a class registered in the test); steer and eval derive the rest."""
    from pipeline.cli import main as daco
    from steering.eval.run import EvalError, available_methods, check_methods
    from steering.steerers import BuildOptions, Steerer, register

    @register("halve")
    class Halve(Steerer):
        """Halves the steered layers' activations (a test method)."""

        def delta(self, layer, z):
            return -0.5 * z

        @classmethod
        def build(cls, options: BuildOptions):
            return cls(options.model, options.layers)

    Halve.needs_dictionary = needs_dictionary
    try:
        assert "halve" in available_methods()
        folder = write_dictionary_folder(tmp_path / "out")
        run = ["steer", "--untrained-family", "qwen2", "--prompt", "a dog", "--method", "halve", "--layers", "1-2",
               "--max-new-tokens", "3"]
        if needs_dictionary:
            with pytest.raises(EvalError, match=r"\['halve'\] steer with the concept dictionary"):
                check_methods(["none", "halve"], None)
            with pytest.raises(SystemExit, match="--method halve needs --dictionary"):
                daco(run)
            run += ["--dictionary", str(folder)]
        else:
            assert check_methods(["none", "halve"], None) == ["none", "halve"]
        assert daco(run) == 0
        out = capsys.readouterr().out
        assert "steered (halve)" in out and ("strength unit" in out) == needs_dictionary
    finally:
        del STEERERS["halve"]


def test_prompting_needs_no_dictionary_in_steer_as_in_eval(capsys):
    from pipeline.cli import main as daco
    from steering.eval.run import check_methods

    assert check_methods(["prompting"], None) == ["prompting"]
    assert daco(["steer", "--untrained-family", "qwen2", "--prompt", "a dog", "--method", "prompting",
                 "--max-new-tokens", "3"]) == 0
    assert "method: prompting (no dictionary)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown steering method 'promting'"):
        daco(["steer", "--untrained-family", "qwen2", "--prompt", "a dog", "--method", "promting"])
