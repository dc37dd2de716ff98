"""AMQPS: both services reach RabbitMQ over TLS, always verified, with a CA of their choosing.

The real broker speaks plain AMQP on 5672; a TLS terminator in the test (a certificate made
with openssl for this test only) stands in front of it, the way a TLS-enabled RabbitMQ
listener or a TLS proxy would.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from shared.amqp_link import AmqpLink, amqp_ssl_context

pytestmark = pytest.mark.integration


def make_certificate(folder: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test's certificate", pytrace=False)
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@contextlib.asynccontextmanager
async def tls_front(broker: tuple[str, int], cert: Path, key: Path) -> AsyncIterator[int]:
    """A TLS listener on a free port that pipes each connection to the plain broker."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    pipes: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*broker)
        for task in (
            asyncio.create_task(pipe(reader, up_writer)),
            asyncio.create_task(pipe(up_reader, writer)),
        ):
            pipes.add(task)
            task.add_done_callback(pipes.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(pipes):
            task.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)


async def test_amqps_connects_verified_with_the_configured_ca(
    amqp_url: str, tmp_path: Path
) -> None:
    """With CALLERID_AMQP_CA_BUNDLE naming the broker's CA, an amqps:// URL connects and the
    link declares its channel; without it the same URL is refused by certificate
    verification; a URL asking not to verify is refused outright."""
    cert, key = make_certificate(tmp_path)
    broker = urlsplit(amqp_url)
    async with tls_front((broker.hostname or "127.0.0.1", broker.port or 5672), cert, key) as port:
        url = f"amqps://{broker.username}:{broker.password}@localhost:{port}/"
        link = AmqpLink(
            url, "test-amqps", reconnect_interval=1, ssl_context=amqp_ssl_context(url, str(cert))
        )
        channel = await asyncio.wait_for(link.open(), 20)
        assert not channel.is_closed
        await link.close()

        untrusted = AmqpLink(
            url, "test-amqps", reconnect_interval=1, ssl_context=amqp_ssl_context(url, None)
        )
        with pytest.raises((ssl.SSLCertVerificationError, ConnectionError, OSError)):
            await asyncio.wait_for(untrusted.open(), 20)
        with contextlib.suppress(Exception):
            await untrusted.close()
    with pytest.raises(ValueError, match="no_verify_ssl"):
        amqp_ssl_context(f"{url}?no_verify_ssl=1", None)
    assert amqp_ssl_context(amqp_url, str(cert)) is None  # plain amqp:// has no TLS
