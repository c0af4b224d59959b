"""Imported first by every Python process a test starts: conftest.py puts this folder on
PYTHONPATH (the pytest process had started already, so it is not affected).

Such a process runs vLLM's engine core in itself, as the demos do (distill/demo/run.py): a CPU
engine then starts in ~10 s instead of ~25 s (no engine-core and worker processes to spawn, each
importing torch and vLLM again). The pytest process keeps vLLM's default, its engines in their own
processes: it holds several engines at once, and engines in one process share vLLM's global
parallel state. A test of what becomes of an engine's processes when its run is stopped sets
VLLM_ENABLE_V1_MULTIPROCESSING=1 for the runs it stops (tests/test_resume.py)."""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
