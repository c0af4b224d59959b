"""`distill export`: a student -> one GGUF file (weights, tokenizer, chat template) + an Ollama Modelfile.

The file is written with the `gguf` package's writer (already a dependency: transformers reads
GGUF with it), not llama.cpp's `convert_hf_to_gguf.py`: that script is not in any package users
install (llama-cpp-python's wheel leaves it out) and wants the `gguf` of its own llama.cpp
commit. docs/recipes/export.md has the reasons and the measured cost of each type.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pydantic import BaseModel

from distill import files
from distill.config import ExportConfig
from distill.engine import check_model
from distill.export import vocab, weights

ADAPTER_CONFIG = "adapter_config.json"


class ExportResult(BaseModel):
    """What `distill export` wrote."""

    gguf: Path
    modelfile: Path
    outtype: str
    bytes: int
    tensor_types: dict[str, int]  # GGUF type name -> tensors of that type
    seconds: float


def check_out(cfg: ExportConfig) -> Path:
    """One line for an output path that cannot be the file: a directory, another suffix, a file
    already there (without `overwrite`)."""
    out = Path(cfg.out)
    if out.is_dir():
        raise IsADirectoryError(f"`{out}` is a directory: give the file to write, e.g. {out / f'student-{cfg.outtype}.gguf'}")
    if out.suffix != ".gguf":
        raise ValueError(f"`{out}`: the output file must end in .gguf")
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"`{out}` exists: pass --overwrite to replace it")
    return out


def load_student(student: str):
    """(model in float32, directory of its tokenizer); a LoRA adapter directory is merged into its
    base first, as `distill train` does for the student it saves."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(student)
    if (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        print(f"merging the LoRA adapter {path} into its base model", file=sys.stderr, flush=True)
        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch.float32).merge_and_unload()
        base = Path(model.config.name_or_path)
        return model.eval(), path if (path / "tokenizer.json").is_file() else base
    check_model(student, "student")  # not found, not a model directory, no tokenizer: one line each
    weights.family(AutoConfig.from_pretrained(path), path)  # refuse an unknown family before loading its weights
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), path


def modelfile(gguf_name: str, template: str | None, eos: str | None) -> str:
    """An Ollama Modelfile for the GGUF beside it. Ollama renders Go templates, not Jinja: a ChatML
    template (Qwen2, SmolLM2, distill's tiny models) is given as Ollama's ChatML; any other is
    left to Ollama's own detection from the template inside the file."""
    lines = [f"FROM ./{gguf_name}"]
    if template and "<|im_start|>" in template:
        lines.append('TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                     '{{ end }}<|im_start|>assistant\n"""')
    if eos:
        lines.append(f'PARAMETER stop "{eos}"')
    return "\n".join(lines) + "\n"


def export(cfg: ExportConfig) -> ExportResult:
    import gguf

    out = check_out(cfg)
    start = time.time()
    model, tokenizer_dir = load_student(cfg.student)
    fam = weights.family(model.config, Path(cfg.student))
    print(f"exporting {cfg.student} as {fam.arch.name.lower()} {cfg.outtype} to {out}", file=sys.stderr, flush=True)
    with files.atomic_path(out) as partial:
        writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[fam.arch])
        writer.add_name(out.stem)
        weights.add_hyperparameters(writer, model.config, cfg.outtype)
        tokenizer = vocab.add_tokenizer(writer, Path(tokenizer_dir), model.config.vocab_size)
        counts = weights.add_tensors(writer, model, fam, cfg.outtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    model_file = out.with_suffix(".Modelfile")
    files.atomic_write(model_file, modelfile(out.name, vocab.chat_template(tokenizer), tokenizer.eos_token))
    return ExportResult(gguf=out, modelfile=model_file, outtype=cfg.outtype, bytes=out.stat().st_size,
                        tensor_types=counts, seconds=round(time.time() - start, 2))

