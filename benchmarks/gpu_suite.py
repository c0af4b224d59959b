"""The GPU suite: what training, generating and serving cost at a real model's size.

Nothing is downloaded: every model is built from its config, its weights random. On a GPU the
default shape is Qwen2.5-0.5B's (V = 151,936, H = 896, 24 layers); `--quick` runs the same code
on the CPU with a tiny shape in float32 (the test suite does; those are not GPU numbers, and the
output says so). `--only train generate serve` picks sections.

train: KD and SFT step time and peak memory of the student in bf16 at T = 4,096, and the peak
memory of the chunked vs the plain KD loss at that vocabulary. A step: forward, loss, backward,
AdamW step, on one sequence of T tokens with random token ids and a random top-k teacher row
(k = 20) per position. KD: `chunked_distill_loss` (alpha 0.5: KD + CE) on the last hidden
states and the LM head, as `distill train` computes it; SFT: the model's own cross-entropy. Peak
memory: `torch.cuda.max_memory_allocated` on a GPU; on the CPU, the growth of the process's
peak RSS, each variant in a fresh process.

generate and serve run a teacher of the same shape under vLLM with `load_format: dummy` (given
through the config's `engine_args`, as a user would) and a locally built byte-level tokenizer of
exactly V ids (`dummy_teacher`: why). generate: tokens/s of `distill generate` end to end (engine,
top-k k = 20 extraction, corpus shards) vs raw `LLM.generate` with the same prompts, sampling,
seeds and `logprobs=20` on the same engine (generate_throughput.py's runs, in a fresh process).
Random weights rarely sample the end of turn, so replies run to about `--max-tokens`. serve:
output tokens/s of vLLM's OpenAI server started as `distill serve` starts it, at concurrency
1/16/64 (streaming chat, greedy, every reply `--max-tokens` long via `ignore_eos`). vLLM runs
where the installed vLLM does (`--device` is the training half's).

    python benchmarks/gpu_suite.py [--only train generate serve] [--tokens 4096] [--steps 5]
                                   [--prompts 256] [--max-tokens 256] [--concurrency 1 16 64] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Headline, emit, parse_args

SHAPES = {
    # Qwen2.5-0.5B-Instruct's config.json: the student the issue names
    "qwen2.5-0.5b": dict(vocab_size=151_936, hidden_size=896, intermediate_size=4_864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "tiny": dict(vocab_size=4_096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True),
}
K, ALPHA, CHUNK = 20, 0.5, 1024
SECTIONS = ("train", "generate", "serve")
# The dummy teacher's chat markers, Qwen2.5's (its last three ids, as Qwen's follow its vocabulary).
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# ChatML as Qwen2.5 writes it, without Qwen's default system prompt.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def student(shape: str, device: str, dtype):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=32_768, attn_implementation="sdpa")
    return Qwen2ForCausalLM(config).to(device=device, dtype=dtype)


def batch(vocab: int, tokens: int, device: str):
    """One sequence: ids, the label of each position (the next id), a top-k teacher row per position."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, tokens + 1), generator=g)
    topk_ids = torch.randint(0, vocab, (1, tokens, K), generator=g)
    topk_ids[..., 0] = ids[:, 1:]
    topk_logprobs = torch.sort(torch.log_softmax(torch.randn(1, tokens, K, generator=g) * 2, -1) - 0.5,
                               dim=-1, descending=True).values
    return {"input_ids": ids[:, :-1].to(device), "labels": ids[:, 1:].to(device), "topk_ids": topk_ids.to(device),
            "topk_logprobs": topk_logprobs.to(device), "mask": torch.ones(1, tokens, dtype=torch.bool, device=device)}


def step_loss(model, b: dict, objective: str):
    from distill.train.losses import chunked_distill_loss

    if objective == "sft":
        logits = model(input_ids=b["input_ids"]).logits
        return _cross_entropy(logits, b["labels"])
    hidden = model.model(input_ids=b["input_ids"]).last_hidden_state
    loss, _ = chunked_distill_loss(hidden, model.lm_head.weight, b["labels"], b["topk_ids"], b["topk_logprobs"],
                                   b["mask"], alpha=ALPHA, chunk_size=CHUNK)
    return loss


def _cross_entropy(logits, labels):
    import torch

    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def train_steps(shape: str, objective: str, tokens: int, steps: int, device: str) -> dict:
    """Seconds per step (median of `steps` after one warm-up step), tokens/s, peak memory."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = student(shape, device, dtype)
    model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    b = batch(model.config.vocab_size, tokens, device)
    times, losses = [], []
    base = _reset_peak(device)
    for _ in range(steps + 1):
        started = time.perf_counter()
        loss = step_loss(model, b, objective)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - started)
        losses.append(loss.item())
    seconds = sorted(times[1:])[len(times[1:]) // 2]
    return {"seconds_per_step": seconds, "tokens_per_s": tokens / seconds, "peak_gib": _peak(device, base),
            "first_loss": losses[0], "last_loss": losses[-1], "dtype": str(dtype).replace("torch.", "")}


def loss_memory(variant: str, shape: str, tokens: int, device: str) -> dict:
    """Forward + backward of the KD loss alone on random hidden states and the LM head: peak memory."""
    import torch

    from distill.train.losses import chunked_distill_loss, topk_kd_loss

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    vocab, hidden = SHAPES[shape]["vocab_size"], SHAPES[shape]["hidden_size"]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, tokens, hidden, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device, dtype).requires_grad_()
    b = batch(vocab, tokens, device)
    base = _reset_peak(device)
    started = time.perf_counter()
    if variant == "plain":
        logits = h @ w.T  # [1, T, V]
        loss = ALPHA * topk_kd_loss(logits, b["topk_ids"], b["topk_logprobs"], b["mask"]) + \
            (1 - ALPHA) * _cross_entropy(logits, b["labels"])
    else:
        loss, _ = chunked_distill_loss(h, w, b["labels"], b["topk_ids"], b["topk_logprobs"], b["mask"],
                                       alpha=ALPHA, chunk_size=CHUNK)
    loss.backward()
    _sync(device)
    return {"loss": loss.item(), "seconds": time.perf_counter() - started, "peak_gib": _peak(device, base)}


def _reset_peak(device: str) -> int:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak(device: str, base: int) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2**30


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def in_fresh_process(what: str, args: argparse.Namespace, device: str | None = None) -> dict:
    """`what` (e.g. `train:kd`, `loss:plain`, `generate`) in its own process: on the CPU its peak
    RSS is its own, and on a GPU its memory is free again for the next."""
    # The suite's own flags (later ones win), then what only a child takes.
    argv = [sys.executable, __file__, *args.argv, "--child", what, "--work", args.work,
            *(["--device", device] if device else [])]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def dummy_teacher(shape: str, where: Path) -> None:
    """A model directory vLLM runs with `load_format="dummy"` (random weights, nothing downloaded):
    SHAPES[shape] as a Qwen2 config.json, and a byte-level BPE tokenizer of exactly `vocab_size`
    ids with a ChatML template, loaded as Qwen2.5's is (`Qwen2Tokenizer`: its pre-tokenizer and
    byte-level decoder). Qwen's own cannot be downloaded here. Ours has no merges: text encodes
    one token per byte, and the ids past the 256 bytes are filler words (`w300`) that only the
    model emits. Its length is the config's so that every id random weights sample decodes (a
    smaller tokenizer would leave rows without text; Qwen2.5's real one has 151,665 ids, and its
    trained weights never pick the padding rows)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab_size = SHAPES[shape]["vocab_size"]
    byte_chars = list(bytes_to_unicode().values())
    words = [*byte_chars, *(f"w{i}" for i in range(len(byte_chars), vocab_size - len(SPECIAL))), *SPECIAL]
    tokenizer = Tokenizer(models.BPE({w: i for i, w in enumerate(words)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            extra_special_tokens=list(SPECIAL), chat_template=CHAT_TEMPLATE).save_pretrained(where)
    Qwen2Config(**SHAPES[shape], max_position_embeddings=32_768, eos_token_id=words.index("<|im_end|>"),
                architectures=["Qwen2ForCausalLM"], dtype="bfloat16").save_pretrained(where)


def dummy_conversations(n: int, length: int) -> list[list[dict]]:
    """`n` one-turn chats of `length` random lowercase letters: `length` tokens with no merges."""
    rng = random.Random(0)
    return [[{"role": "user", "content": "".join(rng.choices(string.ascii_lowercase, k=length))}] for _ in range(n)]


def engine_settings(args: argparse.Namespace) -> dict:
    """How both vLLM sections run the dummy teacher: random weights through the config's own
    `engine_args` passthrough (what a user would write; nothing benchmark-only in distill), and a
    context that just holds a templated prompt and its reply."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(args.work) / "teacher")
    prompt = tokenizer.apply_chat_template(dummy_conversations(1, args.prompt_tokens)[0], add_generation_prompt=True)
    return dict(max_model_len=len(prompt["input_ids"]) + args.max_tokens, engine_args={"load_format": "dummy"})


def generate_rates(args: argparse.Namespace) -> dict:
    """`distill generate` (engine, top-k extraction, corpus shards) vs raw `LLM.generate` with the
    same prompts, sampling, seeds and `logprobs=K`, on one engine (generate_throughput.py's runs)."""
    from generate_throughput import timed_runs

    from distill import corpus
    from distill.config import GenerateConfig
    from distill.generate.engine import VLLMTeacher
    from distill.generate.templating import ChatTokenizer, load_tokenizer

    work = Path(args.work)
    conversations = dummy_conversations(args.prompts, args.prompt_tokens)
    records = [{"id": f"p{i}", "conversations": [{"from": "human", "value": c[0]["content"]}]}
               for i, c in enumerate(conversations)]
    cfg = GenerateConfig(teacher=str(work / "teacher"), prompts=work / "prompts.jsonl", out=work / "corpus",
                         max_tokens=args.max_tokens, top_k=K, **engine_settings(args))
    cfg.prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    chat = ChatTokenizer(load_tokenizer(cfg), set())
    prompt_ids = [chat.prompt_ids(c) for c in conversations]
    teacher = VLLMTeacher(cfg, max_logprobs=K, max_model_len=cfg.max_model_len)
    try:
        runs = timed_runs(cfg, teacher, records, prompt_ids, work)
    finally:
        teacher.close()
    stats = corpus.corpus_stats(runs["distill"][-1][2])
    return {"runs": {key: [r[:2] for r in rows] for key, rows in runs.items()}, "records": stats.records,
            "response_tokens": stats.response_tokens}


def serve_rates(args: argparse.Namespace) -> list[dict]:
    """vLLM's OpenAI server as `distill serve` starts it: output tokens/s at each concurrency
    (`distill.evaluation.load.measure`: streaming chat, `max_tokens` each via `ignore_eos`)."""
    from distill.config import ServeConfig
    from distill.evaluation.load import measure
    from distill.launcher import start_server

    cfg = ServeConfig(model=str(Path(args.work) / "teacher"), port=0, **engine_settings(args))
    with start_server(cfg) as server:
        return measure(server.url, server.model, dummy_conversations(args.requests, args.prompt_tokens),
                       args.concurrency, args.requests, args.max_tokens)


def run_child(what: str, args: argparse.Namespace) -> dict:
    if what == "generate":
        return generate_rates(args)
    import torch

    if args.quick:  # a check that the code runs, on a shared CPU: one thread, no oversubscription
        torch.set_num_threads(1)
    kind, variant = what.split(":")
    if kind == "train":
        return train_steps(args.shape, variant, args.tokens, args.steps, args.device)
    return loss_memory(variant, args.shape, args.tokens, args.device)


def main(argv: list[str] | None = None) -> list[Headline]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                    help="sections to run [default: all]")
    ap.add_argument("--shape", choices=SHAPES, help="the student's and the dummy teacher's shape "
                    "[default: qwen2.5-0.5b; tiny with --quick]")
    ap.add_argument("--tokens", type=int, help="train: tokens per sequence [default: 4096; 128 with --quick]")
    ap.add_argument("--steps", type=int, default=5, help="train: timed steps after one warm-up step")
    ap.add_argument("--device", choices=("cuda", "cpu"), help="train: [default: cuda when available]; vLLM runs "
                    "where the installed vLLM does")
    ap.add_argument("--prompts", type=int, default=256, help="generate: prompts")
    ap.add_argument("--prompt-tokens", type=int, default=128,
                    help="generate, serve: tokens per prompt (random letters)")
    ap.add_argument("--max-tokens", type=int, default=256, help="generate, serve: tokens per reply")
    # 64 at concurrency 1 are 64 x 256 decode steps one after another: the level that sets the suite's time
    ap.add_argument("--requests", type=int, default=64, help="serve: requests per concurrency level")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64], help="serve: concurrency levels")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    # --quick: the CPU-sized run (what the test suite runs): tiny student and teacher, 128 tokens,
    # 2 steps; 8 prompts of 16 tokens, 16-token replies, concurrency 1 and 4
    args = parse_args(ap, argv, quick={"prompts": 8, "prompt_tokens": 16, "max_tokens": 16, "requests": 8,
                                       "concurrency": [1, 4]})
    if args.quick:
        args.shape, args.tokens, args.steps = args.shape or "tiny", args.tokens or 128, min(args.steps, 2)
    args.shape, args.tokens = args.shape or "qwen2.5-0.5b", args.tokens or 4096
    if args.child:
        print(json.dumps(run_child(args.child, args)))
        return []
    args.argv = sys.argv[1:] if argv is None else argv
    headlines = []
    with tempfile.TemporaryDirectory(prefix="distill-gpu-suite-") as work:
        args.work = work
        if "train" in args.only:
            headlines += train_section(args)
        if {"generate", "serve"} & set(args.only):
            headlines += vllm_section(args)
    return headlines


def train_section(args: argparse.Namespace) -> list[Headline]:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (no GPU: not a GPU number)"
    print(f"{where}; student {args.shape} {SHAPES[args.shape]}, T = {args.tokens:,}, k = {K}, median of "
          f"{args.steps} steps after a warm-up")
    results = {what: in_fresh_process(what, args, device) for what in ("train:kd", "train:sft", "loss:plain", "loss:chunked")}
    print(f"\n{'step':<10}{'dtype':>10}{'s/step':>10}{'tokens/s':>12}{'peak GiB':>10}{'loss first -> last':>24}")
    for objective in ("kd", "sft"):
        r = results[f"train:{objective}"]
        print(f"{objective:<10}{r['dtype']:>10}{r['seconds_per_step']:>10.3f}{r['tokens_per_s']:>12,.0f}"
              f"{r['peak_gib']:>10.2f}{r['first_loss']:>12.4f} -> {r['last_loss']:.4f}")
    plain, chunked = results["loss:plain"], results["loss:chunked"]
    print(f"\nKD loss alone (forward + backward, V = {SHAPES[args.shape]['vocab_size']:,}): plain {plain['peak_gib']:.3f} "
          f"GiB, chunked {chunked['peak_gib']:.3f} GiB (ratio {chunked['peak_gib'] / max(plain['peak_gib'], 1e-9):.3f}); "
          f"loss {plain['loss']:.5f} vs {chunked['loss']:.5f}")
    kd, sft = results["train:kd"], results["train:sft"]
    return [Headline(f"KD step, {args.shape}, T={args.tokens}, {device}", f"{kd['seconds_per_step']:.3f} s",
                     f"{kd['seconds_per_step'] / sft['seconds_per_step']:.2f}x the SFT step"),
            Headline("KD step peak memory", f"{kd['peak_gib']:.2f} GiB"),
            Headline("chunked KD loss peak memory", f"{chunked['peak_gib']:.3f} GiB",
                     f"{chunked['peak_gib'] / max(plain['peak_gib'], 1e-9):.3f} of plain")]


def vllm_section(args: argparse.Namespace) -> list[Headline]:
    from generate_throughput import best, print_runs

    from distill.engine import on_cpu

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # read on the CPU only; the dummy teacher needs little
    dummy_teacher(args.shape, Path(args.work) / "teacher")
    device = "cpu" if on_cpu() else "cuda"
    if device == "cpu":
        where = "CPU (no GPU: not a GPU number)"
    else:
        import torch

        where = torch.cuda.get_device_name()
    print(f"\nvLLM on {where}; dummy teacher {args.shape} (random weights, load_format dummy), prompts of "
          f"{args.prompt_tokens} tokens + the chat template's, {args.max_tokens}-token replies")
    headlines = []
    if "generate" in args.only:
        result = in_fresh_process("generate", args)
        runs = result["runs"]
        print(f"\ngenerate: {args.prompts} prompts, k = {K}, temperature 1.0, one engine")
        print_runs(runs)
        ratio = best(runs["distill"]) / best(runs["raw"])
        print(f"ratio distill / raw with vLLM defaults: {ratio:.3f}; distill's last corpus: {result['records']} "
              f"records, {result['response_tokens']:,} response tokens")
        headlines.append(Headline(f"distill generate, {args.shape} dummy teacher, {device}, tokens/s",
                                  f"{best(runs['distill']):,.0f}", f"{ratio:.3f} of raw LLM.generate, vLLM defaults"))
    if "serve" in args.only:
        rows = serve_rates(args)
        print(f"\nserve: vLLM's OpenAI server as `distill serve` starts it; {args.requests} requests per level, "
              f"{args.max_tokens} tokens each (ignore_eos), greedy")
        print(f"{'concurrency':>11}{'requests':>10}{'failures':>10}{'tokens':>10}{'tok/s':>12}{'TTFT p50 ms':>13}")
        for r in rows:
            print(f"{r['concurrency']:>11}{r['requests']:>10}{r['failures']:>10}{r['output_tokens']:>10,}"
                  f"{r['tokens_per_s']:>12,.0f}{r['ttft_ms_p50']:>13.1f}")
        top = rows[-1]
        headlines.append(Headline(f"vLLM server, {args.shape} dummy, {device}, concurrency {top['concurrency']}, output tok/s",
                                  f"{top['tokens_per_s']:,.0f}",
                                  f"{top['tokens_per_s'] / rows[0]['tokens_per_s']:.1f}x concurrency "
                                  f"{rows[0]['concurrency']}", met=False if top["failures"] else None))
    return headlines


if __name__ == "__main__":
    emit(main())
