"""Launching vLLM's OpenAI-compatible server for a model, waiting for it, and stopping it whole.

The server runs in its own session (process group): vLLM forks an engine-core process, and a
stop signals the whole group, so nothing is left behind. `start_server` is what `distill
serve`, `distill eval`, the demo and the tests use.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

from distill.config import EngineConfig, ServeConfig
from distill.engine import ServerError, engine_kwargs, server_flags

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's `--max-lora-rank` accepts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_name(model: str) -> str:
    path = Path(model)
    return path.name if path.exists() else model


def lora_rank(adapter: Path) -> int:
    config = Path(adapter) / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"`{adapter}`: not a LoRA adapter directory (no adapter_config.json)")
    r = json.loads(config.read_text())["r"]
    return next((rank for rank in LORA_RANKS if rank >= r), r)


def server_command(model: str, cfg: EngineConfig, *, name: str, host: str, port: int, lora: Path | None = None,
                   lora_name: str | None = None, api_key: str | None = None, extra: list[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           *server_flags(engine_kwargs(model, cfg)), "--served-model-name", name, "--host", host, "--port", str(port)]
    if lora is not None:
        cmd += ["--enable-lora", "--lora-modules", f"{lora_name}={lora}", "--max-lora-rank", str(lora_rank(lora))]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd + list(extra)


class Server:
    """A running server: `url` (ends in /v1), `model` (the name to request), `stop()`."""

    def __init__(self, process: subprocess.Popen, url: str, model: str, log_path: Path, api_key: str | None):
        self.process, self.url, self.model, self.log_path, self.api_key = process, url, model, log_path, api_key

    def log_tail(self, lines: int = 20) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))

    def wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        health = self.url.removesuffix("/v1") + "/health"
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"the vLLM server exited with code {self.process.returncode} during startup; "
                                  f"its last lines ({self.log_path}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(health, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"the vLLM server did not answer {health} within {timeout:.0f} s; "
                          f"its last lines ({self.log_path}):\n{self.log_tail()}")

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM the server's process group, SIGKILL what is left after `grace` seconds."""
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(self.process.pid, signal.SIGKILL)  # stragglers of the group (engine core)
        self.process.wait()
        return self.process.returncode

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def start_server(model: str, cfg: EngineConfig | None = None, *, lora: Path | None = None, name: str | None = None,
                 host: str = "127.0.0.1", port: int | None = None, api_key: str | None = None,
                 extra: list[str] = (), timeout: float = 600.0, log_path: Path | None = None) -> Server:
    """Start the server and return once `/health` answers. With `lora`, the adapter is served
    as `name` and the base model as `name-base`."""
    cfg = cfg or EngineConfig()
    port = port or free_port()
    name = name or served_name(str(lora.parent if lora and lora.name == "adapter" else lora or model))
    base_name = f"{name}-base" if lora else name
    cmd = server_command(model, cfg, name=base_name, host=host, port=port, lora=Path(lora) if lora else None,
                         lora_name=name, api_key=api_key, extra=extra)
    log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="distill-serve-", suffix=".log")[1])
    with open(log_path, "ab") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    client_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    server = Server(process, f"http://{client_host}:{port}/v1", name, log_path, api_key)
    try:
        server.wait_ready(timeout)
    except BaseException:
        server.stop(grace=5)
        raise
    return server


def serve(cfg: ServeConfig) -> int:
    """`distill serve`: start, print how to call it, then run until SIGINT/SIGTERM or a crash."""
    api_key = cfg.api_key or os.environ.get("VLLM_API_KEY")
    print(f"starting vLLM for {cfg.lora or cfg.model}: waiting until it answers /health ...", file=sys.stderr)
    # SIGTERM takes the same path as Ctrl-C: stop the server's whole process group, then exit.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    server = start_server(cfg.model, cfg, lora=cfg.lora, name=cfg.served_model_name, host=cfg.host, port=cfg.port,
                          api_key=api_key, extra=cfg.vllm_args, timeout=cfg.startup_timeout)
    try:
        print(ready_message(server), flush=True)
        code = server.process.wait()
        raise ServerError(f"the vLLM server exited with code {code}; its last lines ({server.log_path}):\n"
                          f"{server.log_tail()}")
    except KeyboardInterrupt:
        print("stopping the server ...", file=sys.stderr)
        return 0
    finally:
        server.stop()


def ready_message(server: Server) -> str:
    auth = ' -H "Authorization: Bearer $VLLM_API_KEY"' if server.api_key else ""
    body = json.dumps({"model": server.model, "messages": [{"role": "user", "content": "Hello!"}]})
    return "\n".join([
        f"ready: {server.url}  model: {server.model}  (server log: {server.log_path})",
        "",
        f"  curl {server.url}/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'",
        "",
        "  import os; from openai import OpenAI",
        f"  client = OpenAI(base_url='{server.url}', api_key=os.environ.get('VLLM_API_KEY', 'EMPTY'))",
        f"  reply = client.chat.completions.create(model='{server.model}', messages=[{{'role': 'user', 'content': 'Hello!'}}])",
        "  print(reply.choices[0].message.content)",
        "",
        f"  distill chat --url {server.url} --model {server.model}",
        "",
        "Ctrl-C stops it.",
    ])
