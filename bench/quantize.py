"""Quantisation benchmark: which 8-bit storage of the cache's features (pipeline/cache/quantize.py) loses least.

Every scheme of `layerfuse.pipeline.cache.quantize` (int8 `channel`, `token`, `token+outliers` in two settings,
float8_e4m3fn direct and with a per-token scale), plus the cache's fp16 today, on the hidden states of

1. all-MiniLM-L6-v2 (the packaged sentence model, a trained transformer: its BertModel with
   output_hidden_states=True, 7 hidden states x 128 tokens x 384), on the built-in dataset's conversations (14
   samples' turns joined per sequence, truncated to 128 tokens, no padding); calibrated on the first 32
   sequences, measured on the next 256, and on 128-token windows of the project's own docs (other text: a
   distribution the calibration never saw);
2. the shipped pretrained default tower (pipeline/models/default_tower, 25 x 65 x 64) on built-in images:
   calibration 64 images, measured on the next 512;
3. a random-weight ViT-B/16-shaped CLIP (bench/extract.py's `build_vitb`, 13 x 197 x 768): calibration 8
   images, measured on 24, to show what random weights (no outlier channels) do.

Per stored layer (`ErrorStats`): relative RMS error ||x - x^|| / ||x||, max abs error, mean per-token cosine,
clip rate; the reference x is the fp32 forward. Bytes per sample are the stored parts, uncompressed, vs raw
fp16, for each model's shape and for CLIP ViT-L/14-336's (25 x 577 x 1024); calibration state (stored once)
apart. The int8 recommendation is computed from the MiniLM numbers by the rule printed in the section.

    python bench/quantize.py --out BENCHMARKS.md [--quick]
"""

from __future__ import annotations

import datetime
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from layerfuse.core.benchmarks import bench_parser, command, machine, write_section  # noqa: E402
from layerfuse.pipeline.cache.quantize import (  # noqa: E402
    ChannelInt8,
    ErrorStats,
    LayerError,
    QuantScheme,
    TokenOutlierInt8,
    calibrate,
    parts_bytes,
)
from layerfuse.pipeline.data.synthetic import render_record, synthetic_plan  # noqa: E402
from layerfuse.pipeline.models.default_vision import SHIPPED_TOWER  # noqa: E402
from layerfuse.pipeline.models.encoder import load_vision_encoder  # noqa: E402
from layerfuse.pipeline.models.text import InstructionEmbedder  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract import build_vitb  # noqa: E402

SECTION = "## Quantised storage (`bench/quantize.py`)"
REPO = Path(__file__).resolve().parents[1]
VITL_SHAPE = (25, 577, 1024)  # CLIP ViT-L/14-336: L+1 hidden states, tokens, width
MINILM_TOKENS = 128
VARIANTS: list[tuple[str, str, dict[str, float]]] = [  # (label, scheme, calibration options)
    ("channel", "channel", {}),
    ("token", "token", {}),
    ("token+outliers k=3 n≤8", "token+outliers", {"factor": 3.0, "max_outliers": 8}),
    ("token+outliers k=2 n≤16", "token+outliers", {"factor": 2.0, "max_outliers": 16}),
    ("fp8", "fp8", {}),
    ("fp8+token", "fp8+token", {}),
]
INT8 = ("channel", "token", "token+outliers")
MAX_INT8_BYTES = 0.52  # the rule: at most 4% more than plain int8 (0.50 of fp16) at the ViT-L/14-336 shape
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()


class Fp16Reference(QuantScheme):
    """The cache today: a cast to float16 (for comparison; not a scheme of quantize.py)."""

    name = "fp16"

    def quantize(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"q": x.half()}

    def dequantize(self, parts: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return parts["q"].to(dtype)

    def clipped(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs() > torch.finfo(torch.float16).max


# --------------------------------------------------------------------------------------------- the features


def builtin_texts(n: int, seed: int = 0, per_text: int = 14) -> list[str]:
    """n texts, each the joined turns (human and gpt) of `per_text` consecutive built-in samples."""
    records = synthetic_plan(n * per_text, seed).records
    return [" ".join(t["value"].replace("<image>", "").strip() for r in records[i : i + per_text] for t in r.conversations)
            for i in range(0, n * per_text, per_text)]


def docs_texts(words_per_text: int = 110) -> list[str]:
    """Windows of the project's own prose (README and docs/*.md, code blocks and table marks removed)."""
    text = " ".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    text = re.sub(r"[|#*`]", " ", re.sub(r"```.*?```", " ", text, flags=re.S))
    words = text.split()
    return [" ".join(words[i : i + words_per_text]) for i in range(0, len(words) - words_per_text, words_per_text)]


def minilm() -> tuple[torch.nn.Module, object]:
    """all-MiniLM-L6-v2's BertModel and tokenizer, loaded as the cache loads the sentence model (offline)."""
    st = InstructionEmbedder().model[0]
    return st.auto_model.eval(), st.tokenizer


def minilm_states(model: torch.nn.Module, tok: object, texts: list[str], batch: int = 32) -> torch.Tensor:
    """Hidden states [N, 7, 128, 384] float32 of the texts; texts shorter than 128 tokens are dropped (no padding
    tokens in the statistics)."""
    out = []
    for s in range(0, len(texts), batch):
        enc = tok(texts[s : s + batch], padding="max_length", truncation=True, max_length=MINILM_TOKENS, return_tensors="pt")
        full = enc["attention_mask"].all(dim=1)
        with torch.inference_mode():
            hs = torch.stack(model(**enc, output_hidden_states=True).hidden_states, 1)  # [b, 7, 128, 384]
        out.append(hs[full].float())
    return torch.cat(out)


def tower_states(vision_dir: Path, n: int, seed: int = 0, batch: int = 32) -> torch.Tensor:
    """Hidden states of a vision tower on n built-in images, [n, L+1, T, D] float32."""
    enc = load_vision_encoder(str(vision_dir))
    pre = enc.preprocessor(False)
    records = synthetic_plan(n, seed).records
    out = []
    for s in range(0, n, batch):
        pix = torch.from_numpy(np.stack([pre(render_record(r)) for r in records[s : s + batch]]))
        out.append(enc(pix).float())
    return torch.cat(out)


# ------------------------------------------------------------------------------------------- the measurement


def measure(scheme: QuantScheme, x: torch.Tensor, batch: int = 16) -> list[LayerError]:
    """Per-layer error of storing x [N, K, T, D] with the scheme, in blocks of `batch` samples."""
    stats = ErrorStats(x.shape[1])
    for s in range(0, x.shape[0], batch):
        block = x[s : s + batch]
        stats.update(block, scheme.dequantize(scheme.quantize(block)), scheme.clipped(block))
    return stats.per_layer()


def bytes_ratio(scheme: QuantScheme, shape: tuple[int, int, int]) -> float:
    """Stored bytes of one sample of [K, T, D] (the parts, uncompressed) / raw fp16."""
    k, t, d = shape
    return parts_bytes(scheme.quantize(torch.zeros(1, k, t, d))) / (k * t * d * 2)


def at_vitl(scheme: QuantScheme) -> QuantScheme:
    """The same scheme with a state of ViT-L/14-336's shape (same number of outlier channels), for its bytes."""
    k, _, d = VITL_SHAPE
    if isinstance(scheme, ChannelInt8):
        return ChannelInt8(torch.ones(k, d))
    if isinstance(scheme, TokenOutlierInt8):
        return TokenOutlierInt8(torch.arange(scheme.channels.shape[1]).expand(k, -1).contiguous())
    return scheme


def outlier_structure(x: torch.Tensor) -> dict[str, float]:
    """Per layer: largest channel absmax / median channel absmax, and the median token's absmax / RMS over channels;
    medians over layers (the tokens of Gaussian-like activations of width D have absmax / RMS ~ 3-4)."""
    absmax = x.abs().amax(dim=(0, 2))  # [K, D]
    spread = (absmax.amax(1) / absmax.median(1).values.clamp_min(1e-30)).median()
    peak = x.abs().amax(-1) / x.square().mean(-1).sqrt().clamp_min(1e-30)  # [N, K, T]
    peak = peak.transpose(0, 1).flatten(1).median(dim=1).values  # [K]
    return {"channel_spread": float(spread), "token_peak": float(peak.median()), "rms": float(x.square().mean().sqrt()),
            "absmax": float(x.abs().max())}


def study(label: str, cal: torch.Tensor, held: dict[str, torch.Tensor]) -> list[dict]:
    """Every variant calibrated on `cal`, measured on each held-out set; one row per (set, variant)."""
    shape = tuple(cal.shape[1:])
    rows = []
    variants = [("fp16 (the cache today)", Fp16Reference(), "")]
    for name, scheme_name, opts in VARIANTS:
        scheme = calibrate(scheme_name, cal, **opts)
        n = str(scheme.channels.shape[1]) if isinstance(scheme, TokenOutlierInt8) else ""
        variants.append((name, scheme, n))
    for set_name, x in held.items():
        for name, scheme, n in variants:
            t = time.perf_counter()
            errs = measure(scheme, x)
            rows.append({"model": label, "set": set_name, "variant": name, "scheme": scheme.name, "n": n, "errors": errs,
                         "bytes": bytes_ratio(scheme, shape), "bytes_vitl": bytes_ratio(at_vitl(scheme), VITL_SHAPE),
                         "seconds": time.perf_counter() - t})
        print(f"{label} / {set_name}: {len(variants)} variants on {tuple(x.shape)}", file=sys.stderr)
    return rows


# ---------------------------------------------------------------------------------------------- the report


def worst(errs: list[LayerError]) -> tuple[int, LayerError]:
    k = max(range(len(errs)), key=lambda i: errs[i].rel_rms)
    return k, errs[k]


def pct(v: float) -> str:
    return f"{v * 100:.2f}%"


def summary_rows(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        errs = r["errors"]
        k, w = worst(errs)
        med = statistics.median(e.rel_rms for e in errs)
        out.append(f"| {r['model']} | {r['set']} | {r['variant']} | {r['n']} | {pct(med)} | {pct(w.rel_rms)} (hs[{k}]) | "
                   f"{max(e.max_abs for e in errs):.3g} | {min(e.cosine for e in errs):.5f} | {max(e.clip_rate for e in errs):.1e} | "
                   f"{r['bytes']:.3f} | {r['bytes_vitl']:.3f} |")
    return out


def per_layer_rows(rows: list[dict]) -> list[str]:
    return [f"| {r['variant']} | " + " | ".join(pct(e.rel_rms) for e in r["errors"]) + " |" for r in rows]


class Findings:
    """The rows of one run, looked up by model, held-out set and variant."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def get(self, model: str, variant: str) -> list[dict]:
        return [r for r in self.rows if r["model"].startswith(model) and r["variant"] == variant]

    def worst_rms(self, model: str, variant: str) -> float:
        return max(worst(r["errors"])[1].rel_rms for r in self.get(model, variant))

    def median_rms(self, model: str, variant: str) -> float:
        return max(statistics.median(e.rel_rms for e in r["errors"]) for r in self.get(model, variant))

    def clip(self, model: str, variant: str) -> float:
        return max(e.clip_rate for r in self.get(model, variant) for e in r["errors"])

    def max_abs(self, model: str, variant: str) -> float:
        return max(e.max_abs for r in self.get(model, variant) for e in r["errors"])

    def field(self, model: str, variant: str, key: str):
        return self.get(model, variant)[0][key]


MINILM, TINY, VITB = "all-MiniLM", "shipped default", "random ViT-B"


def recommend(rows: list[dict], structure: dict[str, dict[str, float]]) -> tuple[str, str, list[str]]:
    """(int8 variant, fp8 variant, sentences with the numbers behind them, "" between paragraphs): the int8 choice from the
    MiniLM rows."""
    f = Findings(rows)
    int8 = [v for v, name, _ in VARIANTS if name in INT8]
    ok = [v for v in int8 if f.clip(MINILM, v) == 0 and f.field(MINILM, v, "bytes_vitl") <= MAX_INT8_BYTES]
    best = min(ok, key=lambda v: f.worst_rms(MINILM, v))
    vitl = lambda v: f.field(MINILM, v, "bytes_vitl")  # noqa: E731
    own = lambda v: f.field(MINILM, v, "bytes")  # noqa: E731
    sets = [r["set"] for r in f.get(MINILM, "channel")]
    ch = {r["set"]: r for r in f.get(MINILM, "channel")}
    out = [
        f"**int8: `{best}`.** Rule: the int8 variant with the lowest worst-layer relative RMS error over both MiniLM held-out "
        f"sets, among those that clip nothing there and store at most {MAX_INT8_BYTES:.2f} of fp16 at the ViT-L/14-336 shape. "
        f"On MiniLM it has worst layer {pct(f.worst_rms(MINILM, best))}, median layer {pct(f.median_rms(MINILM, best))} (the worse "
        f"of the two sets), max abs error {f.max_abs(MINILM, best):.3g}, no clipping, at {vitl(best):.3f} of fp16 bytes for "
        f"ViT-L/14-336 ({own(best):.3f} at MiniLM's width 384)."]
    others = [v for v in int8 if v != best]
    out.append("The others on MiniLM (worst / median layer, max abs error, clip rate, bytes at ViT-L/14-336): " + "; ".join(
        f"`{v}` {pct(f.worst_rms(MINILM, v))} / {pct(f.median_rms(MINILM, v))}, {f.max_abs(MINILM, v):.3g}, "
        f"{f.clip(MINILM, v):.1e}, {vitl(v):.3f}" for v in others) + ".")
    if f.worst_rms(MINILM, "token") > f.worst_rms(MINILM, best):
        out.append(f"Plain `token` needs no calibration but MiniLM's outlier channels (largest / median channel absmax "
                   f"{structure['all-MiniLM-L6-v2']['channel_spread']:.1f}) set every token's scale: "
                   f"{f.worst_rms(MINILM, 'token') / f.worst_rms(MINILM, best):.2f}x the worst-layer error of `{best}`.")
    if len(sets) == 2:
        a, b = (ch[x] for x in sets)
        wa, wb = worst(a["errors"])[1].rel_rms, worst(b["errors"])[1].rel_rms
        ca, cb = (max(e.clip_rate for e in r["errors"]) for r in (a, b))
        out.append(f"`channel` (one range per layer and channel, fixed on the first samples) has worst layer {pct(wa)} and clip "
                   f"rate {ca:.1e} on held-out {sets[0]}, {pct(wb)} and {cb:.1e} on {sets[1]}"
                   + (": a range fixed on the first samples clips data that differs from them, where per-token scales follow "
                      "every token." if cb > ca else "."))
    fp8, fp8s = "fp8", "fp8+token"
    all_models = (MINILM, TINY, VITB)
    fp8_clip = max(f.clip(m, fp8) for m in all_models)
    largest = max(s["absmax"] for s in structure.values())
    pick = fp8s if (fp8_clip > 0 or f.worst_rms(MINILM, fp8s) <= 1.05 * f.worst_rms(MINILM, fp8)) else fp8
    out.append("")
    out.append(
        f"**fp8: `{pick}`**, if a float8 cache is wanted (a consumer that computes in fp8): worst layer on MiniLM `fp8` "
        f"{pct(f.worst_rms(MINILM, fp8))}, `fp8+token` {pct(f.worst_rms(MINILM, fp8s))} (3 mantissa bits: the relative error "
        f"hardly depends on the scale), but the direct cast saturates beyond 448 ("
        + (f"clip rate up to {fp8_clip:.1e} here" if fp8_clip > 0 else f"no value here came near: the largest |x| is {largest:.3g}")
        + "; a real tower's activations may be larger) and flushes |x| < 2^-10 to zero, which the "
        f"scale avoids for 2 bytes per token ({vitl(fp8s):.3f} vs {vitl(fp8):.3f} of fp16 at ViT-L/14-336). At about the same "
        f"bytes fp8's worst-layer error is {f.worst_rms(MINILM, fp8s) / f.worst_rms(MINILM, best):.1f}x that of int8 `{best}`, "
        "so int8 is the storage to use.")
    tiny_n = f.field(TINY, best, "n")
    vitb_n = f.field(VITB, best, "n")
    out.append("")
    out.append(
        f"Random weights have no outlier channels (largest / median channel absmax {structure['random ViT-B/16-shaped']['channel_spread']:.1f} "
        f"for the random ViT-B/16 shape vs {structure['all-MiniLM-L6-v2']['channel_spread']:.1f} for MiniLM): there `{best}` keeps "
        f"{vitb_n} channel(s) and measures like `token` ({pct(f.worst_rms(VITB, best))} vs {pct(f.worst_rms(VITB, 'token'))} worst "
        f"layer), so such a tower cannot choose the scheme. The shipped default tower is trained but tiny (width 64, largest / "
        f"median channel absmax {structure['shipped default tower']['channel_spread']:.1f}; `{best}` keeps {tiny_n} channel(s)): "
        f"worst layer {pct(f.worst_rms(TINY, best))} vs "
        f"`token` {pct(f.worst_rms(TINY, 'token'))}, `channel` {pct(f.worst_rms(TINY, 'channel'))} (clip rate "
        f"{f.clip(TINY, 'channel'):.1e}).")
    return best, pick, out


def render(cmd: str, rows: list[dict], structure: dict[str, dict[str, float]], sizes: dict[str, str], seconds: float) -> str:
    first_set = next(iter(sizes))
    minilm_builtin = [r for r in rows if r["model"].startswith(MINILM) and r["set"] == first_set]
    _, _, text = recommend(rows, structure)
    struct = [f"| {m} | {s['rms']:.3g} | {s['absmax']:.3g} | {s['channel_spread']:.1f} | {s['token_peak']:.1f} |" for m, s in structure.items()]
    k = len(minilm_builtin[0]["errors"])
    return "\n".join([
        SECTION, "",
        f"Command: `{cmd}`  ",
        f"Date: {datetime.date.today().isoformat()}  ",
        f"Machine: {machine()}  ",
        "Settings: schemes of `layerfuse.pipeline.cache.quantize`, calibrated on the first samples, measured on held-out ones "
        "(reference: the fp32 forward); " + "; ".join(f"{k}: {v}" for k, v in sizes.items())
        + f". Bytes: the stored parts of one sample, uncompressed, / raw fp16 (own shape; CLIP ViT-L/14-336 = 25 x 577 x 1024, "
        f"29.5 MB in fp16); calibration state (stored once) not counted. k = outlier factor over the median channel absmax, "
        f"n = outlier channels kept in fp16. Total run {seconds:.0f} s.", "",
        "Where the outliers are (per layer: largest / median channel absmax, and the median token's absmax / its RMS over "
        "channels; medians over layers):", "",
        "| model | RMS of the activations | largest abs value | largest / median channel absmax | token absmax / RMS |",
        "|---|---|---|---|---|", *struct, "",
        "Per scheme: relative RMS error of the median and of the worst layer, and over all layers the largest abs error, "
        "the lowest mean per-token cosine, the highest clip rate:", "",
        "| model | held-out set | scheme | n | rel. RMS, median layer | rel. RMS, worst layer | max abs error | min cosine | max clip rate | bytes / fp16 | bytes / fp16 at ViT-L/14-336 |",
        "|---|---|---|---|---|---|---|---|---|---|---|", *summary_rows(rows), "",
        f"all-MiniLM-L6-v2 per layer ({first_set}), relative RMS error:", "",
        "| scheme | " + " | ".join(f"hs[{i}]" for i in range(k)) + " |", "|---|" + "---|" * k, *per_layer_rows(minilm_builtin), "",
        *paragraphs(text), "",
    ])


def paragraphs(sentences: list[str]) -> list[str]:
    """Sentences joined into paragraphs (an empty string starts a new one), separated by blank lines."""
    out: list[str] = [""]
    for s in sentences:
        if not s:
            out += ["", ""]
        else:
            out[-1] = f"{out[-1]} {s}".strip()
    return out


def main() -> None:
    ap = bench_parser(__doc__)
    args = ap.parse_args()
    n_text, n_docs, n_cal_text, n_img, n_cal_img, n_vitb, n_cal_vitb = (
        (24, 16, 8, 48, 16, 4, 2) if args.quick else (288, 10**6, 32, 576, 64, 32, 8))
    torch.manual_seed(0)
    cmd = command()
    t0 = time.perf_counter()
    rows, structure, sizes = [], {}, {}
    model, tok = minilm()
    text = minilm_states(model, tok, builtin_texts(n_text))
    docs = minilm_states(model, tok, docs_texts()[:n_docs])
    builtin_set, docs_set = "built-in text", "project docs (other text)"
    sizes[builtin_set] = f"MiniLM {n_cal_text} + {len(text) - n_cal_text} sequences of 128 tokens"
    sizes[docs_set] = f"MiniLM {len(docs)} sequences"
    rows += study("all-MiniLM-L6-v2 (7 x 128 x 384)", text[:n_cal_text], {builtin_set: text[n_cal_text:], docs_set: docs})
    structure["all-MiniLM-L6-v2"] = outlier_structure(text)
    del text, docs
    tower = tower_states(SHIPPED_TOWER, n_img)
    sizes["built-in images"] = f"default tower {n_cal_img} + {n_img - n_cal_img} images, ViT-B {n_cal_vitb} + {n_vitb - n_cal_vitb}"
    rows += study("shipped default tower (25 x 65 x 64)", tower[:n_cal_img], {"built-in images": tower[n_cal_img:]})
    structure["shipped default tower"] = outlier_structure(tower)
    del tower
    with tempfile.TemporaryDirectory(prefix="layerfuse-bench-") as tmp:
        vitb = tower_states(build_vitb(Path(tmp) / "vitb"), n_vitb, batch=8)
    rows += study("random ViT-B/16-shaped (13 x 197 x 768)", vitb[:n_cal_vitb], {"built-in images": vitb[n_cal_vitb:]})
    structure["random ViT-B/16-shaped"] = outlier_structure(vitb)
    section = render(cmd, rows, structure, sizes, time.perf_counter() - t0)
    write_section(args.out, SECTION, section)
    print(section)


if __name__ == "__main__":
    main()
