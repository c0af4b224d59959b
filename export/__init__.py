"""The export stage: a trained student as a file other runtimes load (GGUF for llama.cpp / Ollama)."""
