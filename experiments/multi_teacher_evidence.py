"""Evidence on the demo skills: routed multi-teacher distillation vs one expert, and an ensemble
of two noisy teachers vs either alone, 3 paired seeds, greedy exact match on the 300 held-out
demo prompts (docs/results/multi-teacher.md).

    python experiments/multi_teacher_evidence.py [--out runs/multi-teacher-evidence] [--seeds 0 1 2]
        [--steps 150] [--prompts 2000]

The teachers are built offline in this script, like the demo teacher's noisy stage, as exact
distributions (no model: a teacher here is its top-k rows, which is all distillation reads):
- expert A is the demo teacher's calibrated distribution (`skills.label_distribution`: the right
  digit 0.7, prompt-specific confusions the rest) on `reverse` and `max`, and weak on `sort` and
  `length`: there a confusion gets 0.55 and the right digit 0.15 (a teacher that never learnt the
  skill well: its top choice is wrong). Expert B is the mirror image (strong on sort and length).
- noisy teachers N1 and N2 know all four skills, but at a third of the answer digits (each teacher
  its own, by a hash of teacher, prompt and position) their top choice is a confusion (0.5 against
  0.3 for the right digit).
Each teacher's answers are sampled from its own distribution (temperature 1, as the demo's
`generate`); `distill score` writes its top-k along them; a second teacher's top-k along the same
answers is a sibling corpus (`distill score --corpus`). Students (the demo's 0.45M-parameter
student, init seed s, data order s) train with the demo's KD settings for `--steps` steps:

  A only     expert A's answers + top-k on all prompts
  B only     expert B's likewise
  routed     A's records on A's skills + B's on B's (two corpora, each record against its teacher)
  mixture    A's answers, KL to the 0.5/0.5 mixture of A's and B's top-k (ensemble)
  sft routed the routed answers with CE only (alpha 0)
  N1, N2     one noisy teacher's answers + top-k
  N1+N2      N1's answers, KL to the mixture of N1's and N2's top-k

Results go to OUT/results.json (per seed, per skill) and a table on stdout. A rerun reuses the
corpora and students already there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np

from distill import files
from distill.demo import skills

DEMO = Path(__file__).resolve().parent.parent / "distill" / "demo"
EXPERT_SKILLS = {"A": ("reverse", "max"), "B": ("sort", "length")}
ARMS = ("A only", "B only", "routed", "mixture", "sft routed", "N1", "N2", "N1+N2")
WEAK_WRONG, WEAK_RIGHT = 0.55, 0.15  # an expert off its skills: a confusion on top
NOISY_SHARE, NOISY_WRONG, NOISY_RIGHT = 1 / 3, 0.5, 0.3  # a noisy teacher's wrong-topped positions
TOP_K = 8


def _unit(*key) -> float:
    """A deterministic number in [0, 1) from `key`."""
    return int(hashlib.sha256(":".join(map(str, key)).encode()).hexdigest()[:12], 16) / 16**12


def digit_rows(teacher: str, skill: str, payload: str) -> list[dict[str, float]]:
    """Teacher `teacher`'s distribution over each answer digit of a skill prompt."""
    answer = skills.SKILLS[skill][1](payload)
    rows = skills.label_distribution(skill, payload)
    for i, row in enumerate(rows):
        right = answer[i]
        wrong = sorted(skills.confusions(skill, payload, answer, i)) or [str((int(right) + 1) % 10)]
        expert_weak = teacher in EXPERT_SKILLS and skill not in EXPERT_SKILLS[teacher]
        noisy_wrong = teacher.startswith("N") and _unit(teacher, skill, payload, i) < NOISY_SHARE
        if expert_weak or noisy_wrong:
            top, other = (WEAK_WRONG, WEAK_RIGHT) if expert_weak else (NOISY_WRONG, NOISY_RIGHT)
            chosen = wrong[int(_unit("pick", teacher, skill, payload, i) * len(wrong))]
            rest = [d for d in wrong if d != chosen] or [d for d in "0123456789" if d not in (right, chosen)][:1]
            rows[i] = {chosen: top, right: other, **{d: (1 - top - other) / len(rest) for d in rest}}
    return rows


class SyntheticTeacher:
    """`Teacher.score` for a teacher given as `digit_rows`: at each answer digit its distribution
    (best first, top-k), at the end-of-turn token certainty. Nothing is sampled here."""

    max_model_len = 128

    def __init__(self, name: str, tokenizer):
        self.name = name
        self.digit_ids = {str(d): tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)}

    def score(self, requests, top_k, on_done, window):
        from distill.teacher import Completion

        for req in requests:
            skill, payload = skills.parse(req.messages[-1]["content"])
            rows = digit_rows(self.name, skill, payload)
            ids = np.zeros((len(req.response_token_ids), top_k), dtype=np.int32)
            lps = np.full((len(req.response_token_ids), top_k), -30.0, dtype=np.float32)
            given = np.zeros(len(req.response_token_ids), dtype=np.float32)
            for t, token in enumerate(req.response_token_ids):
                row = rows[t] if t < len(rows) else {}
                ranked = sorted(((self.digit_ids[d], p) for d, p in row.items()), key=lambda x: -x[1]) or [(token, 1.0)]
                # digits the row leaves out fill the remaining slots at ~0 (the stored top-k is always k wide)
                fillers = [i for i in self.digit_ids.values() if i not in {j for j, _ in ranked}]
                for slot, (j, p) in enumerate((ranked + [(f, 0.0) for f in fillers])[:top_k]):
                    ids[t, slot], lps[t, slot] = j, np.log(p) if p > 0 else -30.0
                p = dict(ranked).get(token)
                given[t] = np.log(p) if p else -30.0
            on_done(req, Completion(np.asarray(req.response_token_ids, dtype=np.int32), given, ids, lps,
                                    req.finish_reason))


def answered_prompts(path: Path, prompts: list[dict], teacher: str, seed: int = 0) -> Path:
    """The prompts with teacher `teacher`'s sampled answer as the assistant turn."""
    rng = random.Random(f"{teacher}:{seed}")
    with open(path, "w") as f:
        for ex in prompts:
            skill, payload = skills.parse(ex["messages"][-1]["content"])
            answer = "".join(rng.choices(list(r), weights=list(r.values()))[0] for r in digit_rows(teacher, skill, payload))
            f.write(json.dumps({**ex, "messages": ex["messages"] + [{"role": "assistant", "content": answer}]}) + "\n")
    return path


def build_corpora(work: Path, n_prompts: int) -> dict[str, list[Path]]:
    """arm -> its training corpora (made once)."""
    import pyarrow as pa
    from transformers import AutoTokenizer

    from distill.config import ScoreConfig
    from distill.demo.students import subset
    from distill.generate.job import score

    teacher_dir = str(DEMO / "teacher")
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    prompts = [json.loads(line) for line in (DEMO / "prompts" / "train.jsonl").read_text().splitlines()][:n_prompts]
    work.mkdir(parents=True, exist_ok=True)

    def own(name: str) -> Path:
        out = work / f"{name}-all"
        if not (out / "manifest.json").exists():
            data = answered_prompts(work / f"{name}-answers.jsonl", prompts, name)
            score(ScoreConfig(teacher=teacher_dir, data=data, out=out, top_k=TOP_K, overwrite=True),
                  teacher=SyntheticTeacher(name, tokenizer))
        return out

    def sibling(name: str, of: Path) -> Path:
        out = work / f"{name}-on-{of.name}"
        if not (out / "manifest.json").exists():
            score(ScoreConfig(teacher=teacher_dir, corpus=of, out=out, top_k=TOP_K, overwrite=True),
                  teacher=SyntheticTeacher(name, tokenizer))
        return out

    def on_skills(source: Path, name: str) -> Path:
        wanted = EXPERT_SKILLS[name]
        return subset(source, work / name, lambda table: table.filter(pa.array(
            [skills.parse(m[-1]["content"])[0] in wanted for m in table.column("messages").to_pylist()])),
            f"{'/'.join(wanted)} records of {source}")

    a, b, n1, n2 = own("A"), own("B"), own("N1"), own("N2")
    routed = [on_skills(a, "A"), on_skills(b, "B")]
    return {"A only": [a], "B only": [b], "routed": routed, "mixture": [a, sibling("B", a)], "sft routed": routed,
            "N1": [n1], "N2": [n2], "N1+N2": [n1, sibling("N2", n1)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/multi-teacher-evidence"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=150, help="Optimiser steps per student (the demo: 500).")
    ap.add_argument("--prompts", type=int, default=2000, help="Training prompts (the demo's train.jsonl has 2000).")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    start = time.time()

    from distill import pipeline
    from distill.demo.run import STUDENT_INIT, student_init
    from distill.demo.students import train_many
    from distill.demo.teacher import exact_match

    corpora = build_corpora(args.out / "corpora", args.prompts)
    print(f"[evidence] corpora ready in {time.time() - start:.0f} s", flush=True)
    base = pipeline.stage_configs(pipeline.load_config(DEMO / "demo.yaml", [
        f"out={args.out / 'unused'}", f"teacher.model={DEMO / 'teacher'}", f"student.model={STUDENT_INIT}",
        f"prompts.train={DEMO / 'prompts' / 'train.jsonl'}", f"prompts.eval={DEMO / 'prompts' / 'eval.jsonl'}"]))["train"]
    configs = {}
    for seed in args.seeds:
        init = STUDENT_INIT if seed == 0 else student_init(args.out / f"init-seed{seed}", seed)
        for arm in ARMS:
            ensemble = "mixture" if arm in ("mixture", "N1+N2") else None
            configs[arm, seed] = base.model_copy(update={
                "corpus": corpora[arm], "student": str(init), "seed": seed, "max_steps": args.steps, "resume": True,
                "out": args.out / "students" / f"{arm.replace(' ', '-').replace('+', '-')}-seed{seed}",
                "alpha": 0.0 if arm == "sft routed" else base.alpha, "ensemble": ensemble,
                "teacher_weights": [0.5, 0.5] if ensemble else [], "save_steps": args.steps})
    # model_copy skips validation: rebuild each config so the multi-teacher checks run
    configs = {key: type(cfg)(**cfg.model_dump()) for key, cfg in configs.items()}
    train_many(list(configs.values()), workers=args.workers)
    print(f"[evidence] students trained after {time.time() - start:.0f} s", flush=True)

    examples = [json.loads(line) for line in (DEMO / "prompts" / "eval.jsonl").read_text().splitlines()]
    results = {arm: [] for arm in ARMS}
    for (arm, seed), cfg in configs.items():
        scored = exact_match(Path(cfg.out), examples)
        results[arm].append({"seed": seed, "accuracy": scored["overall"], "per_skill": scored["per_skill"]})
    summary = {"steps": args.steps, "prompts": args.prompts, "seeds": args.seeds, "held_out": len(examples),
               "wall_seconds": round(time.time() - start), "results": results}
    files.write_json(args.out / "results.json", summary)
    print(f"\n| arm | mean ± sd | per seed | {' | '.join(skills.SKILLS)} |")
    print("|---|---|---|" + "---|" * len(skills.SKILLS))
    for arm, rows in results.items():
        acc = [r["accuracy"] for r in rows]
        per_skill = [statistics.mean(r["per_skill"][s] for r in rows) for s in skills.SKILLS]
        spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(f"| {arm} | {statistics.mean(acc):.3f} ± {spread:.3f} | {' / '.join(f'{a:.3f}' for a in acc)} | "
              + " | ".join(f"{p:.3f}" for p in per_skill) + " |")
    print(f"\n[evidence] {time.time() - start:.0f} s in all; {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
