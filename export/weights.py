"""A transformers causal LM -> GGUF hyperparameters and tensors, each in the type `outtype` gives it.

The families are one table, `FAMILIES` (transformers class -> llama.cpp architecture). Names come
from the `gguf` package's tensor map of that architecture, the quantisers are its numpy ones
(bit-exact with ggml's reference code), so nothing here knows a tensor name or a block layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class Family:
    arch: gguf.MODEL_ARCH
    # llama.cpp's `llama` architecture applies RoPE to adjacent pairs, transformers' Llama to the
    # two halves of each head: q and k rows are reordered (as llama.cpp's own converter does).
    # Qwen2 is `neox` RoPE (halves) in llama.cpp too, so its rows stay.
    permute_qk: bool


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),    # Llama 2/3 layout, SmolLM / SmolLM2
    "Qwen2ForCausalLM": Family(gguf.MODEL_ARCH.QWEN2, permute_qk=False),   # Qwen2, Qwen2.5
}
# outtype -> (llama.cpp's file type, the type of every matrix)
OUTTYPES = {
    "f16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
    "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, Q.Q4_0),
}


def family(config, where: Path) -> Family:
    arch = (config.architectures or ["?"])[0]
    if arch not in FAMILIES:
        raise ValueError(f"`{where}`: a {arch} model; distill exports {', '.join(FAMILIES)} to GGUF")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"`{where}`: RoPE scaling `{rope['rope_type']}` is not exported (distill writes plain RoPE only)")
    return FAMILIES[arch]


def add_hyperparameters(writer: gguf.GGUFWriter, config, outtype: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(OUTTYPES[outtype][0])


def _permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of each head from [first half | second half] to interleaved pairs (llama.cpp's converter)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def tensor_type(name: str, data: np.ndarray, outtype: str, tied: bool) -> gguf.GGMLQuantizationType:
    """Vectors (norms, biases) stay float32 as in llama.cpp's converter; a matrix whose rows are
    not whole 32-value blocks stays f16. With q4_0 the output layer (the embeddings when tied)
    is q8_0: llama-quantize likewise keeps it above 4 bits (Q6_K, which `gguf` cannot write)."""
    if data.ndim == 1:
        return Q.F32
    matrix = OUTTYPES[outtype][1]
    if matrix != Q.F16 and data.shape[-1] % 32:
        return Q.F16
    if matrix == Q.Q4_0 and name == ("token_embd.weight" if tied else "output.weight"):
        return Q.Q8_0
    return matrix


def add_tensors(writer: gguf.GGUFWriter, model, fam: Family, outtype: str) -> dict[str, int]:
    """Every weight of `model` under its GGUF name; returns GGUF type name -> tensor count."""
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = gguf.get_tensor_name_map(fam.arch, config.num_hidden_layers)
    counts: dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # the same matrix as the embeddings: llama.cpp reuses token_embd
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"tensor `{hf_name}` has no GGUF name in llama.cpp's {fam.arch.name.lower()} layout")
        data = tensor.detach().float().numpy()
        if fam.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, config.num_attention_heads)
        elif fam.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, config.num_key_value_heads)
        kind = tensor_type(name, data, outtype, tied)
        if kind in (Q.F32, Q.F16):
            writer.add_tensor(name, data.astype(np.float32 if kind == Q.F32 else np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        counts[kind.name] = counts.get(kind.name, 0) + 1
    return counts
