"""The API key in front of every route of the vLLM server that `distill serve` launches.

vLLM's own key check (`--api-key`) guards only paths under /v1, /v2, /inference and /cohere:
`/invocations` answers chats, and `/tokenize`, `/metrics`, `/load`, `/docs`, ... answer too,
without a key. The launcher loads this middleware into the server process instead
(`--middleware distill.api_key.RequireApiKey`, outermost of all), and hands the key over in
the child's environment (`VLLM_API_KEY`), never on a command line, where `ps` would show it.
Only `/health` stays open: the launcher polls it before it may know the key is right, and it
says nothing but "up".
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # starlette is imported only in the server process: the launcher needs just the names below
    from starlette.types import ASGIApp, Receive, Scope, Send

KEY_VARIABLE = "VLLM_API_KEY"
OPEN_PATHS = frozenset({"/health"})
MIDDLEWARE = f"{__name__}.RequireApiKey"  # the import path vLLM's `--middleware` takes
WEBSOCKET_POLICY_VIOLATION = 1008


class RequireApiKey:
    """ASGI middleware: a request without `Authorization: Bearer <key>` gets 401 (a WebSocket is
    closed with 1008), whatever its path or method, except `OPEN_PATHS`. The key comes from
    `$VLLM_API_KEY` (vLLM adds middleware by class, without arguments)."""

    def __init__(self, app: ASGIApp) -> None:
        key = os.environ.get(KEY_VARIABLE)
        if not key:
            raise RuntimeError(f"{MIDDLEWARE} needs the key in ${KEY_VARIABLE}")
        self.app = app
        self._key_hash = hashlib.sha256(key.encode()).digest()

    def _authorized(self, scope: Scope) -> bool:
        from starlette.datastructures import Headers

        scheme, _, token = (Headers(scope=scope).get("authorization") or "").partition(" ")
        # equal-length digests: the comparison takes the same time whatever the guess
        return scheme.lower() == "bearer" and hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._key_hash)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan: no client behind it
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path in OPEN_PATHS or self._authorized(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": WEBSOCKET_POLICY_VIOLATION})
        from starlette.responses import JSONResponse

        await JSONResponse({"error": "Unauthorized: this server requires its API key as a bearer token"},
                           status_code=401)(scope, receive, send)
