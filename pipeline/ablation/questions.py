"""The questions an ablation sweep trains and evaluates on, with their answers (both budgets use the same ones).

Each sample contributes its first exchange (question, answer) when it has an image. Categories: the sweep's, or
by default the *closed-answer* categories: those whose normalised training answers repeat (at most half as many
distinct answers as samples), so free-text captions are left out and short-answer VQA categories are in.
Answers are numbered over the training split (the probe's classes); an evaluation answer outside that vocabulary
is `UNKNOWN` (always wrong for the probe; the LM may still generate it).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from layerfuse.pipeline.cache.reader import FeatureCache
from layerfuse.pipeline.training.evaluate import chance_levels, first_exchange, normalize_answer


UNKNOWN = -1


@dataclass
class QuestionSet:
    """Training and evaluation questions with their answers as class ids."""

    answers: list[str]  # the vocabulary: normalised training answers, most frequent first
    train_rows: np.ndarray  # [n] reader rows, ascending
    train_labels: np.ndarray  # [n] int64
    eval_rows: np.ndarray  # [m] reader rows, ascending
    eval_labels: np.ndarray  # [m] int64, UNKNOWN outside the vocabulary
    eval_categories: np.ndarray  # [m] str
    categories: list[str]
    majority: dict[str, float]  # category -> eval accuracy of always giving its most frequent training answer
    chance: dict[str, float]  # category -> 1 / its distinct training answers (as `layerfuse eval` reports it)

    def labels_of(self, rows: np.ndarray) -> np.ndarray:
        """Training labels of reader rows (which must be training rows)."""
        return self.train_labels[np.searchsorted(self.train_rows, rows)]


def closed_categories(cache: FeatureCache, split: str = "train") -> list[str]:
    """Categories whose normalised first answers in `split` repeat (distinct answers <= half the samples)."""
    per: dict[str, Counter] = {}
    rows = cache.select(split=split)
    for conv, cat in zip(cache.conversations(rows), cache.categories[rows]):
        ex = first_exchange(conv)
        if ex is not None:
            per.setdefault(str(cat), Counter())[normalize_answer(ex[1])] += 1
    return sorted(c for c, cnt in per.items() if sum(cnt.values()) >= 2 and len(cnt) <= 0.5 * sum(cnt.values()))


def question_rows(cache: FeatureCache, split: str, categories: list[str], limit: int | None = None) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Rows of `split` in `categories` with an image and an answered first question -> (rows, answers, categories)."""
    rows = cache.select(split=split, has_image=True)
    rows = rows[np.isin(cache.categories[rows], categories)]
    keep, answers = [], []
    for r, conv in zip(rows, cache.conversations(rows)):
        ex = first_exchange(conv)
        if ex is not None:
            keep.append(int(r))
            answers.append(normalize_answer(ex[1]))
    out = np.asarray(keep, dtype=np.int64)
    if limit is not None:
        out, answers = out[:limit], answers[:limit]
    return out, answers, np.asarray([str(c) for c in cache.categories[out]], dtype=object)


def question_set(cache: FeatureCache, categories: list[str] | None, train_split: str = "train", eval_split: str = "val",
                 eval_limit: int | None = None) -> QuestionSet:
    """The sweep's questions; a ValueError names what is missing."""
    cats = list(categories) if categories else closed_categories(cache, train_split)
    if not cats:
        raise ValueError(f"cache {cache.url} has no closed-answer category in split {train_split!r}; name the categories explicitly")
    known = set(cache.categories.tolist())
    missing = sorted(set(cats) - known)
    if missing:
        raise ValueError(f"cache {cache.url} has no category {', '.join(missing)}; it has {', '.join(sorted(known))}")
    tr_rows, tr_answers, tr_cats = question_rows(cache, train_split, cats)
    if tr_rows.size == 0:
        raise ValueError(f"cache {cache.url} has no answered questions of categories {cats} in split {train_split!r}")
    ev_rows, ev_answers, ev_cats = question_rows(cache, eval_split, cats, eval_limit)
    if ev_rows.size == 0:
        raise ValueError(f"cache {cache.url} has no answered questions of categories {cats} in split {eval_split!r}")
    counts = Counter(tr_answers)
    vocab = [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    index = {a: i for i, a in enumerate(vocab)}
    top = {c: Counter(a for a, cc in zip(tr_answers, tr_cats) if cc == c).most_common(1)[0][0] for c in set(tr_cats.tolist())}
    majority = {}
    for c in sorted(set(ev_cats.tolist())):
        sel = [a for a, cc in zip(ev_answers, ev_cats) if cc == c]
        majority[str(c)] = sum(a == top.get(c) for a in sel) / len(sel)
    by_category: dict[str, list[str]] = {}
    for a, c in zip(tr_answers, tr_cats):
        by_category.setdefault(str(c), []).append(a)
    return QuestionSet(
        answers=vocab,
        train_rows=tr_rows,
        train_labels=np.asarray([index[a] for a in tr_answers], dtype=np.int64),
        eval_rows=ev_rows,
        eval_labels=np.asarray([index.get(a, UNKNOWN) for a in ev_answers], dtype=np.int64),
        eval_categories=ev_cats,
        categories=sorted(cats),
        majority=majority,
        chance=chance_levels(by_category),
    )
