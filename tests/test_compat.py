"""The tested transformers range: stated once, equal to pyproject's bounds and to the pinned
environments, and a warning outside it."""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import compose_cfg
from vlmloc import compat
from vlmloc.models.loading import ModelLoadError, load_adapter

ROOT = Path(__file__).resolve().parents[1]
LOW, HIGH = compat.TESTED_TRANSFORMERS


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    return {canonicalize_name(Requirement(r).name): Requirement(r) for r in reqs}


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints" / f"{name}.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pkg, version = line.split("==")
            pins[canonicalize_name(pkg)] = version
    return pins


def test_the_installed_release_is_read_from_its_metadata():
    import transformers

    assert compat.transformers_version() == transformers.__version__


def test_pyproject_allows_exactly_the_tested_range():
    spec = _requirements()["transformers"].specifier
    assert {str(s) for s in spec} == {f">={LOW}", "<5.26"}
    for version in (LOW, HIGH, "5.20.0", "5.25.3"):
        assert version in spec and compat.is_tested(version)
    for version in ("5.16.1", "5.26.0", "6.0.0"):
        assert version not in spec and not compat.is_tested(version)


@pytest.mark.parametrize(("name", "transformers_version"), [("lowest", LOW), ("newest", HIGH)])
def test_constraints_pin_every_dependency_inside_the_bounds(name, transformers_version):
    pins = _pins(name)
    assert pins["transformers"] == transformers_version
    assert pins["torch"] == "2.13.0"
    for pkg, req in _requirements().items():
        assert pkg in pins, f"constraints/{name}.txt does not pin {pkg}"
        assert req.specifier.contains(pins[pkg], prereleases=True), f"{pkg}=={pins[pkg]} is outside {req.specifier}"


def test_warning_outside_the_tested_range_names_it_once(monkeypatch):
    monkeypatch.setattr(compat, "_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning inside the range
        assert not compat.warn_if_untested(LOW) and not compat.warn_if_untested("5.25.1")
    for version in ("5.16.1", "5.26.0"):
        with pytest.warns(compat.UntestedTransformersWarning, match=rf"transformers {version} .*tested on {LOW} to {HIGH}"):
            assert compat.warn_if_untested(version)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compat.warn_if_untested("5.26.0")  # once per version


def test_model_load_warns_on_an_untested_transformers(monkeypatch, tmp_path):
    monkeypatch.setattr(compat, "_warned", set())
    monkeypatch.setattr(compat, "transformers_version", lambda: "5.99.0")
    cfg = compose_cfg("model=llava7b", f"model.path={tmp_path / 'absent'}").model
    with pytest.warns(compat.UntestedTransformersWarning, match="5.99.0"), pytest.raises(ModelLoadError):
        load_adapter(cfg)



