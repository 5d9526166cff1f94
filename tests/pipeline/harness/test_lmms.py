"""The lmms-eval model `layerfuse` (pipeline/harness/lmms.py) against the real lmms-eval package: found through
lmms-eval's own lookup, instantiated from its argument string, called with its `Instance` request objects whose
`doc_to_visual` returns built-in images; answers equal the live path's, log-likelihoods equal minus the run's loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the `eval` extra: pip install -e '.[eval]')")

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402
from lmms_eval.models import get_model, list_available_models  # noqa: E402

from layerfuse.core.errors import ConfigError  # noqa: E402
from layerfuse.pipeline.harness.live import Request  # noqa: E402
from layerfuse.pipeline.harness.lmms import LayerfuseLMM  # noqa: E402

TASK, SPLIT = "layerfuse_builtin", "val"


def doc_to_visual(doc: dict) -> list:
    return [doc["image"]]


def doc_to_target(doc: dict) -> str:
    return " " + doc["answer"]


def instance(kind: str, doc_id: int, context: str, second: object) -> Instance:
    """A request as lmms-eval's ConfigurableTask.construct_requests builds it."""
    return Instance(request_type=kind, arguments=(context, second, doc_to_visual, doc_id, TASK, SPLIT), idx=0,
                    metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


@pytest.fixture(scope="module")
def model(igva_run, builtin_samples) -> LayerfuseLMM:
    cls = get_model("layerfuse")  # lmms-eval's lookup: the entry point in pyproject.toml
    lm = cls.create_from_arg_string(f"pretrained={igva_run},max_new_tokens=8", {"batch_size": "2", "max_batch_size": None, "device": "cpu"})
    lm.task_dict[TASK] = {SPLIT: [{"image": s.image, "question": s.question, "answer": s.answer} for s in builtin_samples]}  # as the evaluator does
    return lm


def test_lmms_eval_finds_the_model_by_name():
    assert "layerfuse" in list_available_models()
    cls = get_model("layerfuse")
    assert cls is LayerfuseLMM and issubclass(cls, lmms) and cls.is_simple


def test_model_arguments(igva_run, model):
    assert model.batch_size == 2 and model.max_new_tokens == 8 and (model.rank, model.world_size) == (0, 1)
    with pytest.raises(ConfigError, match="unknown argument.*temperature"):
        LayerfuseLMM.create_from_arg_string(f"pretrained={igva_run},temperature=0.5", {"batch_size": None, "device": "cpu"})


def test_generate_until_answers_from_the_docs_images(model, builtin_samples):
    live = model.run  # the LiveRun inside the model: the path test_live.py checks against `layerfuse infer`
    questions = [s.question for s in builtin_samples]
    requests = [instance("generate_until", i, q, {"until": ["\n\n"], "max_new_tokens": 4}) for i, q in enumerate(questions)]
    requests.append(instance("generate_until", 0, questions[0], {"max_new_tokens": 2, "temperature": 0}))  # another group
    with pytest.warns(UserWarning, match="greedily"):  # sampling settings are ignored, with a warning
        model.generate_until([instance("generate_until", 1, questions[1], {"max_new_tokens": 2, "do_sample": True, "temperature": 0.7})])
    answers = model.generate_until(requests)
    asked = [Request(s.image, s.question) for s in builtin_samples]
    assert answers[:-1] == live.answer(asked, max_new_tokens=4, until=["\n\n"])
    assert answers[-1] == live.answer(asked[:1], max_new_tokens=2)[0]
    assert all(isinstance(a, str) for a in answers)


def test_loglikelihood_equals_the_live_path_and_the_runs_loss(model, builtin_samples):
    """Continuations given as strings and through doc_to_target give the same scores; they are LiveRun's, which
    test_live.py checks against the training objective."""
    n = len(builtin_samples)
    by_string = [instance("loglikelihood", i, s.question, " " + s.answer) for i, s in enumerate(builtin_samples)]
    by_target = [instance("loglikelihood", i, s.question, doc_to_target) for i, s in enumerate(builtin_samples)]
    scores = model.loglikelihood(by_string + by_target)
    assert len(scores) == 2 * n and all(isinstance(x, float) and isinstance(g, bool) for x, g in scores)
    assert scores[:n] == scores[n:]
    expected = model.run.loglikelihood([Request(s.image, s.question) for s in builtin_samples], [" " + s.answer for s in builtin_samples])
    np.testing.assert_allclose([x for x, _ in scores[:n]], [x for x, _ in expected], rtol=1e-5, atol=1e-5)
    assert [g for _, g in scores[:n]] == [g for _, g in expected]


def test_multi_round_is_refused(model):
    with pytest.raises(NotImplementedError, match="single-round"):
        model.generate_until_multi_round([])


# -- end to end: lmms-eval's command line on a task of built-in samples -------------------------------------------------
TASK_YAML = """\
task: layerfuse_builtin
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function builtin_task.doc_to_visual
doc_to_text: !function builtin_task.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  until: ["\\n\\n"]
process_results: !function builtin_task.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

TASK_FUNCTIONS = '''\
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"].strip().lower())}
'''


@pytest.mark.slow
def test_lmms_eval_command_line_scores_a_run(igva_run, builtin_samples, model, tmp_path):
    """`python -m lmms_eval --model layerfuse ...` on a task of built-in samples (a local dataset, as real tasks are HF
    datasets): lmms-eval's task manager, evaluator and logging around our model; the logged answers are the live path's."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")})
    rows = {"image": [s.image for s in builtin_samples], "question": [s.question for s in builtin_samples], "answer": [s.answer for s in builtin_samples]}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(tmp_path / "data"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "layerfuse_builtin.yaml").write_text(TASK_YAML.format(data=tmp_path / "data"))
    (tasks / "builtin_task.py").write_text(TASK_FUNCTIONS)
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "layerfuse", "--model_args", f"pretrained={igva_run}", "--tasks", "layerfuse_builtin",
           "--include_path", str(tasks), "--batch_size", "2", "--device", "cpu", "--output_path", str(tmp_path / "out"), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("*_results.json")]
    assert len(results) == 1 and "layerfuse_builtin" in results[0]["results"], proc.stdout[-2000:]
    score = results[0]["results"]["layerfuse_builtin"]["exact_match,none"]
    logged = [json.loads(line) for p in (tmp_path / "out").rglob("*samples_layerfuse_builtin*.jsonl") for line in p.read_text().splitlines()]
    answers = {r["doc_id"]: r["filtered_resps"] if isinstance(r["filtered_resps"], str) else r["filtered_resps"][0] for r in logged}
    expected = model.run.answer([Request(s.image, s.question) for s in builtin_samples], max_new_tokens=4, until=["\n\n"])
    assert [answers[i] for i in range(len(builtin_samples))] == expected
    assert score == pytest.approx(np.mean([a.lower() == s.answer.lower() for a, s in zip(expected, builtin_samples)]))
