"""Where node configurations come from, and how a running service keeps them current.

What belongs here: reading a source (a YAML file, OMniLeads' Redis hashes) into the raw
mappings `shared.nodes.build_node` validates, and the `NodeStore` that holds the active set.
What does not: the model, its ranges and defaults (`shared.nodes`), and choosing the source
from settings beyond the one `CALLERID_NODES` string (the composition roots do that).

Two sources, chosen by `CALLERID_NODES` (`source_from_setting`):

- a YAML file (the Kubernetes ConfigMap): a top-level mapping with a `nodes:` list; a
  destination is `{type: 1, id: 3}` or OMniLeads' string `"1,3"`. Any other top-level key is
  an error (a typo must not pass silently), except keys starting with `x-`, which hold YAML
  anchors for shared defaults (`<<: *defaults`), as in docker-compose files.
- `redis://host:port/db` (or `rediss://`, `unix://`): OMniLeads' own hashes
  `OML:CUSTOMERID:<id>`, read live, so the gateway can stand beside an existing OMniLeads
  without a second copy of its nodes.

OMniLeads hashes, as OMniLeads writes them (`IdentificadorClienteFamily._create_dict` in
`configuracion_telefonia_app/regeneracion_configuracion_telefonia.py`, stored with redis-py
`hset(key, mapping=...)`, so every value is a string):

| field       | node field        | what OMniLeads stores                                     |
|-------------|-------------------|-----------------------------------------------------------|
| (key)       | id                | `OML:CUSTOMERID:<database id>`                            |
| NAME        | name              | the node's name                                           |
| TYPE        | interaction       | "1" none, "2" crm_true_false, "3" crm_destination         |
| EXTERNALURL | url               | the URL, or "" when there is none                         |
| AUDIO       | audio             | "oml/<file stem>": a sound name relative to Asterisk's    |
|             |                   | sounds directory, extension already removed; kept as is   |
|             |                   | (the "oml/" folder is where the file is). A trailing      |
|             |                   | audio extension, found in hand-written hashes, is cut.    |
| LENGTH      | expected_length   | the length, or "" when not set ("0" is read as not set)   |
| TIMEOUT     | timeout           | seconds, e.g. "5"                                         |
| RETRIES     | attempts          | e.g. "3"                                                  |
| TRUEDST     | on_identified     | "type,id"; absent when the node has no such destination   |
| FALSEDST    | on_not_identified | "type,id"                                                 |

Other fields are ignored (a newer OMniLeads may add some) and logged once at DEBUG. Errors
name the OMniLeads field beside ours, e.g. `timeout (TIMEOUT): ...`, and the exact key.

OMniLeads regenerates its hashes by deleting them all and writing them again, so a read can
fall in between. An empty result is therefore an error (it keeps the last good set on reload,
and at start-up it is far more often a wrong db or prefix than a deliberate empty config). A
partial read is not detectable; the next poll corrects it.

Reload semantics (`NodeStore`):

- The first load must succeed: `load_initial` raises ConfigError and the service stops.
- `reload` activates a new set only when the whole set is valid; anything else keeps the last
  good set in force. A failure is logged once per distinct message (a broken file polled every
  few seconds must not flood the log) and again after the config has been good in between.
- `on_reload(True, nodes)` is called when a different set is activated, `on_reload(False,
  None)` on every failed attempt; reading an unchanged set calls nothing.
- `watch` polls `source.changed()` (file: mtime, size and inode of the target, so the
  symlink swap Kubernetes does on a ConfigMap update counts; Redis: always, one SCAN and one
  pipelined round trip) and reloads when it says so.

Errors: every failure to produce a set is `shared.nodes.ConfigError`, whose message names the
source, the node and the field; foreign exceptions (OSError, YAMLError and the ValueError or
RecursionError PyYAML also raises, RedisError) are translated here, once, with `from exc`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import redis.asyncio as aioredis
import yaml
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from shared.nodes import ConfigError, NodeConfig, NodeSet, build_node
from shared.outcomes import Interaction

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 1 << 20
OML_PREFIX = "OML:CUSTOMERID:"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")

_TOP_LEVEL_KEYS = frozenset({"nodes"})
_EXTENSION_KEY_PREFIX = "x-"

# OMniLeads field -> NodeConfig field.
OML_FIELDS: Mapping[str, str] = {
    "NAME": "name",
    "TYPE": "interaction",
    "EXTERNALURL": "url",
    "AUDIO": "audio",
    "LENGTH": "expected_length",
    "TIMEOUT": "timeout",
    "RETRIES": "attempts",
    "TRUEDST": "on_identified",
    "FALSEDST": "on_not_identified",
}
_FIELD_TO_OML = {ours: theirs for theirs, ours in OML_FIELDS.items()}
# A field name where build_node's message starts a problem: after "': " or "; ".
_OUR_FIELD = re.compile(
    r"(?:^|(?<=: )|(?<=; ))(" + "|".join(_FIELD_TO_OML) + r")(?=[.:])",
)
_AUDIO_EXTENSIONS = frozenset({"wav", "gsm", "sln", "sln16", "ulaw", "alaw", "g722", "mp3"})


class NodeSource(Protocol):
    """Where a NodeSet is read from. `description` is for logs."""

    description: str

    async def load(self) -> NodeSet:
        """The whole current set; ConfigError naming source, node and field."""
        ...

    async def changed(self) -> bool:
        """Whether a reload is worth doing; cheap, and True when unsure."""
        ...

    async def close(self) -> None:
        """Release connections; the source is not used afterwards."""
        ...


# --------------------------------------------------------------------------- YAML file


class YamlFileSource:
    """A YAML file with a top-level `nodes:` list (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.description = f"file {self.path}"
        # The stamp of the file as last read, so changed() is False until it is replaced or
        # edited, including after a failed read (a bad file is not re-read every poll).
        self._stamp: tuple[int, int, int] | None = None
        self._loaded = False

    def _current_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()  # follows symlinks: a ConfigMap swap changes the inode
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    async def changed(self) -> bool:
        return not self._loaded or self._current_stamp() != self._stamp

    async def load(self) -> NodeSet:
        # Parsing a large YAML file with the pure-Python loader takes long enough to stall
        # live calls, so it runs off the event loop.
        return await asyncio.to_thread(self._load_blocking)

    def _load_blocking(self) -> NodeSet:
        where = str(self.path)
        self._stamp = self._current_stamp()
        self._loaded = True
        try:
            with self.path.open("rb") as file:
                data = file.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read: {exc.strerror or exc}") from exc
        if len(data) > MAX_FILE_BYTES:
            raise ConfigError(f"{where}: larger than {MAX_FILE_BYTES} bytes, refused")
        try:
            document = yaml.safe_load(data)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: {_describe_yaml_error(exc)}") from exc
        except RecursionError as exc:
            raise ConfigError(f"{where}: nested too deeply") from exc
        except ValueError as exc:
            # PyYAML's own conversions: integers past Python's digit limit, impossible dates.
            raise ConfigError(f"{where}: a value cannot be read: {str(exc)[:80]}") from exc
        return nodes_from_document(document, where=where)

    async def close(self) -> None:
        return None


def _describe_yaml_error(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem or 'invalid YAML'}"
    return f"invalid YAML: {exc}"


def nodes_from_document(document: Any, *, where: str) -> NodeSet:
    """Validate a parsed YAML document: a mapping with a `nodes:` list of mappings."""
    if not isinstance(document, Mapping):
        raise ConfigError(f"{where}: expected a mapping with a 'nodes:' list")
    unknown = sorted(
        str(key)
        for key in document
        if key not in _TOP_LEVEL_KEYS and not str(key).startswith(_EXTENSION_KEY_PREFIX)
    )
    if unknown:
        raise ConfigError(
            f"{where}: unknown top-level key(s): {', '.join(unknown)} (expected 'nodes')"
        )
    raw_nodes = document.get("nodes")
    if not isinstance(raw_nodes, list):
        raise ConfigError(f"{where}: 'nodes' must be a list")
    for index, raw in enumerate(raw_nodes):
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: nodes[{index}] must be a mapping")
    return _node_set((build_node(raw, where=where) for raw in raw_nodes), where=where)


def _node_set(nodes: Iterable[NodeConfig], *, where: str) -> NodeSet:
    built = list(nodes)  # build errors already name the source
    try:
        return NodeSet(built)
    except ConfigError as exc:  # a duplicate id: NodeSet does not know the source
        raise ConfigError(f"{where}: {exc}") from exc


# --------------------------------------------------------------------------- OMniLeads hashes


def sound_name(stored: str) -> str:
    """OMniLeads' AUDIO value as an Asterisk sound name: a trailing audio extension is cut."""
    stored = stored.strip()
    stem, dot, extension = stored.rpartition(".")
    if dot and "/" not in extension and extension.lower() in _AUDIO_EXTENSIONS:
        return stem
    return stored


def node_from_hash(node_id: str, fields: Mapping[str, str], *, where: str) -> dict[str, Any]:
    """An OMniLeads hash as raw node fields, still to be validated by build_node.

    Unknown fields are dropped here; the caller logs them.
    """
    raw: dict[str, Any] = {"id": node_id}
    for theirs, ours in OML_FIELDS.items():
        value = fields.get(theirs)
        if value is None:
            continue  # absent: build_node reports it if the field is required
        value = value.strip()
        if ours == "interaction":
            try:
                raw[ours] = Interaction.from_omnileads(value)
            except ValueError as exc:
                raise ConfigError(f"{where}: node {node_id!r}: interaction (TYPE): {exc}") from exc
        elif ours == "audio":
            raw[ours] = sound_name(value)
        elif ours == "expected_length":
            if value not in {"", "0"}:
                raw[ours] = value
        elif ours == "url":
            if value:
                raw[ours] = value
        else:
            raw[ours] = value
    return raw


def _with_oml_names(message: str, node_id: str) -> str:
    """Name the OMniLeads field beside ours, e.g. 'timeout (TIMEOUT): ...'."""
    # Only the problems after "node '<id>': " are field names; the prefix holds the key.
    head, sep, problems = message.partition(f"node {node_id!r}: ")
    if not sep:
        return message
    renamed = _OUR_FIELD.sub(lambda m: f"{m.group(1)} ({_FIELD_TO_OML[m.group(1)]})", problems)
    return head + sep + renamed


def redacted(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    return f"{scheme}{sep}{authority}{slash}{path}"


class RedisHashSource:
    """OMniLeads' `OML:CUSTOMERID:<id>` hashes, read live (see the module docstring)."""

    def __init__(self, url: str, *, key_prefix: str = OML_PREFIX, timeout: float = 1.0) -> None:
        self.url = url
        self.key_prefix = key_prefix
        self._where = redacted(url)
        self.description = f"redis {self._where} keys {key_prefix}*"
        self._ignored_fields: set[str] = set()
        # Reloads poll; a failed read is retried at the next poll, so redis-py's own retries
        # would only hold the watcher up.
        self._client = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            retry_on_error=[],
        )

    async def changed(self) -> bool:
        return True  # Redis has no cheap version stamp; a full read is one round trip

    async def load(self) -> NodeSet:
        try:
            keys = sorted(
                [
                    key
                    async for key in self._client.scan_iter(match=f"{self.key_prefix}*", count=1000)
                ]
            )
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                results = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            raise ConfigError(f"cannot read nodes from {self._where}: {exc}") from exc
        if not keys:
            raise ConfigError(f"{self._where}: no {self.key_prefix}* hashes found")
        raws: list[tuple[str, dict[str, Any]]] = []
        for key, fields in zip(keys, results, strict=True):
            where = f"{self._where} key {key}"
            if isinstance(fields, Exception):  # e.g. WRONGTYPE: the key is not a hash
                raise ConfigError(f"{where}: cannot read: {fields}")
            if not fields:
                continue  # deleted between SCAN and HGETALL
            node_id = key[len(self.key_prefix) :]
            self._log_ignored_fields(fields)
            raws.append((node_id, node_from_hash(node_id, fields, where=where)))
        return _node_set((self._build(node_id, raw) for node_id, raw in raws), where=self._where)

    def _build(self, node_id: str, raw: Mapping[str, Any]) -> NodeConfig:
        try:
            return build_node(raw, where=f"{self._where} key {self.key_prefix}{node_id}")
        except ConfigError as exc:
            raise ConfigError(_with_oml_names(str(exc), node_id)) from exc

    def _log_ignored_fields(self, fields: Mapping[str, str]) -> None:
        new = set(fields) - OML_FIELDS.keys() - self._ignored_fields
        if new:
            self._ignored_fields |= new
            log.debug("%s: ignoring field(s) %s", self.description, ", ".join(sorted(new)))

    async def close(self) -> None:
        await self._client.aclose()


def source_from_setting(value: str) -> NodeSource:
    """`CALLERID_NODES`: a redis://, rediss:// or unix:// URL, or else a file path."""
    if value.startswith(REDIS_SCHEMES):
        return RedisHashSource(value)
    return YamlFileSource(os.path.expanduser(value))


# --------------------------------------------------------------------------- the active set


class NodeStore:
    """Holds the active NodeSet; the last good config survives a bad reload."""

    def __init__(
        self,
        source: NodeSource,
        *,
        on_reload: Callable[[bool, NodeSet | None], None] | None = None,
    ) -> None:
        self.source = source
        self._on_reload = on_reload
        self._current: NodeSet | None = None
        self._last_error: str | None = None

    @property
    def current(self) -> NodeSet:
        if self._current is None:
            raise RuntimeError("nodes are not loaded yet: call load_initial() first")
        return self._current

    async def load_initial(self) -> NodeSet:
        """The first load; a ConfigError here must stop the service. Calls no on_reload."""
        self._current = await self.source.load()
        log.info("loaded %d node(s) from %s", len(self._current), self.source.description)
        return self._current

    async def reload(self) -> bool:
        """Read the source again; True if a different, valid set is now active."""
        try:
            nodes = await self.source.load()
        except ConfigError as exc:
            message = str(exc)
            if message != self._last_error:
                log.error("node reload failed, keeping the last good nodes: %s", message)
                self._last_error = message
            if self._on_reload is not None:
                self._on_reload(False, None)
            return False
        if self._last_error is not None:
            log.info("nodes from %s are valid again", self.source.description)
            self._last_error = None
        if self._current is not None and tuple(nodes) == tuple(self._current):
            return False
        self._current = nodes
        log.info("activated %d node(s) from %s", len(nodes), self.source.description)
        if self._on_reload is not None:
            self._on_reload(True, nodes)
        return True

    async def watch(self, interval: float) -> None:
        """Reload whenever the source says it changed; runs until cancelled."""
        while True:
            if await self.source.changed():
                await self.reload()
            await asyncio.sleep(interval)
