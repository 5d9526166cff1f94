"""The embedded default vision tower: a tiny CLIP built in code and pretrained in a few minutes on built-in renders.

A real LLaVA starts from a CLIP whose layers already carry colour, shape, text and position. A randomly initialised
tower does not: its features keep colour and count, but shape, digits and relative position are not learnable from
them with a few thousand samples (the layer probe sits at chance on every layer). So the default is pretrained, like
a dense-prediction backbone, on freshly rendered built-in scenes from a seed stream disjoint from every dataset seed
(`PRETRAIN_SEED`, negative; `layerfuse data synthetic` and `extract --builtin` take seeds >= 0), with dense
targets read off the scene description, never off a dataset's questions or answers:

- per patch token (final block, `[B, G*G, D]`): the colour and shape of the object covering the patch, the digit
  whose ink falls in it, the fine detail (dot / stripe) in it, and the centre of the covering object;
- on the CLS token: how many objects of each shape the scene holds.

The heads are thrown away; only the CLIPVisionModel is saved, with its processor, and loaded back through exactly
the code path of a real checkpoint. `pretrain_steps=0` gives the random tower (tests use it; it is fast).
Deterministic for a given machine and thread count: the weights start from `seed`, scenes are pure functions of
(seed, index), and nothing else draws random numbers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from layerfuse.core.atomic import replacing
from layerfuse.core.errors import StateError
from layerfuse.pipeline.models.encoder import ImagePreprocessor
from layerfuse.core.schedule import warmup_cosine
from layerfuse.pipeline.data.synthetic import COLOURS, IMAGE_SIZE, SHAPES, Scene, dense_scene, detail_mask, glyph_mask, render, shape_mask

PRETRAIN_SEED = -1_000_000  # scene seeds PRETRAIN_SEED - cfg.seed: never a dataset's (those are >= 0)
MIN_COVER = 0.2  # a patch belongs to an object when the object covers at least this fraction of it
MAX_COUNT = 7  # CLS count head: 0..7 objects of each shape
DETAILS = ("dot", "stripe")
BACKGROUND_WEIGHT = 0.2  # cross-entropy weight of the "nothing here" class


class DefaultVisionError(StateError):
    """A default-tower folder that does not match the requested settings."""


@dataclass(frozen=True)
class DefaultVisionConfig:
    """The embedded default tower: CLIP ViT with 24 blocks (so the layer presets apply unscaled), 96 px, 12 px patches
    (8x8 grid), pretrained for `pretrain_steps` steps of `pretrain_batch` fresh renders."""

    image_size: int = 96
    patch_size: int = 12
    hidden_size: int = 64
    num_layers: int = 24
    num_heads: int = 4
    intermediate_size: int = 256
    seed: int = 0
    pretrain_steps: int = 2000
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    pretrain_warmup: int = 30
    eval_scenes: int = 512

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class SceneTargets:
    """Dense targets of a batch of scenes; class 0 means "nothing" (background, no digit, no detail).

    colour, shape, digit, detail: [B, G*G] int64; centre: [B, G*G, 2] float (object centre / image size);
    owned: [B, G*G] bool (the patch belongs to an object); counts: [B, len(SHAPES)] int64.
    """

    colour: torch.Tensor
    shape: torch.Tensor
    digit: torch.Tensor
    detail: torch.Tensor
    centre: torch.Tensor
    owned: torch.Tensor
    counts: torch.Tensor

    def to(self, device: torch.device) -> SceneTargets:
        return SceneTargets(**{k: v.to(device) for k, v in vars(self).items()})


def _cover(mask: np.ndarray, grid: int) -> np.ndarray:
    """[H, W] bool -> [G*G] fraction of each patch covered."""
    p = mask.shape[0] // grid
    return mask.reshape(grid, p, grid, p).mean(axis=(1, 3)).reshape(-1)


def scene_targets(scene: Scene, grid: int) -> dict[str, np.ndarray]:
    """The dense targets of one scene (numpy, one row of `SceneTargets`)."""
    n = grid * grid
    colour, shape, digit, detail = (np.zeros(n, dtype=np.int64) for _ in range(4))
    centre = np.zeros((n, 2), dtype=np.float32)
    owned = np.zeros(n, dtype=bool)
    if scene.objects:
        cover = np.stack([_cover(shape_mask(o), grid) for o in scene.objects])  # [K, G*G]
        best, frac = cover.argmax(0), cover.max(0)
        owned = frac >= MIN_COVER
        for k, o in enumerate(scene.objects):
            mine = owned & (best == k)
            colour[mine] = list(COLOURS).index(o.colour) + 1
            shape[mine] = SHAPES.index(o.shape) + 1
            centre[mine] = (o.x / IMAGE_SIZE, o.y / IMAGE_SIZE)
            if o.detail is not None:
                detail[_cover(detail_mask(o), grid) > 0] = DETAILS.index(o.detail) + 1
    g = scene.glyph
    if g is not None:
        ink = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
        x0, y0, x1, y1 = g.box
        ink[y0:y1, x0:x1] = glyph_mask(g.digit, g.scale)
        digit[_cover(ink, grid) > 0] = int(g.digit) + 1
    counts = np.array([min(sum(o.shape == s for o in scene.objects), MAX_COUNT) for s in SHAPES], dtype=np.int64)
    return {"colour": colour, "shape": shape, "digit": digit, "detail": detail, "centre": centre, "owned": owned, "counts": counts}


def render_batch(seed: int, start: int, size: int, grid: int, preprocess: ImagePreprocessor) -> tuple[torch.Tensor, SceneTargets]:
    """Scenes start..start+size of the pretraining stream -> (pixel_values [B, 3, H, W], targets)."""
    scenes = [dense_scene(seed, start + i) for i in range(size)]
    pixels = torch.from_numpy(np.stack([preprocess(render(s)) for s in scenes]))
    rows = [scene_targets(s, grid) for s in scenes]
    return pixels, SceneTargets(**{k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]})


class PretrainHeads(nn.Module):
    """Linear heads on the final block: patch tokens [B, G*G, D] and CLS [B, D] -> logits / centres."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.colour = nn.Linear(dim, len(COLOURS) + 1)
        self.shape = nn.Linear(dim, len(SHAPES) + 1)
        self.digit = nn.Linear(dim, 11)
        self.detail = nn.Linear(dim, len(DETAILS) + 1)
        self.centre = nn.Linear(dim, 2)
        self.counts = nn.Linear(dim, len(SHAPES) * (MAX_COUNT + 1))

    def forward(self, last_hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.norm(last_hidden)  # [B, 1 + G*G, D]
        cls, patches = h[:, 0], h[:, 1:]
        return {
            "colour": self.colour(patches),
            "shape": self.shape(patches),
            "digit": self.digit(patches),
            "detail": self.detail(patches),
            "centre": self.centre(patches),
            "counts": self.counts(cls).view(-1, len(SHAPES), MAX_COUNT + 1),
        }


def _losses(out: dict[str, torch.Tensor], t: SceneTargets) -> dict[str, torch.Tensor]:
    def ce(logits: torch.Tensor, target: torch.Tensor, background: float = 1.0) -> torch.Tensor:
        weight = torch.ones(logits.shape[-1], device=logits.device)
        weight[0] = background  # most patches hold nothing: keep them from drowning the rare classes
        return F.cross_entropy(logits.flatten(0, -2), target.flatten(), weight=weight)

    owned = t.owned.unsqueeze(-1).float()
    return {
        "colour": ce(out["colour"], t.colour, BACKGROUND_WEIGHT),
        "shape": ce(out["shape"], t.shape, BACKGROUND_WEIGHT),
        "digit": ce(out["digit"], t.digit, BACKGROUND_WEIGHT),
        "detail": ce(out["detail"], t.detail, BACKGROUND_WEIGHT),
        "centre": 20.0 * ((out["centre"] - t.centre) ** 2 * owned).sum() / owned.sum().clamp(min=1),
        "counts": ce(out["counts"], t.counts),
    }


@torch.no_grad()
def _evaluate(model: nn.Module, heads: PretrainHeads, pixels: torch.Tensor, t: SceneTargets) -> dict[str, float]:
    """Held-out accuracies on the patches where a target is present (what the pretraining taught)."""
    out = heads(model(pixel_values=pixels).last_hidden_state)
    res = {}
    for name in ("colour", "shape", "digit", "detail"):
        target = getattr(t, name)
        present = target > 0
        res[f"{name}_acc"] = float((out[name].argmax(-1) == target)[present].float().mean()) if present.any() else float("nan")
    err = (out["centre"] - t.centre).abs().mul(IMAGE_SIZE)[t.owned]
    res["centre_mae_px"] = float(err.mean())
    res["counts_acc"] = float((out["counts"].argmax(-1) == t.counts).float().mean())
    return res


def _save_state(path: Path, state: dict[str, Any]) -> None:
    with replacing(path) as tmp:  # a kill while saving keeps the previous state
        torch.save(state, tmp)


def _load_state(path: Path | None, cfg: DefaultVisionConfig) -> dict[str, Any] | None:
    """The saved pretraining state for exactly these settings, or None (none saved, or saved for other settings)."""
    if path is None or not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state if state.get("config") == asdict(cfg) else None


def pretrain(model: nn.Module, preprocess: ImagePreprocessor, cfg: DefaultVisionConfig, progress: bool = True,
             device: str | torch.device = "cpu", state_path: Path | None = None, checkpoint_every: int = 200) -> dict[str, Any]:
    """Train `model` (a CLIPVisionModel) in place on fresh renders (fp32, on `device`; the model is left on the CPU);
    returns held-out accuracies and the first and last losses.

    With `state_path`, the model, heads, optimizer and schedule are saved there every `checkpoint_every` steps and a
    killed run continues from the last save; as scenes are pure functions of their index and nothing else is random,
    the result is the same as an uninterrupted run's."""
    seed = PRETRAIN_SEED - cfg.seed
    device = torch.device(device)
    heads = PretrainHeads(cfg.hidden_size)
    model.to(device)
    heads.to(device)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.pretrain_lr, weight_decay=0.05)

    sched = warmup_cosine(opt, cfg.pretrain_steps, cfg.pretrain_warmup)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    done = 0
    state = _load_state(state_path, cfg)
    if state is not None:
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        done, first, last = state["step"], state["first"], state["last"]
    eval_pixels, eval_targets = render_batch(seed, 0, cfg.eval_scenes, cfg.grid, preprocess)
    eval_pixels, eval_targets = eval_pixels.to(device), eval_targets.to(device)
    start = cfg.eval_scenes  # training scenes follow the held-out ones
    model.train()
    bar = tqdm(range(done, cfg.pretrain_steps), desc="pretrain default vision", unit="step", initial=done,
               total=cfg.pretrain_steps, disable=not progress)
    for step in bar:
        pixels, targets = render_batch(seed, start + step * cfg.pretrain_batch, cfg.pretrain_batch, cfg.grid, preprocess)
        pixels, targets = pixels.to(device), targets.to(device)
        losses = _losses(heads(model(pixel_values=pixels).last_hidden_state), targets)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        last = {k: round(v.item(), 4) for k, v in losses.items()}
        first = first or last
        bar.set_postfix(loss=f"{loss.item():.3f}")  # type: ignore[union-attr]
        if state_path is not None and (step + 1) % checkpoint_every == 0 and step + 1 < cfg.pretrain_steps:
            _save_state(state_path, {"config": asdict(cfg), "step": step + 1, "first": first, "last": last,
                                     "model": model.state_dict(), "heads": heads.state_dict(),
                                     "opt": opt.state_dict(), "sched": sched.state_dict()})
    model.eval()
    held_out = _evaluate(model, heads, eval_pixels, eval_targets)
    model.cpu()
    return {"held_out": {k: round(v, 4) for k, v in held_out.items()}, "first_losses": first, "last_losses": last, "scenes_seed": seed}


def _marker(cfg: DefaultVisionConfig) -> dict[str, Any]:
    note = f"pretrained {cfg.pretrain_steps} steps on built-in renders" if cfg.pretrain_steps else "random weights"
    return {"note": note, **asdict(cfg)}


def describe(cfg: DefaultVisionConfig) -> str:
    """A one-line name for cache metadata and logs."""
    return f"default (tiny CLIP, {_marker(cfg)['note']})"


def build_default_vision(out_dir: str | Path, cfg: DefaultVisionConfig = DefaultVisionConfig(), progress: bool = False,
                         device: str | torch.device = "cpu", checkpoint_every: int = 200) -> Path:
    """Create the default tiny CLIP tower (weights from `cfg.seed`, then `cfg.pretrain_steps` of pretraining) and
    its processor in `out_dir`. Pretraining runs on `device` (extraction passes its own: a GPU when it has one).

    Idempotent: an existing folder built with the same settings is kept, so a resumed extraction sees the same
    weights; one built with other settings is an error, never silently reused. A killed build continues its
    pretraining from the last state saved in `OUT.tmp/` (every `checkpoint_every` steps).
    """
    out = Path(out_dir)
    marker = _marker(cfg)
    if (out / "config.json").exists() and (out / "preprocessor_config.json").exists():
        found = json.loads((out / "layerfuse_default.json").read_text()) if (out / "layerfuse_default.json").exists() else {}
        diff = sorted(k for k, v in asdict(cfg).items() if found.get(k) != v)
        if diff:
            raise DefaultVisionError(
                f"'{out}' holds a default vision tower built with other settings (differs in: {', '.join(diff)}); "
                f"delete it or choose another --run-dir"
            )
        return out
    config = transformers.CLIPVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.hidden_size,
    )
    proc_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor = proc_cls(
        size={"shortest_edge": cfg.image_size}, crop_size={"height": cfg.image_size, "width": cfg.image_size}
    )
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state_path = tmp / "pretrain_state.pt"
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(cfg.seed)
        model = transformers.CLIPVisionModel(config)
        report = {}
        if cfg.pretrain_steps:
            preprocess = ImagePreprocessor(processor, pad_to_square=False)
            report = pretrain(model, preprocess, cfg, progress, device, state_path, checkpoint_every)
    finally:
        torch.random.set_rng_state(gen_state)
    state_path.unlink(missing_ok=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "layerfuse_default.json").write_text(json.dumps({**marker, "pretraining": report}, indent=1))
    tmp.rename(out)  # a killed build leaves only *.tmp behind, never a half-written default
    return out
