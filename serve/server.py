"""`distill serve`: a model behind vLLM's OpenAI-compatible server until Ctrl-C (the CLI turns
SIGTERM and SIGHUP into the same KeyboardInterrupt: `distill.lifetime`). The launcher itself is
`distill.launcher`, shared with eval and the demo; with `--ui`, also the browser chat page of
`distill.serve.ui`, optionally with a teacher beside the student."""

from __future__ import annotations

import json
import sys
import time

from distill.config import ServeConfig
from distill.launcher import (
    Server,
    ServerError,
    check_port,
    check_startup,
    start_server,
)


def serve(cfg: ServeConfig) -> int:
    """`distill serve`: start, print how to call it, then run until a KeyboardInterrupt (Ctrl-C;
    SIGTERM or SIGHUP under the CLI), which it re-raises once the servers are stopped, or a crash."""
    check_startup(cfg)
    if cfg.ui:  # the page starts after the model has loaded: check its port before that
        check_port(cfg.host, cfg.ui_port, "ui_port")
    adapters = f" with {', '.join(cfg.lora)}" if cfg.lora else ""
    print(f"starting vLLM for {cfg.model}{adapters}: waiting until it answers /health ...", file=sys.stderr)
    servers: list[Server] = []
    page = None
    try:
        servers.append(start_server(cfg))
        if cfg.ui:
            page = _launch_page(cfg, servers)
        print(ready_message(servers[0], page.local_url if page is not None else None), flush=True)
        while all(s.process.poll() is None for s in servers):
            time.sleep(0.5)
        dead = next(s for s in servers if s.process.poll() is not None)
        raise ServerError(f"the vLLM server exited with code {dead.process.returncode}; its last lines "
                          f"({dead.log_path}):\n{dead.log_tail()}")
    except KeyboardInterrupt:  # the CLI exits 128 + the signal, as every command does
        print("stopping ...", file=sys.stderr)
        raise
    finally:
        if page is not None:
            page.close()
        for server in servers:
            server.stop()


def _launch_page(cfg: ServeConfig, servers: list[Server]):
    """The chat page for `servers[0]`; a `compare` model is started as a second server (appended
    to `servers`, so that it is stopped with the first)."""
    # Gradio takes seconds to import: only with --ui.
    from distill.serve.ui import Endpoint, launch_ui

    student = servers[0]
    teacher = None
    if cfg.compare and cfg.compare.startswith(("http://", "https://")):
        teacher = Endpoint.at(cfg.compare, student.api_key)
    elif cfg.compare:
        print(f"starting vLLM for the teacher {cfg.compare} ...", file=sys.stderr)
        servers.append(start_server(cfg.model_copy(
            update={"model": cfg.compare, "port": 0, "served_model_name": "teacher", "lora": []})))
        teacher = Endpoint(servers[1].url, servers[1].model, servers[1].api_key)
    return launch_ui(Endpoint(student.url, student.model, student.api_key), teacher, api_key=student.api_key,
                     host=cfg.host, port=cfg.ui_port, models=student.models)


def ready_message(server: Server, page_url: str | None = None) -> str:
    auth = ' -H "Authorization: Bearer $VLLM_API_KEY"' if server.api_key else ""
    body = json.dumps({"model": server.model, "messages": [{"role": "user", "content": "Hello!"}]})
    login = "  (log in with the API key as the password)" if server.api_key else ""
    page = [f"chat page: {page_url}{login}"] if page_url else []
    where = server.url if server.listen_url == server.url else f"{server.listen_url} (from this machine: {server.url})"
    return "\n".join([
        f"ready: {where}  model: {server.model}  (server log: {server.log_path})",
        *page,
        *([f"models: {', '.join(server.models)}  (each a `model` to request)"] if len(server.models) > 1 else []),
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
