"""Optional model labeller: a language model signs each concept desirable / undesirable /
neutral (the DACO paper has an expert MLLM label its concepts; docs/concepts.md).

For every concept the model reads :data:`PROMPT` (lemma and WordNet definition) and the three
answers are compared by the total log-probability of their tokens after it; the most likely
one is the label, written with ``polarity_source = model:<id>``. The lexicon's labels stay the
offline default; :func:`agreement` says how often the model and the lexicon agree.
Any causal LM transformers loads with ``AutoModelForCausalLM`` works (for a multimodal
checkpoint, its text backbone).
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa

from transforms.polarity import POLARITIES

PROMPT = ("You label concepts for an AI-safety dictionary. A concept is undesirable when it stands for harm "
          "(weapons, violence, crime, abuse, hard drugs), desirable when it stands for help or safety, and "
          "neutral otherwise.\nConcept: {lemma} ({definition})\nLabel:")


def load_model(model_id: str, device: str = "cpu"):
    """(model, tokenizer) of a causal LM from a hub id or a local folder, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(model_id).to(device).eval()
    except (OSError, ValueError) as exc:
        raise ValueError(f"--model {model_id}: not a causal language model transformers can load ({exc})") from None
    return model, tokenizer


def label_rows(rows: list[dict], model, tokenizer, batch_size: int = 16) -> list[str]:
    """The model's label (one of :data:`POLARITIES`) for each concepts.parquet row."""
    import torch

    answers = [tokenizer(" " + p, add_special_tokens=False)["input_ids"] for p in POLARITIES]
    labels = []
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_size):
        prompts = [PROMPT.format(lemma=r["lemma"], definition=r["definition"]) for r in rows[start:start + batch_size]]
        prefixes = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        scores = torch.zeros(len(prompts), len(POLARITIES), dtype=torch.float64)
        for a, answer in enumerate(answers):
            seqs = [prefix + answer for prefix in prefixes]
            width = max(map(len, seqs))
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits.double().log_softmax(-1)
            for b, prefix in enumerate(prefixes):
                positions = range(len(prefix) - 1, len(prefix) - 1 + len(answer))
                scores[b, a] = sum(logits[b, pos, tok] for pos, tok in zip(positions, answer))
        labels += [POLARITIES[i] for i in scores.argmax(dim=1).tolist()]
    return labels


def agreement(lexicon: list[str], model: list[str]) -> dict:
    """Agreement of the model's labels with the lexicon's: overall fraction, per lexicon label,
    and the confusion counts {"lexicon->model": n}."""
    pairs = list(zip(lexicon, model))
    per_label = {p: (sum(a == b for a, b in pairs if a == p) / n if (n := sum(a == p for a, _ in pairs)) else None)
                 for p in POLARITIES}
    return {"n": len(pairs), "agreement": sum(a == b for a, b in pairs) / max(len(pairs), 1),
            "per_lexicon_label": per_label,
            "confusion": {f"{a}->{b}": n for (a, b), n in sorted(Counter(pairs).items())}}


def relabel(table: pa.Table, labels: list[str], model_id: str) -> pa.Table:
    """``table`` with ``polarity`` replaced by ``labels`` and ``polarity_source`` = ``model:<id>``."""
    index = table.column_names.index
    table = table.set_column(index("polarity"), "polarity", pa.array(labels, pa.string()))
    return table.set_column(index("polarity_source"), "polarity_source",
                            pa.array([f"model:{model_id}"] * len(labels), pa.string()))
