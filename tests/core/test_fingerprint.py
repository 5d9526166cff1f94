"""core/fingerprint.py: which fields enter a fingerprint (field metadata) and the one hash over canonical JSON."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from layerfuse.core.fingerprint import fingerprint, fingerprint_diff, fingerprinted, fingerprinted_when, runtime


@dataclass
class Budget:
    lr: float = 1e-3
    workers: int = runtime(default=2)


@dataclass
class Job:
    data: str
    out: str = runtime()
    mode: str = "a"
    steps: int = 10
    a_only: Budget = fingerprinted_when(lambda job: job.mode == "a", default_factory=Budget)
    tags: tuple[str, ...] = ("x",)
    device: str = runtime(default="auto")
    options: dict = field(default_factory=dict)


def test_runtime_fields_and_the_other_modes_settings_stay_out():
    job = Job("d", "o")
    assert fingerprinted(job) == {"data": "d", "mode": "a", "steps": 10, "a_only": {"lr": 1e-3}, "tags": ("x",), "options": {}}
    assert fingerprinted(Job("d", "o", mode="b")) == {"data": "d", "mode": "b", "steps": 10, "tags": ("x",), "options": {}}
    assert fingerprint(job) == fingerprint(Job("d", "elsewhere", device="cuda", a_only=Budget(workers=8)))
    assert fingerprint(job) != fingerprint(Job("d", "o", steps=11)) != fingerprint(Job("d", "o", a_only=Budget(lr=1.0)))
    assert fingerprint(Job("d", "o", mode="b", a_only=Budget(lr=1.0))) == fingerprint(Job("d", "o", mode="b"))


def test_the_hash_is_sha256_of_sorted_json_16_hex_digits_the_rule_every_saved_fingerprint_was_made_with():
    record = {"b": [1, 2], "a": {"y": None, "x": 1.5}, "p": ("t",)}
    want = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert fingerprint(record) == want and len(want) == 16
    assert fingerprint({"a": {"x": 1.5, "y": None}, "p": ["t"], "b": [1, 2]}) == want  # key order and tuple/list do not matter
    assert fingerprint({"path": __import__("pathlib").Path("/x")}) == fingerprint({"path": "/x"})  # str for what JSON lacks
    assert fingerprint(Job("d", "o")) == fingerprint(fingerprinted(Job("d", "o")))


def test_diff_names_the_fingerprinted_fields_that_changed():
    saved = json.loads(json.dumps({**fingerprinted(Job("d", "o")), "out": "old", "device": "cpu"}))
    assert fingerprint_diff(saved, Job("d", "new", device="cuda")) == []  # tuples read back as lists are equal
    assert fingerprint_diff(saved, Job("e", "o", steps=3, a_only=Budget(lr=2.0))) == ["a_only", "data", "steps"]
