"""Prompt files -> normalised chat conversations.

Reads JSONL / JSON / Parquet / CSV, one record per conversation, in OpenAI `messages`,
ShareGPT `conversations` (`from`/`value`), Alpaca (`instruction`/`input`[/`output`]) or plain
`prompt` form. Every record becomes `[{"role", "content"}, ...]`; problems become `BadRecord`s
naming the file, the line or record number and what is wrong, never silent drops.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill import files

FORMAT_KEYS = {"messages": "messages", "sharegpt": "conversations", "alpaca": "instruction", "prompt": "prompt"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant"}
ROLES = ("system", "user", "assistant")
# Alpaca / prompt-form records carry the response to score under one of these keys.
RESPONSE_KEYS = ("output", "response", "completion")
MAX_CSV_FIELD = 2**31 - 1  # a long document is one prompt (the csv module stops at 128 KiB)


@dataclass
class Prompt:
    where: str  # "file line N" / "file record N"
    prompt_id: str
    messages: list[dict[str, str]]
    occurrence: int = 0  # score: the n-th response to the same prompt


@dataclass
class BadRecord:
    where: str
    reason: str
    kind: str = "malformed"  # malformed | empty | duplicate | too_long: counted in the manifest

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


class PromptError(ValueError):
    def __init__(self, message: str, kind: str = "malformed"):
        super().__init__(message)
        self.kind = kind


def read_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, raw record or BadRecord) for every record of the file, streaming."""
    path = files.require_file(path, "prompt file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                where = f"{path} line {n}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield where, BadRecord(where, f"not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)")
                    continue
                if not line.strip():
                    continue
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, BadRecord(where, f"invalid JSON ({e.msg} at column {e.colno})")
                except RecursionError:
                    yield where, BadRecord(where, "invalid JSON (nested too deeply)")
    elif suffix == ".json":
        raw = path.read_bytes()
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise PromptError(f"{path} line {line}: not UTF-8 (byte 0x{raw[e.start]:02x})") from None
        except json.JSONDecodeError as e:
            raise PromptError(f"{path} line {e.lineno}: invalid JSON ({e.msg})") from None
        except RecursionError:
            raise PromptError(f"{path}: invalid JSON (nested too deeply)") from None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"data": [...]}
        if not isinstance(data, list):
            raise PromptError(f"{path}: expected a JSON array of records")
        for n, record in enumerate(data, 1):
            yield f"{path} record {n}", record
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        n = 0
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                for record in batch.to_pylist():
                    n += 1
                    yield f"{path} record {n}", record
        except (OSError, ValueError) as e:  # pyarrow's errors on a damaged or non-Parquet file
            raise PromptError(f"{path} record {n + 1}: unreadable Parquet ({str(e).splitlines()[0][:200]})") from None
    elif suffix in (".csv", ".tsv"):
        csv.field_size_limit(MAX_CSV_FIELD)
        # surrogateescape: a bad byte becomes a lone surrogate, reported for its record only
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            while True:
                try:
                    record = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    raise PromptError(f"{path} line {reader.line_num}: invalid CSV ({e})") from None
                where = f"{path} line {reader.line_num}"
                bad_byte = next((ch for v in record.values() for ch in (v if isinstance(v, str) else "")
                                 if "\udc80" <= ch <= "\udcff"), None)
                if bad_byte is not None:
                    yield where, BadRecord(where, f"not UTF-8 (byte 0x{ord(bad_byte) - 0xDC00:02x})")
                    continue
                # Nested columns (messages, conversations) are JSON strings in a CSV.
                for key in ("messages", "conversations"):
                    if isinstance(record.get(key), str):
                        try:
                            record[key] = json.loads(record[key])
                        except json.JSONDecodeError as e:
                            record = BadRecord(where, f"column `{key}` is not valid JSON ({e.msg})")
                            break
                        except RecursionError:
                            record = BadRecord(where, f"column `{key}` is not valid JSON (nested too deeply)")
                            break
                yield where, record
    else:
        raise PromptError(f"{path}: unsupported file type `{suffix}` (use .jsonl, .json, .parquet or .csv)")


def detect_format(record: dict) -> str:
    for fmt, key in FORMAT_KEYS.items():
        if key in record:
            return fmt
    raise PromptError(f"no prompt field found (keys: {sorted(map(str, record))}); expected one of "
                      f"{sorted(FORMAT_KEYS.values())}, or pass `--format`")


def _text(content: Any) -> str:
    if isinstance(content, list):  # OpenAI content parts
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) == len(content) and all(isinstance(t, str) for t in parts):
            content = "".join(parts)
    if not isinstance(content, str):
        raise PromptError(f"message content must be a string or text parts, got {type(content).__name__}")
    _check_unicode(content)
    return content


def _check_unicode(text: str) -> None:
    """A lone surrogate (a JSON escape such as \\ud800) is no character: no tokenizer or
    Parquet file can hold it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"text holds an unpaired surrogate {text[e.start]!r} at character {e.start + 1}") from None


def to_messages(record: dict, fmt: str) -> list[dict[str, str]]:
    """The record's whole conversation, trailing assistant turn included."""
    key = FORMAT_KEYS[fmt]
    if key not in record:
        raise PromptError(f"missing field `{key}` (format {fmt})")
    if fmt in ("messages", "sharegpt"):
        turns = record[key]
        if not isinstance(turns, list):
            raise PromptError(f"`{key}` must be a list of turns")
        role_key, content_key = ("role", "content") if fmt == "messages" else ("from", "value")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
                raise PromptError(f"`{key}[{i}]` must have `{role_key}` and `{content_key}`")
            role = turn[role_key] if fmt == "messages" else SHAREGPT_ROLES.get(str(turn[role_key]).lower())
            if role not in ROLES:
                raise PromptError(f"`{key}[{i}].{role_key}` is {turn[role_key]!r}, not a known role")
            messages.append({"role": role, "content": _text(turn[content_key])})
    else:
        user = _text(record[key])
        if fmt == "alpaca" and record.get("input"):
            user = f"{user}\n\n{_text(record['input'])}"
        messages = [{"role": "user", "content": user}]
        if record.get("system"):
            messages.insert(0, {"role": "system", "content": _text(record["system"])})
        response = next((record[k] for k in RESPONSE_KEYS if record.get(k) is not None), None)
        if response is not None:
            messages.append({"role": "assistant", "content": _text(response)})
    return messages


def prompt_hash(messages: list[dict[str, str]]) -> str:
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def resolve_format(path: Path, fmt: str = "auto") -> str:
    """`fmt`, or the format of the file's first readable record."""
    if fmt != "auto":
        return fmt
    for where, record in read_records(path):
        if isinstance(record, dict):
            try:
                return detect_format(record)
            except PromptError as e:
                raise PromptError(f"{where}: {e}") from None
    raise PromptError(f"{path}: no readable record to detect the format from")


def iter_prompts(path: Path, fmt: str = "auto", with_response: bool = False) -> Iterator[Prompt | BadRecord]:
    """Normalised prompts of a file. `with_response=False` (generate): a trailing assistant turn
    is dropped, the teacher answers the last user turn. `with_response=True` (score): the last
    turn must be the assistant response to score; it stays in `messages`."""
    fmt = resolve_format(path, fmt)
    seen: dict[str, list[str]] = {}
    for where, record in read_records(path):
        if isinstance(record, BadRecord):
            yield record
            continue
        try:
            if not isinstance(record, dict):
                raise PromptError(f"expected an object, got {type(record).__name__}")
            messages = to_messages(record, fmt)
            if with_response:
                if not messages or messages[-1]["role"] != "assistant":
                    raise PromptError("last turn is not an assistant response to score")
                if not messages[-1]["content"].strip():
                    raise PromptError("empty response", "empty")
                prompt = messages[:-1]
            else:
                while messages and messages[-1]["role"] == "assistant":
                    messages.pop()
                prompt = messages
            if not any(m["role"] == "user" for m in prompt) or not prompt or prompt[-1]["role"] != "user":
                raise PromptError("no user turn to answer" if prompt else "empty prompt", "empty")
            if not prompt[-1]["content"].strip():
                raise PromptError("empty prompt (last user turn is blank)", "empty")
            given = record.get("id", record.get("prompt_id"))
            prompt_id = str(given) if given is not None else prompt_hash(prompt)
            _check_unicode(prompt_id)
            if prompt_id in seen and not with_response:
                raise PromptError(f"duplicate prompt_id {prompt_id!r} (first at {seen[prompt_id][0]})", "duplicate")
            seen.setdefault(prompt_id, []).append(where)
            yield Prompt(where, prompt_id, messages, occurrence=len(seen[prompt_id]) - 1)
        except PromptError as e:
            yield BadRecord(where, str(e), e.kind)
