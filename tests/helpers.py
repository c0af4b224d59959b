"""Helpers shared by test modules (test modules import these, never each other)."""

import functools
import json
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from distill import corpus

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "tests" / ".cache"
MAX_MODEL_LEN = 512

K = 4


def record(i: int | str, *, n_tokens: int = 3, k: int = K, question: str | None = None,
           prompt_ids: Sequence[int] = (1, 2, 3), response: str | None = None, response_ids: Sequence[int] | None = None,
           topk_ids=None, topk_logprobs=None, top1: float | None = None, finish_reason: str = "stop",
           loss_mask: Sequence[bool] | None = None) -> dict:
    """One corpus record, as `corpus.records_to_table` takes it; each keyword replaces one part.

    `i`: an int gives the id `r{i}`, a string is the id. By default the prompt is [1, 2, 3], the
    response `n_tokens` tokens 0, 1, ..., the top-k ids random below 500 (inside the tiny models'
    vocabulary) and the top-k logprobs random in [-8, 0], sorted best first, both seeded by `i`;
    `top1` instead gives every position the logprobs `top1, top1 - 1, ...` (a teacher exactly that
    confident). The sampled token's logprob is the top-1's. `response_ids` or the top-k rows, when
    given, set the length; given values are stored as given (lists stay lists).
    """
    given = next((rows for rows in (response_ids, topk_ids, topk_logprobs) if rows is not None), None)
    n = n_tokens if given is None else len(given)
    rng = np.random.default_rng(i if isinstance(i, int) else zlib.crc32(i.encode()))
    drawn = np.sort(rng.uniform(-8, 0, size=(n, k)).astype(np.float32), axis=1)[:, ::-1]
    drawn_ids = rng.integers(0, 500, size=(n, k))
    if topk_logprobs is None:
        topk_logprobs = drawn if top1 is None else np.tile(top1 - np.arange(k, dtype=np.float32), (n, 1))
    built = {
        "id": i if isinstance(i, str) else f"r{i}", "prompt_id": f"p{i}",
        "messages": [{"role": "user", "content": f"q{i}" if question is None else question}],
        "response": f"a{i}" if response is None else response, "prompt_token_ids": list(prompt_ids),
        "response_token_ids": list(range(n)) if response_ids is None else response_ids,
        "response_logprobs": np.asarray(topk_logprobs, dtype=np.float32).reshape(n, k)[:, 0].copy(),
        "topk_token_ids": drawn_ids if topk_ids is None else topk_ids, "topk_logprobs": topk_logprobs,
        "finish_reason": finish_reason,
    }
    if loss_mask is not None:
        built["loss_mask"] = loss_mask
    return built


def make_corpus(root, records, k=K, encoding=corpus.DEFAULT_ENCODING, vocab_size=None, teacher: str | dict = "t",
                stamped: bool = False):
    """A one-shard corpus of `records`. `teacher`: the teacher's model, or the manifest's whole
    teacher section; `vocab_size`: the teacher's, as generate records it (None: not recorded, as
    in corpora written before it was); `stamped`: with the validation stamp generate writes where
    the records pass its checks."""
    table, checked = corpus.records_to_checked_table(records, k, encoding, vocab_size)
    corpus.write_shard(root, 0, table, checked=checked if stamped else None)
    stats = corpus.corpus_stats(root)
    section = {"model": teacher} if isinstance(teacher, str) else teacher
    corpus.write_manifest(root, corpus.Manifest(teacher={**section, "vocab_size": vocab_size},
                                                generation={"top_k": k, "logprob_encoding": encoding}, stats=stats))
    return root


def one_line_error(capsys, command: str) -> str:
    """The error: one line, the last one (a progress bar may come before it), no traceback."""
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith(f"distill {command}: error: ")]
    assert len(errors) == 1 and err.endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def run_in_child(config: Path, out: Path, *options: str) -> dict[str, dict]:
    """`distill run CONFIG OPTIONS` in a child process -> the stages of its `out/run.json` (what
    `pipeline.run` returns). The child's vLLM engines run in that process (child_site/sitecustomize.py),
    not in processes of their own as in pytest's: a two-teacher run took 43 s so, 158-170 s in pytest's."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "distill.cli", "run", str(config), *options], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "run.json").read_text())["stages"]


def in_child(fn, *args):
    """`fn(*args)` (a module-level function) in a fresh Python process, whose vLLM engines start in
    that process as `run_in_child`'s do; its result comes back pickled."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def logged_steps(out: Path) -> list[int]:
    """The steps of the training-loss lines in a student's `metrics.jsonl`, in file order."""
    return [m["step"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


PROMPTS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]},
    {"messages": [{"role": "user", "content": "Sort 5 3 1"}, {"role": "assistant", "content": "1 3 5"},
                  {"role": "user", "content": "Now reverse it"}]},
    {"messages": [{"role": "user", "content": "Hello there, how are you?"}]},
    {"messages": [{"role": "user", "content": "Count the letters in teacher"}]},
    {"messages": [{"role": "user", "content": "Give me seven numbers"}]},
    {"messages": [{"role": "user", "content": "Why is the sky large?"}]},
]


# Alignment tolerance of a stored row against transformers' recomputation: both run float32 on
# CPU (differences ~1e-5), plus the storage error of the corpus's logprob encoding.
ATOL = 2e-3


@functools.lru_cache(maxsize=4)
def hf_model(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def assert_matches_transformers(corpus_dir, model_dir) -> int:
    """Every stored row equals the teacher's recomputed distribution; returns rows checked."""
    import torch

    model, rows = hf_model(str(model_dir)), 0
    generation = corpus.read_manifest(corpus_dir).generation
    k = generation.top_k
    for rec in corpus.iter_records(corpus_dir):
        prompt, response = rec["prompt_token_ids"], rec["response_token_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0].double()
        # the distribution at position t predicts token t + 1
        lp = torch.log_softmax(logits, -1)[len(prompt) - 1: len(prompt) + len(response) - 1].numpy()
        stored_ids, stored_lp = np.array(rec["topk_token_ids"]), np.array(rec["topk_logprobs"], dtype=np.float64)
        sampled = lp[np.arange(len(response)), response]
        np.testing.assert_allclose(np.array(rec["response_logprobs"]), sampled,
                                   atol=ATOL + np.abs(sampled).max() * corpus.FLOAT16_RELATIVE_ERROR)
        gathered = np.take_along_axis(lp, stored_ids, axis=1)
        bound = corpus.logprob_tolerance(generation.logprob_encoding, gathered).max()
        np.testing.assert_allclose(stored_lp, gathered, atol=ATOL + bound)
        order = np.sort(lp, axis=1)[:, ::-1]
        for t in range(len(response)):
            if order[t, k - 1] - order[t, k] > ATOL:  # no near-tie at the k-th place: the sets must agree
                assert set(stored_ids[t]) == set(np.argsort(-lp[t])[:k]), f"record {rec['id']} position {t}"
            rows += 1
    return rows
