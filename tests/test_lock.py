"""constraints.txt (the lock `make install` follows, written by `make lock`) against pyproject.toml: every requirement
of the package and of the dev extra is pinned, at a version its specifier allows; torch is left to TORCH_SPEC."""

from __future__ import annotations

import tomllib

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.support import REPO

UNPINNED = {"torch"}  # TORCH_SPEC, or the torch already installed, decides (README "Installation")


def pins() -> dict[str, Version]:
    """{canonical name: version} of constraints.txt; every line a plain `name==version`, each name once."""
    found: dict[str, Version] = {}
    for n, line in enumerate((REPO / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==" and not req.url and not req.extras and not req.marker, \
            f"constraints.txt:{n}: {line!r} is not a plain name==version pin"
        name = canonicalize_name(req.name)
        assert name not in found, f"constraints.txt:{n}: {req.name} is pinned twice"
        found[name] = Version(specs[0].version)
    return found


def requirements() -> list[Requirement]:
    """The package's dependencies and its dev extra (what `make install` installs by default), for this Python."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]]
    env = default_environment()
    return [r for r in reqs if r.marker is None or r.marker.evaluate({**env, "extra": "dev"})]


@pytest.fixture(scope="module")
def lock() -> dict[str, Version]:
    return pins()


@pytest.mark.parametrize("req", requirements(), ids=str)
def test_every_requirement_is_pinned_within_its_specifier(lock: dict[str, Version], req: Requirement) -> None:
    name = canonicalize_name(req.name)
    if name in UNPINNED:
        assert name not in lock, f"{req.name} is installed by TORCH_SPEC or kept as installed; constraints.txt must not pin it"
        return
    assert name in lock, f"{req.name} ({req}) has no pin in constraints.txt; run `make lock` after installing it"
    assert req.specifier.contains(lock[name], prereleases=True), \
        f"constraints.txt pins {req.name}=={lock[name]}, outside pyproject's {req.name}{req.specifier}"


def test_the_lock_leaves_out_layerfuse_and_the_torch_build(lock: dict[str, Version]) -> None:
    assert "layerfuse" not in lock
    assert not [n for n in lock if n in UNPINNED or n == "triton" or n.startswith("nvidia-")]
