"""Session fixtures: tiny local models (built once, cached on disk) and shared vLLM engines.

No model hub exists here, so the models are built from scratch by `distill.tiny`: a BPE
tokenizer with a ChatML template and random-weight Llama / Qwen2 checkpoints. Everything
else is real: the vLLM engine, the OpenAI server, files on disk.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import CACHE, MAX_MODEL_LEN, PROMPTS, write_jsonl

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    """Every Python process a test starts runs child_site/sitecustomize.py first (why: its
    docstring). Not the processes pytest-xdist starts: they run tests themselves."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return  # pytest-xdist's controller: its children are the test processes
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).parent / "child_site"), *filter(None, [os.environ.get("PYTHONPATH")])])


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """name -> model dir: tokenizer, llama-teacher, llama-student, qwen2-teacher, qwen2-student.
    Rebuilt only when `distill/tiny.py` changes."""
    from distill import tiny

    return tiny.build_cached(CACHE)


@pytest.fixture(scope="session")
def teacher(tiny_models):
    """One in-process vLLM engine for the Llama teacher, shared by every test that generates."""
    from distill.config import TeacherConfig
    from distill.generate.engine import VLLMTeacher

    engine = VLLMTeacher(TeacherConfig(teacher=str(tiny_models["llama-teacher"])), max_logprobs=20,
                         max_model_len=MAX_MODEL_LEN)
    yield engine
    engine.close()


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium driven by Playwright, shared by a module's browser tests (not the
    session: while Playwright's sync API is open, its event loop counts as running in this
    thread, and every later `asyncio.run` in the session would fail). Playwright's
    own browser download cannot work here, so it drives the system's `chromium` (`.ci/run`
    installs it); open pages with `wait_until="load"`: Gradio keeps a connection open, so
    `networkidle` never comes."""
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(executable).exists():
        pytest.fail("the browser tests need Debian's Chromium: `apt-get install --no-install-recommends chromium`")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()

