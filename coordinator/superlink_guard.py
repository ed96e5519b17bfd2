"""Flower's SuperLink with its Control and Runtime APIs answering local connections only.

Flower 1.41 serves the Fleet API (SuperNodes), the Control API (submit runs, register
SuperNodes) and the Runtime API (the ServerApp) on one HTTP port, and open-source Flower does
not authenticate Control API callers. Exposed to a network, anyone reaching the port could
register their own SuperNode key (defeating SuperNode authentication) or submit a run whose
code the coordinator and every device would execute. fleetfl's service drives the Control and
Runtime APIs from the coordinator host itself, so this launcher runs the unmodified
``flower-superlink`` command and wraps its ASGI app (at ``uvicorn.run``) in
:class:`LocalAdminOnly`: ``/v1/control/*`` and ``/v1/runtime/*`` get ``403`` unless the peer
is a loopback address or the coordinator's own bind address. The Fleet API, TLS and
SuperNode authentication stay Flower's.

    python -m fleetfl.coordinator.superlink_guard [flower-superlink arguments]
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

ADMIN_PREFIXES = ("/v1/control", "/v1/runtime")
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_BODY = b"fleetfl: the Control and Runtime APIs accept connections from the coordinator host only\n"


def is_local(client: Any, server: Any) -> bool:
    """Whether the peer ``client`` (host, port) is this host: loopback or the bind address."""
    if not client:
        return False  # a Unix socket or an unknown peer: refuse rather than guess
    host = str(client[0])
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        return False
    return bool(server) and host == str(server[0])


class LocalAdminOnly:
    """ASGI middleware: 403 for admin API paths from non-local peers; all else passes."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and str(scope.get("path", "")).startswith(ADMIN_PREFIXES)
                and not is_local(scope.get("client"), scope.get("server"))):
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/plain"),
                                    (b"content-length", str(len(_BODY)).encode())]})
            await send({"type": "http.response.body", "body": _BODY})
            return
        await self.app(scope, receive, send)


def main() -> None:
    """Run ``flower-superlink`` with ``sys.argv[1:]``, its app wrapped in the guard."""
    import uvicorn
    from flwr.superlink.cli.flower_superlink import flower_superlink

    run = uvicorn.run

    def guarded_run(app: Any, *args: Any, **kwargs: Any) -> None:
        run(LocalAdminOnly(app), *args, **kwargs)

    uvicorn.run = guarded_run  # flower_superlink calls uvicorn.run(app=...) exactly once
    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
