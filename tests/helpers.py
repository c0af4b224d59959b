"""Helpers shared by test modules (test modules import these, never each other)."""

import numpy as np

from distill import corpus

K = 4


def record(i: int, n_tokens: int = 3, k: int = K) -> dict:
    rng = np.random.default_rng(i)
    top = np.sort(rng.uniform(-8, 0, size=(n_tokens, k)).astype(np.float32), axis=1)[:, ::-1]
    return {
        "id": f"r{i}", "prompt_id": f"p{i}", "messages": [{"role": "user", "content": f"q{i}"}],
        "response": f"a{i}", "prompt_token_ids": [1, 2, 3], "response_token_ids": list(range(n_tokens)),
        "response_logprobs": top[:, 0].copy(), "topk_token_ids": rng.integers(0, 500, size=(n_tokens, k)),
        "topk_logprobs": top, "finish_reason": "stop",
    }


def make_corpus(root, records, k=K, encoding=corpus.DEFAULT_ENCODING):
    corpus.write_shard(root, 0, corpus.records_to_table(records, k, encoding))
    stats = corpus.corpus_stats(root)
    corpus.write_manifest(root, corpus.Manifest(teacher={"model": "t"}, generation={"top_k": k, "logprob_encoding": encoding},
                                                stats=stats))
    return root
