"""The layering of docs/design.md, checked statically: core imports no stage, stages import only core
(evaluation may use generate and train, train generate's prompt loaders), the app layer alone imports stages; nothing imports a
stage folder (or the script folders benchmarks/ and experiments/) by its top-level name; scripts
and tests use only public names.

Every `import` / `from ... import` in every module is read with `ast`, including the lazy ones
inside functions. Module names in strings (the CLI's COMMANDS table, scorer specs) are not seen.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("generate", "curation", "train", "serve", "evaluation", "export")
APP = ("distill.cli", "distill.pipeline", "distill.inspect", "distill.demo", "distill.sweep", "distill.synthesize")
# docs/design.md: evaluation uses their functions; train reads a chat dataset with generate's
# prompt loaders and chat templating (the online teacher's `--corpus FILE`)
STAGE_MAY_IMPORT = {"evaluation": ("generate", "train"), "train": ("generate",)}
SCRIPTS = ("benchmarks", "experiments")  # folders of scripts, not packages
TOP_LEVEL_FORBIDDEN = (*STAGES, *SCRIPTS)  # installed only as distill.<stage>
SOURCE_DIRS = ("distill", *STAGES, *SCRIPTS, "tests")


def module_name(rel: Path) -> str:
    """Repository path -> import name: generate/foo.py -> distill.generate.foo."""
    parts = list(rel.with_suffix("").parts)
    if parts[0] in STAGES:
        parts.insert(0, "distill")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def within(mod: str, package: str) -> bool:
    return mod == package or mod.startswith(package + ".")


def layer(mod: str) -> tuple[str, str | None] | None:
    """('core', None), ('stage', name), ('app', None), or None outside the package."""
    for stage in STAGES:
        if within(mod, f"distill.{stage}"):
            return "stage", stage
    if any(within(mod, app) for app in APP):
        return "app", None
    if within(mod, "distill"):
        return "core", None
    return None


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imports(tree: ast.AST, mod: str, is_package: bool):
    """(line, statement text, imported module, imported name or None, absolute import?) per imported thing."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, ast.unparse(node), alias.name, None, True
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = mod.split(".") if is_package else mod.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                if alias.name == "*":
                    yield node.lineno, ast.unparse(node), base, None, not node.level
                    continue
                # `from distill import train` imports the module distill.train
                sub = f"{base}.{alias.name}"
                target = sub if layer(sub) and layer(sub) != layer(base) else base
                yield node.lineno, ast.unparse(node), target, alias.name, not node.level


def check_source(rel: str | Path, source: str) -> list[str]:
    """Every layering violation in one module, as 'path:line: statement: why'."""
    rel = Path(rel)
    mod = module_name(rel)
    here = layer(mod)
    top = rel.parts[0]
    found = []
    tree = ast.parse(source, filename=str(rel))
    for line, text, target, name, absolute in imports(tree, mod, rel.name == "__init__.py"):
        why = None
        there = layer(target)
        if absolute and target.split(".")[0] in TOP_LEVEL_FORBIDDEN:
            why = f"top-level `{target.split('.')[0]}` does not exist: import it as `distill.{target}`" \
                if target.split(".")[0] in STAGES else f"{target.split('.')[0]} are scripts, not an importable package"
        elif here and here[0] == "core" and there and there[0] == "stage":
            why = f"core module imports the `{there[1]}` stage (only the app layer may)"
        elif here and here[0] in ("core", "stage") and there and there[0] == "app":
            why = "core and stages must not import the app layer"
        elif here and here[0] == "stage" and there and there[0] == "stage" and there[1] != here[1] \
                and there[1] not in STAGE_MAY_IMPORT.get(here[1], ()):
            why = f"stage `{here[1]}` imports stage `{there[1]}`"
        elif top in (*SCRIPTS, "tests") and target.split(".")[0] != top:
            private = [p for p in target.split(".") if is_private(p)] + ([name] if name and is_private(name) else [])
            if private:
                why = f"private name `{private[0]}` used outside its package"
        if why:
            found.append(f"{rel}:{line}: `{text}`: {why}")
    return found


def source_files():
    for top in SOURCE_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if not any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
                yield rel


def test_the_tree_respects_the_layers():
    files = list(source_files())
    assert {f.parts[0] for f in files} == set(SOURCE_DIRS)
    problems = [v for rel in files for v in check_source(rel, (ROOT / rel).read_text())]
    assert not problems, "layering violations (docs/design.md, Three layers):\n" + "\n".join(problems)


@pytest.mark.parametrize("rel, source, expected", [
    ("distill/config.py", "def f():\n    from distill.train import losses\n", "distill/config.py:2:"),
    ("distill/config.py", "from distill import train\n", "core module imports the `train` stage"),
    ("distill/corpus.py", "import distill.serve.server\n", "core module imports the `serve` stage"),
    ("distill/engine.py", "from distill.cli import main\n", "must not import the app layer"),
    ("generate/job.py", "from ..curation import pipeline\n", "stage `generate` imports stage `curation`"),
    ("evaluation/job.py", "from distill.serve.server import start_server\n", "stage `evaluation` imports stage `serve`"),
    ("curation/pii.py", "import train.losses\n", "top-level `train` does not exist"),
    ("tests/test_x.py", "from evaluation.job import evaluate\n", "top-level `evaluation` does not exist"),
    ("tests/test_x.py", "import benchmarks.kd_loss\n", "benchmarks are scripts"),
    ("tests/test_x.py", "from experiments.onpolicy_evidence import main\n", "experiments are scripts"),
    ("experiments/e.py", "from distill.train.trainer import _private_helper\n", "private name `_private_helper`"),
    ("tests/test_x.py", "from distill.corpus import _helper\n", "private name `_helper`"),
    ("benchmarks/b.py", "from distill.curation.pipeline import _curate_batch, build_filters\n", "`_curate_batch`"),
    ("benchmarks/b.py", "from distill.train._impl import loss\n", "private name `_impl`"),
])
def test_checker_catches_a_bad_import(rel, source, expected):
    found = check_source(rel, source)
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize("rel, source", [
    ("distill/cli.py", "def f():\n    from distill.train.trainer import train\n"),
    ("distill/demo/run.py", "from distill import generate, curation, train, serve, evaluation\n"),
    ("evaluation/job.py", "from distill.generate import generate\nfrom distill.train.losses import kd_per_position\n"),
    ("generate/job.py", "from . import engine\nfrom .prompts import iter_prompts\nfrom distill import corpus\n"),
    ("train/__init__.py", "from .losses import topk_kd_loss\n"),
    ("tests/test_x.py", "from tests.helpers import _local\nfrom distill.corpus import __version__\n"),
])
def test_checker_allows_what_design_allows(rel, source):
    assert check_source(rel, source) == []


@pytest.mark.parametrize("name", [*STAGES, *SCRIPTS])
def test_stage_folders_import_only_under_distill(tmp_path, name):
    """Outside the checkout (no repository root on sys.path) only `distill.<stage>` exists."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    bare = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bare.returncode != 0 and f"ModuleNotFoundError: No module named '{name}'" in bare.stderr, bare.stderr
    if name not in SCRIPTS:
        full = subprocess.run([sys.executable, "-c", f"import distill.{name}"], cwd=tmp_path, env=env,
                              capture_output=True, text=True)
        assert full.returncode == 0, full.stderr[-2000:]


def test_distill_train_losses_imports_from_outside_the_checkout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", "import distill.train.losses as m; print(m.__file__)"], cwd=tmp_path,
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()).parts[-2:] == ("train", "losses.py")
