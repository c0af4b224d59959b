"""The documentation: the site builds with `mkdocs build --strict` (a broken link, a missing page
or a lost anchor fails it; the CLI reference is generated from the config models during the
build), the README stays short, and nothing in the repository points outside it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 250
# Built from parts so this file does not match itself.
OUTSIDE_PATHS = ("../" + "shared", "design".upper() + ".md")


@pytest.mark.slow
def test_site_builds_strictly_with_the_generated_reference(tmp_path):
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    reference = (site / "reference" / "index.html").read_text(encoding="utf-8")
    assert "<!-- cli-reference -->" not in reference
    # A flag of a config model and a key of a `distill run` section, both only in the code.
    assert "--kd-temperature" in reference and "train.kd_temperature" in reference
    assert (site / "index.html").is_file() and (site / "design" / "index.html").is_file()


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail to docs/"


def test_no_tracked_file_points_outside_the_repository():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    offenders = []
    for name in listed.stdout.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary: models, images
            continue
        text = data.decode("utf-8", errors="replace")
        offenders += [f"{name}: {needle}" for needle in OUTSIDE_PATHS if needle in text]
    assert not offenders, "files that cite a path outside the repository (cite docs/design.md instead):\n" + "\n".join(offenders)


def test_readme_links_point_at_files_of_the_repository():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert targets, "README.md links to no docs page"
    missing = [t for t in targets if "://" not in t and not (ROOT / t).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"
