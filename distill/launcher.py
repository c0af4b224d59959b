"""Launching vLLM's OpenAI-compatible server for a model, waiting for it, and stopping it whole
(a running one is verified and spoken to by `distill.teacher_client`).

The server runs in its own session (process group): vLLM starts an engine-core process, and a
stop signals the whole group, so nothing is left behind. If the process that launched it dies
(even by SIGKILL), the server is killed too and its engine follows (`distill.lifetime`).
`start_server` is what `distill serve`, `distill eval`'s cost measurement, the demo and the
tests use; it lives in the core so that every stage may launch a server without importing
another stage. Its log goes to the file the caller names (eval: its output directory), or to a
temporary file that is removed when the server is stopped, and kept (and named in the error)
when the server failed.
"""

from __future__ import annotations

import ipaddress
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
from collections.abc import Sequence
from pathlib import Path

from distill.adapters import Adapter, load_adapters, max_lora_rank
from distill.api_key import KEY_VARIABLE
from distill.api_key import MIDDLEWARE as API_KEY_MIDDLEWARE
from distill.config import EngineConfig, ServeConfig
from distill.engine import check_model, engine_kwargs, server_flags
from distill.lifetime import command_dying_with_parent
from distill.models import model_source


class ServerError(RuntimeError):
    """A launched vLLM server failed to start or died."""


class EndpointError(ServerError):
    """A running server (`--urls`, `--teacher-endpoint`) cannot be used or stopped answering."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(host: str, port: int, field: str = "port") -> None:
    """One line now instead of a bind error deep in the server's log later (0: any port, free)."""
    if not port:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServerError(f"`{field}` {port} on {host} is not available ({e.strerror}): stop what uses it or "
                              "choose another port (0: any free port)") from None


def is_loopback(host: str) -> bool:
    """True when `host` (an address or a name) reaches only this machine."""
    try:
        return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback
                   for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM))
    except (socket.gaierror, ValueError):
        return False


def check_startup(cfg: ServeConfig) -> None:
    """What would make the server fail to start, found in a second instead of in its log; and a
    server open to the network without a key, refused unless asked for by name."""
    check_model(cfg.model, "model")
    serving_adapters(cfg)
    if not (cfg.api_key or os.environ.get(KEY_VARIABLE) or cfg.insecure_public or is_loopback(cfg.host)):
        raise ServerError(f"`host` {cfg.host} exposes the model to the network without an API key: set $VLLM_API_KEY "
                          "(or `api_key`), or pass `--insecure-public` to serve it to anyone who can reach the port")
    check_port(cfg.host, cfg.port)


def serving_adapters(cfg: ServeConfig) -> list[Adapter]:
    """`cfg.lora`, each found and checked against `cfg.model` (one line for the first problem)."""
    return load_adapters(cfg.lora, cfg.model, cfg.served_model_name) if cfg.lora else []


def base_model_name(cfg: ServeConfig, adapters: list[Adapter]) -> str:
    """The name the base model is served under: `served_model_name` or the model's own; beside a
    lone bare `--lora DIR` (which takes that name), `NAME-base`."""
    lone_unnamed = len(cfg.lora) == 1 and "=" not in cfg.lora[0]
    name = f"{adapters[0].name}-base" if lone_unnamed else cfg.served_model_name or served_name(cfg.model)
    if name in {a.name for a in adapters}:
        raise ServerError(f"the base model and a LoRA adapter are both named `{name}`: rename the adapter (NAME=DIR)")
    return name


def served_name(model: str) -> str:
    """What clients request: a directory's name; for a converted GGUF its file's stem (the cache
    directory is named by the file's hash, which goes to the log instead)."""
    path = Path(model)
    source = model_source(model) if path.is_dir() else None
    if source is not None:
        print(f"{source.gguf} (sha256 {source.sha256}) is served from its conversion {model}", file=sys.stderr)
        return Path(source.gguf).stem
    return path.name if path.exists() else model


def server_command(model: str, cfg: EngineConfig, *, name: str, host: str, port: int, adapters: Sequence[Adapter] = (),
                   api_key: bool = False, extra: list[str] = ()) -> list[str]:
    """The server's command line: the base model as `name`, each adapter as its own name. With
    `api_key`, our key middleware guards every route; the key itself goes in the child's
    environment (`server_environment`), never here."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           *server_flags(engine_kwargs(model, cfg)), "--served-model-name", name, "--host", host, "--port", str(port)]
    if adapters:
        # one engine holds every adapter at once (`--max-loras`): a request for any never waits for a swap
        cmd += ["--enable-lora", "--lora-modules", *(f"{a.name}={a.path}" for a in adapters),
                "--max-lora-rank", str(max_lora_rank(list(adapters))), "--max-loras", str(len(adapters))]
    if api_key:
        cmd += ["--middleware", API_KEY_MIDDLEWARE]
    return cmd + list(extra)


def server_environment(api_key: str | None) -> dict[str, str]:
    """The child's environment: the key in `$VLLM_API_KEY` (read by our middleware and by vLLM's
    own /v1 check), or no such variable at all when the server runs without a key."""
    env = {k: v for k, v in os.environ.items() if k != KEY_VARIABLE}
    return {**env, KEY_VARIABLE: api_key} if api_key else env


class Server:
    """A running server: `url` (ends in /v1; the address this machine's clients use), `listen_url`
    (the address it is bound to: 0.0.0.0 is every interface), `model` (the name to request by
    default: the first adapter's, else the model's), `models` (every name it serves), `stop()`."""

    def __init__(self, process: subprocess.Popen, url: str, model: str, log_path: Path, api_key: str | None,
                 temporary_log: bool = False, listen_url: str | None = None, models: Sequence[str] = ()):
        self.process, self.url, self.model, self.log_path, self.api_key = process, url, model, log_path, api_key
        self.temporary_log, self.listen_url = temporary_log, listen_url or url
        self.models = list(models) or [model]

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
        self.stop(keep_log=True)
        raise ServerError(f"the vLLM server did not answer {health} within {timeout:.0f} s; "
                          f"its last lines ({self.log_path}):\n{self.log_tail()}")

    def stop(self, grace: float = 30.0, keep_log: bool = False) -> int | None:
        """SIGTERM the server's process group, SIGKILL what is left of it after `grace` seconds.
        The whole group, not only the server, gets that time: the engine process and
        multiprocessing's resource tracker exit after it, unlinking vLLM's shared memory, which
        a SIGKILL would leave in /dev/shm. A temporary log goes unless `keep_log` or the server
        had already died (an error names it)."""
        was_running = self.process.poll() is None
        deadline = time.monotonic() + grace
        _signal_group(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        while _signal_group(self.process.pid, 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal_group(self.process.pid, signal.SIGKILL)
        self.process.wait()
        if self.temporary_log and was_running and not keep_log:
            self.log_path.unlink(missing_ok=True)
        return self.process.returncode

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pid: int, sig: int) -> bool:
    """Signal the process group `pid` leads; False when none of it is left (signal 0: only ask)."""
    try:
        os.killpg(pid, sig)
        return True
    except ProcessLookupError:
        return False


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/v1" if ":" in host else f"http://{host}:{port}/v1"


def start_server(cfg: ServeConfig, log_path: Path | None = None) -> Server:
    """Start the server and return once `/health` answers (`cfg.port` 0: any free port). With
    `cfg.lora`, each adapter is served under its name (NAME=DIR; a lone bare DIR: as
    `served_model_name`, and the base model as `NAME-base`), the base model under
    `served_model_name` or its own name."""
    check_startup(cfg)
    adapters, host = serving_adapters(cfg), cfg.host
    port = cfg.port or free_port()
    base_name = base_model_name(cfg, adapters)
    api_key = cfg.api_key or os.environ.get(KEY_VARIABLE)
    cmd = server_command(cfg.model, cfg, name=base_name, host=host, port=port, adapters=adapters,
                         api_key=bool(api_key), extra=cfg.vllm_args)
    temporary_log = log_path is None
    if temporary_log:
        fd, log_path = tempfile.mkstemp(prefix="distill-serve-", suffix=".log")
        os.close(fd)
    log_path = Path(log_path)
    with open(log_path, "wb") as log:
        # Called from the main thread: the parent-death signal belongs to the thread that forks.
        process = subprocess.Popen(command_dying_with_parent(cmd), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, env=server_environment(api_key))
    client_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    names = [a.name for a in adapters] + [base_name]
    server = Server(process, _url(client_host, port), names[0], log_path, api_key, temporary_log,
                    listen_url=_url(host or "0.0.0.0", port), models=names)
    try:
        server.wait_ready(cfg.startup_timeout)
    except BaseException as e:
        server.stop(grace=5, keep_log=not isinstance(e, KeyboardInterrupt))
        raise
    return server


def server_root(url: str) -> str:
    """`http://host:port/v1/` -> `http://host:port`: vLLM serves /tokenize and /health at the root."""
    return url.rstrip("/").removesuffix("/v1")
