"""The sample record that flows from a source through extraction into the cache.

A source (LLaVA JSON, WebDataset shards, the built-in synthetic set) is first *planned*: turned into a
list of `SampleRecord`s without decoding any image. Extraction then loads each record's image in a
DataLoader worker. Anything wrong with a sample is raised as `SampleError` and recorded as a
`SampleIssue`, never dropped silently.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from layerfuse.core.errors import InputError

SOURCES = ("llava", "webdataset", "synthetic")


class SampleError(InputError):
    """A sample that cannot be used; `reason` is a short human-readable cause (no id: the caller adds it)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SampleRecord:
    """One planned sample.

    locator says where the image lives, by source:
      llava:      {"path": "<absolute, normalised path under the image root, or an fsspec URL>"} (read under
                  `access.ImageAccess` (pipeline/data/access.py): the worker checks it against the image root again)
      webdataset: {"tar": "<shard path/URL>", "member": "<member name>", "offset": <data offset>, "size": <bytes>}
      synthetic:  {"seed": <dataset seed>, "index": <sample index>}
      text-only:  {}  (has_image is False)
    """

    id: str
    source: str
    locator: dict[str, Any]
    conversations: list[dict[str, str]]  # [{"from": "human"|"gpt", "value": str}, ...]
    has_image: bool
    category: str = ""
    split: str = ""
    image_ref: str = ""  # the image as named by the source (relative path, tar member); for display only

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SampleRecord":
        return cls(**d)


SKIP_STAGES = ("image", "encoder")  # issue stages of a sample whose row is stored as skipped (no features)


@dataclass(frozen=True)
class SampleIssue:
    """A recorded problem with one input sample.

    stage: "plan" (the record itself is malformed), "image" (loading/decoding failed), "encoder" (the vision encoder's
    hidden states of the image were not finite, or beyond what the storage dtype holds), or "note" (the sample was
    kept after a repair, e.g. a missing `<image>` token was added).
    """

    id: str
    source: str
    stage: str
    reason: str
    where: str = ""  # file / tar member / JSON index the issue refers to

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        loc = f" ({self.where})" if self.where else ""
        return f"{self.id}{loc}: {self.reason}"


@dataclass
class Plan:
    """The result of planning a source: the usable records and the issues found while reading it."""

    records: list[SampleRecord] = field(default_factory=list)
    issues: list[SampleIssue] = field(default_factory=list)
