"""What the student sees of a prompt the teacher answers in full (context distillation,
docs/recipes/context-distillation.md): the teacher answers the whole conversation (a long
system prompt, few-shot example turns), the student is trained on a shorter one and so learns
to behave as if the context were there.

A view is one of VIEWS or a YAML / JSON file `{system: TEXT, examples: keep | drop}`: the
student gets that (short) system prompt instead of the teacher's, and the example turns only
with `examples: keep` (default: drop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distill import files
from distill.config import load_yaml

Messages = list[dict[str, str]]

# The named views, each: what of the teacher's conversation the student keeps.
VIEWS: dict[str, str] = {
    "drop-system": "every turn but the system prompt",
    "drop-examples": "the system prompt and the last user turn (the earlier turns, few-shot examples, go)",
    "user-only": "the last user turn alone",
}


def _system(messages: Messages) -> Messages:
    return [m for m in messages if m["role"] == "system"]


def _last_user(messages: Messages) -> Messages:
    return messages[-1:]  # a prompt ends with the user turn the teacher answers (`iter_prompts`)


@dataclass(frozen=True)
class StudentView:
    """`spec`: the name or file it was given; `identity`: what the corpus manifest records (a
    file's hash, not its path); calling it maps the teacher's messages to the student's."""

    spec: str
    identity: str
    transform: Callable[[Messages], Messages]

    def __call__(self, messages: Messages) -> Messages:
        return self.transform(messages)


NAMED: dict[str, Callable[[Messages], Messages]] = {
    "drop-system": lambda m: [t for t in m if t["role"] != "system"],
    "drop-examples": lambda m: _system(m) + _last_user(m),
    "user-only": _last_user,
}
assert NAMED.keys() == VIEWS.keys()


def load_view(spec: str) -> StudentView:
    """A view by name or file; raises ValueError (one line) for anything else."""
    if spec in NAMED:
        return StudentView(spec, spec, NAMED[spec])
    path = Path(spec)
    if path.suffix.lower() not in (".yaml", ".yml", ".json") or not path.is_file():
        raise ValueError(f"`student_view` {spec!r}: expected one of {', '.join(VIEWS)} or a YAML / JSON file "
                         "`{system: TEXT, examples: keep | drop}`")
    data = load_yaml(path)  # JSON is YAML
    return StudentView(spec, f"file:{files.sha256(path)}", _file_view(path, data))


def _file_view(path: Path, data) -> Callable[[Messages], Messages]:
    if not isinstance(data, dict) or set(data) - {"system", "examples"}:
        raise ValueError(f"{path}: a student view file holds a mapping with `system` and/or `examples` only")
    system, examples = data.get("system"), data.get("examples", "drop")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"{path}: `system` must be text, got {type(system).__name__}")
    if examples not in ("keep", "drop"):
        raise ValueError(f"{path}: `examples` must be `keep` or `drop`, got {examples!r}")
    prefix = [{"role": "system", "content": system}] if system else []

    def view(messages: Messages) -> Messages:
        turns = [t for t in messages if t["role"] != "system"]
        return prefix + (turns if examples == "keep" else _last_user(turns))

    return view
