"""The built-in synthetic dataset: procedurally rendered scenes with single-answer questions.

Every sample is a pure function of (seed, index): `make_scene` draws its parameters from
`random.Random(f"{seed}:{index}")` and `render` rasterises it with numpy only (shapes are analytic
masks, digits a hand-coded 5x7 bitmap font), so any worker can render sample i alone and the pixels
are identical across machines and Pillow versions. `write_dataset` exports LLaVA JSON + PNG files and
WebDataset tar shards; `synthetic_plan` lists the records without rendering anything.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from layerfuse.pipeline.data.records import Plan, SampleError, SampleRecord

IMAGE_SIZE = 96
CATEGORIES = ("colour", "shape", "count", "position", "glyph", "detail", "caption")
QUESTION_CATEGORIES = CATEGORIES[:-1]
SPLITS = ("train", "val", "test")
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses", "diamond": "diamonds"}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 225, 30),
    "purple": (140, 50, 190),
    "orange": (250, 135, 20),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
LLAVA_SUFFIX = "\nAnswer the question using a single word or phrase."
CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "Give a short description of this image.",
    "Write a one-sentence caption for the image.",
    "Summarize the visual content of the image.",
)
DETAIL_WORDS = {"dot": "small dot", "stripe": "thin stripe"}
GLYPH_SCALE = 2
# Hand-coded 5x7 bitmap font ("#" = ink); no PIL fonts, so rendering is identical everywhere.
GLYPHS: dict[str, tuple[str, ...]] = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
}

RGB = tuple[int, int, int]
Box = tuple[float, float, float, float]
_YS, _XS = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)


@dataclass(frozen=True)
class SceneObject:
    """One shape: centre (x, y) in pixels, size = box side in pixels, optional fine detail."""

    shape: str
    colour: str
    rgb: RGB
    x: int
    y: int
    size: int
    detail: str | None = None  # None, "dot" or "stripe"

    @property
    def box(self) -> Box:
        r = self.size / 2
        return (self.x - r, self.y - r, self.x + r, self.y + r)


@dataclass(frozen=True)
class Glyph:
    """A digit drawn with the bitmap font; (x, y) is the top-left pixel, patch the plain box behind it."""

    digit: str
    x: int
    y: int
    rgb: RGB
    scale: int = GLYPH_SCALE
    patch: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1 (exclusive)
    patch_rgb: RGB | None = None

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.x + 5 * self.scale, self.y + 7 * self.scale)

    @property
    def clear_box(self) -> Box:
        """The box, 3 px wider on every side (the plain patch's extent): objects are placed outside it."""
        x0, y0, x1, y1 = self.box
        return (x0 - 3, y0 - 3, x1 + 3, y1 + 3)


@dataclass(frozen=True)
class Scene:
    """All parameters of one synthetic sample; `render(scene)` draws it."""

    seed: int
    index: int
    id: str
    category: str
    split: str
    human: str  # the full human turn ("<image>\n" + question [+ suffix])
    question: str
    answer: str
    objects: tuple[SceneObject, ...]
    background: RGB
    glyph: Glyph | None = None

    def conversations(self) -> list[dict[str, str]]:
        return [{"from": "human", "value": self.human}, {"from": "gpt", "value": self.answer}]


def glyph_mask(digit: str, scale: int = GLYPH_SCALE) -> np.ndarray:
    """The boolean (7*scale, 5*scale) ink mask of a digit."""
    bits = np.array([[c == "#" for c in row] for row in GLYPHS[digit]], dtype=bool)
    return np.kron(bits, np.ones((scale, scale), dtype=bool)).astype(bool)


def shape_mask(obj: SceneObject) -> np.ndarray:
    """Boolean (IMAGE_SIZE, IMAGE_SIZE) mask of the object's shape (without detail)."""
    dx, dy, r = _XS - obj.x, _YS - obj.y, obj.size / 2 - 0.5
    if obj.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if obj.shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if obj.shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if obj.shape == "triangle":  # apex up, base at the bottom
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if obj.shape == "cross":
        w = max(2.0, obj.size / 6)
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {obj.shape!r}")


def detail_rgb(rgb: RGB) -> RGB:
    """Black on light colours, white on dark ones."""
    return (0, 0, 0) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else (255, 255, 255)


def detail_mask(obj: SceneObject) -> np.ndarray:
    """The detail's pixels, always inside the shape and never on the centre pixel."""
    if obj.detail is None:
        return np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    off = max(3, obj.size // 5)
    if obj.detail == "dot":  # 3x3 px dot below the centre
        m = (np.abs(_XS - obj.x) <= 1) & (np.abs(_YS - (obj.y + off)) <= 1)
    elif obj.detail == "stripe":  # 2 px horizontal stripe across the lower half
        m = (_YS >= obj.y + off - 1) & (_YS <= obj.y + off)
    else:
        raise ValueError(f"unknown detail {obj.detail!r}")
    return m & shape_mask(obj)


def render(scene: Scene) -> Image.Image:
    """Rasterise a scene to an RGB IMAGE_SIZE x IMAGE_SIZE image (numpy only, deterministic)."""
    arr = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    arr[:] = scene.background
    g = scene.glyph
    if g is not None:
        if g.patch is not None:
            x0, y0, x1, y1 = g.patch
            arr[y0:y1, x0:x1] = g.patch_rgb
        gx0, gy0, gx1, gy1 = g.box
        arr[gy0:gy1, gx0:gx1][glyph_mask(g.digit, g.scale)] = g.rgb
    for obj in scene.objects:
        arr[shape_mask(obj)] = obj.rgb
        if obj.detail is not None:
            arr[detail_mask(obj)] = detail_rgb(obj.rgb)
    return Image.fromarray(arr)  # uint8 (H, W, 3) -> mode "RGB"


def _overlaps(a: Box, b: Box, margin: float = 2.0) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _place(rng: random.Random, sizes: list[int], taken: list[Box], tries: int = 200) -> list[tuple[int, int]] | None:
    """Reject-sample non-overlapping centres for objects of the given sizes (None if it gets stuck)."""
    out = []
    for s in sizes:
        lo, hi = math.ceil(s / 2) + 1, IMAGE_SIZE - 2 - math.ceil(s / 2)
        for _ in range(tries):
            x, y = rng.randint(lo, hi), rng.randint(lo, hi)
            box = (x - s / 2, y - s / 2, x + s / 2, y + s / 2)
            if not any(_overlaps(box, t) for t in taken):
                break
        else:
            return None
        taken.append(box)
        out.append((x, y))
    return out


def _objects(rng: random.Random, specs: list[tuple[str, str]], sizes: list[int], taken: list[Box]) -> list[SceneObject] | None:
    pos = _place(rng, sizes, taken)
    if pos is None:
        return None
    return [SceneObject(s, c, COLOURS[c], x, y, z) for (s, c), (x, y), z in zip(specs, pos, sizes)]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _caption(objs: list[SceneObject], bg: RGB) -> str:
    names = [f"{_article(o.colour)} {o.colour} {o.shape}" for o in objs]
    tone = "dark" if bg[0] < 128 else "light"
    if len(objs) == 2:
        a, b = objs
        dx, dy = a.x - b.x, a.y - b.y
        rel = ("to the left of" if dx < 0 else "to the right of") if abs(dx) >= abs(dy) else ("above" if dy < 0 else "below")
        body = f"{names[0]} {rel} {names[1]}"
    else:
        body = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{body[0].upper()}{body[1:]} on a {tone} grey background."


def _glyph(rng: random.Random, bg: RGB) -> Glyph:
    """A random digit at a random place, on the background or (half the time) on a plain light/dark patch."""
    digit, w, h = str(rng.randint(0, 9)), 5 * GLYPH_SCALE, 7 * GLYPH_SCALE
    gx, gy = rng.randint(4, IMAGE_SIZE - 4 - w), rng.randint(4, IMAGE_SIZE - 4 - h)
    patch = patch_rgb = None
    ink = detail_rgb(bg)
    if rng.random() < 0.5:
        patch = (gx - 3, gy - 3, gx + w + 3, gy + h + 3)
        light = rng.random() < 0.5
        g = rng.randint(205, 235) if light else rng.randint(15, 35)
        patch_rgb, ink = (g, g, g), ((0, 0, 0) if light else (255, 255, 255))
    return Glyph(digit, gx, gy, ink, GLYPH_SCALE, patch, patch_rgb)


def _build(rng: random.Random, category: str, bg: RGB) -> tuple[str, str, list[SceneObject], Glyph | None] | None:
    """One attempt at a scene of `category`: (question, answer, objects, glyph) or None to retry."""
    colours, shapes = list(COLOURS), list(SHAPES)
    size = lambda lo=14, hi=26: rng.randint(lo, hi)  # noqa: E731
    if category in ("colour", "shape"):
        shape, colour = rng.choice(shapes), rng.choice(colours)
        specs = [(shape, colour)]
        for _ in range(rng.randint(0, 3)):  # distractors differ in the queried attribute's partner
            if category == "colour":
                specs.append((rng.choice([s for s in shapes if s != shape]), rng.choice(colours)))
            else:
                specs.append((rng.choice(shapes), rng.choice([c for c in colours if c != colour])))
        objs = _objects(rng, specs, [size() for _ in specs], [])
        if objs is None:
            return None
        rng.shuffle(objs)
        if category == "colour":
            return f"What colour is the {shape}?", colour, objs, None
        return f"What shape is the {colour} object?", shape, objs, None
    if category == "count":
        shape, k = rng.choice(shapes), rng.randint(1, 6)
        specs = [(shape, rng.choice(colours)) for _ in range(k)]
        specs += [(rng.choice([s for s in shapes if s != shape]), rng.choice(colours)) for _ in range(rng.randint(0, min(2, 7 - k)))]
        objs = _objects(rng, specs, [size(14, 26 if len(specs) <= 3 else 18) for _ in specs], [])
        if objs is None:
            return None
        rng.shuffle(objs)
        return f"How many {PLURALS[shape]} are there?", str(k), objs, None
    if category == "position":
        direction = rng.choice(("left", "right", "above", "below"))
        (s1, s2), (c1, c2) = rng.sample(shapes, 2), rng.sample(colours, 2)
        z1, z2 = size(14, 22), size(14, 22)
        for _ in range(500):
            pos = _place(rng, [z1, z2], [])
            if pos is None:
                continue
            (x1, y1), (x2, y2) = pos
            major, minor = {"left": (x2 - x1, y1 - y2), "right": (x1 - x2, y1 - y2), "above": (y2 - y1, x1 - x2), "below": (y1 - y2, x1 - x2)}[direction]
            if major >= max(20, (z1 + z2) / 2 + 3) and abs(minor) <= major / 2:
                objs = [SceneObject(s1, c1, COLOURS[c1], x1, y1, z1), SceneObject(s2, c2, COLOURS[c2], x2, y2, z2)]
                return f"Where is the {c1} {s1} relative to the {c2} {s2}?", direction, objs, None
        return None
    if category == "glyph":
        glyph = _glyph(rng, bg)
        specs = [(rng.choice(shapes), rng.choice(colours)) for _ in range(rng.randint(0, 2))]
        objs = _objects(rng, specs, [size(14, 20) for _ in specs], [glyph.clear_box])
        if objs is None:
            return None
        return "What digit is written in the image?", glyph.digit, objs, glyph
    if category == "detail":
        shape, kind = rng.choice(shapes), rng.choice(("dot", "stripe"))
        chosen = rng.sample(colours, rng.randint(2, 4))
        objs = _objects(rng, [(shape, c) for c in chosen], [size(20, 26) for _ in chosen], [])
        if objs is None:
            return None
        objs[0] = SceneObject(shape, chosen[0], COLOURS[chosen[0]], objs[0].x, objs[0].y, objs[0].size, kind)
        rng.shuffle(objs)
        return f"What colour is the {shape} with the {DETAIL_WORDS[kind]}?", chosen[0], objs, None
    if category == "caption":
        pairs = rng.sample([(s, c) for s in shapes for c in colours], rng.randint(1, 3))
        objs = _objects(rng, pairs, [size() for _ in pairs], [])
        if objs is None:
            return None
        return rng.choice(CAPTION_PROMPTS), _caption(objs, bg), objs, None
    raise ValueError(f"unknown category {category!r}")


def make_scene(seed: int, index: int) -> Scene:
    """The scene of sample `index` in the dataset with `seed`; a pure function of (seed, index)."""
    rng = random.Random(f"{seed}:{index}")
    u = rng.random()
    category = "caption" if u < 0.25 else QUESTION_CATEGORIES[min(int((u - 0.25) / 0.75 * 6), 5)]
    v = rng.random()
    split = "train" if v < 0.8 else ("val" if v < 0.9 else "test")
    g = rng.randint(40, 90) if rng.random() < 0.5 else rng.randint(160, 210)
    bg = (g, g, g)
    suffix = category != "caption" and rng.random() < 0.25
    for _ in range(100):
        built = _build(rng, category, bg)
        if built is not None:
            break
    else:  # pragma: no cover - the budgets above make this practically unreachable
        raise RuntimeError(f"could not lay out synthetic sample {seed}:{index}")
    question, answer, objs, glyph = built
    human = "<image>\n" + question + (LLAVA_SUFFIX if suffix else "")
    return Scene(seed, index, f"syn-{seed}-{index:07d}", category, split, human, question, answer, tuple(objs), bg, glyph)


def dense_scene(seed: int, index: int) -> Scene:
    """A question-free scene packed with everything the categories ask about, for pretraining the default tower:
    1-5 objects (any shape and colour, each with a dot or stripe 40% of the time) and a digit 60% of the time.
    A pure function of (seed, index); category and split are "pretrain"."""
    rng = random.Random(f"dense:{seed}:{index}")
    g = rng.randint(40, 90) if rng.random() < 0.5 else rng.randint(160, 210)
    bg = (g, g, g)
    for _ in range(100):
        glyph = _glyph(rng, bg) if rng.random() < 0.6 else None
        taken = [glyph.clear_box] if glyph is not None else []
        specs = [(rng.choice(SHAPES), rng.choice(list(COLOURS))) for _ in range(rng.randint(1, 5))]
        objs = _objects(rng, specs, [rng.randint(14, 26 if len(specs) <= 3 else 20) for _ in specs], taken)
        if objs is not None:
            break
    else:  # pragma: no cover - the budgets above make this practically unreachable
        raise RuntimeError(f"could not lay out dense scene {seed}:{index}")
    objs = [o if rng.random() >= 0.4 else SceneObject(o.shape, o.colour, o.rgb, o.x, o.y, o.size, rng.choice(("dot", "stripe"))) for o in objs]
    return Scene(seed, index, f"dense-{seed}-{index:07d}", "pretrain", "pretrain", "", "", "", tuple(objs), bg, glyph)


def scene_record(scene: Scene) -> SampleRecord:
    """The SampleRecord of a scene (no rendering)."""
    return SampleRecord(
        id=scene.id, source="synthetic", locator={"seed": scene.seed, "index": scene.index},
        conversations=scene.conversations(), has_image=True, category=scene.category, split=scene.split,
        image_ref=f"images/{scene.id}.png",
    )


def synthetic_plan(n: int, seed: int) -> Plan:
    """Plan n synthetic samples without rendering any image."""
    return Plan(records=[scene_record(make_scene(seed, i)) for i in range(n)])


def render_record(rec: SampleRecord) -> Image.Image:
    """Render the image of a synthetic record from its locator; SampleError if the locator is unusable."""
    loc = rec.locator or {}
    if rec.source != "synthetic" or not isinstance(loc.get("seed"), int) or not isinstance(loc.get("index"), int):
        raise SampleError(f"not a synthetic locator: source={rec.source!r} locator={loc!r}")
    if loc["index"] < 0:
        raise SampleError(f"negative synthetic index {loc['index']}")
    return render(make_scene(loc["seed"], loc["index"]))


def wds_key(sample_id: str) -> str:
    """WebDataset key of a sample id: anything but [A-Za-z0-9_-] becomes "_" (keys never contain dots)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", sample_id)


def png_bytes(img: Image.Image) -> bytes:
    """PNG encoding without metadata (deterministic)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _dump_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_dataset(out_dir: str | Path, n: int, seed: int, shard_size: int = 1000, progress: bool = True) -> dict[str, Any]:
    """Render n samples to `out_dir` as LLaVA (images/ + llava*.json) and WebDataset tars (wds/); returns the manifest."""
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "wds").mkdir(parents=True, exist_ok=True)
    llava: list[dict[str, Any]] = []
    counts = {s: {c: 0 for c in CATEGORIES} for s in SPLITS}
    shards: dict[str, list[str]] = {s: [] for s in SPLITS}
    open_tars: dict[str, tarfile.TarFile] = {}
    in_shard = {s: 0 for s in SPLITS}
    try:
        for i in tqdm(range(n), desc="synthetic", unit="img", disable=not progress):
            scene = make_scene(seed, i)
            data = png_bytes(render(scene))
            (out / "images" / f"{scene.id}.png").write_bytes(data)
            entry = {"id": scene.id, "image": f"{scene.id}.png", "conversations": scene.conversations(),
                     "category": scene.category, "split": scene.split}
            llava.append(entry)
            counts[scene.split][scene.category] += 1
            sp = scene.split
            if sp not in open_tars or in_shard[sp] >= shard_size:
                if sp in open_tars:
                    open_tars[sp].close()
                name = f"{sp}-{len(shards[sp]):06d}.tar"
                shards[sp].append(name)
                open_tars[sp] = tarfile.open(out / "wds" / name, "w", format=tarfile.USTAR_FORMAT)
                in_shard[sp] = 0
            key = wds_key(scene.id)
            meta = {k: entry[k] for k in ("id", "conversations", "category", "split")}
            _add_member(open_tars[sp], f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
            _add_member(open_tars[sp], f"{key}.png", data)
            in_shard[sp] += 1
    finally:
        for t in open_tars.values():
            t.close()
    _dump_json(out / "llava.json", llava)
    for s in SPLITS:
        _dump_json(out / f"llava_{s}.json", [e for e in llava if e["split"] == s])
    manifest = {
        "name": "layerfuse-synthetic", "version": 1, "n": n, "seed": seed, "image_size": IMAGE_SIZE,
        "categories": list(CATEGORIES), "counts": counts,
        "files": {"images": "images", "llava": "llava.json",
                  "llava_splits": {s: f"llava_{s}.json" for s in SPLITS},
                  "wds": {s: [f"wds/{name}" for name in shards[s]] for s in SPLITS}},
        "content_sha256": hashlib.sha256(json.dumps(llava, sort_keys=True).encode("utf-8")).hexdigest(),
    }
    _dump_json(out / "dataset.json", manifest)
    return manifest
