"""Chat template -> token ids, exactly once, the way the teacher sees them."""

from __future__ import annotations

from distill.config import TeacherConfig


def load_tokenizer(cfg: TeacherConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.teacher, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)


def model_max_len(cfg: TeacherConfig) -> int:
    """The context length vLLM will be given: `max_model_len` or the model's own."""
    if cfg.max_model_len is not None:
        return cfg.max_model_len
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.teacher, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    length = getattr(config.get_text_config(), "max_position_embeddings", None)
    if length is None:
        raise ValueError(f"`{cfg.teacher}` does not state its context length: set `max_model_len`")
    return int(length)


def vocab_size(cfg: TeacherConfig, tokenizer) -> int | None:
    """How many token ids the teacher can emit, for the manifest (`validate` refuses any other):
    its output rows (the config's `vocab_size`, which may exceed the tokenizer's length by padding
    rows the engine still scores) or the tokenizer's length if larger. None where the config cannot
    be read: no bound is recorded rather than one that could refuse a valid corpus."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(cfg.teacher, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError):
        return None
    return max(getattr(config.get_text_config(), "vocab_size", None) or 0, len(tokenizer))


def stop_token_ids(cfg: TeacherConfig, tokenizer) -> set[int]:
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id} - {None}
    try:
        eos = GenerationConfig.from_pretrained(cfg.teacher, revision=cfg.revision).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


class ChatTokenizer:
    """Applies the chat template once and encodes without adding special tokens again, so a
    template that writes BOS itself does not get a second one."""

    def __init__(self, tokenizer, stop_ids: set[int]):
        if not tokenizer.chat_template:
            raise ValueError("the teacher's tokenizer has no chat template; set one in its tokenizer_config.json")
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids

    def render(self, messages, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _encode(self, messages, add_generation_prompt: bool) -> list[int]:
        return self.encode(self.render(messages, add_generation_prompt))

    def prompt_ids(self, messages) -> list[int]:
        return self._encode(messages, add_generation_prompt=True)

    def prompt_and_response_ids(self, messages) -> tuple[list[int], list[int]]:
        """Split a conversation ending in an assistant turn into prompt ids and that turn's ids
        (through its end-of-turn token; template text after it is not part of the answer)."""
        prompt = self.prompt_ids(messages[:-1])
        full = self._encode(messages, add_generation_prompt=False)
        if full[: len(prompt)] != prompt:
            raise ValueError("the chat template renders the prompt differently with and without the answer")
        response = full[len(prompt):]
        ends = [i for i, t in enumerate(response) if t in self.stop_ids]
        return prompt, response[: ends[-1] + 1] if ends else response

    def tokenize_many(self, conversations, scoring: bool) -> list[tuple[list[int], list[int]] | Exception]:
        """`(prompt_ids, response_ids)` per conversation (response empty unless `scoring`), or the
        exception its template raised; prompts are encoded in one batch call."""
        if scoring:
            return [_capture(self.prompt_and_response_ids, m) for m in conversations]
        texts = [_capture(self.render, m) for m in conversations]
        ok = [t for t in texts if not isinstance(t, Exception)]
        ids = iter(self.tokenizer(ok, add_special_tokens=False)["input_ids"] if ok else [])
        return [t if isinstance(t, Exception) else (next(ids), []) for t in texts]

    def decode_many(self, sequences) -> list[str]:
        return self.tokenizer.batch_decode([list(s) for s in sequences], skip_special_tokens=True)


def _capture(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # reported per record by the caller
        return e
