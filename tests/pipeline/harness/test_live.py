"""LiveRun (pipeline/harness/live.py) and the VLMEvalKit-style model (vlmevalkit.py) on tiny trained runs and built-in
images: answers equal `layerfuse infer`'s, and a continuation's log-likelihood is minus the run's own training loss
on that sample. Also the README's recipe from `layerfuse eval`'s answer file to LLaVA's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from layerfuse.core.errors import InputError
from layerfuse.pipeline.cache.extract import run_extract
from layerfuse.pipeline.cache.reader import FeatureCache
from layerfuse.pipeline.data.conversation import IGNORE_INDEX, collate, tokenize_conversation
from layerfuse.pipeline.harness.live import LiveRun, Request, cut_at_stop, first_image
from layerfuse.pipeline.harness.vlmevalkit import LayerfuseVLM, message_items
from layerfuse.pipeline.training.evaluate import EvalConfig, evaluate
from layerfuse.pipeline.training.infer import LivePipeline
from layerfuse.pipeline.training.train import TrainObjective

from tests.support import extract_config


@pytest.fixture(scope="module")
def igva(igva_run) -> LiveRun:
    return LiveRun(igva_run, device="cpu")


@pytest.fixture(scope="module")
def concat(concat_run) -> LiveRun:
    return LiveRun(concat_run, device="cpu")


def objective_sum(run: LiveRun, question: str, answer: str, layers: torch.Tensor, text: torch.Tensor | None) -> float:
    """The training objective's summed cross-entropy on the answer's tokens of the sample (question, answer): the
    sample training builds, with its end-of-turn label left out (the continuation is the answer alone)."""
    vlm, bundle = run.pipe.vlm, run.pipe.bundle
    conv = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    sample = tokenize_conversation(conv, bundle.tokenizer, run.pipe.model.template, num_visual_tokens=vlm.fuser.num_visual_tokens,
                                   image_token_id=bundle.image_token_id, max_length=256, has_image=True)
    batch = collate([sample], bundle.pad_token_id)
    last = int((batch.labels[0] != IGNORE_INDEX).nonzero().max())
    assert batch.labels[0, last] == bundle.tokenizer.eos_token_id  # v1: the answer, then eos
    labels = batch.labels.clone()
    labels[0, last] = IGNORE_INDEX
    with torch.no_grad():
        loss_sum, _ = TrainObjective(vlm)(batch.input_ids, batch.attention_mask, labels, batch.has_image, layers, text)
    return float(loss_sum)


def test_cut_at_stop_and_first_image(builtin_samples):
    assert cut_at_stop(" red\n\nblue", ["\n\n"]) == "red" and cut_at_stop("red. Blue", [".", "\n"]) == "red"
    assert cut_at_stop(" red ", []) == "red" and cut_at_stop("red", [""]) == "red"
    assert first_image([], where="x") is None
    a, b = builtin_samples[0], builtin_samples[1]
    with pytest.warns(UserWarning, match="one image slot"):
        im = first_image([a.image, b.image], where="x")
    assert np.array_equal(np.asarray(im), np.asarray(a.image))
    assert np.array_equal(np.asarray(first_image([str(a.path)], where="x")), np.asarray(a.image))  # a file path
    assert first_image([a.image.convert("RGBA")], where="x").mode == "RGB"
    with pytest.raises(InputError, match="still images"):
        first_image(["/no/such/video.mp4"], where="doc 3")


@pytest.mark.parametrize("which", ["igva", "concat"])
def test_answers_are_those_of_layerfuse_infer(which, igva_run, concat_run, builtin_samples, request):
    run: LiveRun = request.getfixturevalue(which)
    pipe = LivePipeline(igva_run if which == "igva" else concat_run)
    images, questions = [s.image for s in builtin_samples], [s.question for s in builtin_samples]
    expected = pipe.answer(images, questions, max_new_tokens=4)
    requests = [Request(im, q) for im, q in zip(images, questions)]
    assert run.answer(requests, max_new_tokens=4) == expected
    assert [run.answer([r], max_new_tokens=4)[0] for r in requests] == expected  # a batch answers as one by one
    assert run.answer([], max_new_tokens=4) == []


@pytest.mark.parametrize("which", ["igva", "concat"])
def test_loglikelihood_is_minus_the_runs_training_loss(which, train_cache, builtin_samples, request):
    """On the same built-in samples: log p(reference answer | question, raw image) from the live path equals minus the
    training objective's summed cross-entropy on the answer tokens, computed on the live features (to float32
    rounding) and on the cache's features of that sample, which training read (within their fp16 rounding)."""
    run: LiveRun = request.getfixturevalue(which)
    cache = FeatureCache(train_cache)
    rows = np.array([s.row for s in builtin_samples])
    fuser = run.pipe.vlm.fuser
    cached_layers = cache.features(rows, fuser.required_layers).float()
    cached_text = cache.text_embeddings(rows, per_turn=True)[0][:, 0] if fuser.needs_text else None
    requests = [Request(s.image, s.question) for s in builtin_samples]
    scores = run.loglikelihood(requests, [" " + s.answer for s in builtin_samples])  # lm-eval's leading space
    live_layers, live_text = run.features(requests)
    for i, (s, (ll, _)) in enumerate(zip(builtin_samples, scores)):
        assert ll < 0
        live = objective_sum(run, s.question, s.answer, live_layers[i : i + 1], None if live_text is None else live_text[i : i + 1])
        cached = objective_sum(run, s.question, s.answer, cached_layers[i : i + 1], None if cached_text is None else cached_text[i : i + 1])
        assert ll == pytest.approx(-live, rel=1e-5, abs=1e-5)
        assert ll == pytest.approx(-cached, rel=2e-3, abs=2e-3)
    one_by_one = [run.loglikelihood([r], [" " + s.answer])[0] for r, s in zip(requests, builtin_samples)]
    assert [b for _, b in one_by_one] == [b for _, b in scores]
    np.testing.assert_allclose([x for x, _ in one_by_one], [x for x, _ in scores], rtol=1e-5, atol=1e-5)


def test_loglikelihood_greedy_flag(igva_run, builtin_samples):
    """The tiny run's own greedy tokens are byte fragments that no text round-trips to, so its LM head is given a
    bias towards the token of " red": greedy decoding then says "red red ...", and exactly those continuations are
    flagged greedy."""
    run = LiveRun(igva_run, device="cpu")
    s = builtin_samples[0]
    r = Request(s.image, s.question)
    sample, n = run.scored_sample(r, " red")
    assert n == 1, "' red' is one token of the built-in BPE"
    red = int(sample.input_ids[sample.labels != IGNORE_INDEX][0])
    llm = run.pipe.vlm.llm
    head = torch.nn.Linear(llm.lm_head.in_features, llm.lm_head.out_features, bias=True)
    head.weight, head.bias = llm.lm_head.weight, torch.nn.Parameter(torch.zeros(llm.lm_head.out_features))
    with torch.no_grad():
        head.bias[red] = 1e3
    llm.lm_head = head
    assert run.answer([r], max_new_tokens=3) == ["red red red"]
    scores = run.loglikelihood([r, r, r, r], [" red", "red red", "blue", "red blue"])
    assert [g for _, g in scores] == [True, True, False, False]
    assert scores[0][0] == pytest.approx(0.0, abs=1e-3) and scores[2][0] < -100
    assert run.loglikelihood([r], [""]) == [(0.0, True)]  # nothing to score


def test_a_request_without_an_image_is_asked_as_text(igva, builtin_samples):
    s = builtin_samples[0]
    text_only = Request(None, "<image>\nWhat colour is the triangle?")
    answers = igva.answer([text_only, Request(s.image, s.question)], max_new_tokens=3)
    assert answers[1] == igva.answer([Request(s.image, s.question)], max_new_tokens=3)[0]  # its batch neighbour is unaffected
    assert answers[0] == igva.answer([text_only], max_new_tokens=3)[0]
    (ll, _), = igva.loglikelihood([text_only], [" red"])
    assert np.isfinite(ll) and ll < 0


# -- VLMEvalKit --------------------------------------------------------------------------------------------------------
def test_vlmevalkit_messages(builtin_samples, tmp_path):
    a = builtin_samples[0]
    assert message_items("Q?") == [{"type": "text", "value": "Q?"}]
    assert message_items([str(a.path), "Q?"]) == [{"type": "image", "value": str(a.path)}, {"type": "text", "value": "Q?"}]
    assert message_items({"type": "text", "value": "Q?"}) == [{"type": "text", "value": "Q?"}]
    assert message_items([str(tmp_path / "missing.png"), "Q?"])[0]["type"] == "text"  # as VLMEvalKit: not a file, so text
    for bad in ([], 3, [{"type": "video", "value": "x.mp4"}], [1]):
        with pytest.raises(InputError):
            message_items(bad)


def test_vlmevalkit_generate_answers_from_the_image(igva_run, igva, builtin_samples):
    model = LayerfuseVLM(igva_run, device="cpu", max_new_tokens=4)
    assert model.INTERLEAVE is False and model.use_custom_prompt("MMBench_DEV_EN") is False
    s, t = builtin_samples[0], builtin_samples[1]
    expected = igva.answer([Request(s.image, s.question)], max_new_tokens=4)[0]
    msgs = [{"type": "image", "value": str(s.path)}, {"type": "text", "value": s.question}]
    assert model.generate(msgs) == expected
    assert model.generate(msgs, dataset="TextVQA_VAL") == expected
    assert model.generate([str(s.path), s.question]) == expected  # list of strings: the path is the image
    assert model.generate([{"type": "image", "value": s.image}, {"type": "text", "value": s.question}]) == expected  # a PIL image
    with pytest.warns(UserWarning, match="one image slot"):  # two images: the first is used
        assert model.generate([{"type": "image", "value": str(s.path)}, {"type": "image", "value": str(t.path)},
                               {"type": "text", "value": s.question}]) == expected
    both = model.batch_generate([msgs, [str(t.path), t.question]])
    assert both == [expected, model.generate([str(t.path), t.question])]
    assert isinstance(model.generate("What colour is the triangle?"), str)  # text only


# -- README: LLaVA's answer files from `layerfuse eval` ----------------------------------------------------------------
def test_readme_recipe_turns_a_llava_question_file_into_llava_answer_files(igva_run, vision_dir, builtin_samples, tmp_path):
    """The README's conversion, run on a LLaVA-style question file of built-in images: extract (placeholder answers,
    split test), `layerfuse eval` on that cache, ids and prompts mapped back. The result has the keys and ids of
    LLaVA's model_vqa_loader.py answer files, in the question file's order."""
    images = tmp_path / "images"
    images.mkdir()
    questions = []
    for k, s in enumerate(reversed(builtin_samples)):  # ids unlike the storage order, ints as LLaVA's
        s.image.save(images / f"img{k}.png")
        questions.append({"question_id": 1000 - k, "image": f"img{k}.png", "text": s.question.replace("<image>\n", ""), "category": "adversarial"})
    # the README's snippet
    json.dump([{"id": str(q["question_id"]), "image": q["image"], "split": "test", "category": q.get("category", "default"),
                "conversations": [{"from": "human", "value": "<image>\n" + q["text"]}, {"from": "gpt", "value": ""}]}
               for q in questions], open(tmp_path / "bench.json", "w"))
    run_extract(extract_config(str(tmp_path / "cache"), vision_dir, builtin=None, llava=str(tmp_path / "bench.json"), image_root=str(images)))
    res = evaluate(EvalConfig(run=str(igva_run), cache=str(tmp_path / "cache"), split="test", max_new_tokens=4, workers=0, progress=False,
                              out=str(tmp_path / "eval")))
    assert res.overall["n"] == len(questions)
    answers = {a["question_id"]: a for a in map(json.loads, open(tmp_path / "eval" / "answers.jsonl"))}
    with open(tmp_path / "bench-answers.jsonl", "w") as f:
        for q in questions:
            a = answers[str(q["question_id"])]
            f.write(json.dumps({**a, "question_id": q["question_id"], "prompt": q["text"]}) + "\n")
    out = [json.loads(line) for line in open(tmp_path / "bench-answers.jsonl")]
    assert [a["question_id"] for a in out] == [q["question_id"] for q in questions]
    assert [a["prompt"] for a in out] == [q["text"] for q in questions]
    assert all({"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} <= set(a) for a in out)
    live = LiveRun(igva_run, device="cpu").answer([Request(s.image, s.question) for s in reversed(builtin_samples)], max_new_tokens=4)
    assert [a["text"] for a in out] == live  # the cache path's answers are the live path's on these images
