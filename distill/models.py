"""Model arguments -> what vLLM and transformers load.

Hub ids and Hugging Face directories pass through unchanged. A GGUF file (llama.cpp's format;
`--teacher model.gguf`, or a directory holding one and no `config.json`) is converted once to a
float32 safetensors checkpoint with its tokenizer and chat template, cached under
`$DISTILL_CACHE/gguf/<sha256 of the file>/` (default `~/.cache/distill`), so every stage then sees
an ordinary Hugging Face directory. transformers dequantises the weights; the conversion records
where it came from in `gguf-source.json`, which manifests and model cards copy (`model_source`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from pydantic import BaseModel

from distill import files

SOURCE_FILE = "gguf-source.json"


class ModelSource(BaseModel):
    """Where a converted checkpoint came from."""

    gguf: str  # the GGUF file as given
    sha256: str


def cache_dir() -> Path:
    root = os.environ.get("DISTILL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distill"
    return Path(root)


def gguf_file(spec: str) -> Path | None:
    """The GGUF file `spec` names, if it names one."""
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise ValueError(f"`{spec}` holds {len(found)} GGUF files ({', '.join(p.name for p in found)}): name one")
        return found[0] if found else None
    return None


def resolve(spec: str) -> str:
    """`spec` itself, or for a GGUF file the directory of its cached conversion."""
    source = gguf_file(spec)
    return spec if source is None else str(convert_gguf(source))


def model_source(model: str) -> ModelSource | None:
    """The GGUF a resolved model directory was converted from (None for anything else)."""
    marker = Path(model) / SOURCE_FILE
    return ModelSource.model_validate_json(marker.read_bytes()) if marker.is_file() else None


def check_gguf(source: Path) -> None:
    """One line instead of the converter's traceback deep in a struct read: the header, metadata
    and every tensor must lie within the file (a cut-off download fails here)."""
    from gguf import GGUFReader

    try:
        GGUFReader(source)
    except Exception as e:  # the reader raises whatever the damaged bytes lead it to (ValueError, struct.error, ...)
        raise ValueError(f"`{source}`: not a readable GGUF file (truncated?): {type(e).__name__}: {e}") from None


def convert_gguf(source: Path, cache: Path | None = None) -> Path:
    """GGUF -> `cache/gguf/<sha256>/` (float32 safetensors + tokenizer + chat template), once."""
    sha = files.sha256(source)
    out = (cache or cache_dir()) / "gguf" / sha[:16]
    if (out / SOURCE_FILE).is_file():  # written last: its presence means the conversion finished
        return out
    check_gguf(source)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {source} to a Hugging Face checkpoint in {out} (once)", file=sys.stderr, flush=True)
    start = time.time()
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype="float32")
    # transformers marks the dequantised model as GGUF-quantised and then refuses to save it;
    # its weights are already dense float32, so the marker is dropped.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / SOURCE_FILE).write_text(json.dumps({"gguf": str(source.resolve()), "sha256": sha}, indent=2) + "\n")
    try:
        partial.rename(out)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(partial)
    print(f"converted in {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    return out
