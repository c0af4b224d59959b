"""LoRA adapters to serve on one base model (`distill serve --lora NAME=DIR`): found, checked and
named before the server starts, so that a missing adapter, one trained for another base or two
adapters under one name are each refused in one line instead of deep in vLLM's log.

An adapter directory is what PEFT saves (`adapter_config.json` + weights): `distill train --lora`
writes it to `STUDENT/adapter` (with `--keep-adapter`, instead of a merged model), so a student
directory names its adapter too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_DIR = "adapter"  # where `distill train --lora` writes the adapter inside a student directory
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's `--max-lora-rank` accepts
# The config keys that make two models the same base for an adapter: its weights' shapes and placement.
BASE_SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "vocab_size")


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter as served: `name` (the model name clients request), `path` (the directory
    holding adapter_config.json), `rank`, `base` (the base model it records)."""

    name: str
    path: Path
    rank: int
    base: str


def parse_spec(spec: str) -> tuple[str | None, Path]:
    """`NAME=DIR` -> (NAME, DIR); a bare `DIR` -> (None, DIR)."""
    name, sep, path = spec.partition("=")
    if not sep:
        return None, Path(spec)
    if not name or not path:
        raise ValueError(f"`lora` {spec!r}: expected NAME=DIR (or a bare DIR)")
    return name, Path(path)


def find_adapter(directory: Path) -> Path:
    """The adapter directory: `directory` itself or its `adapter/` (a student trained with LoRA)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"LoRA adapter `{directory}`: no such directory")
    for candidate in (directory, directory / ADAPTER_DIR):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise FileNotFoundError(f"`{directory}`: not a LoRA adapter (no {ADAPTER_CONFIG} in it or in its "
                            f"`{ADAPTER_DIR}/`); train one with `distill train --lora --keep-adapter`")


def default_name(path: Path) -> str:
    """A student's name for its adapter (`runs/x/student/adapter` -> `student`)."""
    return path.parent.name if path.name == ADAPTER_DIR else path.name


def max_lora_rank(adapters: list[Adapter]) -> int:
    """vLLM's `--max-lora-rank` for these adapters: the smallest rank it accepts that holds them all."""
    r = max(a.rank for a in adapters)
    rank = next((rank for rank in LORA_RANKS if rank >= r), None)
    if rank is None:
        worst = max(adapters, key=lambda a: a.rank)
        raise ValueError(f"LoRA adapter `{worst.path}` has rank {r}; vLLM serves ranks up to {LORA_RANKS[-1]}")
    return rank


def load_adapter(spec: str, base_model: str, name: str | None = None) -> Adapter:
    """One `--lora` value, found and checked against `base_model`; `name`: the name to give it
    when the spec has none (default: the adapter's directory name)."""
    given, directory = parse_spec(spec)
    path = find_adapter(directory)
    config = _read_config(path / ADAPTER_CONFIG)
    if config.get("peft_type", "LORA") != "LORA" or "r" not in config:
        raise ValueError(f"`{path}`: a {config.get('peft_type')} adapter, not LoRA: vLLM serves LoRA adapters only")
    base = str(config.get("base_model_name_or_path") or "")
    if base and not same_base(base, base_model):
        raise ValueError(f"LoRA adapter `{path}` was trained on `{base}`, not on the served model `{base_model}`: "
                         "serve it on its own base")
    return Adapter(given or name or default_name(path), path, int(config["r"]), base)


def load_adapters(specs: list[str], base_model: str, single_name: str | None = None) -> list[Adapter]:
    """Every `--lora` value checked, names unique; `single_name` names a lone unnamed adapter
    (`--served-model-name`)."""
    adapters = [load_adapter(spec, base_model, single_name if len(specs) == 1 else None) for spec in specs]
    seen: dict[str, Path] = {}
    for adapter in adapters:
        if adapter.name in seen:
            raise ValueError(f"two LoRA adapters are named `{adapter.name}` ({seen[adapter.name]} and {adapter.path}): "
                             "name them with NAME=DIR")
        seen[adapter.name] = adapter.path
    return adapters


def same_base(recorded: str, model: str) -> bool:
    """Whether an adapter recorded as trained on `recorded` fits `model`: the same path or name,
    or two local models whose configs agree on every shape (a copy of the base)."""
    if recorded == model:
        return True
    a, b = Path(recorded), Path(model)
    if not (a.exists() and b.exists()):
        return a.name == b.name  # a hub id and a local copy of it (`org/name` vs `.../name`)
    if a.resolve() == b.resolve():
        return True
    shapes = [_shape(p) for p in (a, b)]
    return shapes[0] is not None and shapes[0] == shapes[1]


def _shape(model: Path) -> tuple | None:
    config = model / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    data = data.get("text_config", data)
    return tuple(data.get(key) for key in BASE_SHAPE_KEYS)


def _read_config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"`{path}`: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"`{path}`: expected a JSON object")
    return data
