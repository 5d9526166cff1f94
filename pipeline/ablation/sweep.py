"""What an ablation sweep is: its spec (from the command line or a YAML/TOML file) and its variants.

    SweepSpec (fusers x layer sets x seeds, + the layer-probe study, + the training budget)
      -- expand_sweep(spec, vision, llm) -->  [Variant]  each valid (trainable) or invalid (with the reason)

A variant is one fuser with one layer spec, its options and one seed. Validity is decided by the registry itself:
every variant is built on the `meta` device (no memory, no compute), so a combination the registry refuses
(`single` x `3-18-23`, `igva` x `18`, ...) becomes an invalid variant carrying the `FuserBuildError` message, and
the same build gives the parameter count and the hidden states it reads. Internal fusers (`inject`, `xattn`) act
inside an LLM: in probe mode, which has none, they are invalid.

Fingerprints make a killed or extended sweep resumable: `SweepSpec.settings_hash` covers everything that changes
what one variant computes except the variant lists; `Variant.key` adds the variant itself. A finished variant is
reused when its stored key equals the key the current spec gives it.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from layerfuse.core.errors import ConfigError
from layerfuse.core.fingerprint import FINGERPRINT, fingerprint, fingerprinted, fingerprinted_when
from layerfuse.core.options import option_pair
from layerfuse.fusion import FuserBuildError, LLMSpec, VisionSpec, build_fuser, fuser_class, list_fusers


MODES = ("probe", "lm")
STUDY_SWEEP, STUDY_LAYERS = "sweep", "layers"
VARIANT_LIST = {FINGERPRINT: False}  # field metadata: a list of variants, not a setting every variant shares


class SweepError(ConfigError):
    """A sweep spec that cannot be run as written (clear message, no traceback in the CLI)."""


@dataclass
class ProbeSettings:
    """The probe budget: the fuser's projector maps to `width`, a small answer head replaces the LLM."""

    width: int = 128  # d: the fuser's output width, the head's width
    heads: int = 4  # attention-pooling heads of the answer head
    lr: float = 1e-3  # fuser, projector and head
    weight_decay: float = 0.0


@dataclass
class LMSettings:
    """The LM budget: fuser + projector (+ the LLM) trained on the next-token loss as phase two does.

    `stage` picks phase two's defaults (docs/methods.md#training-recipe: stage 1 = LLM frozen at lr 1e-3, stage 2 =
    everything at 2e-5); every variant starts from the base LLM (a sweep has no stage-1 run per variant to start from)."""

    llm: str = "default"  # hub id or folder; "default" = the embedded tiny Llama (built in OUT/default-llm)
    stage: int = 1
    template: str = "v1"  # the question must be in the prompt for exact-match evaluation ("plain" drops it)
    llm_mode: str | None = None  # frozen | full | lora [the stage's]
    lr_fuser: float | None = None
    lr_projector: float | None = None
    lr_llm: float | None = None
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    max_length: int = 2048
    micro_batch_size: int | None = None  # [batch_size]
    max_new_tokens: int = 16


@dataclass
class SweepSpec:
    """One sweep. Variant lists: fusers x layers x seeds (+ probe_layers); the rest is the shared budget."""

    cache: str
    fusers: list[str] = field(default_factory=list, metadata=VARIANT_LIST)
    layers: list[str] = field(default_factory=list, metadata=VARIANT_LIST)
    seeds: list[int] = field(default_factory=lambda: [0], metadata=VARIANT_LIST)
    fuser_options: dict[str, dict[str, Any]] = field(default_factory=dict, metadata=VARIANT_LIST)  # fuser -> options of its config
    probe_layers: list[int] | None = field(default=None, metadata=VARIANT_LIST)  # hidden states of the single-layer study
    mode: str = "probe"
    epochs: float = 5.0
    steps: int | None = None  # overrides epochs
    batch_size: int = 32
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    categories: list[str] | None = None  # train and evaluate on these; None = the closed-answer categories
    train_split: str = "train"
    eval_split: str = "val"
    eval_limit: int | None = None  # at most this many evaluation samples (storage order)
    buffer_rows: int = 1024  # shuffle buffer (whole batches)
    probe: ProbeSettings = fingerprinted_when(lambda s: s.mode == "probe", default_factory=ProbeSettings)  # probe mode's budget
    lm: LMSettings = fingerprinted_when(lambda s: s.mode == "lm", default_factory=LMSettings)  # lm mode's budget

    # -- what a variant's result depends on ----------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The fingerprinted fields (all but the variant lists and the other mode's budget), the cache as an absolute
        path: two sweeps with equal settings train a shared variant identically."""
        d = fingerprinted(self)
        d["cache"] = str(Path(self.cache).resolve()) if Path(self.cache).exists() else self.cache
        return d

    def settings_hash(self) -> str:
        return fingerprint(self.settings())

    def check(self) -> SweepSpec:
        if self.mode not in MODES:
            raise SweepError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        unknown = sorted(set(self.fusers) - set(list_fusers()))
        if unknown:
            raise SweepError(f"unknown fuser(s) {', '.join(unknown)}; available: {', '.join(list_fusers())}")
        stray = sorted(set(self.fuser_options) - set(list_fusers()))
        if stray:
            raise SweepError(f"fuser_options for unknown fuser(s) {', '.join(stray)}; available: {', '.join(list_fusers())}")
        if self.fusers and not self.layers:
            raise SweepError("give the layer sets to sweep (--layers, e.g. 18,3-18-23,all)")
        if self.layers and not self.fusers:
            raise SweepError("give the fusers to sweep (--fusers, e.g. single,concat,mmfuser,igva)")
        if not self.fusers and self.probe_layers is None:
            raise SweepError("nothing to run: give --fusers and --layers, or --probe-layers (or both)")
        if not self.seeds:
            raise SweepError("give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise SweepError(f"seeds repeat: {self.seeds}")
        if self.steps is None and self.epochs <= 0:
            raise SweepError("epochs must be > 0 (or give steps)")
        if self.steps is not None and self.steps < 1:
            raise SweepError("steps must be >= 1")
        if self.batch_size < 1:
            raise SweepError("batch_size must be >= 1")
        if self.lm.stage not in (1, 2):
            raise SweepError(f"lm.stage must be 1 or 2, got {self.lm.stage}")
        return self


# -- parsing ----------------------------------------------------------------------------------------------------------
def split_layer_sets(text: str) -> list[str]:
    """`--layers` value -> layer specs: separated by ';' when one appears (explicit lists such as `4,12,20` or `12,`
    contain commas), else by ','."""
    sep = ";" if ";" in text else ","
    return [s.strip() for s in text.split(sep) if s.strip()]


def parse_seeds(value: Any) -> list[int]:
    """`3` -> [0, 1, 2]; `0,5` or [0, 5] -> [0, 5]."""
    if isinstance(value, bool):
        raise SweepError(f"seeds must be a count or a list of integers, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise SweepError(f"seeds must be >= 1, got {value}")
        return list(range(value))
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if len(parts) == 1 and "," not in value:
            return parse_seeds(_int(parts[0], "seeds"))
        return [_int(p, "seeds") for p in parts]
    if isinstance(value, (list, tuple)):
        return [_int(v, "seeds") for v in value]
    raise SweepError(f"seeds must be a count or a list of integers, got {value!r}")


def parse_probe_layers(value: Any, num_states: int) -> list[int]:
    """`all` -> 0..L; `0,3,12,23` / [0, 3] -> those hidden states (negative counts from the end)."""
    if isinstance(value, str) and value.strip().lower() == "all":
        return list(range(num_states))
    items = value if isinstance(value, (list, tuple)) else [p for p in str(value).split(",") if p.strip()]
    out = []
    for v in items:
        i = _int(v, "probe_layers")
        j = i + num_states if i < 0 else i
        if not 0 <= j < num_states:
            raise SweepError(f"probe layer {i} does not exist: the cache stores hidden states 0..{num_states - 1}")
        if j not in out:
            out.append(j)
    if not out:
        raise SweepError("probe_layers lists no layer; use 'all' or e.g. 0,3,12,23")
    return out


def _int(v: Any, what: str) -> int:
    try:
        if isinstance(v, float) and not v.is_integer():
            raise ValueError
        return int(v)
    except (TypeError, ValueError):
        raise SweepError(f"{what}: expected an integer, got {v!r}") from None


def read_sweep_file(path: str | Path) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or TOML (.toml) sweep file as a plain dict (keys as in SweepSpec)."""
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"sweep file '{path}' does not exist")
    import yaml

    text = p.read_text()
    suffix = p.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise SweepError(f"sweep file '{path}': use a .yaml, .yml or .toml file")
    try:
        data = tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:  # both name line and column
        raise SweepError(f"cannot read sweep file '{path}': {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SweepError(f"sweep file '{path}' must hold a mapping of settings (fusers:, layers:, seeds:, ...)")
    return data


def spec_from_dict(data: dict[str, Any], *, num_states: int | None = None, where: str = "sweep") -> SweepSpec:
    """Build a SweepSpec from file/CLI values: lists may be comma strings, seeds a count, layers any scalars."""
    data = dict(data)
    known = {f.name for f in dataclasses.fields(SweepSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SweepError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if "cache" not in data or not data["cache"]:
        raise SweepError(f"{where}: no cache given (--cache or `cache:` in the sweep file)")
    kw: dict[str, Any] = {"cache": str(data["cache"])}
    if "fusers" in data:
        kw["fusers"] = _str_list(data["fusers"], "fusers", split=lambda s: [x.strip() for x in s.split(",") if x.strip()])
    if "layers" in data:
        kw["layers"] = _str_list(data["layers"], "layers", split=split_layer_sets)
    if "seeds" in data:
        kw["seeds"] = parse_seeds(data["seeds"])
    if "categories" in data and data["categories"] is not None:
        kw["categories"] = _str_list(data["categories"], "categories", split=lambda s: [x.strip() for x in s.split(",") if x.strip()])
    if data.get("fuser_options"):
        opts = data["fuser_options"]
        if not isinstance(opts, dict) or not all(isinstance(v, dict) for v in opts.values()):
            raise SweepError(f"{where}: fuser_options must map a fuser name to its options, e.g. {{igva: {{allocator_dim: 256}}}}")
        kw["fuser_options"] = {str(k): dict(v) for k, v in opts.items()}
    if data.get("probe_layers") is not None:
        if num_states is None:
            raise SweepError("probe_layers needs the cache's number of hidden states")
        kw["probe_layers"] = parse_probe_layers(data["probe_layers"], num_states)
    for name, cls in (("probe", ProbeSettings), ("lm", LMSettings)):
        if data.get(name) is not None:
            kw[name] = _sub(cls, data[name], f"{where}: {name}")
    for f in dataclasses.fields(SweepSpec):
        if f.name not in kw and f.name in data and data[f.name] is not None:
            kw[f.name] = data[f.name]
    try:
        spec = SweepSpec(**kw)
    except TypeError as e:
        raise SweepError(f"{where}: {e}") from None
    for name, typ in (("epochs", float), ("warmup_ratio", float), ("max_grad_norm", float)):
        setattr(spec, name, _num(getattr(spec, name), typ, name))
    for name in ("steps", "eval_limit"):
        if getattr(spec, name) is not None:
            setattr(spec, name, _int(getattr(spec, name), name))
    spec.batch_size, spec.buffer_rows = _int(spec.batch_size, "batch_size"), _int(spec.buffer_rows, "buffer_rows")
    return spec.check()


def _num(v: Any, typ: type, what: str) -> Any:
    try:
        return typ(v)
    except (TypeError, ValueError):
        raise SweepError(f"{what}: expected a number, got {v!r}") from None


def _str_list(value: Any, what: str, split) -> list[str]:
    if isinstance(value, str):
        return split(value)
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    if isinstance(value, (int, float)):
        return [str(value)]
    raise SweepError(f"{what}: expected a list or a comma-separated string, got {value!r}")


def _sub(cls: type, value: Any, where: str) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise SweepError(f"{where} must be a mapping of settings")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise SweepError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return cls(**value)


# -- variants ---------------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    """One fuser x layer spec x seed of a sweep (valid: it trains; invalid: `reason` says why not)."""

    fuser: str
    layers: str
    seed: int
    options: dict[str, Any]  # the fuser's options as the sweep gives them (layers excluded)
    study: str = STUDY_SWEEP  # "sweep" (fusers x layers) or "layers" (the single-layer probe study)
    reason: str | None = None  # why the registry refused it (invalid variant)
    key: str = ""  # settings hash + variant: a stored result with this key is this variant, finished
    required_layers: list[int] = field(default_factory=list)  # hidden states read from the cache
    trainable_params: int = 0  # fuser (+ projector) parameters
    needs_text: bool = False
    internal: bool = False
    num_visual_tokens: int = 0
    describe: str = ""  # the resolved layer selection

    @property
    def valid(self) -> bool:
        return self.reason is None

    @property
    def id(self) -> str:
        """A stable, file-system safe name: fuser__layers__s<seed>."""
        return f"{self.fuser}__{layer_slug(self.layers)}__s{self.seed}"

    @property
    def arm(self) -> tuple[str, str]:
        """(fuser, layers): the variant without its seed, what a results row aggregates over."""
        return self.fuser, self.layers

    def build_options(self) -> dict[str, Any]:
        return {**self.options, "layers": self.layers}

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "id": self.id}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Variant:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def layer_slug(spec: str) -> str:
    """'3-18-23' -> '3-18-23', '12,' -> '12_', '1:6,7:12,23' -> '1-6_7-12_23' (distinct specs stay distinct)."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", spec.replace(":", "-")) or "_"


def probe_options(spec: SweepSpec, fuser: str) -> dict[str, Any]:
    """The options a sweep gives `fuser`: its fuser_options, plus the probe-mode defaults.

    Probe mode sizes IGVA's weight allocator to the probe width (allocator_dim = probe.width; the paper's 1024
    makes the allocator ~25M parameters, which would dominate a probe's budget) and uses the allocator (not the
    uniform stage-1 average), unless the sweep sets them. In lm mode IGVA follows the stage like `layerfuse
    train`: uniform average in stage 1, the allocator in stage 2."""
    opts = dict(spec.fuser_options.get(fuser, {}))
    opts.pop("layers", None)
    if fuser == "igva":
        if spec.mode == "probe":
            opts.setdefault("allocator_dim", spec.probe.width)
            opts.setdefault("mode", "allocator")
        else:
            opts.setdefault("mode", "uniform" if spec.lm.stage == 1 else "allocator")
    return opts


def expand_sweep(spec: SweepSpec, vision: VisionSpec, llm: LLMSpec) -> list[Variant]:
    """Every variant of the sweep (fusers x layers x seeds, then the layer study), each checked by building it on
    the meta device: invalid ones carry the registry's reason."""
    arms: list[tuple[str, str, str]] = [(f, l, STUDY_SWEEP) for f in spec.fusers for l in spec.layers]
    for i in spec.probe_layers or []:
        arm = ("single", f"{i},", STUDY_LAYERS)
        if arm[:2] not in {a[:2] for a in arms}:
            arms.append(arm)
    settings = spec.settings_hash()
    out = []
    for fuser, layers, study in arms:
        template = Variant(fuser, layers, 0, probe_options(spec, fuser), study)
        checked = check_variant(template, spec.mode, vision, llm)
        for seed in spec.seeds:
            v = dataclasses.replace(checked, seed=seed, options=dict(checked.options), required_layers=list(checked.required_layers))
            v.key = fingerprint({"settings": settings, "fuser": fuser, "layers": layers, "options": v.options, "seed": seed})
            out.append(v)
    return out


def check_variant(v: Variant, mode: str, vision: VisionSpec, llm: LLMSpec) -> Variant:
    """Fill in validity, required layers, parameter count and token count by building the fuser on `meta`."""
    v = dataclasses.replace(v)
    try:
        cls = fuser_class(v.fuser)
    except FuserBuildError as e:
        v.reason = str(e)
        return v
    v.internal = bool(cls.internal)
    if mode == "probe" and cls.internal:
        v.reason = (f"{v.fuser} is an internal fuser: it acts inside an LLM's decoder layers, and probe mode has no LLM "
                    "(run it with --mode lm)")
        return v
    try:
        with torch.device("meta"):
            fuser = build_fuser(v.fuser, vision, llm, **v.build_options())
    except FuserBuildError as e:
        v.reason = str(e)
        return v
    v.required_layers = list(fuser.required_layers)
    v.trainable_params = sum(p.numel() for p in fuser.parameters() if p.requires_grad)
    v.needs_text = bool(fuser.needs_text)
    v.num_visual_tokens = int(fuser.num_visual_tokens)
    v.describe = fuser.selection.describe()
    return v


# -- command line + sweep file ----------------------------------------------------------------------------------------
CLI_TOP = ("cache", "fusers", "layers", "seeds", "probe_layers", "mode", "epochs", "steps", "batch_size", "categories", "eval_split",
           "eval_limit", "train_split")
CLI_PROBE = {"probe_width": "width", "lr": "lr"}
CLI_LM = {"llm": "llm", "stage": "stage", "llm_mode": "llm_mode", "template": "template", "max_length": "max_length",
          "micro_batch_size": "micro_batch_size"}


def fuser_option(text: str) -> tuple[str, str, Any]:
    """`igva.allocator_dim=256` -> ("igva", "allocator_dim", 256): values as core/options.py reads them."""
    malformed = SweepError(f"--fuser-opt: expected FUSER.KEY=VALUE (e.g. igva.allocator_dim=256), got {text!r}")
    try:
        lhs, value = option_pair(text)
    except ValueError:
        raise malformed from None
    fuser, _, key = (part.strip() for part in lhs.partition("."))
    if not fuser or not key:
        raise malformed
    return fuser, key, value


def sweep_from_inputs(sweep_file: str | None, cli: dict[str, Any], fuser_opts: list[str], *, num_states: Any = None) -> SweepSpec:
    """The sweep file's settings (if any), overridden by every command-line value that was given (not None).

    `num_states` is a callable cache path -> number of hidden states (needed to resolve probe_layers 'all')."""
    data: dict[str, Any] = read_sweep_file(sweep_file) if sweep_file else {}
    where = f"sweep file '{sweep_file}'" if sweep_file else "command line"
    for k in CLI_TOP:
        if cli.get(k) is not None:
            data[k] = cli[k]
    for flag, key in CLI_PROBE.items():
        if cli.get(flag) is not None:
            data["probe"] = {**(data.get("probe") or {}), key: cli[flag]}
    for flag, key in CLI_LM.items():
        if cli.get(flag) is not None:
            data["lm"] = {**(data.get("lm") or {}), key: cli[flag]}
    if fuser_opts:
        opts = {k: dict(v) for k, v in (data.get("fuser_options") or {}).items()}
        for text in fuser_opts:
            fuser, key, value = fuser_option(text)
            opts.setdefault(fuser, {})[key] = value
        data["fuser_options"] = opts
    states = None
    if data.get("probe_layers") is not None and data.get("cache") and num_states is not None:
        states = num_states(str(data["cache"]))
    return spec_from_dict(data, num_states=states, where=where)
