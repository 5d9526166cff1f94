"""Resolving model checkpoints given as a Hugging Face hub id or a local directory.

Every model layerfuse loads (vision tower, sentence model, LLM) goes through `load_pretrained`, so that a
machine without network access gets one clear message saying what to do instead of a stack trace.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, TypeVar

from layerfuse.core.errors import StateError

T = TypeVar("T")


class CheckpointError(StateError):
    """A checkpoint could not be found locally nor fetched from the hub."""


def is_local(name_or_path: str | os.PathLike) -> bool:
    return Path(os.path.expanduser(str(name_or_path))).is_dir()


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ).lower() in ("1", "true", "yes")


def offline_message(what: str, name: str, cause: BaseException | None = None) -> str:
    why = f" ({type(cause).__name__}: {str(cause).splitlines()[0][:200]})" if cause else ""
    return (
        f"cannot load {what} '{name}': it is not a local directory and it could not be fetched from the "
        f"Hugging Face hub{why}. If this machine is offline, download it where there is network, e.g. "
        f"`hf download {name} --local-dir /path/to/{name.split('/')[-1]}`, copy the folder here and pass "
        f"the directory instead of the hub id."
    )


def load_pretrained(what: str, name: str, loader: Callable[..., T], **kwargs: Any) -> T:
    """Call `loader(name, **kwargs)` (a `from_pretrained`), turning hub/network failures into `CheckpointError`.

    A local directory is loaded with `local_files_only=True`, so a broken folder never triggers a download.
    """
    if is_local(name):
        path = os.path.expanduser(str(name))
        try:
            return loader(path, local_files_only=True, **kwargs)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load {what} from directory '{path}': {e}") from e
    if str(name).startswith((".", "/", "~")) or os.sep in str(name).strip("/").replace("/", "", 1):
        raise CheckpointError(f"cannot load {what} '{name}': no such directory")
    try:
        return loader(name, local_files_only=hub_offline(), **kwargs)
    except OSError as e:  # transformers/huggingface_hub raise OSError subclasses for missing/unreachable repos
        raise CheckpointError(offline_message(what, name, e)) from e
