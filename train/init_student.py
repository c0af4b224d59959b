"""`distill init-student`: a student made of a subset of the teacher's layers.

Depth pruning as in DistilBERT (every other layer) and Minitron: keep evenly spaced decoder layers
or, with `select: importance`, those of highest Block Influence on a calibration corpus
(`importance.py`), the first and the last always; copy the embeddings, final norm and LM head,
and update the config, which records the kept teacher layers as `distill_layer_map`. The
student shares the teacher's tokenizer and chat template by construction, which is what
token-level KD on the teacher's top-k needs. It starts damaged (a pruned network loops or
babbles) and is repaired by `distill train --full`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill import corpus, files
from distill.config import InitStudentConfig
from distill.engine import check_model

LAYER_MAP_KEY = "distill_layer_map"  # in the student's config.json: the teacher layer each student layer was


@dataclass(frozen=True)
class InitStudentResult:
    path: Path
    layers: list[int]  # teacher layer indices, in order
    parameters: int
    teacher_parameters: int
    embedding_parameters: int  # input embeddings (+ LM head when untied), shared with the teacher


def evenly_spaced(total: int, keep: int) -> list[int]:
    """`keep` of `total` layer indices, evenly spaced, first and last included."""
    if not 1 <= keep <= total:
        raise ValueError(f"cannot keep {keep} of the teacher's {total} layers")
    if keep == 1:
        return [0]
    return sorted({round(float(i)) for i in np.linspace(0, total - 1, keep)})


def decoder_layers(model):
    """The `nn.ModuleList` of decoder layers (`model.model.layers` for Llama, Qwen, Mistral, ...)."""
    import torch

    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) != model.config.num_hidden_layers:
        raise ValueError(f"{type(model).__name__}: cannot find its {model.config.num_hidden_layers} decoder layers")
    return layers


def init_student(cfg: InitStudentConfig) -> InitStudentResult:
    check_model(cfg.teacher, "teacher")
    with files.exclusive(cfg.out) as out:
        if not (cfg.overwrite or files.is_empty(out) or _interrupted(out)):
            raise FileExistsError(f"`{out}` holds a student or other files: choose another `out` or pass --overwrite "
                                  "to replace it")
        files.clear_dir(out)  # pruning has nothing to resume: an interrupted one starts over
        return _prune(cfg, out)


def _interrupted(out: Path) -> bool:
    """`out` as a killed init-student leaves it: the model's files without the tokenizer (saved last)."""
    return all(p.name in ("config.json", "generation_config.json", files.LOCK_NAME) or p.name.startswith("model")
               or p.match(files.PARTIAL_GLOB) for p in out.iterdir())


def _prune(cfg: InitStudentConfig, out: Path) -> InitStudentResult:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(cfg.teacher, dtype=getattr(torch, cfg.dtype))
    tokenizer = AutoTokenizer.from_pretrained(cfg.teacher)
    teacher_parameters = model.num_parameters()
    layers = decoder_layers(model)
    total = len(layers)
    scores = None
    if cfg.keep_layers is not None:
        keep = list(cfg.keep_layers)
    elif cfg.select == "importance":
        from distill.train.importance import block_influence, calibration_ids, most_important

        corpus.read_manifest(cfg.calibration)  # one line if it is not a corpus
        scores = block_influence(model, layers, calibration_ids(cfg.calibration, cfg.samples))
        keep = most_important(scores, cfg.num_layers)
    else:
        keep = evenly_spaced(total, cfg.num_layers)
    if any(not 0 <= i < total for i in keep) or len(set(keep)) != len(keep) or keep != sorted(keep):
        raise ValueError(f"`keep_layers` {keep}: need distinct increasing indices in 0..{total - 1}")
    kept = torch.nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(kept):
        # The KV cache is indexed by each attention module's `layer_idx`.
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    model.get_decoder().layers = kept
    model.config.num_hidden_layers = len(keep)
    # Which teacher layer each student layer was: the default `layer_map` of `distill train --hidden-weight`.
    setattr(model.config, LAYER_MAP_KEY, keep)
    if scores is not None:
        model.config.distill_layer_importance = [round(x, 6) for x in scores]
    if isinstance(getattr(model.config, "layer_types", None), list):  # per-layer attention kinds (sliding, full)
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    embeddings = model.get_input_embeddings().weight.numel()
    if not model.config.tie_word_embeddings:
        embeddings += model.get_output_embeddings().weight.numel()
    result = InitStudentResult(path=out, layers=keep, parameters=model.num_parameters(),
                               teacher_parameters=teacher_parameters, embedding_parameters=embeddings)
    if scores is not None:
        print("block influence per teacher layer (kept *): " + ", ".join(
            f"{i}{'*' if i in keep else ''} {score:.4f}" for i, score in enumerate(scores)), file=sys.stderr)
    print(f"student: {len(keep)} of the teacher's {total} layers {keep}\n"
          f"parameters: {result.parameters / 1e6:.1f}M ({result.parameters / teacher_parameters:.0%} of the teacher's "
          f"{teacher_parameters / 1e6:.1f}M; embeddings {embeddings / 1e6:.1f}M)", file=sys.stderr)
    return result
