"""Resumable state as safetensors + JSON: an optimizer and the RNG come back exactly, through real files."""

from __future__ import annotations

import json
import random

import numpy as np
import torch
from layerfuse.core.resume_state import capture_rng, join_optimizer, restore_rng, split_optimizer
from safetensors.torch import load_file, save_file


def _through_files(tmp_path, tensors, meta, name):
    save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    (tmp_path / f"{name}.json").write_text(json.dumps(meta))
    return load_file(str(tmp_path / f"{name}.safetensors")), json.loads((tmp_path / f"{name}.json").read_text())


def _steps(model, opt, n, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        loss = model(torch.randn(8, 4, generator=gen)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_a_plain_optimizer_resumes_bit_for_bit(tmp_path):
    """A plain optimizer's state is keyed by integer parameter indices; JSON makes them strings, join restores them."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model.load_state_dict(ref.state_dict())
    ref_opt, opt = (torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.05) for m in (ref, model))
    _steps(ref, ref_opt, 3, 1)
    _steps(ref, ref_opt, 2, 2)

    _steps(model, opt, 3, 1)
    tensors, meta = _through_files(tmp_path, *split_optimizer(opt.state_dict()), "opt")
    assert set(tensors) == {f"{i}/{k}" for i in range(4) for k in ("exp_avg", "exp_avg_sq")}
    assert meta["scalars"]["0"] == {"step": 3.0}
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    fresh.load_state_dict(join_optimizer(tensors, meta))
    assert set(fresh.state_dict()["state"]) == {0, 1, 2, 3}  # not silently dropped under string keys
    _steps(model, fresh, 2, 2)
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_named_optimizer_state_keeps_its_names():
    osd = {"state": {"fuser.w": {"step": torch.tensor(5.0), "exp_avg": torch.ones(2)}},
           "param_groups": [{"lr": 0.1, "params": ["fuser.w"]}]}
    tensors, meta = split_optimizer(osd)
    back = join_optimizer(tensors, json.loads(json.dumps(meta)))
    assert list(back["state"]) == ["fuser.w"] and torch.equal(back["state"]["fuser.w"]["exp_avg"], torch.ones(2))
    assert back["state"]["fuser.w"]["step"].dtype == torch.float32 and float(back["state"]["fuser.w"]["step"]) == 5.0


def test_rng_states_come_back(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    tensors, plain = _through_files(tmp_path, *capture_rng(), "rng")
    expected = (torch.rand(3), random.random(), np.random.rand())
    restore_rng(tensors, plain)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]
