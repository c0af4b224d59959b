"""Teacher corpora: prompts -> vLLM teacher -> responses with top-k logprobs per token."""

from distill.generate.job import generate, score

__all__ = ["generate", "score"]
