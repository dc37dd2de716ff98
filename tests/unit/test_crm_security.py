"""Securing CRM calls: bearer token, Standard Webhooks signing, context fields, secrets from
the environment, the host allow-list and the metadata-address policy (README "Securing CRM
calls"). TLS verification itself is proven in test_crm_http.py: an HTTPS CRM with its own CA
is refused without the CA (`test_untrusted_certificate_is_unreachable`) and answers with it
(`test_ca_bundle_makes_the_certificate_trusted`).

Servers are real aiohttp apps on 127.0.0.1; names that must resolve to a metadata address
come from a fake DNS handed to the client under the real policy resolver.
"""

from __future__ import annotations

import base64
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from agi_gateway.app import Gateway
from agi_gateway.settings import GatewaySettings
from crm_resolver.address_policy import AddressPolicy, AddressRefused, is_metadata_address
from crm_resolver.crm_auth import CrmCredentials
from crm_resolver.crm_http import CrmHttpSettings, HttpCrmClient
from crm_resolver.ports import CallContext, CrmUnreachable
from crm_resolver.signing import parse_signing_secret, sign
from shared.node_sources import CheckedSource, NodeStore, YamlFileSource
from shared.nodes import ConfigError, NodeConfig, NodeSet
from tests.unit.test_crm_http import TRUE, AppServer, serve_app
from tools.asterisk_sim import CallScript, run_call

ROOT = Path(__file__).resolve().parents[2]
KEY = bytes(range(32))
SECRET = "whsec_" + base64.b64encode(KEY).decode()
TOKEN = "tok-3f9a.B_x~+/=="
CONTEXT = CallContext(caller_number="+54 11 5555-1234", call_id="1700000000.42")


def crm_node(url: str, **extra: Any) -> NodeConfig:
    return NodeConfig.model_validate(
        {
            "id": "gold",
            "name": "gold-customers",
            "interaction": "crm_true_false",
            "url": url,
            "audio": "customer-id-prompt",
            "on_identified": "1,3",
            "on_not_identified": "1,4",
            **extra,
        }
    )


def readme_verify() -> Callable[..., bool]:
    """The verification snippet of the README, executed as CRM developers would paste it."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Securing CRM calls", 1)[1].split("\n## ", 1)[0]
    [code] = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    verify: Callable[..., bool] = namespace["verify"]
    return verify


class FakeDns(AbstractResolver):
    """Maps names to fixed addresses, like /etc/hosts would."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        address = self.table[host]
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


@pytest.fixture
async def server() -> AsyncIterator[AppServer]:
    async with serve_app() as app_server:
        yield app_server


async def make_client(**kwargs: Any) -> HttpCrmClient:
    settings = kwargs.pop("settings", CrmHttpSettings())
    client = HttpCrmClient(settings, **kwargs)
    await client.start()
    return client


# --- token, signing, context ---------------------------------------------------------------


async def test_off_by_default_the_request_is_plain_omnileads(server: AppServer) -> None:
    """Without the node fields no Authorization, no webhook-* header, only idContact."""
    client = await make_client(credentials=CrmCredentials({"X": "unused"}))
    try:
        assert await client.lookup(crm_node(server.url + "/id"), "123", budget=2, context=CONTEXT)
    finally:
        await client.close()
    [seen] = server.seen
    names = {name.lower() for name in seen.headers}
    assert not names & {"authorization", "webhook-id", "webhook-timestamp", "webhook-signature"}
    assert seen.body == b"idContact=123"


async def test_token_signature_and_context_are_sent_and_verify(server: AppServer) -> None:
    """Token as a bearer header; a Standard Webhooks signature over the exact body (with the
    context fields) that the README's verification snippet accepts, and rejects when the
    body, the timestamp or the secret differ."""
    env = {"CALLERID_CRM_TOKEN_GOLD": TOKEN, "CALLERID_CRM_SECRET_GOLD": SECRET}
    client = await make_client(credentials=CrmCredentials(env))
    node = crm_node(
        server.url + "/id",
        crm_token_env="CALLERID_CRM_TOKEN_GOLD",
        crm_signing_secret_env="CALLERID_CRM_SECRET_GOLD",
        crm_send_context=True,
    )
    try:
        assert await client.lookup(node, "4711", budget=2, context=CONTEXT) == TRUE
        assert await client.lookup(node, "4711", budget=2, context=CONTEXT) == TRUE
    finally:
        await client.close()
    first, second = server.seen
    headers = {name.lower(): value for name, value in first.headers.items()}
    assert headers["authorization"] == f"Bearer {TOKEN}"
    assert first.body == (
        b"idContact=4711&callerNumber=%2B54+11+5555-1234&callId=1700000000.42&nodeId=gold"
    )
    assert re.fullmatch(r"msg_[0-9a-f]{32}", headers["webhook-id"])
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 5
    assert headers["webhook-signature"] == sign(
        KEY, headers["webhook-id"], int(headers["webhook-timestamp"]), first.body
    )
    # Each request has its own id.
    assert first.headers["webhook-id"] != second.headers["webhook-id"]

    verify = readme_verify()
    assert verify(SECRET, headers, first.body)
    assert not verify(SECRET, headers, first.body.replace(b"4711", b"4712"))
    assert not verify("whsec_" + base64.b64encode(b"x" * 32).decode(), headers, first.body)
    stale = {**headers, "webhook-timestamp": str(int(headers["webhook-timestamp"]) - 3600)}
    assert not verify(SECRET, stale, first.body)


def test_signature_matches_the_standard_webhooks_reference_vector() -> None:
    """The signature of the Standard Webhooks reference example (its spec's test vector)."""
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert (
        sign(parse_signing_secret(secret), "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
        == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


@pytest.mark.parametrize(
    ("fields", "env", "message"),
    [
        ({"crm_token_env": "CALLERID_T"}, {}, "crm_token_env: environment variable CALLERID_T"),
        ({"crm_token_env": "CALLERID_T"}, {"CALLERID_T": "  "}, "is not set or empty"),
        (
            {"crm_token_env": "CALLERID_T"},
            {"CALLERID_T": "abc\r\nX-Evil: 1"},
            "crm_token_env: CALLERID_T does not hold a bearer token",
        ),
        (
            {"crm_signing_secret_env": "CALLERID_S"},
            {},
            "crm_signing_secret_env: environment variable CALLERID_S",
        ),
        (
            {"crm_signing_secret_env": "CALLERID_S"},
            {"CALLERID_S": "not-a-whsec"},
            "crm_signing_secret_env: CALLERID_S: must start with 'whsec_'",
        ),
        (
            {"crm_signing_secret_env": "CALLERID_S"},
            {"CALLERID_S": "whsec_!!!"},
            "followed by base64",
        ),
        (
            {"crm_signing_secret_env": "CALLERID_S"},
            {"CALLERID_S": "whsec_" + base64.b64encode(b"short").decode()},
            "key must be 16 to 64 bytes",
        ),
    ],
)
def test_unusable_secrets_are_config_errors_naming_node_and_field(
    fields: dict[str, str], env: dict[str, str], message: str
) -> None:
    """A missing, empty or malformed secret is a ConfigError naming the node and the field,
    and never quoting the secret itself."""
    node = crm_node("https://crm.example.com/id", **fields)
    with pytest.raises(ConfigError) as caught:
        CrmCredentials(env).check([node])
    assert "node 'gold'" in str(caught.value)
    assert message in str(caught.value)
    for value in env.values():
        if value.strip():
            assert value not in str(caught.value)


def test_env_field_names_must_be_variable_names() -> None:
    """crm_token_env must name a variable: anything else is refused at load."""
    from shared.nodes import build_node

    raw = {**crm_node("http://x").model_dump(), "crm_token_env": "A B"}
    with pytest.raises(ConfigError, match="crm_token_env: must name an environment variable"):
        build_node(raw)


NODE_YAML = """
nodes:
  - id: gold
    name: gold-customers
    interaction: crm_true_false
    url: {url}
    audio: customer-id-prompt
    on_identified: "1,3"
    on_not_identified: "1,4"
    on_error: "5,1"
    crm_timeout: 0.5
{extra}
"""


async def test_gateway_does_not_start_and_reload_keeps_the_last_good_config(
    tmp_path: Path,
) -> None:
    """Start-up with a node naming a missing secret fails (ConfigError naming node and
    field); a reload that introduces one is refused and the running config stays."""
    path = tmp_path / "nodes.yaml"
    path.write_text(
        NODE_YAML.format(
            url="http://127.0.0.1:9/id", extra="    crm_token_env: CALLERID_TEST_ABSENT_TOKEN"
        )
    )
    gateway = Gateway(
        GatewaySettings(
            nodes=str(path), embedded=True, agi_listen="127.0.0.1:0", http_listen="127.0.0.1:0"
        )
    )
    try:
        with pytest.raises(ConfigError, match=r"node 'gold': crm_token_env: .*ABSENT_TOKEN"):
            await gateway.start()
    finally:
        await gateway.stop()

    path.write_text(NODE_YAML.format(url="http://127.0.0.1:9/id", extra=""))
    store = NodeStore(CheckedSource(YamlFileSource(path), CrmCredentials({})))
    first = await store.load_initial()
    path.write_text(
        NODE_YAML.format(url="http://127.0.0.1:9/x", extra="    crm_token_env: CALLERID_ABSENT")
    )
    assert await store.reload() is False
    assert store.current is first


# --- where requests may go -----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://169.254.170.2/v2/credentials",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://100.100.100.200/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/",
        "http://[64:ff9b::a9fe:a9fe]/",
        "http://[fe80::1]/",
        "http://0.0.0.0:8080/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://METADATA.GOOGLE.INTERNAL./",
    ],
)
async def test_metadata_urls_are_refused_without_a_connection(url: str) -> None:
    """Link-local and metadata addresses (and names) are CrmUnreachable at once: nothing is
    resolved or sent (the fake DNS would fail the test if asked)."""
    dns = FakeDns({})
    client = await make_client(dns=dns)
    try:
        with pytest.raises(CrmUnreachable, match="refused"):
            await client.lookup(crm_node(url), "1", budget=2, context=CONTEXT)
    finally:
        await client.close()
    assert dns.asked == []


async def test_a_name_resolving_to_a_metadata_address_is_refused_at_connect_time(
    server: AppServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The policy checks the resolved address: crm.internal → 169.254.169.254 is refused
    (logged once for the node, however often asked), while crm.local → 127.0.0.1 goes
    through the same resolver hook to the real server."""
    port = server.url.rsplit(":", 1)[1]
    dns = FakeDns({"crm.internal": "169.254.169.254", "crm.local": "127.0.0.1"})
    client = await make_client(dns=dns)
    caplog.set_level(logging.DEBUG)
    try:
        for _ in range(3):
            with pytest.raises(CrmUnreachable, match=r"resolves to 169\.254\.169\.254"):
                await client.lookup(
                    crm_node(f"http://crm.internal:{port}/id"), "1", budget=2, context=CONTEXT
                )
        answer = await client.lookup(
            crm_node(f"http://crm.local:{port}/id"), "1", budget=2, context=CONTEXT
        )
    finally:
        await client.close()
    assert answer == TRUE
    assert "crm.local" in dns.asked
    assert len(server.seen) == 1
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1
    assert refusals[0].levelno == logging.WARNING


async def test_allow_metadata_lets_a_link_local_crm_through(server: AppServer) -> None:
    """With CALLERID_CRM_ALLOW_METADATA the same name is connected to (here it is a fake
    name for the local server, resolving through the policy)."""
    port = server.url.rsplit(":", 1)[1]
    policy = AddressPolicy(allow_metadata=True)
    client = await make_client(
        settings=CrmHttpSettings(policy=policy), dns=FakeDns({"metadata": "127.0.0.1"})
    )
    try:
        answer = await client.lookup(
            crm_node(f"http://metadata:{port}/id"), "1", budget=2, context=CONTEXT
        )
    finally:
        await client.close()
    assert answer == TRUE


async def test_allow_list(server: AppServer) -> None:
    """With CALLERID_CRM_ALLOWED_HOSTS, listed hosts (exact or *.domain) pass, others are
    CrmUnreachable before any connection."""
    port = server.url.rsplit(":", 1)[1]
    policy = AddressPolicy.from_settings(["127.0.0.1", "*.crm.example"], False)
    dns = FakeDns({"a.crm.example": "127.0.0.1", "crm.example.evil": "127.0.0.1"})
    client = await make_client(settings=CrmHttpSettings(policy=policy), dns=dns)
    try:
        assert await client.lookup(crm_node(server.url + "/id"), "1", budget=2, context=CONTEXT)
        assert await client.lookup(
            crm_node(f"http://a.crm.example:{port}/id"), "1", budget=2, context=CONTEXT
        )
        for host in ("localhost", "crm.example.evil", "crm.example"):
            with pytest.raises(CrmUnreachable, match="not in CALLERID_CRM_ALLOWED_HOSTS"):
                await client.lookup(
                    crm_node(f"http://{host}:{port}/id"), "1", budget=2, context=CONTEXT
                )
    finally:
        await client.close()
    assert len(server.seen) == 2
    assert dns.asked == ["a.crm.example"]


def test_settings_parse_the_allow_list_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CALLERID_CRM_ALLOWED_HOSTS is comma-separated; it reaches the embedded resolver."""
    from crm_resolver.settings import ResolverSettings

    monkeypatch.setenv("CALLERID_CRM_ALLOWED_HOSTS", " crm.example.com, *.corp ,")
    monkeypatch.setenv("CALLERID_CRM_ALLOW_METADATA", "true")
    gateway = GatewaySettings()
    resolver = ResolverSettings.model_validate(gateway.model_dump())
    assert resolver.crm_allowed_hosts == ("crm.example.com", "*.corp")
    assert resolver.crm_allow_metadata is True
    assert ResolverSettings().crm_allowed_hosts == ("crm.example.com", "*.corp")


def test_only_http_and_https(monkeypatch: pytest.MonkeyPatch) -> None:
    """Other schemes are refused at load (ConfigError) and, should one get through, by the
    client's policy."""
    from shared.nodes import build_node

    for url in ("ftp://crm/x", "file:///etc/passwd", "gopher://crm/", "unix:/run/crm.sock"):
        with pytest.raises(ConfigError, match=r"url: must be an http:// or https:// URL"):
            build_node({**crm_node("http://x").model_dump(), "url": url})
        with pytest.raises(AddressRefused):
            AddressPolicy().check_url(url)


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("169.254.169.254", True),
        ("fd00:ec2::254", True),
        ("100.100.100.200", True),
        ("::ffff:169.254.1.1", True),
        ("fe80::1%eth0", True),
        ("127.0.0.1", False),
        ("::1", False),
        ("10.1.2.3", False),
        ("192.168.1.10", False),
        ("100.100.100.201", False),
        ("fd00:ec2::253", False),
        ("8.8.8.8", False),
    ],
)
def test_metadata_address_rule(address: str, refused: bool) -> None:
    """Exactly the link-local/metadata set is refused; loopback and private ranges are not."""
    assert is_metadata_address(address) is refused


async def test_a_refused_crm_is_crm_error_for_the_caller(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """End to end: a node aimed at the metadata service gives the call crm_error and its
    on_error destination; the refusal is logged once at WARNING for two calls."""
    path = tmp_path / "nodes.yaml"
    path.write_text(NODE_YAML.format(url="http://169.254.169.254/latest/meta-data/", extra=""))
    gateway = Gateway(
        GatewaySettings(
            nodes=str(path), embedded=True, agi_listen="127.0.0.1:0", http_listen="127.0.0.1:0"
        )
    )
    await gateway.start()
    caplog.set_level(logging.DEBUG)
    try:
        assert gateway.server is not None
        host, port = gateway.server.address
        results = [
            await run_call(host, port, CallScript(node="gold", entries=[cid]), timeout=10)
            for cid in ("111", "222")
        ]
    finally:
        await gateway.stop()
    for result in results:
        variables = result.variables
        assert variables["OML_IDENT_OUTCOME"] == "crm_error"
        assert (variables["OML_DEST_TYPE"], variables["OML_DEST_ID"]) == ("5", "1")
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert [r.levelno for r in refusals] == [logging.WARNING]


def test_node_credentials_never_show_secrets() -> None:
    """repr() of resolved credentials says set/None, never the token or key."""
    node = crm_node("http://x", crm_token_env="T", crm_signing_secret_env="S")
    credentials = CrmCredentials({"T": TOKEN, "S": SECRET}).for_node(node)
    assert TOKEN not in repr(credentials)
    assert "signing_key=set" in repr(credentials)
    assert NodeSet([node])  # the node itself holds only variable names
    assert TOKEN not in node.model_dump_json()
