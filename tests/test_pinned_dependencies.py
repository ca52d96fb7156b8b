"""constraints.txt pins what `make` and the images install: every requirement of pyproject.toml,
runtime and dev, at a version its range admits, and the tests run on exactly those versions."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def pinned_versions() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, version = line.strip().partition("==")
        assert sep and version, f"constraints.txt: {line!r} is not name==version"
        pins[canonicalize_name(name)] = version
    return pins


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [requirement for extra in project["optional-dependencies"].values() for requirement in extra]
    return [Requirement(requirement) for requirement in project["dependencies"] + extras]


def test_every_requirement_is_pinned_within_its_range():
    pins = pinned_versions()
    for requirement in project_requirements():
        name = canonicalize_name(requirement.name)
        if name == "torch":
            assert name not in pins, "torch's build (CPU or CUDA) is TORCH_SPEC's choice, not a pin"
            continue
        assert name in pins, f"{requirement} has no pin in constraints.txt: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {requirement}: run `make lock`"
        )


def test_the_tests_run_on_the_pinned_versions():
    """An environment installed without the pins (or before they changed) fails here, not later."""
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    differing = {
        name: f"pinned {version}, installed {installed[name]}"
        for name, version in pinned_versions().items()
        if name in installed and installed[name] != version
    }
    assert not differing, f"run `make install`: {differing}"
