"""The embedded default LLM (build, save, reload, tokenizer) and conversation tokenisation (templates,
label masking, image expansion, truncation, generation prompts, collation)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
from layerfuse.core.hub import CheckpointError
from layerfuse.pipeline.data import synthetic
from layerfuse.pipeline.data.conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    V1_SYSTEM,
    SkipSample,
    TemplateError,
    collate,
    prompt_for_generation,
    tokenize_conversation,
)
from layerfuse.pipeline.models.default_build import MARKER
from layerfuse.pipeline.models.llm import (
    DefaultLLMConfig,
    build_default_llm,
    load_llm,
    resolve_attn_implementation,
)

N_V = 5  # visual tokens in these tests
CONV = [
    {"from": "human", "value": "<image>\nWhat colour is the circle?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "How many squares are there?"},
    {"from": "gpt", "value": "3"},
]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}[U] {{ m['content'] }}\n"
    "{% else %}[A] {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}[A]{% endif %}"
)


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory) -> Path:
    return build_default_llm(tmp_path_factory.mktemp("run") / "llm")


@pytest.fixture(scope="module")
def bundle(llm_dir):
    return load_llm(str(llm_dir))


@pytest.fixture(scope="module")
def tok(bundle):
    return bundle.tokenizer


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def tokenize(tok, conv, template="v1", *, has_image=True, max_length=512, n_v=N_V):
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    return tokenize_conversation(
        conv, tok, template, num_visual_tokens=n_v, image_token_id=image_id, max_length=max_length, has_image=has_image
    )


def prompt(tok, question, template="v1", *, has_image=True):
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    return prompt_for_generation(question, tok, template, num_visual_tokens=N_V, image_token_id=image_id, has_image=has_image)


def supervised_runs(sample) -> list[list[int]]:
    """Contiguous groups of supervised label ids."""
    runs, cur = [], []
    for lab in sample.labels.tolist():
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(lab)
    return runs + ([cur] if cur else [])


def text_of(tok, sample) -> str:
    """The sample decoded, with the image span written once as <image>."""
    ids = sample.input_ids.tolist()
    if sample.has_image:
        ids = ids[: sample.image_start] + ids[sample.image_start + sample.num_image_tokens - 1 :]
    return tok.decode(ids, skip_special_tokens=False)


# ------------------------------------------------------------------------------------ default LLM


def test_default_llm_builds_saves_and_reloads(llm_dir, bundle, tmp_path):
    marker = json.loads((llm_dir / MARKER).read_text())
    assert marker["note"] == "random weights" and marker["kind"] == "llm"
    assert not list(llm_dir.parent.glob(f".{llm_dir.name}.tmp-*"))
    mtime = (llm_dir / "model.safetensors").stat().st_mtime_ns
    assert build_default_llm(llm_dir) == llm_dir and (llm_dir / "model.safetensors").stat().st_mtime_ns == mtime

    model, tok = bundle.model, bundle.tokenizer
    assert isinstance(model, transformers.LlamaForCausalLM) and bundle.attn_implementation == "sdpa"
    assert bundle.image_token_id == tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) <= 2000  # nothing was added on load
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id

    direct = transformers.AutoModelForCausalLM.from_pretrained(llm_dir)
    direct_tok = transformers.AutoTokenizer.from_pretrained(llm_dir)
    assert direct_tok.get_vocab() == tok.get_vocab()
    for (k, a), (_, b) in zip(model.state_dict().items(), direct.state_dict().items()):
        assert torch.equal(a, b), k
    ids = torch.tensor([enc(tok, "What colour is the circle?")])
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()

    again = build_default_llm(tmp_path / "llm2")  # deterministic: same seed, same corpus -> same files
    assert (again / "tokenizer.json").read_bytes() == (llm_dir / "tokenizer.json").read_bytes()
    assert (again / "model.safetensors").read_bytes() == (llm_dir / "model.safetensors").read_bytes()


def test_incomplete_default_dir_is_not_overwritten(tmp_path):
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a complete default LLM"):
        build_default_llm(tmp_path / "llm")


def test_default_dir_of_other_settings_is_refused(llm_dir):
    """The default tower's reuse rule (one builder, default_build.py): a folder built otherwise is never reused."""
    with pytest.raises(CheckpointError, match=r"default LLM built with other settings \(differs in: corpus_samples, seed\)"):
        build_default_llm(llm_dir, replace(DefaultLLMConfig(), seed=1, corpus_samples=10))


def test_load_default_by_name(llm_dir):
    b = load_llm("default", default_dir=llm_dir)
    assert b.name == "default" and b.image_token_id >= 0
    with pytest.raises(ValueError, match="default_dir"):
        load_llm("default")


def test_tokenizer_round_trips_builtin_text(tok):
    unk = tok.unk_token_id
    for i in range(300):
        scene = synthetic.make_scene(7, i)  # a seed the tokenizer was not trained on
        for text in (scene.human.replace(IMAGE_TOKEN, "").strip(), scene.answer, V1_SYSTEM):
            ids = enc(tok, text)
            assert unk not in ids
            assert tok.decode(ids) == text
    assert len(enc(tok, "What colour is the circle?")) == 6  # one token per word, "?"
    assert len(enc(tok, " red")) == 1
    assert enc(tok, IMAGE_TOKEN) == [tok.convert_tokens_to_ids(IMAGE_TOKEN)]
    assert IMAGE_TOKEN in tok.all_special_tokens
    assert tok("hi").input_ids[0] == tok.bos_token_id


def test_missing_hub_id_fails_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="hf download"):
        load_llm("layerfuse-test/no-such-llm")
    with pytest.raises(CheckpointError, match="no such directory"):
        load_llm("./no/such/dir")


def test_image_and_pad_tokens_added_when_missing(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    cfg = transformers.LlamaConfig(vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    b = load_llm(str(tmp_path), attn_implementation="eager")
    assert b.attn_implementation == "eager"
    assert b.image_token_id == 4 and len(b.tokenizer) == 5
    assert enc(b.tokenizer, "hello <image> world") == [2, 4, 3]
    emb = b.model.get_input_embeddings().weight
    head = b.model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == 5
    assert torch.allclose(emb[4], emb[:4].mean(0)) and torch.allclose(head[4], head[:4].mean(0))
    assert b.tokenizer.pad_token == "<unk>" and b.model.config.pad_token_id == 0


def test_attn_implementation_auto(monkeypatch):
    llama = transformers.LlamaForCausalLM
    assert resolve_attn_implementation("auto", llama, "cpu", torch.bfloat16) == "sdpa"
    assert resolve_attn_implementation("eager", llama, "cpu", torch.float32) == "eager"
    no_sdpa = type("NoSdpa", (), {"_supports_sdpa": False})
    assert resolve_attn_implementation("auto", no_sdpa, "cpu", torch.float32) == "eager"
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "flash_attn" else real(n, *a))
    assert resolve_attn_implementation("auto", llama, "cuda", torch.bfloat16) == "flash_attention_2"
    assert resolve_attn_implementation("auto", llama, "cuda", torch.float32) == "sdpa"
    assert resolve_attn_implementation("auto", llama, "cpu", torch.float16) == "sdpa"


# -------------------------------------------------------------------------------------- templates


def test_v1_layout_multi_turn(tok):
    s = tokenize(tok, CONV)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    expected = (
        [tok.bos_token_id] + enc(tok, V1_SYSTEM + " USER: ") + [image_id] * N_V
        + enc(tok, "\nWhat colour is the circle? ASSISTANT: red") + [tok.eos_token_id]
        + enc(tok, "USER: How many squares are there? ASSISTANT: 3") + [tok.eos_token_id]
    )
    assert s.input_ids.tolist() == expected
    assert s.input_ids.dtype == s.labels.dtype == torch.long and s.labels.shape == s.input_ids.shape
    assert text_of(tok, s) == (
        f"<s>{V1_SYSTEM} USER: <image>\nWhat colour is the circle? ASSISTANT: red</s>"
        "USER: How many squares are there? ASSISTANT: 3</s>"
    )
    # image span: contiguous, exactly N_V long, unsupervised
    positions = (s.input_ids == image_id).nonzero().flatten().tolist()
    assert positions == list(range(s.image_start, s.image_start + N_V)) and s.num_image_tokens == N_V
    # loss only on the replies and their eos
    runs = supervised_runs(s)
    assert [tok.decode(r) for r in runs] == [" red</s>", " 3</s>"]
    assert runs == [enc(tok, " red") + [tok.eos_token_id], enc(tok, " 3") + [tok.eos_token_id]]
    assert s.num_supervised == sum(map(len, runs)) and not s.truncated


def test_plain_layout(tok):
    caption = "A red circle above a blue square on a dark grey background."
    conv = [{"from": "human", "value": "Describe the image briefly.\n<image>"}, {"from": "gpt", "value": caption}]
    s = tokenize(tok, conv, "plain")
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert s.input_ids.tolist() == [tok.bos_token_id] + [image_id] * N_V + enc(tok, caption) + [tok.eos_token_id]
    assert s.image_start == 1
    assert supervised_runs(s) == [enc(tok, caption) + [tok.eos_token_id]]
    p = prompt(tok, "anything", "plain")
    assert p.input_ids.tolist() == [tok.bos_token_id] + [image_id] * N_V
    with pytest.raises(SkipSample, match="needs an image"):
        tokenize(tok, [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], "plain", has_image=False)
    with pytest.raises(SkipSample, match="exactly one"):
        tokenize(tok, CONV, "plain")


def test_image_token_moved_or_added(tok):
    ref = tokenize(tok, CONV[:2])
    moved = tokenize(tok, [{"from": "human", "value": "What colour is the circle?\n<image>"}, CONV[1]])
    added = tokenize(tok, [{"from": "human", "value": "What colour is the circle?"}, CONV[1]])
    assert moved.input_ids.tolist() == ref.input_ids.tolist() == added.input_ids.tolist()
    later = tokenize(tok, [CONV[0] | {"value": "What colour is the circle?"}, CONV[1], CONV[2] | {"value": "<image> How many squares are there?"}, CONV[3]])
    assert later.input_ids.tolist() == tokenize(tok, CONV).input_ids.tolist()


def test_text_only_sample(tok):
    conv = [{"from": "human", "value": "What digit comes after 3?"}, {"from": "gpt", "value": "4"}]
    s = tokenize(tok, conv, has_image=False)
    assert s.image_start == -1 and s.num_image_tokens == 0 and not s.has_image
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) not in s.input_ids.tolist()
    assert text_of(tok, s) == f"<s>{V1_SYSTEM} USER: What digit comes after 3? ASSISTANT: 4</s>"
    assert [tok.decode(r) for r in supervised_runs(s)] == [" 4</s>"]
    with pytest.raises(SkipSample, match="text-only"):
        tokenize(tok, CONV, has_image=False)


def test_unusable_conversations_are_skipped(tok):
    with pytest.raises(SkipSample, match="alternate"):
        tokenize(tok, [CONV[0], CONV[2], CONV[1]])
    with pytest.raises(SkipSample, match="no assistant"):
        tokenize(tok, [CONV[0]])
    with pytest.raises(SkipSample, match="human turn"):
        tokenize(tok, [CONV[1], CONV[0]])
    with pytest.raises(SkipSample, match="gpt turn"):
        tokenize(tok, [CONV[0], {"from": "gpt", "value": "see <image>"}])
    with pytest.raises(ValueError, match="unknown template"):
        tokenize(tok, CONV, "vicuna_v2")
    with pytest.raises(ValueError, match="num_visual_tokens"):
        tokenize(tok, CONV, n_v=0)
    assert isinstance(SkipSample("x"), ValueError) and SkipSample("why").reason == "why"


def test_trailing_human_turn_is_dropped(tok):
    assert tokenize(tok, CONV[:3]).input_ids.tolist() == tokenize(tok, CONV[:2]).input_ids.tolist()


def test_truncation(tok):
    full = tokenize(tok, CONV[:2])
    end_of_image = full.image_start + N_V
    with pytest.raises(SkipSample, match="image span"):
        tokenize(tok, CONV[:2], max_length=end_of_image - 1)
    with pytest.raises(SkipSample, match="image span"):
        tokenize(tok, CONV[:2], max_length=full.image_start - 2)
    first_sup = int((full.labels != IGNORE_INDEX).nonzero()[0])
    with pytest.raises(SkipSample, match="no supervised token left"):
        tokenize(tok, CONV[:2], max_length=first_sup)
    kept = tokenize(tok, CONV[:2], max_length=first_sup + 1)  # the answer's first token survives
    assert kept.truncated and len(kept) == first_sup + 1 and kept.num_supervised == 1
    assert kept.input_ids.tolist() == full.input_ids.tolist()[: first_sup + 1]

    long_answer = " ".join(["a red circle"] * 100)
    s = tokenize(tok, [CONV[0], {"from": "gpt", "value": long_answer}], max_length=128)
    assert s.truncated and len(s) == 128 and s.num_supervised > 50 and s.labels[-1] != IGNORE_INDEX
    assert tokenize(tok, CONV[:2], max_length=len(full)).input_ids.tolist() == full.input_ids.tolist()


def test_chat_template(tok, llm_dir):
    with pytest.raises(TemplateError, match="no chat template"):
        tokenize(tok, CONV, "chat")
    with pytest.raises(TemplateError, match="no chat template"):
        prompt(tok, "hi", "chat")
    chat_tok = transformers.AutoTokenizer.from_pretrained(llm_dir)
    chat_tok.chat_template = CHAT_TEMPLATE
    s = tokenize(chat_tok, CONV, "chat")
    assert text_of(chat_tok, s) == (
        "[U] <image>\nWhat colour is the circle?\n[A] red</s>\n[U] How many squares are there?\n[A] 3</s>\n"
    )
    assert s.input_ids.tolist().count(chat_tok.eos_token_id) == 2  # eos in the rendered text is the eos token
    assert [chat_tok.decode(r) for r in supervised_runs(s)] == [" red</s>\n", " 3</s>\n"]
    positions = (s.input_ids == chat_tok.convert_tokens_to_ids(IMAGE_TOKEN)).nonzero().flatten().tolist()
    assert positions == list(range(s.image_start, s.image_start + N_V))
    p = prompt(chat_tok, "What colour is the circle?", "chat")
    assert s.input_ids.tolist()[: len(p)] == p.input_ids.tolist()
    assert s.labels[len(p) - 1] == IGNORE_INDEX and s.labels[len(p)] != IGNORE_INDEX


@pytest.mark.parametrize("template", ["v1", "plain"])
def test_prompt_ends_where_the_answer_begins(tok, template):
    conv = CONV[:2]
    s = tokenize(tok, conv, template)
    p = prompt(tok, "What colour is the circle?", template)
    n = len(p)
    assert s.input_ids.tolist()[:n] == p.input_ids.tolist()
    assert (s.labels[:n] == IGNORE_INDEX).all() and s.labels[n] != IGNORE_INDEX
    assert (p.labels == IGNORE_INDEX).all() and p.image_start == s.image_start and p.num_image_tokens == N_V
    if template == "v1":
        assert tok.decode(p.input_ids[-2:]) == " ASSISTANT:"


def test_prompt_with_history(tok):
    s = tokenize(tok, CONV)
    p = prompt(tok, CONV[:3])
    n = len(p)
    assert s.input_ids.tolist()[:n] == p.input_ids.tolist()
    assert s.labels[n - 1] == IGNORE_INDEX and tok.decode(s.labels[n:].tolist()) == " 3</s>"
    text_only = prompt(tok, "What digit comes after 3?", has_image=False)
    assert text_only.image_start == -1 and tok.convert_tokens_to_ids(IMAGE_TOKEN) not in text_only.input_ids.tolist()


def test_builtin_dataset_tokenizes(tok):
    for i in range(200):
        scene = synthetic.make_scene(3, i)
        conv = scene.conversations()
        s = tokenize(tok, conv, "v1", max_length=256)
        assert s.num_image_tokens == N_V and tok.unk_token_id not in s.input_ids.tolist()
        assert tok.decode(supervised_runs(s)[0]) == f" {scene.answer}</s>"
        if scene.category == "caption":
            assert tok.decode(supervised_runs(tokenize(tok, conv, "plain"))[0]) == f"{scene.answer}</s>"


def test_collate(tok):
    a = tokenize(tok, CONV)
    b = tokenize(tok, [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], has_image=False)
    pad = tok.pad_token_id
    batch = collate([a, b], pad)
    s = len(a)
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.labels.shape == (2, s)
    assert batch.input_ids.dtype == batch.labels.dtype == torch.long
    assert batch.input_ids[0].tolist() == a.input_ids.tolist()
    assert batch.input_ids[1, len(b):].eq(pad).all() and batch.labels[1, len(b):].eq(IGNORE_INDEX).all()
    assert batch.attention_mask.sum(1).tolist() == [len(a), len(b)]
    assert batch.has_image.tolist() == [True, False] and batch.image_start.tolist() == [a.image_start, -1]
    assert collate([a, b], pad, pad_to_multiple_of=64).input_ids.shape[1] % 64 == 0
    assert len(batch.to("cpu")) == 2


def test_llm_learns_from_masked_batches(bundle):
    """Labels line up with the LM's own shift: a few steps on v1 text-only samples lower the loss."""
    tok = bundle.tokenizer
    model = transformers.AutoModelForCausalLM.from_pretrained(Path(tok.name_or_path))
    scenes = [synthetic.make_scene(0, i) for i in range(16)]
    samples = [
        tokenize(tok, [{"from": "human", "value": sc.question}, {"from": "gpt", "value": sc.answer}], has_image=False)
        for sc in scenes
    ]
    batch = collate(samples, tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(15):
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
