"""The demo's synthetic chat skills: short digit-string tasks with one checkable answer.

Chosen for what a ~2M-parameter model learns well in tens of minutes on 2 CPU cores
(shared/notes/demo-feasibility.md: multi-digit addition and letter counting did not learn):
every answer is a permutation, a digit or a length of the digits in the prompt, and the
tokenizer splits digits one per token. Everything is deterministic from a seed, and each
payload belongs to exactly one split by its hash, so the teacher's training prompts, the
demo's corpus prompts and the held-out eval prompts never share a question.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

SKILLS: dict[str, tuple[list[str], Callable[[str], str]]] = {
    "reverse": (["Reverse {x}", "Reverse the digits of {x}.", "Write {x} backwards.", "What is {x} reversed?"],
                lambda x: x[::-1]),
    "sort": (["Sort {x}", "Sort the digits of {x}.", "Put the digits of {x} in ascending order.",
              "What is {x} with its digits sorted?"], lambda x: "".join(sorted(x))),
    "max": (["Largest digit of {x}", "What is the largest digit in {x}?", "Which digit of {x} is the biggest?"],
            lambda x: max(x)),
    "length": (["How many digits in {x}?", "Count the digits of {x}.", "How long is {x}?"], lambda x: str(len(x))),
}
SYSTEM_PROMPTS = [None, "You are a helpful assistant.", "Answer with the result only.", "Be brief."]
DIGITS = (3, 5)  # payload length range, inclusive
# payload hash % 10 -> split: the teacher learns on 0-6, the demo distils on 7, evaluates on 8-9.
SPLITS = {"teacher": range(0, 7), "distill": range(7, 8), "eval": range(8, 10)}


def split_of(skill: str, payload: str) -> str:
    bucket = int(hashlib.sha1(f"{skill}:{payload}".encode()).hexdigest(), 16) % 10
    return next(name for name, buckets in SPLITS.items() if bucket in buckets)


def examples(split: str, n: int, seed: int) -> Iterator[dict]:
    """`n` examples of `split`, skills in turn: {"id", "skill", "messages", "answer"}."""
    rng = random.Random(seed)
    names = list(SKILLS)
    made = 0
    while made < n:
        skill = names[made % len(names)]
        phrasings, solve = SKILLS[skill]
        payload = "".join(rng.choice("0123456789") for _ in range(rng.randint(*DIGITS)))
        if split_of(skill, payload) != split:
            continue
        system = rng.choice(SYSTEM_PROMPTS)
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": rng.choice(phrasings).format(x=payload)}]
        yield {"id": f"{split}-{seed}-{made}", "skill": skill, "messages": messages, "answer": solve(payload)}
        made += 1


def write_prompts(path: Path, split: str, n: int, seed: int, with_answers: bool = False) -> Path:
    """A JSONL prompt file `distill generate` reads (`messages` form, with `id`, `skill`, `answer`).
    `with_answers` appends the answer as the assistant turn (a conversation to train on)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for ex in examples(split, n, seed):
            if with_answers:
                ex["messages"] = ex["messages"] + [{"role": "assistant", "content": ex["answer"]}]
            f.write(json.dumps(ex) + "\n")
    return path


def parse(prompt: str) -> tuple[str, str]:
    """(skill, payload) of a user prompt (the phrasings are disjoint)."""
    for skill, (phrasings, _) in SKILLS.items():
        for phrasing in phrasings:
            head, tail = phrasing.split("{x}")
            payload = prompt[len(head):len(prompt) - len(tail)]
            if prompt.startswith(head) and prompt.endswith(tail) and payload.isdigit():
                return skill, payload
    raise ValueError(f"not a demo skill prompt: {prompt!r}")


def check(prompt: str, answer: str) -> float:
    """1.0 if `answer` solves the skill prompt, else 0.0: the verifier and the task scorer."""
    skill, payload = parse(prompt)
    return float(answer.strip() == SKILLS[skill][1](payload))


def verify(record: dict) -> str | None:
    """Curation plug-in: the reason a teacher answer is wrong, or None to keep it."""
    if not check(record["messages"][-1]["content"], record["response"]):
        return f"wrong answer {record['response'].strip()!r}"
    return None
