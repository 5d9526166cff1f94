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

The shipped tower. Pretraining the default settings takes about 9 minutes on 2 cores, so the package ships its
result (package data, `default_tower/`): the files `build_default_vision` writes for `DefaultVisionConfig()`, and
`recipe.json` with the settings, the code version, machine, torch version and threads it was built with, the
sha256 of every file, the held-out accuracies and final losses, and a fingerprint of the tower after its first
`FIRST_STEPS` pretraining steps. A build with exactly the recipe's settings installs these files (their sha256
checked against the recipe) instead of pretraining; any other settings pretrain in code. To check that the code
still makes the shipped tower, `make default-tower` (`layerfuse tower rebuild`) pretrains it again into a
temporary folder and prints every file whose sha256 differs; `layerfuse tower record FOLDER` makes a built tower
the shipped one. tests/pipeline/models/test_default_vision.py reruns the first steps against the fingerprint.

A killed pretraining resumes from `OUT.resume.safetensors` (model, heads, optimizer and RNG tensors; the step,
schedule, losses, optimizer scalars and settings as JSON in its metadata). Nothing here reads a pickle.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from layerfuse.core import __version__
from layerfuse.core.errors import StateError
from layerfuse.core.atomic import fresh_temp_dir, publish_dir, replacing
from layerfuse.core.resume_state import capture_rng, join_optimizer, restore_rng, split_optimizer
from layerfuse.pipeline.models.default_build import MARKER, build_default, read_marker, seeded, settings_of
from layerfuse.pipeline.models.encoder import ImagePreprocessor
from layerfuse.core.schedule import warmup_cosine
from layerfuse.pipeline.data.synthetic import COLOURS, IMAGE_SIZE, SHAPES, Scene, dense_scene, detail_mask, glyph_mask, render, shape_mask

PRETRAIN_SEED = -1_000_000  # scene seeds PRETRAIN_SEED - cfg.seed: never a dataset's (those are >= 0)
MIN_COVER = 0.2  # a patch belongs to an object when the object covers at least this fraction of it
MAX_COUNT = 7  # CLS count head: 0..7 objects of each shape
DETAILS = ("dot", "stripe")
BACKGROUND_WEIGHT = 0.2  # cross-entropy weight of the "nothing here" class
SHIPPED_TOWER = Path(__file__).with_name("default_tower")  # package data: the tower built for DefaultVisionConfig()
RECIPE = "recipe.json"
TOWER_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", MARKER)  # what a build writes
FIRST_STEPS = 4  # the recipe fingerprints the tower after this many pretraining steps


class DefaultVisionError(StateError):
    """A default-tower folder that does not match the requested settings, or a shipped tower that does not match
    its recipe."""


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


def _save_state(path: Path, cfg: DefaultVisionConfig, step: int, first: dict[str, float], last: dict[str, float],
                model: nn.Module, heads: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> None:
    """Everything a killed pretraining needs, in one safetensors file: the tensors (model/, heads/, optimizer/,
    rng/) and, in its metadata, the rest as JSON. Written atomically: a kill while saving keeps the previous state."""
    opt_tensors, opt_meta = split_optimizer(opt.state_dict())
    rng_tensors, rng_meta = capture_rng()
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"heads/{k}": v for k, v in heads.state_dict().items()}
    tensors |= {f"optimizer/{k}": v for k, v in opt_tensors.items()} | {f"rng/{k}": v for k, v in rng_tensors.items()}
    meta = {"config": asdict(cfg), "step": step, "first": first, "last": last, "optimizer": opt_meta,
            "scheduler": sched.state_dict(), "rng": rng_meta}
    with replacing(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"layerfuse": json.dumps(meta)})


def _load_state(path: Path | None, cfg: DefaultVisionConfig) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]] | None:
    """The saved pretraining state for exactly these settings as (tensors by part, JSON metadata), or None (none
    saved, saved for other settings, or not a state this code wrote: ignored with a warning, never executed)."""
    if path is None or not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["layerfuse"])
            parts: dict[str, dict[str, torch.Tensor]] = {}
            for key in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                part, name = key.split("/", 1)
                parts.setdefault(part, {})[name] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        warnings.warn(f"ignoring the unreadable pretraining state '{path}' ({type(e).__name__}: {e}); pretraining starts over")
        return None
    return (parts, meta) if meta.get("config") == asdict(cfg) else None


def pretrain(model: nn.Module, preprocess: ImagePreprocessor, cfg: DefaultVisionConfig, progress: bool = True,
             device: str | torch.device = "cpu", state_path: Path | None = None, checkpoint_every: int = 200,
             stop_after: int | None = None) -> dict[str, Any]:
    """Train `model` (a CLIPVisionModel) in place on fresh renders (fp32, on `device`; the model is left on the CPU);
    returns held-out accuracies and the first and last losses.

    With `state_path`, the model, heads, optimizer, schedule and RNG are saved there every `checkpoint_every` steps
    and a killed run continues from the last save; as scenes are pure functions of their index and nothing else is
    random, the result is the same as an uninterrupted run's. `stop_after` ends after that many steps of the
    schedule, without the held-out evaluation (the recipe's first-steps fingerprint)."""
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
    saved = _load_state(state_path, cfg)
    if saved is not None:
        tensors, meta = saved
        model.load_state_dict(tensors["model"])
        heads.load_state_dict(tensors["heads"])
        opt.load_state_dict(join_optimizer(tensors.get("optimizer", {}), meta["optimizer"]))
        sched.load_state_dict(meta["scheduler"])
        restore_rng(tensors["rng"], meta["rng"])
        done, first, last = meta["step"], meta["first"], meta["last"]
    start = cfg.eval_scenes  # training scenes follow the held-out ones
    end = cfg.pretrain_steps if stop_after is None else min(stop_after, cfg.pretrain_steps)
    model.train()
    bar = tqdm(range(done, end), desc="pretrain default vision", unit="step", initial=done, total=end, disable=not progress)
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
        if state_path is not None and (step + 1) % checkpoint_every == 0 and step + 1 < end:
            _save_state(state_path, cfg, step + 1, first, last, model, heads, opt, sched)
    model.eval()
    if end < cfg.pretrain_steps:
        model.cpu()
        return {"first_losses": first, "last_losses": last, "scenes_seed": seed}
    eval_pixels, eval_targets = render_batch(seed, 0, cfg.eval_scenes, cfg.grid, preprocess)
    held_out = _evaluate(model, heads, eval_pixels.to(device), eval_targets.to(device))
    model.cpu()
    return {"held_out": {k: round(v, 4) for k, v in held_out.items()}, "first_losses": first, "last_losses": last, "scenes_seed": seed}


def _note(cfg: DefaultVisionConfig) -> str:
    return f"pretrained {cfg.pretrain_steps} steps on built-in renders" if cfg.pretrain_steps else "random weights"


def describe(cfg: DefaultVisionConfig) -> str:
    """A one-line name for cache metadata and logs."""
    return f"default (tiny CLIP, {_note(cfg)})"


def _clip(cfg: DefaultVisionConfig) -> transformers.CLIPVisionModel:
    """A freshly initialised tower of `cfg`'s architecture (draws from torch's global generator)."""
    config = transformers.CLIPVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.hidden_size,
    )
    return transformers.CLIPVisionModel(config)


def _processor(cfg: DefaultVisionConfig) -> Any:
    proc_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return proc_cls(size={"shortest_edge": cfg.image_size}, crop_size={"height": cfg.image_size, "width": cfg.image_size})


def resume_path(out_dir: str | Path) -> Path:
    """Where a build of `out_dir` keeps its pretraining state until the tower is saved: `OUT.resume.safetensors`."""
    out = Path(out_dir)
    return out.with_name(out.name + ".resume.safetensors")


def build_default_vision(out_dir: str | Path, cfg: DefaultVisionConfig = DefaultVisionConfig(), progress: bool = False,
                         device: str | torch.device = "cpu", checkpoint_every: int = 200,
                         shipped: str | Path | None = SHIPPED_TOWER) -> Path:
    """Create the default tiny CLIP tower (weights from `cfg.seed`, then `cfg.pretrain_steps` of pretraining) and
    its processor in `out_dir`, through the one default-model builder (default_build.py).

    When `cfg` is the recipe's of the tower shipped in `shipped` (the package's by default), that tower is installed
    instead of pretraining: its files' sha256 must match `recipe.json` (else DefaultVisionError), and with
    `progress` its hash and recorded held-out accuracies are printed. `shipped=None` always pretrains (what
    `layerfuse tower rebuild` does). Pretraining runs on `device` (extraction passes its own: a GPU when it has one).

    Idempotent: an existing folder built with the same settings is kept, so a resumed extraction sees the same
    weights; one built with other settings is an error, never silently reused. A killed build continues its
    pretraining from the state saved in `resume_path(out_dir)` every `checkpoint_every` steps.
    """
    out = Path(out_dir)
    settings = settings_of(cfg)
    recipe = read_recipe(shipped) if shipped is not None else None
    state_path = resume_path(out)

    def pretrained(staging: Path) -> dict[str, Any]:
        model, processor = _clip(cfg), _processor(cfg)
        report: dict[str, Any] = {}
        if cfg.pretrain_steps:
            preprocess = ImagePreprocessor(processor, pad_to_square=False)
            report = pretrain(model, preprocess, cfg, progress, device, state_path, checkpoint_every)
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        return {"pretraining": report}

    def installed(staging: Path) -> dict[str, Any]:
        assert shipped is not None and recipe is not None
        check_shipped(Path(shipped), recipe)
        for name in TOWER_FILES:
            if name != MARKER:  # the builder writes the marker; check_shipped then proves it the shipped one
                shutil.copyfile(Path(shipped) / name, staging / name)
        return {"pretraining": json.loads((Path(shipped) / MARKER).read_text())["pretraining"]}

    install = recipe is not None and recipe["config"] == settings
    existed = out.exists()
    built = build_default(out, settings, installed if install else pretrained, seed=cfg.seed, note={"note": _note(cfg)},
                          what="default vision tower", error=DefaultVisionError,
                          check=(lambda staging: check_shipped(staging, recipe)) if install else None)
    state_path.unlink(missing_ok=True)
    if install and progress and not existed:
        assert recipe is not None
        tqdm.write(shipped_summary(recipe))
    return built


# ------------------------------------------------------------------------------------------------ the shipped tower


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_recipe(folder: str | Path = SHIPPED_TOWER) -> dict[str, Any] | None:
    """The recipe of the tower shipped in `folder`, or None when there is none."""
    path = Path(folder) / RECIPE
    return json.loads(path.read_text()) if path.is_file() else None


def check_shipped(folder: Path, recipe: dict[str, Any]) -> None:
    """Raise DefaultVisionError unless every file of the recipe is in `folder` with the recorded sha256."""
    for name, want in recipe["files"].items():
        path = folder / name
        got = file_sha256(path) if path.is_file() else "missing"
        if got != want:
            raise DefaultVisionError(
                f"the shipped default vision tower does not match its {RECIPE}: '{path}' has sha256 {got}, recorded {want}; "
                f"reinstall layerfuse, or rebuild the tower and record it (`make default-tower`, `layerfuse tower record`)")


def shipped_summary(recipe: dict[str, Any]) -> str:
    """One line on an installed shipped tower: its hash and recorded held-out accuracies, to compare with a rebuild."""
    held = ", ".join(f"{k.removesuffix('_acc')} {v:.3f}" for k, v in recipe["held_out"].items() if k.endswith("_acc"))
    built = recipe["built_with"]
    return (f"default vision tower: installed the shipped one (pretrained {recipe['config']['pretrain_steps']} steps; "
            f"model.safetensors sha256 {recipe['files']['model.safetensors'][:16]}); held-out accuracy {held}, centre error "
            f"{recipe['held_out']['centre_mae_px']:.2f} px; built by layerfuse {built['layerfuse']} ({built['commit'][:10]}) "
            f"with torch {built['torch']}, {built['threads']} threads on {built['cpu']}; `make default-tower` rebuilds it")


EXACT_ON = ("torch", "cpu", "cpu_capability", "threads")  # a rerun is bit-exact only where these match
# Elsewhere each tensor's sum and norm must agree within SUM_RTOL * norm and NORM_RTOL * norm. Measured on the
# default recipe: 1 thread against 2 moves them by at most 1.1e-6 and 1.6e-7 of the norm, while a 3% different
# learning rate moves the median tensor by 1.2e-3 and 1.1e-5 (287 of 367 tensors beyond these tolerances).
SUM_RTOL = 1e-4
NORM_RTOL = 1e-5
# The attention key biases get no gradient in exact arithmetic (a key bias shifts every logit of a query's row
# alike, and softmax ignores that), so Adam's steps on them are amplified rounding noise: compared only bit-exactly.
ROUNDING_NOISE = ("self_attn.k_proj.bias",)


def machine() -> dict[str, Any]:
    """What a bit-exact rebuild depends on: the torch build, the CPU and its vector unit, the thread count."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")] if cpuinfo.exists() else []
    return {"torch": torch.__version__, "transformers": transformers.__version__, "cpu": names[0] if names else platform.processor(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "platform": platform.platform()}


def first_steps_fingerprint(cfg: DefaultVisionConfig = DefaultVisionConfig(), steps: int = FIRST_STEPS) -> dict[str, Any]:
    """The tower after the first `steps` pretraining steps of `cfg` (on the CPU, as the shipped one was built):
    sha256 over all its tensors, and each tensor's sum and L2 norm (in float64)."""
    with seeded(cfg.seed):  # the same generator draws as build_default_vision's
        model = _clip(cfg)
        pretrain(model, ImagePreprocessor(_processor(cfg), pad_to_square=False), cfg, progress=False, stop_after=steps)
    weights = model.state_dict()
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].contiguous().numpy().tobytes())
    tensors = {name: [float(weights[name].double().sum()), float(weights[name].double().norm())] for name in sorted(weights)}
    return {"steps": steps, "machine": machine(), "sha256": digest.hexdigest(), "tensors": tensors}


def first_steps_differences(recorded: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """How a rerun of the first steps (`first_steps_fingerprint`) differs from the recorded one; [] when it matches.

    Where torch, CPU, vector unit and threads are the recorded ones the tensors must be bit-identical (one sha256).
    Elsewhere float32 sums are reassociated (other BLAS kernels, other thread splits) and the weights differ in the
    last bits, so each tensor's sum and norm are compared with tolerances (SUM_RTOL, NORM_RTOL: about 100 times
    what that rounding moves, and well below what a changed recipe moves), except the ROUNDING_NOISE tensors."""
    if recorded["steps"] != got["steps"]:
        return [f"{got['steps']} steps rerun, {recorded['steps']} recorded"]
    if all(recorded["machine"].get(k) == got["machine"].get(k) for k in EXACT_ON):
        if got["sha256"] == recorded["sha256"]:
            return []
        changed = [k for k, v in recorded["tensors"].items() if got["tensors"].get(k) != v]
        return [f"sha256 {got['sha256']} (recorded {recorded['sha256']}) on the recorded torch, CPU and threads; "
                f"{len(changed)} tensor(s) differ, e.g. {', '.join(changed[:3])}"]
    diffs = [f"{name}: not in the rerun" for name in recorded["tensors"] if name not in got["tensors"]]
    diffs += [f"{name}: not recorded" for name in got["tensors"] if name not in recorded["tensors"]]
    for name, (s0, n0) in recorded["tensors"].items():
        if name not in got["tensors"] or name.endswith(ROUNDING_NOISE):
            continue
        s1, n1 = got["tensors"][name]
        if abs(s1 - s0) > SUM_RTOL * n0 + 1e-9 or abs(n1 - n0) > NORM_RTOL * n0 + 1e-9:
            diffs.append(f"{name}: sum {s1:.8g}, norm {n1:.8g} (recorded {s0:.8g}, {n0:.8g})")
    return diffs


def shipped_differences(folder: str | Path, shipped: str | Path = SHIPPED_TOWER) -> list[str]:
    """How a tower built in `folder` differs from the shipped one: files whose sha256 differs, held-out results."""
    recipe = read_recipe(shipped)
    if recipe is None:
        raise DefaultVisionError(f"no shipped default vision tower in '{shipped}' (no {RECIPE})")
    folder = Path(folder)
    diffs = []
    for name, want in recipe["files"].items():
        got = file_sha256(folder / name) if (folder / name).is_file() else "missing"
        if got != want:
            diffs.append(f"{name}: sha256 {got} (shipped {want})")
    held = ((read_marker(folder) or {}).get("pretraining") or {}).get("held_out", {})
    diffs += [f"held-out {k}: {held.get(k)} (shipped {v})" for k, v in recipe["held_out"].items() if json.dumps(held.get(k)) != json.dumps(v)]
    return diffs


def record_shipped(folder: str | Path, into: str | Path = SHIPPED_TOWER, commit: str = "unknown", device: str = "cpu") -> dict[str, Any]:
    """Make the tower built in `folder` (for `DefaultVisionConfig()`, on this machine) the shipped one: its files and
    a new `recipe.json` replace `into`. Reruns the first steps for the fingerprint (seconds). Returns the recipe."""
    folder, cfg = Path(folder), DefaultVisionConfig()
    settings, marker = settings_of(cfg), read_marker(folder)
    if marker is None or any(marker.get(k) != v for k, v in settings.items()) or not marker.get("pretraining"):
        raise DefaultVisionError(f"'{folder}' holds no default vision tower pretrained with the default settings; only that one ships")
    report = marker["pretraining"]
    recipe = {
        "config": settings,
        "built_with": {"layerfuse": __version__, "commit": commit, "device": device, **machine()},
        "files": {name: file_sha256(folder / name) for name in TOWER_FILES},
        "held_out": report["held_out"],
        "final_losses": report["last_losses"],
        "first_steps": first_steps_fingerprint(cfg),
    }
    staging = fresh_temp_dir(into)
    for name in TOWER_FILES:
        shutil.copyfile(folder / name, staging / name)
    (staging / RECIPE).write_text(json.dumps(recipe, indent=1) + "\n")
    publish_dir(staging, into, replace=True)
    return recipe
