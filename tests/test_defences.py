"""The published defences as steerers (steering/steerers/{refusal,mars,iar,ras}.py) and the contrastive sets.

Seeded untrained models: a 5-layer Qwen2ForCausalLM (hidden 64) for the text methods and
a Qwen2-VL of the same size where images are needed. Contrastive sets are small slices
of the shipped defaults. Torch runs single-threaded here (tiny models are much faster
that way on a busy machine); the previous setting is restored afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from steering.contrastive import (ContrastiveSets, PromptItem, load_prompts, load_responses, neutral_images,
                                  post_instruction_positions, prompt_states, response_states)
from steering.models import get_adapter
from steering.steerers import (STEERERS, BuildOptions, IARFitConfig, IARSteerer, MARSFitConfig, MARSSteerer,
                               RASFitConfig, RASSteerer, RefusalDirectionSteerer, RefusalFitConfig, record_activations)
from steering.steerers.fitted import final_norm
from steering.steerers.ras import CONTEXT_INSTRUCTION, REFORMULATION, RISK_PROMPT
from steering.steerers.iar import fit_probe, output_projection
from steering.steerers.refusal import (allowed_layers, encode_prompts, next_token_logits, refusal_score,
                                       refusal_token_ids, select_candidate)

N_LAYERS = 5


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return get_adapter("qwen2").build_untrained(seed=0, num_hidden_layers=N_LAYERS)


@pytest.fixture(scope="module")
def tiny_vl():
    return get_adapter("qwen2_vl").build_untrained(seed=0, num_hidden_layers=N_LAYERS)


@pytest.fixture(scope="module")
def sets():
    return ContrastiveSets.default()


@pytest.fixture(scope="module")
def refusal(tiny, sets):
    model, tokenizer = tiny
    # an untrained model never refuses: keep every induce score (Arditi et al.'s default 0.0 is tested apart)
    return RefusalDirectionSteerer.fit(model, tokenizer, sets.harmful[:6], sets.harmless[:6],
                                       RefusalFitConfig(n_positions=3, induce_threshold=-math.inf))


def chat_batch(tokenizer, prompts):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    return tokenizer(texts, return_tensors="pt", padding=True)


class Recorder:
    """Forward hook keeping a copy of a module's output (first item of a tuple) per call."""

    def __init__(self, module, pre: bool = False):
        self.calls: list[torch.Tensor] = []
        self.handle = (module.register_forward_pre_hook(lambda m, args: self.calls.append(args[0].detach().clone()))
                       if pre else module.register_forward_hook(self._keep))

    def _keep(self, module, args, output):
        self.calls.append((output[0] if isinstance(output, tuple) else output).detach().clone())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ----------------------------------------------------------------------------------------- contrastive sets


def test_default_sets_are_shipped_and_small(sets):
    assert 20 <= len(sets.harmful) == len(sets.harmless) <= 40
    assert 20 <= len(sets.refusal) <= 40 and 20 <= len(sets.compliant) <= 40
    assert all(isinstance(item, PromptItem) and item.image is None for item in sets.harmful)
    assert len({item.prompt for item in sets.harmful}) == len(sets.harmful)


def test_loaders_read_user_files_and_name_the_file_line_and_field(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "red.png")
    good = tmp_path / "prompts.jsonl"
    good.write_text('{"prompt": "what is this?", "image": "red.png"}\n\n{"prompt": "hello"}\n')
    assert load_prompts(good) == [PromptItem("what is this?", str((tmp_path / "red.png").resolve())), PromptItem("hello")]
    responses = tmp_path / "responses.jsonl"
    responses.write_text('{"response": "I cannot."}\n')
    assert load_responses(responses) == ["I cannot."]
    cases = {
        '{"text": "x"}\n': "prompts_bad.jsonl:1: unknown field",
        '{"prompt": "ok"}\n{"prompt": ""}\n': "prompts_bad.jsonl:2: field 'prompt' must be a non-empty string",
        '{"prompt": "x"\n': "prompts_bad.jsonl:1: not valid JSON",
        '{"prompt": "x", "image": "missing.png"}\n': "image 'missing.png' not found",
        '\n': "prompts_bad.jsonl: no items",
    }
    bad = tmp_path / "prompts_bad.jsonl"
    for content, message in cases.items():
        bad.write_text(content)
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            load_prompts(bad)
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: unknown field\(s\) \['image', 'prompt'\]; allowed: \['response'\]"):
        load_responses(good)
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl: no such file"):
        ContrastiveSets.from_files(harmful=tmp_path / "nowhere.jsonl")


def test_neutral_images_are_seeded_plain_colours():
    first, again = neutral_images(3, seed=4), neutral_images(3, seed=4)
    assert [im.tobytes() for im in first] == [im.tobytes() for im in again]
    assert all(len(set(im.getdata())) == 1 for im in first)


# ----------------------------------------------------------------------------------------- refusal direction


def test_refusal_selection_skips_the_last_20_percent_and_applies_both_filters(tiny, sets, refusal):
    model, tokenizer = tiny
    assert allowed_layers(5, 0.2) == [0, 1, 2, 3] and allowed_layers(32, 0.2) == list(range(25))
    report = refusal.report
    assert {c["layer"] for c in report["candidates"]} == {0, 1, 2, 3}  # layer 4 (the last 20%) never tried
    assert {c["position"] for c in report["candidates"]} == {-3, -2, -1}
    passing = [c for c in report["candidates"] if c["kl"] <= 0.1]
    best = min(passing, key=lambda c: c["bypass_score"])  # Arditi et al.'s code: the lowest bypass score
    assert (refusal.layer, refusal.position) == (best["layer"], best["position"])
    assert refusal.mode == "addition" and not refusal.attack
    # the direction is the difference of means at that layer and post-instruction position (even items extract)
    h = prompt_states(model, tokenizer, sets.harmful[:6:2], [refusal.layer], 3)[refusal.layer][:, refusal.position]
    s = prompt_states(model, tokenizer, sets.harmless[:6:2], [refusal.layer], 3)[refusal.layer][:, refusal.position]
    assert torch.allclose(refusal.direction, h.mean(0) - s.mean(0), atol=1e-5)
    # the KL filter: with a threshold below every candidate's KL nothing is selectable
    smallest = min(c["kl"] for c in report["candidates"])
    with pytest.raises(ValueError, match="no refusal-direction candidate passes KL"):
        RefusalDirectionSteerer.fit(model, tokenizer, sets.harmful[:6], sets.harmless[:6],
                                    RefusalFitConfig(n_positions=1, kl_threshold=smallest / 2))
    assert post_instruction_positions(model, tokenizer) == 6  # <|im_end|> \n <|im_start|> ass istant \n


def test_refusal_selection_discards_candidates_that_do_not_induce_refusal():
    cands = [{"layer": 0, "position": -1, "kl": 0.01, "induce_score": -0.5, "bypass_score": -9.0},  # lowest bypass, but
             {"layer": 1, "position": -1, "kl": 0.02, "induce_score": 0.3, "bypass_score": -2.0},   # fails to induce
             {"layer": 2, "position": -1, "kl": 0.50, "induce_score": 2.0, "bypass_score": -8.0},   # KL too large
             {"layer": 3, "position": -1, "kl": 0.05, "induce_score": 1.5, "bypass_score": -1.0},
             {"layer": 3, "position": -2, "kl": float("nan"), "induce_score": 9.0, "bypass_score": -99.0}]
    assert select_candidate(cands, 0.1, 0.0)["layer"] == 1
    assert select_candidate(cands, 0.1, -math.inf)["layer"] == 0
    with pytest.raises(ValueError, match="induce_threshold=5"):
        select_candidate(cands, 0.1, 5.0)


def test_refusal_default_threshold_refuses_an_untrained_model_that_never_refuses(tiny, sets):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="induces refusal"):
        RefusalDirectionSteerer.fit(model, tokenizer, sets.harmful[:4], sets.harmless[:4], RefusalFitConfig(n_positions=1))


def test_refusal_defence_raises_the_refusal_score_on_harmful_prompts(tiny, sets, refusal):
    """On a model whose refusal tokens read the refusal direction, the default fit adds it: refusal goes up."""
    import copy

    model, tokenizer = tiny
    refusing = copy.deepcopy(model)
    ids = refusal_token_ids(tokenizer)
    unit = refusal.direction / refusal.direction.norm()
    with torch.no_grad():
        refusing.lm_head.weight = torch.nn.Parameter(refusing.lm_head.weight.clone())  # untie from the embeddings
        refusing.lm_head.weight[ids] = 20.0 * unit
    defence = RefusalDirectionSteerer.fit(refusing, tokenizer, sets.harmful[:6], sets.harmless[:6],
                                          RefusalFitConfig(n_positions=3, induce_threshold=-math.inf))
    assert defence.mode == "addition" and not defence.attack
    harmful = encode_prompts(refusing, tokenizer, [item.prompt for item in sets.harmful[:6]])
    plain = refusal_score(next_token_logits(refusing, harmful), ids).mean()
    with defence:
        defended = refusal_score(next_token_logits(refusing, harmful), ids).mean()
    assert defended > plain + 0.5
    assert RefusalDirectionSteerer(refusing, defence.direction, defence.layer, mode="ablation").attack


def test_refusal_ablation_leaves_zero_projection_at_every_layer(tiny, refusal):
    model, tokenizer = tiny
    inputs = chat_batch(tokenizer, ["a man with a knife", "a calm blue sea under the sun"])
    unit = refusal.direction / refusal.direction.norm()
    layers = range(N_LAYERS)
    plain = record_activations(model, layers, inputs)
    with RefusalDirectionSteerer(model, refusal.direction, refusal.layer, mode="ablation") as ablating:
        ablated = record_activations(model, layers, inputs)
        with Recorder(model.model.layers[2].mlp) as mlp, Recorder(model.model.layers[2].self_attn) as attn:
            out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert all((plain[l] @ unit).abs().max() > 1e-3 for l in layers)
    for layer in layers:
        ratio = (ablated[layer] @ unit).abs() / ablated[layer].norm(dim=-1)
        assert ratio.max() < 1e-5, layer
    # every write into the residual stream is ablated too, at every generated token (KV cache on)
    assert len(mlp.calls) == 4 and all((c @ unit).abs().max() < 1e-4 for c in mlp.calls + attn.calls)
    assert ablating.tokens_steered[0] == 2 * inputs["input_ids"].numel() + 3 * 2  # the recorded forward, then generate
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_refusal_addition_adds_r_at_its_layer_only(tiny, refusal):
    model, tokenizer = tiny
    adding = RefusalDirectionSteerer(model, refusal.direction, refusal.layer, mode="addition", coefficient=2.0)
    assert adding.layers == (refusal.layer,)
    inputs = chat_batch(tokenizer, ["hello there"])
    plain = record_activations(model, [refusal.layer], inputs)[refusal.layer]
    with adding:
        steered = record_activations(model, [refusal.layer], inputs)[refusal.layer]
    assert torch.allclose(steered - plain, (2.0 * refusal.direction).expand_as(plain), atol=1e-5)


# ----------------------------------------------------------------------------------------- MARS


@pytest.fixture(scope="module")
def mars(tiny_vl, sets):
    model, processor = tiny_vl
    return MARSSteerer.fit(model, processor, sets.harmful[:6], sets.harmless[:6], MARSFitConfig(n_images=2, seed=3))


def test_mars_offset_is_the_measured_multimodal_minus_text_mean(tiny_vl, sets, mars):
    from steering.capture import capture

    model, processor = tiny_vl
    adapter = get_adapter(model)
    harmless = [item.prompt for item in sets.harmless[:6]]
    images = neutral_images(2, seed=3, size=32)
    with_images = capture(model, adapter, adapter.build_inputs(processor, [images[i % 2] for i in range(6)], harmless),
                          [mars.layer], "last")[mars.layer]
    text = capture(model, adapter, adapter.build_inputs(processor, [None] * 6, harmless), [mars.layer], "last")[mars.layer]
    assert torch.allclose(mars.offset, with_images.mean(0) - text.mean(0), atol=1e-5)
    assert mars.recenter and mars.offset.norm() > 0
    scores = mars.report["layer_scores"]
    assert int(max(scores, key=lambda l: scores[l]["score"])) == mars.layer


def test_mars_gate_and_trust_region(mars):
    mars.set_images([True] * 200)  # 200 items with an image: all re-centred
    g = torch.Generator().manual_seed(0)
    unit, safe, unsafe = mars.unit, mars.safe_centroid, mars.unsafe_centroid
    noise = torch.randn(200, unit.shape[0], generator=g)
    noise = noise - (noise @ unit)[:, None] * unit  # orthogonal to the direction
    s = torch.linspace(safe - 3 * (unsafe - safe), unsafe + 3 * (unsafe - safe), 200)
    z = mars.offset + s[:, None] * unit + noise
    for strength in (0.5, 1.0, 50.0):
        mars.strength = strength
        delta = mars.delta(mars.layer, z)
        after = mars.projection(z + delta)
        below = s <= safe
        assert below.any() and torch.equal(delta[below], torch.zeros_like(delta[below]))  # the gate: no change at all
        assert (after[s <= unsafe] <= unsafe + 1e-4).all()  # never pushed past the unsafe centroid
        assert not delta[s >= unsafe].any()  # already at or past it: left alone
        assert (after >= s - 1e-4).all()  # only ever towards refusal
        assert torch.allclose(delta - (delta @ unit)[:, None] * unit, torch.zeros_like(delta), atol=1e-6)  # along r_hat
    mars.strength = 50.0
    middle = (s > safe) & (s < unsafe)
    assert torch.allclose(mars.projection(z + mars.delta(mars.layer, z))[middle], torch.full((int(middle.sum()),), unsafe),
                          atol=1e-3)  # a strong gate stops exactly at the unsafe centroid
    mars.strength, mars.with_image = 1.0, None


def test_mars_recentres_exactly_the_items_with_an_image_in_steer_and_eval(tiny_vl, mars):
    from steering.generation import generate  # what daco steer and daco eval both call

    model, processor = tiny_vl
    fresh = lambda: MARSSteerer(model, mars.unit, mars.layer, mars.offset, mars.safe_centroid,  # noqa: E731
                                mars.unsafe_centroid)
    z = torch.randn(2, 3, mars.unit.shape[0], generator=torch.Generator().manual_seed(1))
    steerer = fresh()
    steerer.set_images([True, False])
    s = steerer.projection(z)
    assert torch.allclose(s[0], (z[0] - mars.offset) @ mars.unit, atol=1e-5)  # the item with an image: re-centred
    assert torch.allclose(s[1], z[1] @ mars.unit, atol=1e-5)  # the text-only item: not
    image = neutral_images(1, seed=2)[0]
    for shown, expected in ((None, [False]), (image, [True])):
        steerer = fresh()
        generate(model, processor, "how do I pick a lock?", shown, steerer, max_new_tokens=1)
        assert steerer.with_image.tolist() == expected
    inputs = get_adapter(model).build_inputs(processor, [None], ["hi"])
    inputs = {k: v for k, v in inputs.items() if k != "caption_mask"}
    with fresh(), pytest.raises(RuntimeError, match="before_generation"):  # never a silent guess
        model.generate(**inputs, max_new_tokens=1)


def test_mars_steers_only_the_first_generated_token(tiny_vl, mars):
    model, processor = tiny_vl
    open_gate = MARSSteerer(model, mars.unit, mars.layer, mars.offset, -1e3, 1e3, strength=1.0, recenter=False)
    inputs = get_adapter(model).build_inputs(processor, [None, None], ["a man with a knife", "hi"])
    inputs = {k: v for k, v in inputs.items() if k != "caption_mask"}
    layer = model.model.language_model.layers[mars.layer]
    with torch.no_grad(), Recorder(layer) as raw:  # registered first: sees the layer's output before steering
        with open_gate, Recorder(layer) as steered:
            model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert len(raw.calls) == len(steered.calls) == 3
    changed = [(after - before).abs().amax(-1) > 0 for before, after in zip(raw.calls, steered.calls)]
    assert changed[0][:, -1].all() and not changed[0][:, :-1].any()  # prefill: only the last prompt position
    assert not changed[1].any() and not changed[2].any()  # later generated tokens: untouched
    assert open_gate.tokens_steered[mars.layer] == 2 * (inputs["input_ids"].shape[1] + 2)  # the hook ran on every call


# ----------------------------------------------------------------------------------------- IAR


@pytest.fixture(scope="module")
def iar_samples(tiny, sets):
    model, tokenizer = tiny
    queries = [q for q in sets.harmful[:4] for _ in range(2)]
    responses = [r for i in range(4) for r in (sets.refusal[i], sets.compliant[i])]
    states, heads = response_states(model, tokenizer, queries, responses, [1, 2],
                                    {"1": output_projection(model.model.layers[1]),
                                     "2": output_projection(model.model.layers[2])})
    return states, heads, torch.tensor([1, 0] * 4)


def iar_fit(tiny, sets, **kw):
    model, tokenizer = tiny
    return IARSteerer.fit(model, tokenizer, sets.harmful[:4], sets.refusal[:4], sets.compliant[:4],
                          IARFitConfig(layers=[1, 2], responses_per_query=1, **kw))


def test_iar_mms_is_the_mean_difference(tiny, sets, iar_samples):
    states, _heads, y = iar_samples
    steerer = iar_fit(tiny, sets, level="layer", direction="mms", k=2, alpha=3.0)
    assert set(steerer.layers) == {1, 2}
    for layer in (1, 2):
        theta = states[layer][y == 1].mean(0) - states[layer][y == 0].mean(0)
        assert torch.allclose(steerer.vectors[layer], 3.0 * theta / theta.norm(), atol=1e-5)


def test_iar_pwd_is_the_probe_weight_direction(tiny, sets, iar_samples):
    from sklearn.linear_model import LogisticRegression

    states, _heads, y = iar_samples
    steerer = iar_fit(tiny, sets, level="layer", direction="pwd", k=1, alpha=1.0)
    (layer,) = steerer.layers
    probe = LogisticRegression(C=1.0, max_iter=2000, random_state=0).fit(states[layer].double().numpy(), y.numpy())
    w = torch.from_numpy(probe.coef_[0]).float()
    assert torch.allclose(steerer.vectors[layer], w / w.norm(), atol=1e-5)
    assert fit_probe(states[layer], y).score(states[layer].double().numpy(), y.numpy()) == probe.score(
        states[layer].double().numpy(), y.numpy())


def test_iar_head_level_changes_only_the_selected_heads_at_the_last_position(tiny, sets, iar_samples):
    """The default is the paper's best variant (head level, top-K heads), applied where ITI edits: the last position."""
    model, tokenizer = tiny
    _states, heads, y = iar_samples
    steerer = iar_fit(tiny, sets, direction="mms", k=3, alpha=5.0)
    assert steerer.level == "head" and steerer.positions == "last"
    units = [(u["layer"], u["head"]) for u in steerer.report["units"]]
    assert len(units) == 3
    first = min(layer for layer, _ in units)
    width = model.config.hidden_size // model.config.num_attention_heads
    inputs = chat_batch(tokenizer, ["a man with a knife", "hi"])
    projections = {l: output_projection(model.model.layers[l]) for l in range(N_LAYERS)}
    with torch.no_grad():
        plain = {l: Recorder(p, pre=True) for l, p in projections.items()}
        model(**inputs)
        for r in plain.values():
            r.handle.remove()
        with steerer:
            steered = {l: Recorder(p, pre=True) for l, p in projections.items()}
            model(**inputs)
            for r in steered.values():
                r.handle.remove()
    for layer in range(first):
        assert torch.equal(plain[layer].calls[0], steered[layer].calls[0])
    diff = (steered[first].calls[0] - plain[first].calls[0]).reshape(*inputs["input_ids"].shape, -1, width)
    selected = {h for l, h in units if l == first}
    for head in range(model.config.num_attention_heads):
        moved = diff[..., head, :]
        if head not in selected:
            assert not moved.any(), head
            continue
        x = heads[str(first)][:, head * width:(head + 1) * width]
        theta = x[y == 1].mean(0) - x[y == 0].mean(0)
        sigma = (x @ (theta / theta.norm())).std(unbiased=False)
        assert torch.allclose(moved[:, -1], (5.0 * sigma * theta / theta.norm()).expand_as(moved[:, -1]), atol=1e-5)
        assert not moved[:, :-1].any()  # only the last position of the forward call
    everywhere = IARSteerer(model, steerer.vectors, "head", positions="all")
    z = torch.zeros(2, 4, steerer.vectors[first].shape[0])
    assert torch.equal(everywhere.delta(first, z), steerer.vectors[first].expand_as(z))
    assert torch.equal(steerer.delta(first, z)[:, -1], steerer.vectors[first].expand(2, -1))


# ----------------------------------------------------------------------------------------- RAS


@pytest.fixture(scope="module")
def ras(tiny, sets):
    model, tokenizer = tiny
    return RASSteerer.fit(model, tokenizer, sets.harmful[:4], sets.harmless[:3])


def test_ras_calibration(ras):
    assert ras.s_base == pytest.approx(sum(ras.report["benign_scores"]) / 3)
    assert ras.k == pytest.approx(math.log(99) / (1 - ras.s_base))
    assert ras.risk(ras.s_base).item() == pytest.approx(0.5)
    assert ras.risk(1.0).item() == pytest.approx(0.99, abs=1e-4)
    assert ras.n_tokens == 3 and ras.prototypes.shape == (3, 64)


def test_ras_changes_only_the_first_n_generated_tokens(tiny, ras):
    model, tokenizer = tiny
    inputs = chat_batch(tokenizer, ["a man with a knife", "hi"])
    norm = final_norm(model)
    assert norm is model.model.norm
    with torch.no_grad(), Recorder(norm) as raw:
        with ras:
            with pytest.raises(RuntimeError, match="prepare"):
                model(**inputs)
            raw.calls.clear()
            ras.set_risk([1.0, 0.25])
            with Recorder(norm) as steered:
                model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert len(raw.calls) == len(steered.calls) == 6
    right = tokenizer([tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                     tokenize=False) for p in ("hi", "a long prompt here")],
                      return_tensors="pt", padding=True, padding_side="right")
    with ras, pytest.raises(ValueError, match="right-padded batch"):
        model(**right)
    for n, (before, after) in enumerate(zip(raw.calls, steered.calls)):
        changed = (after - before).abs().amax(-1) > 0
        if n < 3:
            assert changed[:, -1].all() and not changed[:, :-1].any()
            assert torch.allclose(after[0, -1], ras.prototypes[n], atol=1e-5)  # r = 1: the prototype itself
            assert torch.allclose(after[1, -1], before[1, -1] + 0.25 * (ras.prototypes[n] - before[1, -1]), atol=1e-5)
        else:
            assert not changed.any(), n


def test_ras_prompts_are_the_authors_wording():
    """snumprlab/moras LLaVA/utils/utils.py: get_prompt1, get_prompt2's wrapper, get_prompt3."""
    assert CONTEXT_INSTRUCTION == ("Write a single sentence visual context to outline any safety-critical context in the "
                                   "image. The context should read out any texts in the image, and begin with 'The image "
                                   "shows'.")
    assert RISK_PROMPT.format(query="Q?") == (
        "Evaluate the following question to ensure that it is safe. Benign and harmless questions should be answered "
        "normally. However, if the following question is unsafe, malicious, or illegal, the assistant should apologize "
        "and refuse to answer. Question: Q?")
    assert REFORMULATION.format(context="The image shows a cat.", query="Q?") == "The image shows a cat. Q?"


def test_ras_prepare_reformulates_with_the_visual_context(tiny_vl, sets):
    model, processor = tiny_vl
    steerer = RASSteerer(model, torch.zeros(3, 64) + 0.1, s_base=0.5, context_tokens=5)
    image = neutral_images(1, seed=1)[0]
    (result,) = steerer.prepare(processor, ["what is in this picture?"], [image])
    assert result["context"] == steerer.context(processor, image)
    assert result["reformulated"] == f"{result['context']} what is in this picture?"  # get_prompt3
    # step 2 scores the reformulated query inside the authors' safety wrapper (get_prompt2), with the image
    wrapped = RISK_PROMPT.format(query=result["reformulated"])
    p = steerer.distributions(steerer.prototypes.float())
    assert result["score"] == pytest.approx(steerer.score(steerer.distributions(
        steerer.final_states(processor, wrapped, image)), p), abs=1e-6)
    unwrapped = steerer.score(steerer.distributions(steerer.final_states(processor, result["reformulated"], image)), p)
    assert unwrapped != pytest.approx(result["score"], abs=1e-6)
    assert steerer.risk_value.tolist() == [pytest.approx(result["risk"])]
    assert 0 <= result["risk"] <= 1


# ----------------------------------------------------------------------------------------- fit configs


def test_fit_config_defaults_are_the_documented_methods():
    """docs/defences.md: IAR head level, top 48 heads, MMS, alpha 15, last position; refusal adds, Arditi et al.'s
    filters; MARS gain 1; RAS N = 3, gamma 0.3, 40 context tokens, the authors' prompts."""
    iar = IARFitConfig()
    assert (iar.level, iar.units(), iar.direction, iar.alpha, iar.positions) == ("head", 48, "mms", 15.0, "last")
    assert (iar.layers, iar.responses_per_query, iar.probe_c) == (None, 2, 1.0)
    assert IARFitConfig(level="layer").units() == 1 and IARFitConfig(k=5).units() == 5
    refusal = RefusalFitConfig()
    assert (refusal.mode, refusal.kl_threshold, refusal.induce_threshold, refusal.skip_last) == ("addition", 0.1, 0.0, 0.2)
    assert (refusal.n_positions, refusal.coefficient) == (None, 1.0)
    assert refusal.refusal_phrases == ("I'm sorry", "I am sorry", "I cannot", "I can't", "Sorry", "As an AI")
    mars = MARSFitConfig()
    assert (mars.layers, mars.strength, mars.validation_fraction, mars.n_images, mars.seed) == (None, 1.0, 0.5, 8, 0)
    ras = RASFitConfig()
    assert (ras.n_tokens, ras.gamma, ras.context_tokens, ras.keep_image) == (3, 0.3, 40, True)
    assert (ras.reformulation, ras.context_instruction, ras.risk_prompt) == (REFORMULATION, CONTEXT_INSTRUCTION, RISK_PROMPT)
    assert {name: cls.fit_config for name, cls in STEERERS.items() if cls.fitted} == {
        "refusal": RefusalFitConfig, "mars": MARSFitConfig, "iar": IARFitConfig, "ras": RASFitConfig}


@pytest.mark.parametrize("cls, bad, message", [
    (IARFitConfig, {"level": "neuron"}, r"IARFitConfig\.level: 'neuron' is not one of \('head', 'layer'\)"),
    (IARFitConfig, {"k": 0}, r"IARFitConfig\.k must be >= 1"),
    (IARFitConfig, {"validation_fraction": 1.0}, r"IARFitConfig\.validation_fraction must be in \(0, 1\)"),
    (IARFitConfig, {"alpha": "15"}, r"IARFitConfig\.alpha: '15' is a str; expected float"),
    (RefusalFitConfig, {"mode": "subtract"}, r"RefusalFitConfig\.mode: 'subtract' is not one of"),
    (RefusalFitConfig, {"skip_last": 1.0}, r"RefusalFitConfig\.skip_last must be in \[0, 1\)"),
    (RefusalFitConfig, {"refusal_phrases": ()}, r"RefusalFitConfig\.refusal_phrases: give the non-empty"),
    (MARSFitConfig, {"strength": -1.0}, r"MARSFitConfig\.strength must be >= 0"),
    (MARSFitConfig, {"layers": [-1]}, r"MARSFitConfig\.layers: \[-1\]"),
    (RASFitConfig, {"gamma": 0.0}, r"RASFitConfig\.gamma must be in \(0, 1\]"),
    (RASFitConfig, {"risk_prompt": "no field"}, r"RASFitConfig\.risk_prompt must contain the field \{query\}"),
    (RASFitConfig, {"n_tokens": 0}, r"RASFitConfig\.n_tokens must be >= 1"),
])
def test_fit_configs_reject_a_bad_value_naming_it(cls, bad, message):
    with pytest.raises(ValueError, match=message):
        cls.from_dict(bad, cls.__name__)
    with pytest.raises(ValueError, match=message):  # built directly, the fit checks it before any work
        STEERERS[{IARFitConfig: "iar", RefusalFitConfig: "refusal", MARSFitConfig: "mars",
                  RASFitConfig: "ras"}[cls]].fit_options(cls(**bad))


@pytest.mark.parametrize("cls", [IARFitConfig, RefusalFitConfig, MARSFitConfig, RASFitConfig])
def test_fit_configs_reject_an_unknown_option_naming_it(cls):
    with pytest.raises(ValueError, match=r"defences\.x: unknown option\(s\) \['alfa'\]; valid: \["):
        cls.from_dict({"alfa": 1.0}, "defences.x")


def test_fit_takes_its_own_config_and_records_it(tiny, sets, refusal):
    model, tokenizer = tiny
    with pytest.raises(TypeError, match="IARSteerer.fit takes a IARFitConfig, not a MARSFitConfig"):
        IARSteerer.fit(model, tokenizer, sets.harmful[:4], sets.refusal[:4], sets.compliant[:4], MARSFitConfig())
    assert refusal.report["fit_config"] == {**dataclasses.asdict(RefusalFitConfig()), "n_positions": 3,
                                            "induce_threshold": -math.inf}
    built = IARSteerer.build(BuildOptions(model, tokenizer, sets=sets, fit=IARFitConfig(layers=[2], level="layer",
                                                                                     responses_per_query=1)))
    assert built.layers == (2,) and built.level == "layer" and built.report["fit_config"]["layers"] == [2]


def test_fit_takes_its_config_fields_as_keywords_too(tiny, sets):
    """``fit(..., layers=[2])`` is ``fit(..., config=MARSFitConfig(layers=[2]))``; unknown names and both at once fail."""
    model, tokenizer = tiny
    by_keywords = MARSSteerer.fit(model, tokenizer, sets.harmful, sets.harmless, layers=[2], strength=0.5)
    by_config = MARSSteerer.fit(model, tokenizer, sets.harmful, sets.harmless, MARSFitConfig(layers=[2], strength=0.5))
    assert by_keywords.layers == by_config.layers == (2,) and by_keywords.strength == 0.5
    assert torch.equal(by_keywords.unit, by_config.unit)
    assert by_keywords.report["fit_config"] == by_config.report["fit_config"]
    with pytest.raises(ValueError, match=r"MARSSteerer.fit: unknown option\(s\) \['layer'\]; valid: \["):
        MARSSteerer.fit(model, tokenizer, sets.harmful, sets.harmless, layer=2)
    with pytest.raises(TypeError, match="a MARSFitConfig or keyword options, not both"):
        MARSSteerer.fit(model, tokenizer, sets.harmful, sets.harmless, MARSFitConfig(), layers=[2])


# ----------------------------------------------------------------------------------------- save / load


def test_every_defence_saves_and_loads(tmp_path, tiny, tiny_vl, sets, refusal, mars, ras):
    model, _tokenizer = tiny
    iar = iar_fit(tiny, sets, level="head", k=2)
    g = torch.Generator().manual_seed(0)
    for steerer, owner in ((refusal, model), (mars, tiny_vl[0]), (iar, model), (ras, model)):
        folder = steerer.save(tmp_path / steerer.name)
        config = json.loads((folder / "steerer.json").read_text())
        assert config["method"] == steerer.name and STEERERS[steerer.name] is type(steerer)
        loaded = type(steerer).load(folder, owner)
        assert type(loaded) is type(steerer) and loaded.layers == steerer.layers
        assert loaded.report == json.loads(json.dumps(steerer.report))
        layer = steerer.layers[0]
        if steerer is ras:
            assert torch.equal(loaded.prototypes, ras.prototypes)
            assert (loaded.s_base, loaded.k, loaded.gamma, loaded.n_tokens) == (ras.s_base, ras.k, ras.gamma, 3)
            continue
        width = iar.vectors[layer].shape[0] if steerer is iar else 64
        z = torch.randn(7, width, generator=g) * 3  # 2-D: every row is steered (no generation step involved)
        if steerer is mars:
            for m in (loaded, steerer):
                m.set_images([True] * 7)
        assert torch.allclose(loaded.delta(layer, z), steerer.delta(layer, z), atol=1e-6)
    mars.with_image = None
    with pytest.raises(ValueError, match="holds a 'refusal' steerer, not 'mars'"):
        MARSSteerer.load(tmp_path / "refusal", model)
    with pytest.raises(FileNotFoundError, match="steerer.json is missing"):
        RASSteerer.load(tmp_path / "nothing", model)
    narrow, _ = get_adapter("qwen2").build_untrained(seed=0, hidden_size=32, num_attention_heads=2, num_hidden_layers=2)
    with pytest.raises(ValueError, match="hidden size is 32"):
        RefusalDirectionSteerer.load(tmp_path / "refusal", narrow)


# ----------------------------------------------------------------------------------------- the command


@pytest.mark.parametrize("method", ["refusal", "mars", "iar", "ras"])
def test_daco_steer_fits_saves_and_reloads_each_defence(tmp_path, capsys, sets, method):
    from pipeline.cli import main as daco

    files = {}
    for kind, rows, key in (("harmful", sets.harmful[:4], "prompt"), ("harmless", sets.harmless[:4], "prompt"),
                            ("refusal-responses", sets.refusal[:2], "response"),
                            ("compliant-responses", sets.compliant[:2], "response")):
        files[kind] = tmp_path / f"{kind}.jsonl"
        files[kind].write_text("".join(json.dumps({key: getattr(r, "prompt", r)}) + "\n" for r in rows))
    common = ["steer", "--untrained-family", "qwen2", "--prompt", "a man with a knife", "--method", method,
              "--layers", "1-2", "--max-new-tokens", "3", "--iar-k", "2"]
    given = [arg for kind, path in files.items() for arg in (f"--{kind}", str(path))]
    if method == "refusal":  # an untrained model never refuses: keep every candidate
        given += ["--refusal-induce-threshold=-inf"]
    assert daco(common + given + ["--save-steerer", str(tmp_path / "fitted")]) == 0
    out = capsys.readouterr().out
    assert f"steered ({method})" in out and "UNTRAINED" in out and "fitted on the contrastive sets" in out
    assert json.loads((tmp_path / "fitted" / "steerer.json").read_text())["method"] == method
    assert daco(common + ["--steerer", str(tmp_path / "fitted")]) == 0
    again = capsys.readouterr().out
    assert f"loaded from {tmp_path / 'fitted'}" in again
    assert again.split("unsteered")[1] == out.split("unsteered")[1]  # the reloaded defence steers the same way
    if method == "ras":
        assert "ras: risk" in again


def test_daco_steer_defence_options_are_checked_first(tmp_path):
    from pipeline.cli import main as daco

    bad = tmp_path / "harmful.jsonl"
    bad.write_text('{"prompt": 3}\n')
    with pytest.raises(SystemExit, match="harmful.jsonl:1: field 'prompt' must be a non-empty string"):
        daco(["steer", "--untrained-family", "qwen2", "--prompt", "hi", "--method", "mars", "--harmful", str(bad)])
    with pytest.raises(SystemExit, match="--method actadd needs --dictionary"):
        daco(["steer", "--untrained-family", "qwen2", "--prompt", "hi", "--method", "actadd", "--layers", "1-2"])
    with pytest.raises(SystemExit, match="steerer.json is missing"):
        daco(["steer", "--untrained-family", "qwen2", "--prompt", "hi", "--method", "iar", "--layers", "1-2",
              "--steerer", str(tmp_path)])
