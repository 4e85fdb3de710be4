"""What the package index shows: a LICENSE, classifiers, project URLs, keywords, a README whose links work there
(absolute, to files that exist), and extras for torch and the example plugins."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
BLOB = "https://github.com/ckconv/ckconv/blob/main/"


def test_license_is_mit_in_the_repository_and_declared_for_the_wheel():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert PROJECT["license"] == "MIT" and PROJECT["license-files"] == ["LICENSE"]


def test_index_metadata():
    assert len(PROJECT["classifiers"]) >= 8 and "Typing :: Typed" in PROJECT["classifiers"]
    assert not any(c.startswith("License ::") for c in PROJECT["classifiers"])  # PEP 639: the license expression
    assert {"Homepage", "Repository", "Issues", "Changelog"} <= set(PROJECT["urls"])
    assert "safetensors" in PROJECT["keywords"]


def test_readme_links_are_absolute_and_point_at_files_that_exist():
    links = re.findall(r"\]\(([^)\s]+)\)", (ROOT / "README.md").read_text())
    assert links
    for link in links:
        assert link.startswith("https://"), f"relative link {link}: it breaks on the package index"
        if link.startswith(BLOB):
            assert (ROOT / link[len(BLOB):].partition("#")[0]).is_file(), link


def test_torch_is_an_extra_and_the_plugins_are_extras():
    base = " ".join(PROJECT["dependencies"])
    assert "torch" not in base and "torchvision" not in base
    extras = PROJECT["optional-dependencies"]
    assert any(d.startswith("torch>=") for d in extras["torch"]) and any(d.startswith("torchvision")
                                                                        for d in extras["torch"])
    for extra, folder in (("timm", "ckconv-timm"), ("npz", "ckconv-npz")):
        plugin = tomllib.loads((ROOT / "plugins" / folder / "pyproject.toml").read_text())["project"]["name"]
        assert any(d.split(">")[0].split("=")[0].strip() == plugin for d in extras[extra]), extra
