"""The demo's synthetic chat skills: short digit-string tasks with one checkable answer, and the
noise model that makes the demo teacher calibrated rather than one-hot.

The skills are chosen for what a ~2M-parameter model learns well in tens of minutes on 2 CPU
cores (multi-digit addition and letter counting did not learn): every answer is a permutation, a
digit or a length of the digits in the prompt, and the tokenizer splits digits one per token.
Everything is deterministic from a seed, and each payload belongs to exactly one split by its
hash, so the teacher's training prompts, the demo's corpus prompts and the held-out eval
prompts never share a question.

Noise: the teacher's last training stage sees answers where each digit is right with probability
0.7 and otherwise one of a few confusions that depend on the prompt (a neighbouring digit, the
digit +-1, the second-largest digit, the length +-1). A model trained on such labels learns
their distribution: its top choice stays the right digit, and its other probabilities say which
mistakes are plausible. That is the information KD transfers and a sampled answer lacks (only
0.7^k of k-digit samples are fully right). Not label smoothing: the mass goes to prompt-specific
confusions, never spread evenly over the vocabulary.
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
RIGHT = 0.7  # probability of the right digit in a noisy label
DIGITS = (3, 5)  # payload length range, inclusive
# payload hash % 10 -> split: the teacher learns on 0-6, the demo distils on 7, evaluates on 8-9.
SPLITS = {"teacher": range(0, 7), "distill": range(7, 8), "eval": range(8, 10)}


def split_of(skill: str, payload: str) -> str:
    bucket = int(hashlib.sha1(f"{skill}:{payload}".encode()).hexdigest(), 16) % 10
    return next(name for name, buckets in SPLITS.items() if bucket in buckets)


def examples(split: str, n: int, seed: int, system_prompts: bool = True) -> Iterator[dict]:
    """`n` examples of `split`, skills in turn: {"id", "skill", "messages", "answer"}.
    `system_prompts`: sometimes open with one of SYSTEM_PROMPTS (else never: shorter prompts)."""
    rng = random.Random(seed)
    names = list(SKILLS)
    made = 0
    while made < n:
        skill = names[made % len(names)]
        phrasings, solve = SKILLS[skill]
        payload = "".join(rng.choice("0123456789") for _ in range(rng.randint(*DIGITS)))
        if split_of(skill, payload) != split:
            continue
        system = rng.choice(SYSTEM_PROMPTS) if system_prompts else None
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": rng.choice(phrasings).format(x=payload)}]
        yield {"id": f"{split}-{seed}-{made}", "skill": skill, "messages": messages, "answer": solve(payload)}
        made += 1


def write_prompts(path: Path, split: str, n: int, seed: int, answers: str | None = None,
                  system_prompts: bool = True) -> Path:
    """A JSONL prompt file `distill generate` reads (`messages` form, with `id`, `skill`, `answer`).
    `answers` appends an assistant turn (a conversation to train on): "right", or "noisy" (drawn
    from `label_distribution`, seeded by `seed`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 1000)
    with open(path, "w") as f:
        for ex in examples(split, n, seed, system_prompts):
            if answers is not None:
                payload = parse(ex["messages"][-1]["content"])[1]
                content = ex["answer"] if answers == "right" else noisy_answer(ex["skill"], payload, rng)
                ex["messages"] = ex["messages"] + [{"role": "assistant", "content": content}]
            f.write(json.dumps(ex) + "\n")
    return path


def confusions(skill: str, payload: str, answer: str, i: int) -> set[str]:
    """The plausible wrong digits at answer position `i`."""
    right = answer[i]
    if skill in ("reverse", "sort"):  # the digit +-1, and the answer's neighbouring digits
        out = {str(int(right) + d) for d in (-1, 1) if 0 <= int(right) + d <= 9}
        out |= {answer[j] for j in (i - 1, i + 1) if 0 <= j < len(answer)}
    elif skill == "max":  # the next-lower digit of the payload
        below = sorted({d for d in payload if d < right})
        out = {below[-1]} if below else {str(int(right) - 1) if right != "0" else "1"}
    elif skill == "length":
        out = {str(int(right) + d) for d in (-1, 1) if 0 <= int(right) + d <= 9}
    else:
        raise ValueError(f"unknown skill {skill!r}")
    return out - {right}


def label_distribution(skill: str, payload: str) -> list[dict[str, float]]:
    """Per answer digit: {digit: probability}, RIGHT on the right one, the rest evenly over its
    confusions (so the right digit is always the most likely)."""
    answer = SKILLS[skill][1](payload)
    rows = []
    for i, right in enumerate(answer):
        wrong = confusions(skill, payload, answer, i)
        row = {right: RIGHT if wrong else 1.0}
        row.update({d: (1 - RIGHT) / len(wrong) for d in sorted(wrong)})  # sorted: reproducible draws
        rows.append(row)
    return rows


def noisy_answer(skill: str, payload: str, rng: random.Random) -> str:
    """One draw per digit from `label_distribution` (the end of the answer is never noised)."""
    return "".join(rng.choices(list(row), weights=list(row.values()))[0] for row in label_distribution(skill, payload))


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
