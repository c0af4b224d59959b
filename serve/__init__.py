"""Serving a student behind vLLM's OpenAI server (issue 5)."""
