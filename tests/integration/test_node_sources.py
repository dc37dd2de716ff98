"""Node sources (YAML file, OMniLeads' Redis hashes) and the NodeStore's reload semantics.

The Redis tests use the machine's real Redis, in db 13 (flushed at the start of each of them);
everything else needs no service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from shared.destination import Destination
from shared.node_sources import (
    MAX_FILE_BYTES,
    NodeStore,
    RedisHashSource,
    SourceRead,
    YamlFileSource,
    sound_name,
    source_from_setting,
)
from shared.nodes import ConfigError, NodeSet, build_nodes
from shared.outcomes import Interaction
from shared.settings import CommonSettings

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "nodes.yaml"
REDIS_DB = 13

GOLD_YAML = """\
nodes:
  - id: 1
    name: gold-customers
    interaction: crm_true_false
    url: https://crm.example.com/omnileads/identify
    audio: oml/customer-id-prompt
    expected_length: 5
    timeout: 5
    attempts: 3
    on_identified: {type: 1, id: 3}
    on_not_identified: {type: 1, id: 4}
  - id: 2
    name: any-entry
    audio: oml/account-prompt
    timeout: 7
    attempts: 2
    on_identified: "9,1"
    on_not_identified: "1,6"
"""

# What OMniLeads' IdentificadorClienteFamily writes for the same two nodes (redis-py turns
# the ints into strings; url and length are "" when unset; AUDIO is "oml/<stem>").
GOLD_HASHES: dict[str, dict[str, Any]] = {
    "OML:CUSTOMERID:1": {
        "NAME": "gold-customers",
        "TYPE": 2,
        "EXTERNALURL": "https://crm.example.com/omnileads/identify",
        "AUDIO": "oml/customer-id-prompt",
        "LENGTH": 5,
        "TIMEOUT": 5,
        "RETRIES": 3,
        "TRUEDST": "1,3",
        "FALSEDST": "1,4",
    },
    "OML:CUSTOMERID:2": {
        "NAME": "any-entry",
        "TYPE": 1,
        "EXTERNALURL": "",
        "AUDIO": "oml/account-prompt",
        "LENGTH": "",
        "TIMEOUT": 7,
        "RETRIES": 2,
        "TRUEDST": "9,1",
        "FALSEDST": "1,6",
    },
}


def write(path: Path, text: str) -> Path:
    """Replace the file the way a ConfigMap update does: a new inode, swapped in at once."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


async def load_yaml(tmp_path: Path, text: str) -> NodeSet:
    return await YamlFileSource(write(tmp_path / "nodes.yaml", text)).load()


async def yaml_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        await load_yaml(tmp_path, text)
    return str(caught.value)


# --------------------------------------------------------------------------- YAML file


async def test_example_file_loads() -> None:
    """examples/nodes.yaml is valid and holds the nodes the end-to-end tests depend on."""
    nodes = await YamlFileSource(EXAMPLE).load()
    assert [(n.id, n.name) for n in nodes] == [
        ("1", "gold-customers"),
        ("2", "any-entry"),
        ("3", "crm-router"),
        ("4", "second-step"),
    ]
    gold, anyone, router, second = (nodes.get(i) for i in "1234")
    assert gold is not None
    assert anyone is not None
    assert router is not None
    assert second is not None
    assert gold.interaction is Interaction.CRM_TRUE_FALSE
    assert gold.url == "http://127.0.0.1:8081/identify"
    assert (gold.expected_length, gold.timeout, gold.attempts, gold.crm_timeout) == (5, 5, 3, 2)
    assert gold.on_error == Destination(type=1, id=9)
    assert anyone.interaction is Interaction.NONE
    assert (anyone.min_length, anyone.max_length, anyone.attempts) == (3, 10, 2)
    assert anyone.on_no_input == Destination(type=3, id=1)
    assert router.interaction is Interaction.CRM_DESTINATION
    assert router.url == "http://127.0.0.1:8081/route"
    assert router.on_error == Destination(type=5, id=1)
    assert (second.audio, second.expected_length) == ("account-prompt", 4)
    assert (second.on_identified, second.on_not_identified) == (
        Destination(type=1, id=8),
        Destination(type=1, id=4),
    )


async def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    """A YAML syntax error names the file and the line it was found on."""
    message = await yaml_error(tmp_path, "nodes:\n  - id: 1\n    name: [unclosed\n  - id: 2\n")
    assert str(tmp_path / "nodes.yaml") in message
    assert "line 4" in message


async def test_bad_field_names_file_node_and_field(tmp_path: Path) -> None:
    """A bad value names the file, the node and the field."""
    message = await yaml_error(tmp_path, GOLD_YAML.replace("timeout: 7", "timeout: 0"))
    assert message.startswith(f"{tmp_path / 'nodes.yaml'}: node '2': timeout:")


@pytest.mark.parametrize("key", ["node", "Nodes", "defaults"])
async def test_unknown_top_level_key_is_refused(tmp_path: Path, key: str) -> None:
    """A misspelt or unknown top-level key is an error, not silently ignored."""
    message = await yaml_error(tmp_path, GOLD_YAML + f"{key}: []\n")
    assert f"unknown top-level key(s): {key}" in message


async def test_x_keys_hold_anchors_for_shared_defaults(tmp_path: Path) -> None:
    """`x-` top-level keys may hold YAML anchors merged into nodes with `<<:`."""
    text = """\
x-defaults: &defaults
  audio: customer-id-prompt
  attempts: 3
  on_not_identified: {type: 1, id: 4}
nodes:
  - <<: *defaults
    id: a
    name: first
    on_identified: "1,3"
  - <<: *defaults
    id: b
    name: second
    attempts: 1
    on_identified: "1,5"
"""
    nodes = await load_yaml(tmp_path, text)
    assert [(n.id, n.attempts, n.audio) for n in nodes] == [
        ("a", 3, "customer-id-prompt"),
        ("b", 1, "customer-id-prompt"),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "expected a mapping"),
        ("- id: 1\n", "expected a mapping"),
        ("nodes: {id: 1}\n", "'nodes' must be a list"),
        ("x-only: 1\n", "'nodes' must be a list"),
        ("nodes:\n  - id: 1\n  - just-a-string\n", "nodes[1] must be a mapping"),
        ("nodes: []\n---\nnodes: []\n", "line 2"),
    ],
)
async def test_malformed_documents_are_refused(tmp_path: Path, text: str, expected: str) -> None:
    """Documents of the wrong shape are refused with a message naming the file and the problem."""
    message = await yaml_error(tmp_path, text)
    assert message.startswith(str(tmp_path / "nodes.yaml"))
    assert expected in message


async def test_duplicate_ids_name_the_file(tmp_path: Path) -> None:
    """Two nodes with one id are refused, naming the file and the id."""
    message = await yaml_error(tmp_path, GOLD_YAML.replace("id: 2", "id: 1"))
    assert message.startswith(str(tmp_path / "nodes.yaml"))
    assert "node '1': id: duplicate" in message


async def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A missing file is a ConfigError naming the path, not an OSError."""
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match=r"absent\.yaml: cannot read"):
        await YamlFileSource(path).load()


async def test_oversized_file_is_refused(tmp_path: Path) -> None:
    """A file over 1 MiB is refused before it is parsed."""
    message = await yaml_error(tmp_path, GOLD_YAML + "#" * MAX_FILE_BYTES)
    assert "larger than" in message


async def test_changed_follows_the_file(tmp_path: Path) -> None:
    """changed() is True before the first load, False after it, True once the file is replaced."""
    path = write(tmp_path / "nodes.yaml", GOLD_YAML)
    source = YamlFileSource(path)
    assert await source.changed()
    await source.load()
    assert not await source.changed()
    write(path, GOLD_YAML)  # same content, new inode: worth a (cheap, no-op) reload
    assert await source.changed()
    await source.load()
    assert not await source.changed()
    path.unlink()
    assert await source.changed()


async def test_a_bad_file_is_not_reread_until_it_changes(tmp_path: Path) -> None:
    """After a failed load, changed() stays False until the file changes again."""
    path = write(tmp_path / "nodes.yaml", "nodes: [")
    source = YamlFileSource(path)
    with pytest.raises(ConfigError):
        await source.load()
    assert not await source.changed()
    write(path, GOLD_YAML)
    assert await source.changed()


def test_source_from_setting() -> None:
    """CALLERID_NODES picks the Redis source for redis URLs and the file source otherwise."""
    assert isinstance(source_from_setting("/etc/callerid/nodes.yaml"), YamlFileSource)
    assert isinstance(source_from_setting("examples/nodes.yaml"), YamlFileSource)
    for url in ("redis://127.0.0.1:6379/3", "rediss://host:6380/0"):
        source = source_from_setting(url)
        assert isinstance(source, RedisHashSource)
        assert source.key_prefix == "OML:CUSTOMERID:"


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        ("oml/customer-id-prompt", "oml/customer-id-prompt"),
        ("oml/customer-id-prompt.wav", "oml/customer-id-prompt"),
        ("prompt.GSM", "prompt"),
        (" oml/v1.2 ", "oml/v1.2"),
    ],
)
def test_sound_name(stored: str, expected: str) -> None:
    """AUDIO keeps OMniLeads' "oml/" folder (Asterisk needs it) and loses an audio extension."""
    assert sound_name(stored) == expected


# --------------------------------------------------------------------------- Redis hashes


def redis_db_url(base_url: str, db: int) -> str:
    parts = urlsplit(base_url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", "", ""))


@pytest.fixture
async def oml_redis(redis_base_url: str) -> AsyncIterator[tuple[str, aioredis.Redis]]:
    """The dedicated db, flushed, and a client to write hashes into it as OMniLeads does."""
    url = redis_db_url(redis_base_url, REDIS_DB)
    client = aioredis.Redis.from_url(url, decode_responses=True)
    await client.flushdb()
    try:
        yield url, client
    finally:
        await client.aclose()


@pytest.fixture
async def redis_source(
    oml_redis: tuple[str, aioredis.Redis],
) -> AsyncIterator[RedisHashSource]:
    source = RedisHashSource(oml_redis[0])
    try:
        yield source
    finally:
        await source.close()


async def write_hashes(client: aioredis.Redis, hashes: dict[str, dict[str, Any]]) -> None:
    """HSET with a mapping, as OMniLeads' AbstractRedisFamily._create_family does."""
    async with client.pipeline(transaction=False) as pipe:
        for key, fields in hashes.items():
            pipe.hset(key, mapping=fields)
        await pipe.execute()


async def redis_error(source: RedisHashSource) -> str:
    with pytest.raises(ConfigError) as caught:
        await source.load()
    return str(caught.value)


@pytest.mark.integration
async def test_omnileads_hashes_load_like_the_equivalent_yaml(
    tmp_path: Path, oml_redis: tuple[str, aioredis.Redis], redis_source: RedisHashSource
) -> None:
    """Hashes written as OMniLeads writes them give the same nodes as the equivalent YAML."""
    await write_hashes(oml_redis[1], GOLD_HASHES)
    await oml_redis[1].set("OML:CAMP:1", "other families are not read")
    from_redis = await redis_source.load()
    from_yaml = await load_yaml(tmp_path, GOLD_YAML)
    assert list(from_redis) == list(from_yaml)
    any_entry = from_redis.get("2")
    assert any_entry is not None
    assert (any_entry.url, any_entry.expected_length) == (None, None)


@pytest.mark.integration
async def test_length_zero_means_not_set(
    oml_redis: tuple[str, aioredis.Redis], redis_source: RedisHashSource
) -> None:
    """LENGTH "0" is read as "not set", like the empty string OMniLeads writes."""
    await write_hashes(
        oml_redis[1],
        {**GOLD_HASHES, "OML:CUSTOMERID:2": {**GOLD_HASHES["OML:CUSTOMERID:2"], "LENGTH": 0}},
    )
    node = (await redis_source.load()).get("2")
    assert node is not None
    assert node.expected_length is None


@pytest.mark.integration
async def test_unknown_fields_are_ignored_and_logged_once(
    oml_redis: tuple[str, aioredis.Redis],
    redis_source: RedisHashSource,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A field OMniLeads may add is ignored, and mentioned once at DEBUG, not every poll."""
    hashes = {key: {**fields, "NEWFIELD": "x"} for key, fields in GOLD_HASHES.items()}
    await write_hashes(oml_redis[1], hashes)
    with caplog.at_level(logging.DEBUG, logger="shared.node_sources"):
        assert len(await redis_source.load()) == 2
        assert len(await redis_source.load()) == 2
    mentions = [r for r in caplog.records if "NEWFIELD" in r.getMessage()]
    assert len(mentions) == 1
    assert mentions[0].levelno == logging.DEBUG


@pytest.mark.integration
@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("TIMEOUT", "0", "timeout (TIMEOUT):"),
        ("RETRIES", "lots", "attempts (RETRIES):"),
        ("TYPE", "7", "interaction (TYPE): TYPE must be 1, 2 or 3"),
        ("TRUEDST", "1;3", "on_identified (TRUEDST):"),
        ("LENGTH", "31", "expected_length (LENGTH):"),
        ("EXTERNALURL", "", "url (EXTERNALURL): required"),
        ("AUDIO", "", "audio (AUDIO):"),
    ],
)
async def test_bad_hash_names_key_node_and_omnileads_field(
    oml_redis: tuple[str, aioredis.Redis],
    redis_source: RedisHashSource,
    field: str,
    value: str,
    expected: str,
) -> None:
    """A bad hash is refused naming the key, the node and the OMniLeads-facing field."""
    bad = {**GOLD_HASHES["OML:CUSTOMERID:1"], field: value}
    await write_hashes(
        oml_redis[1], {"OML:CUSTOMERID:1": bad, "OML:CUSTOMERID:2": GOLD_HASHES["OML:CUSTOMERID:2"]}
    )
    message = await redis_error(redis_source)
    assert f"/{REDIS_DB} key OML:CUSTOMERID:1: node '1': " in message
    assert expected in message


@pytest.mark.integration
async def test_type_3_without_true_destination_loads(
    oml_redis: tuple[str, aioredis.Redis], redis_source: RedisHashSource
) -> None:
    """OMniLeads writes TRUEDST only when the node has an "identified" destination, and a
    type-3 node (the CRM names the route) needs none: such a hash loads, on_identified unset;
    a type-2 hash without TRUEDST is still refused, naming the field."""
    routed_by_crm = dict(GOLD_HASHES["OML:CUSTOMERID:1"], TYPE=3)
    del routed_by_crm["TRUEDST"]
    await write_hashes(oml_redis[1], {"OML:CUSTOMERID:1": routed_by_crm})
    nodes = await redis_source.load()
    node = nodes.get("1")
    assert node is not None
    assert node.on_identified is None
    assert node.interaction is Interaction.CRM_DESTINATION
    true_false = dict(routed_by_crm, TYPE=2)
    await write_hashes(oml_redis[1], {"OML:CUSTOMERID:1": true_false})
    assert "on_identified (TRUEDST): required" in await redis_error(redis_source)


@pytest.mark.integration
async def test_missing_false_destination_is_named(
    oml_redis: tuple[str, aioredis.Redis], redis_source: RedisHashSource
) -> None:
    """A hash without FALSEDST (a node saved without it) names the missing field."""
    hashes = {"OML:CUSTOMERID:1": dict(GOLD_HASHES["OML:CUSTOMERID:1"])}
    del hashes["OML:CUSTOMERID:1"]["FALSEDST"]
    await write_hashes(oml_redis[1], hashes)
    assert "on_not_identified (FALSEDST): Field required" in await redis_error(redis_source)


@pytest.mark.integration
async def test_a_key_that_is_not_a_hash_is_named(
    oml_redis: tuple[str, aioredis.Redis], redis_source: RedisHashSource
) -> None:
    """A key under the prefix that is not a hash is reported by name, not as a crash."""
    await write_hashes(oml_redis[1], GOLD_HASHES)
    await oml_redis[1].set("OML:CUSTOMERID:9", "not a hash")
    assert "key OML:CUSTOMERID:9: cannot read" in await redis_error(redis_source)


@pytest.mark.integration
async def test_no_hashes_is_an_error(redis_source: RedisHashSource) -> None:
    """An empty read (wrong db, or OMniLeads mid-regeneration) is an error, not an empty set."""
    assert "no OML:CUSTOMERID:* hashes found" in await redis_error(redis_source)


@pytest.mark.integration
async def test_key_prefix_is_configurable(
    oml_redis: tuple[str, aioredis.Redis], unique_name: str
) -> None:
    """Another key prefix reads only its own hashes (e.g. a test or a second tenant)."""
    await write_hashes(oml_redis[1], GOLD_HASHES)
    await write_hashes(
        oml_redis[1], {f"{unique_name}:5": {**GOLD_HASHES["OML:CUSTOMERID:1"], "NAME": "five"}}
    )
    source = RedisHashSource(oml_redis[0], key_prefix=f"{unique_name}:")
    try:
        assert [(n.id, n.name) for n in await source.load()] == [("5", "five")]
    finally:
        await source.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_unreachable_redis_is_a_config_error_without_the_password() -> None:
    """Redis down is a ConfigError naming the URL (password hidden) and the reason."""
    source = RedisHashSource(f"redis://user:s3cret@127.0.0.1:{closed_port()}/0", timeout=0.5)
    try:
        message = await redis_error(source)
    finally:
        await source.close()
    assert message.startswith("cannot read nodes from redis://***@127.0.0.1:")
    assert "s3cret" not in message


# --------------------------------------------------------------------------- OMniLeads read-back


@pytest.mark.integration
async def test_read_back_is_given_to_every_node_from_the_hashes(
    oml_redis: tuple[str, aioredis.Redis],
) -> None:
    """With `confirm=True` every node built from a hash reads the entry back and asks for the
    given prompt, as OMniLeads' dialplan does; nothing else about the node changes."""
    await write_hashes(oml_redis[1], GOLD_HASHES)
    plain = RedisHashSource(oml_redis[0])
    confirming = RedisHashSource(
        oml_redis[0], confirm=True, confirm_audio="oml/es/oml-to-confirm-press-one"
    )
    try:
        before, after = list(await plain.load()), list(await confirming.load())
    finally:
        await plain.close()
        await confirming.close()
    assert [n.confirm for n in before] == [False, False]
    assert [(n.confirm, n.confirm_audio) for n in after] == [
        (True, "oml/es/oml-to-confirm-press-one")
    ] * 2
    assert after == [
        n.model_copy(update={"confirm": True, "confirm_audio": "oml/es/oml-to-confirm-press-one"})
        for n in before
    ]


@pytest.mark.integration
async def test_source_from_setting_reads_back_by_default_and_can_be_turned_off(
    oml_redis: tuple[str, aioredis.Redis],
) -> None:
    """CALLERID_NODES=redis://...: nodes confirm with OMniLeads' own prompt unless
    CALLERID_OMNILEADS_CONFIRM is off, and the prompt follows CALLERID_OMNILEADS_CONFIRM_AUDIO."""
    await write_hashes(oml_redis[1], GOLD_HASHES)
    sources = [
        source_from_setting(oml_redis[0]),
        source_from_setting(oml_redis[0], omnileads_confirm_audio="callerid-confirm"),
        source_from_setting(oml_redis[0], omnileads_confirm=False),
    ]
    try:
        loaded = [list(await source.load()) for source in sources]
    finally:
        for source in sources:
            await source.close()
    assert [{(n.confirm, n.confirm_audio) for n in nodes} for nodes in loaded] == [
        {(True, "oml/en/oml-to-confirm-press-one")},
        {(True, "callerid-confirm")},
        {(False, "callerid-confirm")},  # the node's own default prompt, unused
    ]


async def test_omnileads_read_back_does_not_touch_a_yaml_file(tmp_path: Path) -> None:
    """A YAML file says per node whether to confirm: the OMniLeads setting leaves it alone."""
    path = write(tmp_path / "nodes.yaml", GOLD_YAML)
    source = source_from_setting(str(path), omnileads_confirm=True)
    assert isinstance(source, YamlFileSource)
    assert [n.confirm for n in await source.load()] == [False, False]


def test_omnileads_read_back_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """CALLERID_OMNILEADS_CONFIRM is on unless turned off; the prompt must be a sound name."""
    monkeypatch.delenv("CALLERID_OMNILEADS_CONFIRM", raising=False)
    monkeypatch.delenv("CALLERID_OMNILEADS_CONFIRM_AUDIO", raising=False)
    defaults = CommonSettings()
    assert (defaults.omnileads_confirm, defaults.omnileads_confirm_audio) == (
        True,
        "oml/en/oml-to-confirm-press-one",
    )
    monkeypatch.setenv("CALLERID_OMNILEADS_CONFIRM", "false")
    monkeypatch.setenv("CALLERID_OMNILEADS_CONFIRM_AUDIO", "oml/es/oml-to-confirm-press-one")
    chosen = CommonSettings()
    assert (chosen.omnileads_confirm, chosen.omnileads_confirm_audio) == (
        False,
        "oml/es/oml-to-confirm-press-one",
    )
    for bad in ("oml/../secret", "/etc/passwd", "two words", "oml/x;Hangup"):
        monkeypatch.setenv("CALLERID_OMNILEADS_CONFIRM_AUDIO", bad)
        with pytest.raises(ValidationError, match="omnileads_confirm_audio"):
            CommonSettings()


# --------------------------------------------------------------------------- NodeStore


def nodes_named(*names: str) -> NodeSet:
    return build_nodes(
        {
            "id": index,
            "name": name,
            "audio": "prompt",
            "on_identified": "1,3",
            "on_not_identified": "1,4",
        }
        for index, name in enumerate(names, start=1)
    )


class FakeSource:
    """A source whose next read the test sets: a set, a whole-source error, or a read with
    some nodes refused."""

    description = "fake"
    strict_start = True

    def __init__(self, result: NodeSet | ConfigError | SourceRead) -> None:
        self.result = result
        self.closed = False

    async def read(self) -> SourceRead:
        if isinstance(self.result, ConfigError):
            raise self.result
        if isinstance(self.result, SourceRead):
            return self.result
        return SourceRead(tuple(self.result))

    async def load(self) -> NodeSet:
        return (await self.read()).strict()

    async def changed(self) -> bool:
        return True

    async def close(self) -> None:
        self.closed = True


class Calls:
    def __init__(self) -> None:
        self.seen: list[tuple[bool, NodeSet | None]] = []

    def __call__(self, ok: bool, nodes: NodeSet | None) -> None:
        self.seen.append((ok, nodes))


async def test_initial_load_failure_propagates() -> None:
    """A bad config at start-up raises (the service must fail loudly), and no set is current."""
    store = NodeStore(FakeSource(ConfigError("node '1': timeout: bad")))
    with pytest.raises(ConfigError, match="timeout"):
        await store.load_initial()
    with pytest.raises(RuntimeError, match="not loaded"):
        _ = store.current


async def test_bad_reload_keeps_the_last_good_set() -> None:
    """A failed reload keeps the active set and reports on_reload(False, None)."""
    good = nodes_named("gold")
    source = FakeSource(good)
    calls = Calls()
    store = NodeStore(source, on_reload=calls)
    assert tuple(await store.load_initial()) == tuple(good)
    source.result = ConfigError("node '1': timeout: bad")
    assert await store.reload() is False
    assert tuple(store.current) == tuple(good)
    assert calls.seen == [(False, None)]


async def test_good_reload_swaps_and_unchanged_reload_does_not() -> None:
    """A different valid set is activated and reported; re-reading the same set is a no-op."""
    source = FakeSource(nodes_named("gold"))
    calls = Calls()
    store = NodeStore(source, on_reload=calls)
    await store.load_initial()
    source.result = nodes_named("gold")  # equal content, new objects
    assert await store.reload() is False
    assert calls.seen == []
    renamed = nodes_named("platinum")
    source.result = renamed
    assert await store.reload() is True
    assert tuple(store.current) == tuple(renamed)
    assert calls.seen == [(True, store.current)]


async def test_repeated_errors_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """The same reload error is logged once; a different one, or a relapse, is logged again."""
    source = FakeSource(nodes_named("gold"))
    store = NodeStore(source)
    await store.load_initial()

    def errors() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]

    with caplog.at_level(logging.INFO, logger="shared.node_sources"):
        source.result = ConfigError("first problem")
        for _ in range(3):
            await store.reload()
        assert len(errors()) == 1
        source.result = ConfigError("second problem")
        await store.reload()
        await store.reload()
        assert len(errors()) == 2
        source.result = nodes_named("gold")
        await store.reload()
        assert any("valid again" in r.getMessage() for r in caplog.records)
        source.result = ConfigError("second problem")
        await store.reload()
    assert len(errors()) == 3
    assert "first problem" in errors()[0]


async def test_watch_picks_up_file_changes_and_survives_bad_ones(tmp_path: Path) -> None:
    """watch() activates an edited file, keeps the last good set through a broken edit."""
    path = write(tmp_path / "nodes.yaml", GOLD_YAML)
    events: asyncio.Queue[tuple[bool, NodeSet | None]] = asyncio.Queue()
    store = NodeStore(YamlFileSource(path), on_reload=lambda ok, n: events.put_nowait((ok, n)))
    await store.load_initial()
    watcher = asyncio.create_task(store.watch(0.01))
    try:
        write(path, GOLD_YAML.replace("gold-customers", "platinum"))
        ok, nodes = await asyncio.wait_for(events.get(), 5)
        assert ok
        assert nodes is store.current
        assert store.current.names() == ["platinum", "any-entry"]

        write(path, "nodes: [")
        ok, nodes = await asyncio.wait_for(events.get(), 5)
        assert (ok, nodes) == (False, None)
        assert store.current.names() == ["platinum", "any-entry"]

        write(path, GOLD_YAML)
        ok, _ = await asyncio.wait_for(events.get(), 5)
        assert ok
        assert store.current.names() == ["gold-customers", "any-entry"]
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher
    assert watcher.cancelled()
