"""Tiny local models for tests, benchmarks and offline runs (no model hub exists there).

A byte-level BPE tokenizer trained with `tokenizers` on deterministic synthetic text, with a
ChatML chat template that marks assistant turns with `{% generation %}`, and small Llama /
Qwen2 checkpoints sharing it. They are ordinary Hugging Face model directories: every code
path treats them exactly like a hub model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import random
import shutil
from pathlib import Path

BOS, EOS, PAD = "<|bos|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [PAD, BOS, "<|im_start|>", EOS]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else %}{{ message['content'] + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)
WORDS = (
    "the a teacher student model answer question list number reverse sort add count word "
    "letter digit what is how why when where please give me one two three four five six "
    "seven eight nine zero and or not with from into over under small large fast slow "
    "system user assistant hello thanks you we they it this that sure here result sum"
).split()

# name -> config overrides; head_dim 32 everywhere (vLLM rejects 16).
SIZES = {
    "teacher": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2),
    "student": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1),
}


def synthetic_text(n_lines: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.5:
            words.append(str(rng.randint(0, 99999)))
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ":"]))
    return lines


def build_tokenizer(out: Path, vocab_size: int = 512, model_max_length: int = 512,
                    texts: list[str] | None = None, split_digits: bool = False):
    """BPE trained on `texts` (default: `synthetic_text()`); `split_digits` makes every digit
    its own token, as Llama 3 / Qwen do, which arithmetic-like skills need."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) \
        if split_digits else byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts or synthetic_text(), trainer=trainer)
    # Like Llama: plain encoding adds BOS, so a chat template that also writes it would
    # double it unless the caller encodes the rendered template without special tokens.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=model_max_length)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_model(out: Path, tokenizer_dir: Path, arch: str = "llama", size: str | dict = "teacher",
                seed: int = 0, max_position_embeddings: int = 512, init_std: float = 0.5,
                tie_word_embeddings: bool = False) -> Path:
    """A random-weight checkpoint. A large `init_std` makes its next-token distributions peaked,
    like a trained model's, rather than near-uniform."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config_cls, model_cls = {
        "llama": (LlamaConfig, "LlamaForCausalLM"),
        "qwen2": (Qwen2Config, "Qwen2ForCausalLM"),
    }[arch]
    config = config_cls(
        vocab_size=len(tokenizer), max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tie_word_embeddings,
        initializer_range=init_std, torch_dtype="float32", **(SIZES[size] if isinstance(size, str) else size))
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(out)
    return Path(out)


def build_all(root: Path) -> dict[str, Path]:
    """Tokenizer + {llama,qwen2} x {teacher,student} under `root`; returns name -> directory."""
    root = Path(root)
    tokenizer_dir = root / "tokenizer"
    build_tokenizer(tokenizer_dir)
    paths = {"tokenizer": tokenizer_dir}
    for arch in ("llama", "qwen2"):
        for size in ("teacher", "student"):
            paths[f"{arch}-{size}"] = build_model(root / f"{arch}-{size}", tokenizer_dir, arch, size)
    return paths


def build_cached(cache: Path) -> dict[str, Path]:
    """`build_all` under `cache/models-<hash of this module>`, built once per version of this module
    (the tests and the benchmarks share one copy); returns name -> directory."""
    key = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    root = Path(cache) / f"models-{key}"
    marker = root / "paths.json"
    Path(cache).mkdir(parents=True, exist_ok=True)
    # test processes started together (`make test-fast` runs two): one builds, the others wait for it
    with open(Path(cache) / f"models-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            shutil.rmtree(root, ignore_errors=True)
            paths = build_all(root)
            marker.write_text(json.dumps({name: str(path) for name, path in paths.items()}))
    return {name: Path(path) for name, path in json.loads(marker.read_text()).items()}
