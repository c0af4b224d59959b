"""Serving a student: `distill serve` (vLLM's OpenAI-compatible server, started and stopped whole
by `distill.launcher`) and `distill chat` (a streaming terminal client for any such server)."""
