"""`layerfuse eval`: greedy answers on a cache split, exact-match accuracy per task category and overall.

Each sample is asked its first question (the first human turn, in the run's template) and its answer is
compared with the first reference answer after normalisation (case, surrounding spaces and punctuation).
Next to each category's accuracy stand two baselines, so "above chance" can be read off the table: the majority
baseline (how often the training split's most frequent answer of that category would be right) and chance
(1 / the number of distinct answers the training split gives in that category: guessing uniformly among them).

    RUN/eval/<split>/results.json   per category: n, correct, accuracy, majority baseline, chance; overall
    RUN/eval/<split>/results.md     the same as a table
    RUN/eval/<split>/answers.jsonl  LLaVA answer-file format (question_id, prompt, text, answer_id, model_id,
                                    metadata), for real benchmark scorers
"""

from __future__ import annotations

import json
import re
import string
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from layerfuse.core.distributed import DistContext
from layerfuse.core.errors import ConfigError
from layerfuse.pipeline.cache.reader import FeatureCache
from layerfuse.pipeline.data.conversation import SkipSample, prompt_for_generation
from layerfuse.pipeline.models.generate import greedy_generate
from layerfuse.pipeline.training.loader import LazyCache, own_generator
from layerfuse.pipeline.models.run import load_run
from layerfuse.core.workers import worker_init_fn

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]+$|^[{re.escape(string.punctuation)}]+")


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no punctuation at either end: 'Red.' == ' red'."""
    return _PUNCT.sub("", " ".join(text.lower().split())).strip()


@dataclass
class EvalConfig:
    run: str
    cache: str | None = None  # [the run's training cache]
    split: str = "val"
    categories: list[str] | None = None
    batch_size: int = 32
    max_new_tokens: int = 16
    limit: int | None = None  # the first N samples of the split (storage order)
    out: str | None = None  # [RUN/eval/<split>]
    device: str = "auto"
    workers: int = 2
    progress: bool = True


@dataclass
class EvalResult:
    out_dir: Path
    per_category: dict[str, dict[str, Any]]  # category -> n, correct, accuracy, majority, chance
    overall: dict[str, Any]
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"| category | n | accuracy | majority baseline | {CHANCE_HEADER} |", "|---|---|---|---|---|"]
        for c, r in sorted(self.per_category.items()):
            lines.append(f"| {c} | {r['n']} | {r['accuracy']:.3f} | {_fmt(r['majority'])} | {_fmt(r['chance'])} |")
        o = self.overall
        lines.append(f"| **overall** | {o['n']} | **{o['accuracy']:.3f}** | {_fmt(o['majority'])} | |")
        return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def first_exchange(conversations: list[dict[str, str]]) -> tuple[str, str] | None:
    """(first human turn, first gpt answer), or None when the sample has no answered question."""
    if len(conversations) < 2 or conversations[0].get("from") != "human" or conversations[1].get("from") != "gpt":
        return None
    return conversations[0]["value"], conversations[1]["value"]


class EvalChunks(Dataset):
    """Item i: rows chunk i -> features of the run's layers, first-turn text embeddings, prompts, references."""

    def __init__(self, lazy: LazyCache, chunks: list[np.ndarray], layers: list[int], need_text: bool, tokenizer: Any,
                 template: str, num_visual_tokens: int, image_token_id: int):
        self.lazy, self.chunks, self.layers, self.need_text = lazy, chunks, layers, need_text
        self.tokenizer, self.template, self.n_v, self.image_token_id = tokenizer, template, num_visual_tokens, image_token_id

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, Any]:
        cache = self.lazy.cache
        rows = self.chunks[i]
        convs, has_image, ids, cats = cache.conversations(rows), cache.has_image[rows], cache.sample_ids(rows), cache.categories[rows]
        keep, prompts, items, skipped = [], [], [], []
        for k, (conv, img) in enumerate(zip(convs, has_image)):
            ex = first_exchange(conv)
            if ex is None:
                skipped.append({"id": str(ids[k]), "reason": "no answered first question"})
                continue
            try:
                prompts.append(prompt_for_generation([{"from": "human", "value": ex[0]}], self.tokenizer, self.template,
                                                     num_visual_tokens=self.n_v, image_token_id=self.image_token_id, has_image=bool(img)))
            except SkipSample as e:
                skipped.append({"id": str(ids[k]), "reason": e.reason})
                continue
            keep.append(k)
            items.append({"id": str(ids[k]), "category": str(cats[k]), "question": ex[0], "reference": ex[1]})
        sel = rows[keep]
        layers = cache.features(sel, self.layers) if keep else None
        text = None
        if self.need_text and keep:
            turns, _ = cache.text_embeddings(sel, per_turn=True)
            text = turns[:, 0]  # the first question's embedding: that is the question asked
        return {"layers": layers, "text": text, "prompts": prompts, "items": items, "skipped": skipped}


def _collate(x: Any) -> Any:
    return x


def answer_counts(cache: FeatureCache, split: str = "train") -> dict[str, Counter]:
    """Per category: how often each normalised first answer occurs in `split`."""
    rows = cache.select(split=split)
    answers: dict[str, Counter] = {}
    for conv, cat in zip(cache.conversations(rows), cache.categories[rows]):
        ex = first_exchange(conv)
        if ex is not None:
            answers.setdefault(str(cat), Counter())[normalize_answer(ex[1])] += 1
    return answers


def majority_baseline(counts: Mapping[str, Counter]) -> dict[str, tuple[str, float]]:
    """Per category: the most frequent answer of `answer_counts` (and its share there)."""
    return {c: (cnt.most_common(1)[0][0], cnt.most_common(1)[0][1] / sum(cnt.values())) for c, cnt in counts.items()}


CHANCE_HEADER = "chance (1 / answers)"


def chance_levels(answers: Mapping[str, Iterable[str]]) -> dict[str, float]:
    """Per category: 1 / its number of distinct (normalised) training answers, the accuracy of guessing uniformly
    among them. `answers`: category -> its answers (a Counter of `answer_counts`, or a list with repeats)."""
    out = {}
    for c, a in answers.items():
        distinct = set(a)
        if distinct:
            out[c] = 1.0 / len(distinct)
    return out


@torch.inference_mode()
def evaluate(cfg: EvalConfig) -> EvalResult:
    device = DistContext().device(cfg.device)
    vlm, bundle, model = load_run(cfg.run, device=device)
    cache_url = cfg.cache or model.cache
    cache = FeatureCache(cache_url)
    fuser = vlm.fuser
    fuser.use_views(cache.views)  # group terms from the cache's stored group means, where it has them
    cache.resolve_layers(fuser.required_inputs)  # a missing layer is a CacheError naming layer and cache
    rows = cache.select(split=cfg.split)
    if cfg.categories:
        rows = rows[np.isin(cache.categories[rows], cfg.categories)]
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    if rows.size == 0:
        raise ConfigError(f"cache {cache_url} has no samples in split {cfg.split!r}" + (f" of categories {cfg.categories}" if cfg.categories else "")
                          + "; choose another --split or --categories (`layerfuse cache info` lists them)")
    chunks = [rows[i : i + cfg.batch_size] for i in range(0, rows.size, cfg.batch_size)]
    ds = EvalChunks(LazyCache(cache_url, None), chunks, fuser.required_inputs, fuser.needs_text, bundle.tokenizer, model.template,
                     fuser.num_visual_tokens, bundle.image_token_id)
    workers = min(cfg.workers, len(chunks))
    loader = DataLoader(ds, batch_size=None, collate_fn=_collate, num_workers=workers, worker_init_fn=worker_init_fn(workers),
                        generator=own_generator(0))
    counts = answer_counts(cache, "train")
    baseline, chance = majority_baseline(counts), chance_levels(counts)
    records, skipped = [], []
    model_id = Path(cfg.run).resolve().name
    with tqdm(total=int(rows.size), unit="sample", desc=f"eval {cfg.split}", disable=not cfg.progress) as bar:
        for chunk in loader:
            skipped += chunk["skipped"]
            if chunk["items"]:
                text = None if chunk["text"] is None else chunk["text"].float()
                gen = greedy_generate(vlm, chunk["prompts"], chunk["layers"].float(), text, pad_id=bundle.pad_token_id,
                                      eos_id=bundle.tokenizer.eos_token_id, max_new_tokens=cfg.max_new_tokens,
                                      suppress=[bundle.image_token_id])
                for item, ids in zip(chunk["items"], gen):
                    answer = bundle.tokenizer.decode(ids, skip_special_tokens=True).strip()
                    records.append({**item, "answer": answer, "correct": normalize_answer(answer) == normalize_answer(item["reference"])})
            bar.update(len(chunk["items"]) + len(chunk["skipped"]))
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / "eval" / cfg.split
    return _write(out, records, skipped, baseline, chance, model_id)


def _write(out: Path, records: list[dict[str, Any]], skipped: list[dict[str, Any]], baseline: dict[str, tuple[str, float]],
           chance: dict[str, float], model_id: str) -> EvalResult:
    out.mkdir(parents=True, exist_ok=True)
    per: dict[str, dict[str, Any]] = {}
    for r in records:
        c = per.setdefault(r["category"], {"n": 0, "correct": 0, "majority_hits": 0, "has_baseline": r["category"] in baseline})
        c["n"] += 1
        c["correct"] += int(r["correct"])
        if r["category"] in baseline:
            c["majority_hits"] += int(normalize_answer(r["reference"]) == baseline[r["category"]][0])
    for c, v in per.items():
        v["accuracy"] = v["correct"] / v["n"]
        v["majority"] = v["majority_hits"] / v["n"] if v.pop("has_baseline") else None
        v["majority_answer"] = baseline[c][0] if c in baseline else None
        v["chance"] = chance.get(c)
        v.pop("majority_hits")
    n = len(records)
    overall = {"n": n, "correct": sum(v["correct"] for v in per.values()), "accuracy": sum(v["correct"] for v in per.values()) / max(1, n),
               "majority": sum((v["majority"] or 0) * v["n"] for v in per.values()) / max(1, n)}
    result = EvalResult(out, per, overall, skipped)
    (out / "results.json").write_text(json.dumps({"per_category": per, "overall": overall, "skipped": skipped}, indent=1))
    (out / "results.md").write_text(result.table() + "\n")
    with (out / "answers.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps({"question_id": r["id"], "prompt": r["question"], "text": r["answer"], "answer_id": uuid.uuid5(uuid.NAMESPACE_URL, f"{model_id}/{r['id']}").hex,
                                "model_id": model_id, "metadata": {"category": r["category"], "reference": r["reference"], "correct": r["correct"]}}) + "\n")
    return result
