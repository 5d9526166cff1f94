"""Tokenising LLaVA conversations for training and evaluation: templates, label masking, image expansion.

A conversation is LLaVA's list of turns, `[{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt",
"value": "A"}, ...]`. `tokenize_conversation` turns one into `input_ids` [S] and `labels` [S] (-100
except on the assistant replies and their end-of-turn token), with `<image>` expanded to exactly
`num_visual_tokens` copies of the image token id. Templates:

    plain  (stage 1, LLaVA's "plain"): <s> <image>*N  caption </s>         the human turn is dropped
    v1     (stage 2, vicuna v1):       <s> SYSTEM USER: <image>*N \\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>
    chat   the tokenizer's own chat template (`apply_chat_template`), text rendered then tokenised

Text between special tokens (image span, bos, eos) is tokenised in one call and each token is labelled
by the template part its first character belongs to, so an answer is tokenised as it reads in context
(" red" after "ASSISTANT:") and `prompt_for_generation` gives exactly the training sample's prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence, get_args

import torch

from layerfuse.core.errors import ConfigError

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100
Template = Literal["plain", "v1", "chat"]  # the conversation templates (render_plain, render_v1, render_chat)
TEMPLATES: tuple[str, ...] = get_args(Template)
V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
V1_ROLES = ("USER", "ASSISTANT")
V1_SEP = " "  # after the system prompt and after each human turn; the assistant turn ends with eos

_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "model": "gpt"}
_CHAT_ROLES = {"human": "user", "gpt": "assistant"}


class SkipSample(ValueError):
    """This sample cannot be used with these settings (the loader counts these and moves on)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class TemplateError(ConfigError):
    """The template cannot be used with this tokenizer (no chat template, no eos token, ...)."""


@dataclass(frozen=True)
class TokenizedSample:
    """One tokenised conversation (or generation prompt)."""

    input_ids: torch.Tensor  # [S] int64
    labels: torch.Tensor  # [S] int64, IGNORE_INDEX where there is no loss
    image_start: int  # index of the first image token, -1 without an image
    num_image_tokens: int  # length of the contiguous image span, 0 without an image
    truncated: bool = False  # cut to max_length (still has supervised tokens)

    @property
    def has_image(self) -> bool:
        return self.image_start >= 0

    @property
    def num_supervised(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class TokenBatch:
    """Right-padded batch of `TokenizedSample`s."""

    input_ids: torch.Tensor  # [B, S] int64, pad_id past each sample's end
    attention_mask: torch.Tensor  # [B, S] int64, 1 on real tokens
    labels: torch.Tensor  # [B, S] int64, IGNORE_INDEX on padding
    has_image: torch.Tensor  # [B] bool
    image_start: torch.Tensor  # [B] int64, -1 without an image

    def to(self, device: str | torch.device) -> "TokenBatch":
        return TokenBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels, self.has_image, self.image_start)))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


# A rendered conversation is a list of pieces:
#   ("text", str, supervised)   text, tokenised together with neighbouring text pieces
#   ("token", int, supervised)  one special token id (bos, eos)
#   ("image", None, False)      the image span
_Piece = tuple[str, Any, bool]


# ------------------------------------------------------------------------------------- normalising


def _turns(conversations: Sequence[dict[str, str]], has_image: bool, *, for_generation: bool) -> list[tuple[str, str]]:
    """LLaVA turns -> [(role in {human, gpt}, text)], alternating from human, `<image>` moved like LLaVA.

    With an image, every `<image>` is removed and one is put at the start of the first human turn
    ("<image>\\n" + stripped text). Training conversations end with a gpt turn (a trailing human turn has
    nothing to supervise and is dropped); generation conversations end with a human turn.
    """
    turns: list[tuple[str, str]] = []
    for n, t in enumerate(conversations, start=1):
        role = _ROLES.get(str(t.get("from", t.get("role", ""))).strip().lower())
        value = t.get("value", t.get("content"))
        if role is None or not isinstance(value, str):
            raise SkipSample(f"turn {n} is not a human/gpt turn with a text value")
        turns.append((role, value))
    if not turns or turns[0][0] != "human":
        raise SkipSample("the conversation does not start with a human turn")
    if any(role != ("human", "gpt")[i % 2] for i, (role, _) in enumerate(turns)):
        raise SkipSample("turns do not alternate human/gpt")
    if any(role == "gpt" and IMAGE_TOKEN in value for role, value in turns):
        raise SkipSample(f"a gpt turn contains {IMAGE_TOKEN}")
    if has_image:
        turns = [(r, v.replace(IMAGE_TOKEN, "").strip() if IMAGE_TOKEN in v else v) for r, v in turns]
        turns[0] = ("human", (IMAGE_TOKEN + "\n" + turns[0][1]).strip())
    elif any(IMAGE_TOKEN in v for _, v in turns):
        raise SkipSample(f"text-only sample contains {IMAGE_TOKEN}")
    if for_generation:
        if turns[-1][0] != "human":
            raise ValueError("a generation prompt must end with a human turn")
    else:
        if turns[-1][0] == "human":
            turns = turns[:-1]
        if not turns:
            raise SkipSample("no assistant turn")
    return turns


# -------------------------------------------------------------------------------------- templates


def _special_id(tokenizer: Any, which: str, template: str) -> int:
    tid = getattr(tokenizer, f"{which}_token_id", None)
    if tid is None:
        raise TemplateError(f"template '{template}' needs an {which} token, and tokenizer {_name(tokenizer)} has none")
    return int(tid)


def _name(tokenizer: Any) -> str:
    return repr(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _bos(tokenizer: Any) -> list[_Piece]:
    tid = getattr(tokenizer, "bos_token_id", None)
    return [] if tid is None else [("token", int(tid), False)]


def _split_image(text: str) -> list[_Piece]:
    """Unsupervised text with `<image>` cut out as an image piece."""
    parts = text.split(IMAGE_TOKEN)
    out: list[_Piece] = [("text", parts[0], False)]
    for p in parts[1:]:
        out += [("image", None, False), ("text", p, False)]
    return [p for p in out if p[0] != "text" or p[1]]


def _render_plain(turns: list[tuple[str, str]], tokenizer: Any, has_image: bool, generation: bool) -> list[_Piece]:
    if not has_image:
        raise SkipSample("the plain template needs an image")
    if len(turns) != (1 if generation else 2):
        raise SkipSample("the plain template takes exactly one human/gpt exchange")
    eos = _special_id(tokenizer, "eos", "plain")
    pieces = _bos(tokenizer) + [("image", None, False)]
    if not generation:
        pieces += [("text", turns[1][1], True), ("token", eos, True)]
    return [p for p in pieces if p[0] != "text" or p[1]]


def _render_v1(turns: list[tuple[str, str]], tokenizer: Any, has_image: bool, generation: bool) -> list[_Piece]:
    eos = _special_id(tokenizer, "eos", "v1")
    user, assistant = V1_ROLES
    pieces = _bos(tokenizer)
    prompt = V1_SYSTEM + V1_SEP
    for role, value in turns:
        if role == "human":
            prompt += f"{user}: {value}{V1_SEP}{assistant}:"
        else:
            pieces += _split_image(prompt) + [("text", f" {value}" if value else "", True), ("token", eos, True)]
            prompt = ""
    if generation:
        pieces += _split_image(prompt)
    return [p for p in pieces if p[0] != "text" or p[1]]


def _render_chat(turns: list[tuple[str, str]], tokenizer: Any, has_image: bool, generation: bool) -> list[_Piece]:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            f"tokenizer {_name(tokenizer)} has no chat template; use the 'v1' or 'plain' template, or a "
            f"tokenizer whose tokenizer_config.json (or chat_template.jinja) defines one"
        )
    messages = [{"role": _CHAT_ROLES[r], "content": v} for r, v in turns]
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    if generation:
        return _split_image(render(messages, True))
    full = render(messages, False)
    spans: list[tuple[int, int]] = []  # supervised character ranges of `full`
    for i, (role, _) in enumerate(turns):
        if role != "gpt":
            continue
        before, after = render(messages[:i], True), render(messages[: i + 1], False)
        if not (full.startswith(before) and full.startswith(after) and len(before) <= len(after)):
            raise TemplateError(
                f"the chat template of {_name(tokenizer)} does not render conversations prefix-consistently "
                f"(turn {i + 1}); cannot locate the assistant replies"
            )
        spans.append((len(before), len(after)))
    pieces: list[_Piece] = []
    pos = 0
    for a, b in spans:
        pieces += _split_image(full[pos:a]) + [("text", full[a:b], True)]
        pos = b
    pieces += _split_image(full[pos:])
    return [p for p in pieces if p[0] != "text" or p[1]]


_RENDERERS = {"plain": _render_plain, "v1": _render_v1, "chat": _render_chat}


# ------------------------------------------------------------------------------------- tokenising


def _encode_text(tokenizer: Any, parts: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Tokenise consecutive text parts as one string; a token is supervised when its first character is."""
    text = "".join(t for t, _ in parts)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        char_sup = [s for t, s in parts for _ in t]
        ids = list(enc["input_ids"])
        sup = [char_sup[min(start, len(char_sup) - 1)] for start, _ in enc["offset_mapping"]]
        return ids, sup
    ids, sup = [], []  # tokenizers without offsets: each part on its own
    for t, s in parts:
        part_ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        ids += part_ids
        sup += [s] * len(part_ids)
    return ids, sup


def _assemble(pieces: list[_Piece], tokenizer: Any, num_visual_tokens: int, image_token_id: int) -> tuple[list[int], list[int], int]:
    """Pieces -> (input_ids, labels, image_start)."""
    ids: list[int] = []
    labels: list[int] = []
    image_start = -1
    run: list[tuple[str, bool]] = []

    def flush() -> None:
        if run:
            run_ids, run_sup = _encode_text(tokenizer, run)
            ids.extend(run_ids)
            labels.extend(i if s else IGNORE_INDEX for i, s in zip(run_ids, run_sup))
            run.clear()

    for kind, value, supervised in pieces:
        if kind == "text":
            run.append((value, supervised))
            continue
        flush()
        if kind == "image":
            if image_start >= 0:
                raise SkipSample(f"more than one {IMAGE_TOKEN}")
            image_start = len(ids)
            ids += [image_token_id] * num_visual_tokens
            labels += [IGNORE_INDEX] * num_visual_tokens
        else:
            ids.append(value)
            labels.append(value if supervised else IGNORE_INDEX)
    flush()
    n_img = sum(i == image_token_id for i in ids)
    if n_img != (num_visual_tokens if image_start >= 0 else 0):
        raise SkipSample(f"the text itself contains the image token (id {image_token_id})")
    return ids, labels, image_start


def _check_args(template: str, has_image: bool, num_visual_tokens: int) -> None:
    if template not in _RENDERERS:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    if has_image and num_visual_tokens < 1:
        raise ValueError(f"num_visual_tokens must be >= 1 for a sample with an image (got {num_visual_tokens})")


def tokenize_conversation(
    conversations: Sequence[dict[str, str]],
    tokenizer: Any,
    template: str,
    *,
    num_visual_tokens: int,
    image_token_id: int,
    max_length: int,
    has_image: bool,
) -> TokenizedSample:
    """A LLaVA conversation -> `TokenizedSample` (input_ids/labels [S], S <= max_length).

    Labels are IGNORE_INDEX except on assistant replies and their end-of-turn token. With `has_image`,
    the image span is `num_visual_tokens` contiguous copies of `image_token_id` at `image_start`.
    A sample longer than `max_length` is cut at the end; raises `SkipSample` when that would cut the
    image span, when no supervised token is left, or when the conversation is unusable for `template`.
    """
    _check_args(template, has_image, num_visual_tokens)
    turns = _turns(conversations, has_image, for_generation=False)
    pieces = _RENDERERS[template](turns, tokenizer, has_image, False)
    ids, labels, image_start = _assemble(pieces, tokenizer, num_visual_tokens, image_token_id)
    truncated = len(ids) > max_length
    if truncated:
        if image_start >= 0 and image_start + num_visual_tokens > max_length:
            raise SkipSample(
                f"max_length {max_length} would cut the image span [{image_start}, {image_start + num_visual_tokens})"
            )
        ids, labels = ids[:max_length], labels[:max_length]
    if all(lab == IGNORE_INDEX for lab in labels):
        raise SkipSample(f"no supervised token {'left after truncation to ' + str(max_length) if truncated else 'in the sample'}")
    return TokenizedSample(
        input_ids=torch.tensor(ids, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        image_start=image_start,
        num_image_tokens=num_visual_tokens if image_start >= 0 else 0,
        truncated=truncated,
    )


def prompt_for_generation(
    question: str | Sequence[dict[str, str]],
    tokenizer: Any,
    template: str,
    *,
    num_visual_tokens: int,
    image_token_id: int,
    has_image: bool = True,
    max_length: int | None = None,
) -> TokenizedSample:
    """The prompt ids [S] that end exactly where the assistant's answer begins (labels all IGNORE_INDEX).

    `question` is one human turn's text or a LLaVA conversation ending with a human turn (earlier turns
    are history). For a conversation whose first exchange is (question, answer), it equals the prefix of
    `tokenize_conversation(...)` up to the first supervised token. Raises `SkipSample` when longer than
    `max_length`.
    """
    _check_args(template, has_image, num_visual_tokens)
    conv = [{"from": "human", "value": question}] if isinstance(question, str) else list(question)
    turns = _turns(conv, has_image, for_generation=True)
    pieces = _RENDERERS[template](turns, tokenizer, has_image, True)
    ids, _, image_start = _assemble(pieces, tokenizer, num_visual_tokens, image_token_id)
    if max_length is not None and len(ids) > max_length:
        raise SkipSample(f"the prompt has {len(ids)} tokens, more than max_length {max_length}")
    t = torch.tensor(ids, dtype=torch.long)
    return TokenizedSample(t, torch.full_like(t, IGNORE_INDEX), image_start, num_visual_tokens if image_start >= 0 else 0)


def collate(samples: Sequence[TokenizedSample], pad_id: int, *, pad_to_multiple_of: int | None = None) -> TokenBatch:
    """Right-pad samples to the longest (rounded up to `pad_to_multiple_of`): tensors [B, S] and [B]."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    s = max(len(x) for x in samples)
    if pad_to_multiple_of:
        s = -(-s // pad_to_multiple_of) * pad_to_multiple_of
    b = len(samples)
    input_ids = torch.full((b, s), int(pad_id), dtype=torch.long)
    labels = torch.full((b, s), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((b, s), dtype=torch.long)
    for i, x in enumerate(samples):
        n = len(x)
        input_ids[i, :n] = x.input_ids
        labels[i, :n] = x.labels
        attention_mask[i, :n] = 1
    has_image = torch.tensor([x.has_image for x in samples], dtype=torch.bool)
    image_start = torch.tensor([x.image_start for x in samples], dtype=torch.long)
    return TokenBatch(input_ids, attention_mask, labels, has_image, image_start)
