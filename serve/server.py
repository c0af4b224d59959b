"""`distill serve`: a model behind vLLM's OpenAI-compatible server until Ctrl-C / SIGTERM
(the launcher itself is `distill.launcher`, shared with eval and the demo)."""

from __future__ import annotations

import json
import signal
import sys

from distill.config import ServeConfig
from distill.launcher import Server, ServerError, start_server


def serve(cfg: ServeConfig) -> int:
    """`distill serve`: start, print how to call it, then run until SIGINT/SIGTERM or a crash."""
    print(f"starting vLLM for {cfg.lora or cfg.model}: waiting until it answers /health ...", file=sys.stderr)
    # SIGTERM takes the same path as Ctrl-C: stop the server's whole process group, then exit.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    server = start_server(cfg)
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
