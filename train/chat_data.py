"""A chat dataset as training data for the online teacher (`distill train --corpus FILE --teacher MODEL`).

A file instead of a corpus directory: JSONL / JSON / Parquet / CSV in OpenAI `messages`, ShareGPT,
Alpaca or `prompt` form, read by the loaders of `distill generate` (`generate/prompts.py`). Each
record's last turn must be an assistant turn: its text is the response the student learns, and
the turns before it, chat-templated with the generation prompt by the teacher's tokenizer, are the
prompt: the tokens `distill score` would store for the record (`ChatTokenizer.prompt_and_response_ids`,
the response through its end-of-turn token). No top-k is stored: the online teacher gives the KD
targets live, so the training records hold only `id`, `prompt_token_ids` and `response_token_ids`.

A record that cannot train (no assistant answer last, a template that fails) stops the run with
one line naming the file and the record, before any model loads; records whose prompt fills
`max_length` are skipped and counted, as in a corpus.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pyarrow as pa

from distill import files
from distill.config import TeacherConfig, TrainConfig
from distill.corpus import GenerationInfo, Manifest, TeacherInfo, tokenizer_fingerprint
from distill.train.data import TrainingData, write_training_data


def is_chat_dataset(path: Path) -> bool:
    """A corpus is a directory; a file given as `corpus` is a chat dataset."""
    return Path(path).is_file()


def check_chat_datasets(cfg: TrainConfig) -> None:
    """Refuse, in one line, a chat dataset the run cannot learn from."""
    chats = [path for path in cfg.corpora if is_chat_dataset(path)]
    if not chats:
        return
    if not cfg.teacher:
        raise ValueError(f"`corpus` {chats[0]} is a chat dataset, not a corpus directory: a chat dataset needs the "
                         "online `teacher` (`--teacher MODEL`), or make it a corpus first with `distill score --data FILE`")
    if len(cfg.corpora) > 1:
        raise ValueError(f"`corpus` {chats[0]} is a chat dataset: it trains alone, not with other corpora")


def chat_manifest(path: Path, cfg: TrainConfig) -> Manifest:
    """What stands for a corpus manifest (model card, tracked parameters): the online teacher, the
    targets it gives (`top_k`: the whole vocabulary, or `teacher_top_k` with `online_targets: topk`),
    and the file with its SHA-256."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.teacher)
    vocab_size = AutoConfig.from_pretrained(cfg.teacher).vocab_size
    return Manifest(teacher=TeacherInfo(model=str(cfg.teacher), vocab_size=vocab_size,
                                        **tokenizer_fingerprint(tokenizer)),
                    generation=GenerationInfo(mode="score", top_k=cfg.teacher_top_k if cfg.online_targets == "topk"
                                              else vocab_size),
                    source={"chat_dataset": str(path), "sha256": files.sha256(Path(path))})


def _rows(path: Path, cfg: TrainConfig):
    """`(id, prompt_token_ids, response_token_ids)` per record of the file."""
    from transformers import AutoTokenizer

    from distill.generate.job import request_id
    from distill.generate.prompts import BadRecord, iter_prompts
    from distill.generate.templating import ChatTokenizer, stop_token_ids

    teacher = TeacherConfig(teacher=cfg.teacher)
    tokenizer = AutoTokenizer.from_pretrained(cfg.teacher)
    chat = ChatTokenizer(tokenizer, stop_token_ids(teacher, tokenizer))
    for item in iter_prompts(path, with_response=True):
        if isinstance(item, BadRecord):
            raise ValueError(f"{item} (a chat dataset for `distill train` needs every record to end in the "
                             "assistant answer the student learns): fix or remove the record")
        try:
            prompt, response = chat.prompt_and_response_ids(item.messages)
        except Exception as e:  # the template's own error, for this record
            raise ValueError(f"{item.where}: chat template failed: {e}") from None
        yield {"id": request_id(item.prompt_id, item.occurrence), "prompt_token_ids": prompt,
               "response_token_ids": response}


def chat_training_data(path: Path, cfg: TrainConfig, scratch: Path) -> TrainingData:
    """The file's records as training data, written once as an Arrow file the dataset memory-maps
    (`data.write_training_data`, as for a corpus; no top-k: its largest id 0)."""
    rows = _rows(path, cfg)
    tables = ((pa.Table.from_pylist(batch), 0) for batch in iter(lambda: list(itertools.islice(rows, 512)), []))
    return write_training_data(tables, path, cfg.max_length, scratch)
