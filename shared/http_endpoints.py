"""The operational HTTP port of both services: /metrics, /healthz and /readyz.

/healthz answers 200 while the event loop runs (a liveness probe: restart only a wedged
process). /readyz answers 200 only while the service can do its job — config loaded, broker
connected where one is used, not draining — so orchestrators stop sending it work first.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


def build_app(registry: CollectorRegistry, ready: Callable[[], bool]) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(registry))
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        response.charset = "utf-8"
        return response

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        if ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_http(
    host: str, port: int, registry: CollectorRegistry, ready: Callable[[], bool]
) -> web.AppRunner:
    runner = web.AppRunner(build_app(registry, ready), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port actually bound (useful with port 0 in tests)."""
    for address in runner.addresses:
        return int(address[1])
    raise RuntimeError("HTTP server is not listening")
