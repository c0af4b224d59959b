"""A Hugging Face tokenizer -> GGUF tokenizer metadata (llama.cpp's `gpt2` BPE kind).

llama.cpp does not run the tokenizer's pre-tokenizer from its description: it picks one of its
own, compiled in, by the name in `tokenizer.ggml.pre`. A wrong name splits text differently and
the file silently tokenises prompts unlike the model was trained on, so the name is chosen from the
pre-tokenizer's structure (`PRE_TOKENIZERS`) and anything else is refused, naming what was found.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf

# llama.cpp's pre-tokenizer name -> the tokenizer.json `pre_tokenizer` it reproduces, as
# (type, digits split one by one, split regex) per step. The regexes are the ones llama.cpp's
# src/llama-vocab.cpp quotes as the tokenizer.json originals of its LLAMA3 and QWEN2 kinds.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[str, tuple[tuple, ...]] = {
    "gpt-2": (("ByteLevel", None, None),),                                   # GPT-2's regex alone
    "smollm": (("Digits", True, None), ("ByteLevel", None, None)),           # SmolLM / StarCoder: digits one by one
    "llama-bpe": (("Split", None, _LLAMA3_SPLIT), ("ByteLevel", None, "no-regex")),  # Llama 3
    "qwen2": (("Split", None, _QWEN2_SPLIT), ("ByteLevel", None, "no-regex")),       # Qwen2 / Qwen2.5
}
# transformers' own Jinja extension: marks assistant text for the loss mask and renders nothing.
# llama.cpp's template engine does not know the tag, so it is removed from the copy in the file.
GENERATION_TAGS = re.compile(r"{%-?\s*(?:end)?generation\s*-?%}")


def _steps(pre_tokenizer: dict | None) -> tuple[tuple, ...]:
    """The pre-tokenizer as comparable steps: (type, individual digits, split regex)."""
    if pre_tokenizer is None:
        return ()
    parts = pre_tokenizer["pretokenizers"] if pre_tokenizer["type"] == "Sequence" else [pre_tokenizer]
    steps = []
    for part in parts:
        kind = part["type"]
        if kind == "Digits":
            steps.append((kind, part.get("individual_digits", False), None))
        elif kind == "Split":
            steps.append((kind, None, part.get("pattern", {}).get("Regex")))
        elif kind == "ByteLevel":
            steps.append((kind, None, None if part.get("use_regex", True) else "no-regex"))
        else:
            steps.append((kind, None, json.dumps(part, sort_keys=True)))
    return tuple(steps)


def pre_tokenizer_name(tokenizer_json: dict, where: Path) -> str:
    """llama.cpp's name for the pre-tokenizer of `tokenizer_json` (a tokenizer.json's content)."""
    steps = _steps(tokenizer_json.get("pre_tokenizer"))
    for name, known in PRE_TOKENIZERS.items():
        if steps == known:
            return name
    found = " + ".join(step[0] for step in steps) or "none"
    raise ValueError(f"`{where}`: its pre-tokenizer ({found}) matches none llama.cpp implements that distill "
                     f"knows ({', '.join(PRE_TOKENIZERS)}): llama.cpp would split text differently")


def chat_template(tokenizer) -> str | None:
    """The tokenizer's chat template as llama.cpp can render it."""
    template = tokenizer.chat_template
    return GENERATION_TAGS.sub("", template) if isinstance(template, str) else None


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, n_vocab: int):
    """Tokens, their types, merges, special ids, add-BOS and the chat template of `model_dir`;
    returns the transformers tokenizer."""
    from transformers import AutoTokenizer

    if not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"`{model_dir}`: no tokenizer.json (a fast tokenizer): a GGUF file carries its "
                                "tokenizer; save the student's tokenizer beside it (`tokenizer.save_pretrained`)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # The tokenizer as transformers runs it, not tokenizer.json as stored: some classes rebuild
    # parts (transformers 5's Qwen2Tokenizer always uses Qwen2's pre-tokenizer).
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError(f"`{model_dir}`: a {model.get('type')} tokenizer"
                         f"{' with byte fallback (SentencePiece-style)' if model.get('byte_fallback') else ''}; "
                         "distill exports byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM) only")
    pre = pre_tokenizer_name(backend, model_dir)
    vocab = tokenizer.get_vocab()
    if len(vocab) > n_vocab:
        raise ValueError(f"`{model_dir}`: the tokenizer has {len(vocab)} tokens but the model only {n_vocab} embedding rows")
    by_id = {i: token for token, i in vocab.items()}
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(n_vocab):  # rows past the tokenizer's (padding to a round size) get unused placeholders
        token = by_id.get(i)
        tokens.append(token if token is not None else f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED if token is None else gguf.TokenType.NORMAL if token not in added
                     else gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    special.chat_template = chat_template(tokenizer)
    special.add_to_gguf(writer, quiet=True)
    return tokenizer
