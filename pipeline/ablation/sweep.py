"""What an ablation sweep is: its spec (from the command line or a YAML/TOML file) and its variants.

A sweep file and the command line are read by one parser: pydantic validates the mapping against `SweepSpec` (types,
choices, unknown keys, the shorthands of its field types: comma lists, a seed count, 'all' probe layers), and the
command line sets the same dotted field names (`steps`, `probe.width`, `lm.llm`) over the file.

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
from typing import Annotated, Any, Callable, Literal

import torch
import yaml
from pydantic import BeforeValidator, ValidationInfo, with_config

from layerfuse.core.config import STRICT, check_choices, read_config
from layerfuse.core.errors import ConfigError
from layerfuse.core.fingerprint import FINGERPRINT, fingerprint, fingerprinted, fingerprinted_when
from layerfuse.core.options import option_pair
from layerfuse.fusion import FuserBuildError, LLMSpec, VisionSpec, build_fuser, fuser_class, fuser_config, list_fusers
from layerfuse.pipeline.data.conversation import Template
from layerfuse.pipeline.models.llm import DEFAULT_LLM
from layerfuse.pipeline.models.run import LLMMode, Stage
from layerfuse.pipeline.training.evaluate import EvalConfig
from layerfuse.pipeline.training.train import STAGE_DEFAULTS, TrainConfig

Mode = Literal["probe", "lm"]  # probe: fuser + answer head; lm: fuser + projector + LLM, as phase two trains
STUDY_SWEEP, STUDY_LAYERS = "sweep", "layers"
VARIANT_LIST = {FINGERPRINT: False}  # field metadata: a list of variants, not a setting every variant shares


class SweepError(ConfigError):
    """A sweep spec that cannot be run as written (clear message, no traceback in the CLI)."""


# -- the shorthands a sweep file and the command line may use (pydantic runs these before checking the type) -------
def split_layer_sets(text: str) -> list[str]:
    """`--layers` value -> layer specs: separated by ';' when one appears (explicit lists such as `4,12,20` or `12,`
    contain commas), else by ','."""
    sep = ";" if ";" in text else ","
    return [s.strip() for s in text.split(sep) if s.strip()]


def _words(value: Any) -> Any:
    """`"a, b"` -> ["a", "b"]; a list's items as strings (a YAML `18` is the layer spec "18"); one number -> [it]."""
    if isinstance(value, str):
        return [x.strip() for x in value.split(",") if x.strip()]
    return _strings(value)


def _layer_sets(value: Any) -> Any:
    return split_layer_sets(value) if isinstance(value, str) else _strings(value)


def _strings(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [str(value)]
    return value  # pydantic names what is wrong with it


def _seeds(value: Any) -> Any:
    """`3` or `"3"` -> [0, 1, 2]; `"0,5"` -> the seeds 0 and 5; a list as it is."""
    if isinstance(value, str):
        if "," in value:
            return [p.strip() for p in value.split(",") if p.strip()]
        try:
            value = int(value)
        except ValueError:
            raise ValueError("expected a count or a list of integers") from None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError("a count of seeds must be >= 1")
        return list(range(value))
    return value


def _probe_layers(value: Any, info: ValidationInfo) -> Any:
    """`all` -> every hidden state 0..L; `0,3,12,23` / [0, 3] -> those (negative counts from the end). Needs the
    cache's number of hidden states: the validation context's `num_states` (a number or a callable giving it)."""
    if value is None:
        return None
    states = (info.context or {}).get("num_states")
    if states is None:
        raise ValueError("needs the cache's number of hidden states")
    num_states = states() if callable(states) else int(states)
    if isinstance(value, str) and value.strip().lower() == "all":
        return list(range(num_states))
    out = []
    for v in value if isinstance(value, (list, tuple)) else [p for p in str(value).split(",") if p.strip()]:
        i = _int(v)
        j = i + num_states if i < 0 else i
        if not 0 <= j < num_states:
            raise ValueError(f"layer {i} does not exist: the cache stores hidden states 0..{num_states - 1}")
        if j not in out:
            out.append(j)
    if not out:
        raise ValueError("lists no layer; use 'all' or e.g. 0,3,12,23")
    return out


def _int(v: Any) -> int:
    try:
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            raise ValueError
        return int(v)
    except (TypeError, ValueError):
        raise ValueError(f"expected an integer, not {v!r}") from None


Names = Annotated[list[str], BeforeValidator(_words)]  # a list, or one comma-separated string
LayerSets = Annotated[list[str], BeforeValidator(_layer_sets)]  # layer specs; in one string ';'- or ','-separated
Seeds = Annotated[list[int], BeforeValidator(_seeds)]  # a count (3 = seeds 0, 1, 2) or a list
ProbeLayers = Annotated[list[int] | None, BeforeValidator(_probe_layers)]  # 'all' or hidden-state indices


@with_config(STRICT)
@dataclass
class ProbeSettings:
    """The probe budget: the fuser's projector maps to `width`, a small answer head replaces the LLM."""

    width: int = 128  # d: the fuser's output width, the head's width
    heads: int = 4  # attention-pooling heads of the answer head
    lr: float = STAGE_DEFAULTS[1]["lr_fuser"]  # fuser, projector and head, at phase two's stage-1 rate
    weight_decay: float = 0.0


@with_config(STRICT)
@dataclass
class LMSettings:
    """The LM budget: fuser + projector (+ the LLM) trained on the next-token loss as phase two does.

    `stage` picks phase two's defaults (docs/methods.md#training-recipe: stage 1 = LLM frozen at lr 1e-3, stage 2 =
    everything at 2e-5); every variant starts from the base LLM (a sweep has no stage-1 run per variant to start from). The
    other defaults are phase two's (`layerfuse train`, `layerfuse eval`)."""

    llm: str = DEFAULT_LLM  # hub id or folder; "default" = the embedded tiny Llama (built in OUT/default-llm)
    stage: Stage = 1
    template: Template = "v1"  # the question must be in the prompt for exact-match evaluation ("plain" drops it)
    llm_mode: LLMMode | None = None  # [the stage's]
    lr_fuser: float | None = None  # [the stage's]
    lr_projector: float | None = None  # [the stage's]
    lr_llm: float | None = None  # [the stage's]
    lora_r: int = TrainConfig.lora_r
    lora_alpha: int = TrainConfig.lora_alpha
    lora_dropout: float = TrainConfig.lora_dropout
    max_length: int = TrainConfig.max_length
    micro_batch_size: int | None = None  # [batch_size]
    max_new_tokens: int = EvalConfig.max_new_tokens


@with_config(STRICT)
@dataclass
class SweepSpec:
    """One sweep. Variant lists: fusers x layers x seeds (+ probe_layers); the rest is the shared budget (phase
    two's defaults where phase two has the setting)."""

    cache: str
    fusers: Names = field(default_factory=list, metadata=VARIANT_LIST)
    layers: LayerSets = field(default_factory=list, metadata=VARIANT_LIST)
    seeds: Seeds = field(default_factory=lambda: [0], metadata=VARIANT_LIST)
    fuser_options: dict[str, dict[str, Any]] = field(default_factory=dict, metadata=VARIANT_LIST)  # fuser -> options of its config
    probe_layers: ProbeLayers = field(default=None, metadata=VARIANT_LIST)  # hidden states of the single-layer study
    mode: Mode = "probe"
    epochs: float = 5.0
    steps: int | None = None  # overrides epochs
    batch_size: int = TrainConfig.batch_size
    warmup_ratio: float = TrainConfig.warmup_ratio
    max_grad_norm: float = TrainConfig.max_grad_norm
    categories: Names | None = None  # train and evaluate on these; None = the closed-answer categories
    train_split: str = TrainConfig.split
    eval_split: str = EvalConfig.split
    eval_limit: int | None = None  # at most this many evaluation samples (storage order)
    buffer_rows: int = TrainConfig.buffer_rows  # shuffle buffer (whole batches)
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
        """What the types alone do not say: a cache, fusers that exist, a runnable combination of lists, a budget."""
        if not self.cache:
            raise SweepError("no cache given (--cache or `cache:` in the sweep file)")
        check_choices(self, error=SweepError)
        unknown = sorted(set(self.fusers) - set(list_fusers()))
        if unknown:
            raise SweepError(f"unknown fuser(s) {', '.join(unknown)}; available: {', '.join(list_fusers())}")
        stray = sorted(set(self.fuser_options) - set(list_fusers()))
        if stray:
            raise SweepError(f"fuser_options for unknown fuser(s) {', '.join(stray)}; available: {', '.join(list_fusers())}")
        for name, options in self.fuser_options.items():
            try:
                fuser_config(name, **options)  # a misspelt option is an error, not a column of invalid variants
            except FuserBuildError as e:
                raise SweepError(f"fuser_options.{name}: {e}") from None
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
        return self


# -- sweep file + command line ---------------------------------------------------------------------------------------
def read_sweep_file(path: str | Path) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or TOML (.toml) sweep file as a plain dict (keys as in SweepSpec)."""
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"sweep file '{path}' does not exist")
    suffix = p.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise SweepError(f"sweep file '{path}': use a .yaml, .yml or .toml file")
    text = p.read_text()
    try:
        data = tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:  # both name line and column
        raise SweepError(f"cannot read sweep file '{path}': {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SweepError(f"sweep file '{path}' must hold a mapping of settings (fusers:, layers:, seeds:, ...)")
    return data


def spec_from_dict(data: dict[str, Any], *, num_states: int | Callable[[], int] | None = None, where: str = "sweep") -> SweepSpec:
    """A checked SweepSpec from a sweep file's (and the command line's) values, validated by pydantic against the
    SweepSpec fields; `num_states` (the cache's hidden states, or a callable giving them) resolves probe_layers."""
    spec = read_config(SweepSpec, data, where=where, context={"num_states": num_states}, error=SweepError)
    try:
        return spec.check()
    except SweepError as e:
        raise SweepError(f"{where}: {e}") from None


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


def sweep_from_inputs(sweep_file: str | None, overrides: dict[str, Any], fuser_opts: list[str], *,
                      num_states: Callable[[str], int] | None = None) -> SweepSpec:
    """The sweep file's settings (if any) with `overrides` set over them: SweepSpec field paths (`steps`,
    `probe.width`, `lm.llm`) -> the command-line values that were given; then `--fuser-opt FUSER.KEY=VALUE`s.

    `num_states` is a callable cache path -> number of hidden states (to resolve probe_layers)."""
    data: dict[str, Any] = read_sweep_file(sweep_file) if sweep_file else {}
    given = bool(overrides or fuser_opts)
    where = f"sweep file '{sweep_file}'" + (" with the command line" if given else "") if sweep_file else "command line"
    for path, value in overrides.items():
        _set(data, path.split("."), value, where)
    for text in fuser_opts:
        fuser, key, value = fuser_option(text)
        _set(data, ["fuser_options", fuser, key], value, where)
    cache = data.get("cache")
    states = (lambda: num_states(str(cache))) if num_states is not None and cache else None
    return spec_from_dict(data, num_states=states, where=where)


def _set(data: dict[str, Any], path: list[str], value: Any, where: str) -> None:
    for i, key in enumerate(path[:-1]):
        data = data.setdefault(key, {})
        if not isinstance(data, dict):
            raise SweepError(f"{where}: '{'.'.join(path[:i + 1])}' must be a mapping of settings to set '{'.'.join(path)}'")
    data[path[-1]] = value


# -- variants ---------------------------------------------------------------------------------------------------------
@with_config(STRICT)
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
    def from_json(cls, d: dict[str, Any], *, where: str = "variant record", error: type[Exception] = SweepError) -> Variant:
        """A variant from its `to_json` record; an unknown or missing key is an `error` naming `where`."""
        record = {k: v for k, v in d.items() if k != "id"}  # the id is derived (to_json writes it for readers)
        v = read_config(cls, record, where=where, error=error)
        if "id" in d and d["id"] != v.id:
            raise error(f"{where}: id {d['id']!r} is not the variant's ({v.id!r})")
        return v


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
