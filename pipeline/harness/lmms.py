"""The lmms-eval model `layerfuse`: a trained run answering lmms-eval's requests from raw images, live.

    python -m lmms_eval --model layerfuse --model_args pretrained=RUN --tasks textvqa_val,pope,mmbench_en_dev ...

lmms-eval (0.7, the `eval` extra) finds the class by the name `layerfuse` through the `lmms_eval.models` entry point
(registration.py). Requests arrive as lmms-eval `Instance`s whose `args` are

    generate_until:  (context, gen_kwargs, doc_to_visual, doc_id, task, split)
    loglikelihood:   (context, continuation | doc_to_target, doc_to_visual, doc_id, task, split)

and the images are `doc_to_visual(self.task_dict[task][split][doc_id])` (the evaluator fills `task_dict` with each
task's dataset). Decoding is greedy (sampling settings are ignored, with a warning once per task), up to `max_new_tokens` (from the
task's gen_kwargs, else the model argument), cut at the task's `until` strings. One process, no data parallelism.
"""

from __future__ import annotations

import warnings
from typing import Any

from tqdm.auto import tqdm

# lmms-eval is an optional dependency (the `eval` extra): this module is imported by lmms-eval's model lookup, or by
# whoever has it installed; nothing else in layerfuse imports it
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from layerfuse.core.errors import ConfigError
from layerfuse.pipeline.harness.live import LiveRun, Request, first_image

_SAMPLING = ("temperature", "top_p", "top_k", "num_beams", "do_sample")


def _batch_size(value: int | str | None) -> int:
    """lmms-eval's --batch_size (a string on its command line; `auto` is taken as 1)."""
    if value is None or str(value).startswith("auto"):
        return 1
    n = int(value)
    if n < 1:
        raise ConfigError(f"batch_size must be >= 1 (got {value})")
    return n


class LayerfuseLMM(lmms):
    """A layerfuse run folder (`pretrained=`) as an lmms-eval simple model: `generate_until` and `loglikelihood`."""

    is_simple = True

    def __init__(self, pretrained: str, device: str | None = None, batch_size: int | str | None = 1, max_new_tokens: int = 128,
                 max_batch_size: int | None = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ConfigError(f"--model_args: unknown argument(s) {sorted(unknown)} for model layerfuse; it takes pretrained=RUN, "
                              "device, batch_size, max_new_tokens")
        self.run = LiveRun(pretrained, device=device or "auto")
        self.batch_size = _batch_size(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self._told_greedy: set[str] = set()  # tasks already warned that their sampling settings are ignored

    def _request(self, doc_to_visual: Any, doc_id: int, task: str, split: str, text: str) -> Request:
        where = f"lmms-eval task {task} split {split} doc {doc_id}"
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        return Request(first_image(list(visuals or []), where=where), text)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers; requests with the same max_new_tokens and stop strings are answered in batches."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple[int, tuple[str, ...]], list[int]] = {}
        asked: list[Request] = []
        for i, inst in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = inst.args
            kw = dict(gen_kwargs or {})
            sampling = kw.get("do_sample") or float(kw.get("temperature") or 0) > 0 or int(kw.get("num_beams") or 1) > 1
            if sampling and task not in self._told_greedy:
                self._told_greedy.add(task)
                warnings.warn(f"task {task}: {', '.join(k for k in _SAMPLING if k in kw)} ignored: layerfuse decodes greedily", stacklevel=2)
            until = kw.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            groups.setdefault((int(kw.get("max_new_tokens") or self.max_new_tokens), until), []).append(i)
            asked.append(self._request(doc_to_visual, doc_id, task, split, context))
        with tqdm(total=len(requests), desc="layerfuse generate_until", disable=self.rank != 0) as bar:
            for (max_new, until), idx in groups.items():
                for s in range(0, len(idx), self.batch_size):
                    chunk = idx[s : s + self.batch_size]
                    for i, text in zip(chunk, self.run.answer([asked[i] for i in chunk], max_new_tokens=max_new, until=until)):
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), text)
                    bar.update(len(chunk))
        return [o or "" for o in out]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log p(continuation | context, image), is greedy) per request (live.LiveRun.loglikelihood)."""
        asked, continuations = [], []
        for inst in requests:
            context, target, doc_to_visual, doc_id, task, split = inst.args
            doc = self.task_dict[task][split][doc_id] if callable(target) else None
            continuations.append(target(doc) if callable(target) else str(target))
            asked.append(self._request(doc_to_visual, doc_id, task, split, context))
        out: list[tuple[float, bool]] = []
        with tqdm(total=len(requests), desc="layerfuse loglikelihood", disable=self.rank != 0) as bar:
            for s in range(0, len(requests), self.batch_size):
                scores = self.run.loglikelihood(asked[s : s + self.batch_size], continuations[s : s + self.batch_size])
                for inst, cont, score in zip(requests[s : s + self.batch_size], continuations[s : s + self.batch_size], scores):
                    self.cache_hook.add_partial("loglikelihood", (inst.args[0], cont), score)
                out += scores
                bar.update(len(scores))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the layerfuse model answers single-round tasks (generate_until, loglikelihood) only")

