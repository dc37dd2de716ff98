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
- `redis://host:port/db` (or `rediss://`, `unix://`, `redis+sentinel://`: `shared.redis_url`):
  OMniLeads' own hashes `OML:CUSTOMERID:<id>`, read live, so the gateway can stand beside an
  existing OMniLeads without a second copy of its nodes.

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

Read-back: OMniLeads' dialplan always reads the entry back and asks for 1, and its hashes have
no field for it. `RedisHashSource(confirm=True, confirm_audio=...)` gives every node it builds
`confirm: true` and that prompt, so a switch-over keeps what callers hear; `source_from_setting`
passes `CALLERID_OMNILEADS_CONFIRM` (on by default) and `CALLERID_OMNILEADS_CONFIRM_AUDIO`.
The class itself defaults to off: it then reads exactly what the hashes say.

OMniLeads regenerates its hashes by deleting them all and writing them again, so a read can
fall in between. An empty result is therefore an error (it keeps the last good set on reload,
and at start-up it is far more often a wrong db or prefix than a deliberate empty config). A
partial read is not detectable; the next poll corrects it.

Each node stands alone (`NodeStore`): a source is read into the nodes that validated and,
per node id, why each other one did not (`SourceRead`); one bad node never takes the others
down, and a bad edit of a node keeps that node's last good version in force.

- The first load: a YAML file is all or nothing (`strict_start`: it is one reviewed artifact,
  and a deploy with a bad node should fail loudly); OMniLeads' hashes, edited live by its
  administrators, start with the nodes that are valid, each bad one logged with node and
  field. A source that cannot be read at all stops the service (ConfigError).
- `reload` builds the new set node by node: valid nodes are taken as read, a node that became
  invalid keeps its last good version, a node that was never valid stays out, a deleted node
  goes. Cross-node rules (unique names, type-9 destinations naming a configured node) are
  checked on that set and leave out only the nodes that break them. A source that cannot be
  read keeps everything as it is. Each problem is logged once per distinct message, and once
  more when the node is valid again.
- `on_reload(True, nodes)` is called when a different set is activated, `on_reload(False,
  None)` on every attempt that refused something (the whole source or some node); reading an
  unchanged, clean set calls nothing. `rejected` says which nodes are refused now, and why.
- Polls are cheap even with thousands of nodes: a node whose raw fields have not changed since
  the last read is not validated again, and validation of many changed nodes runs off the
  event loop, so a reload does not stall live calls.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml
from redis.exceptions import RedisError

from shared.nodes import ConfigError, NodeConfig, NodeSet, build_node
from shared.outcomes import Interaction
from shared.redis_url import parse_redis_url, redacted, sync_client

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 1 << 20
OML_PREFIX = "OML:CUSTOMERID:"
# OMniLeads' own "to confirm press one" prompt (its dialplan plays
# oml/${CHANNEL(language)}/oml-to-confirm-press-one): CALLERID_OMNILEADS_CONFIRM_AUDIO's default.
OMNILEADS_CONFIRM_AUDIO = "oml/en/oml-to-confirm-press-one"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "rediss+sentinel://")

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


@dataclass(frozen=True)
class SourceRead:
    """One read of a source: the nodes that validated, in order, and why each other one did
    not (by node id; the message names source, node and field)."""

    nodes: tuple[NodeConfig, ...]
    rejected: Mapping[str, str] = field(default_factory=dict)

    def strict(self) -> NodeSet:
        """All or nothing: the set, or ConfigError naming every refused node."""
        if self.rejected:
            raise ConfigError("; ".join(self.rejected.values()))
        return NodeSet(self.nodes)


class NodeSource(Protocol):
    """Where nodes are read from. `description` is for logs."""

    description: str
    # Whether a bad node at start-up stops the service (else it starts without that node).
    strict_start: bool

    async def read(self) -> SourceRead:
        """Every node, each validated on its own; ConfigError only when the source as a whole
        cannot be read (unreachable, unparseable, empty)."""
        ...

    async def load(self) -> NodeSet:
        """The whole current set, all or nothing; ConfigError naming source, node and field."""
        ...

    async def changed(self) -> bool:
        """Whether a reload is worth doing; cheap, and True when unsure."""
        ...

    async def close(self) -> None:
        """Release connections; the source is not used afterwards."""
        ...


class _Builder:
    """Validates raw nodes, remembering the result per node id and raw fields, so a poll that
    reads the same fields again validates nothing (sources call it off the event loop)."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[Any, NodeConfig | ConfigError]] = {}
        self.validations = 0  # how many nodes were validated (tests look)

    def build(
        self, raws: list[tuple[str, Mapping[str, Any], Callable[[], NodeConfig]]]
    ) -> list[tuple[str, NodeConfig | ConfigError]]:
        """`raws`: (node id, raw fields, how to build it); results in the same order."""
        todo = []
        for node_id, raw, build in raws:
            known = self._known.get(node_id)
            if known is None or known[0] != raw:
                todo.append((node_id, raw, build))
        built = self._build_all(todo)
        self._known = {
            node_id: built.get(node_id) or self._known[node_id] for node_id, _, _ in raws
        }
        return [(node_id, self._known[node_id][1]) for node_id, _, _ in raws]

    def _build_all(
        self, todo: list[tuple[str, Mapping[str, Any], Callable[[], NodeConfig]]]
    ) -> dict[str, tuple[Any, NodeConfig | ConfigError]]:
        done: dict[str, tuple[Any, NodeConfig | ConfigError]] = {}
        for node_id, raw, build in todo:
            self.validations += 1
            try:
                done[node_id] = (raw, build())
            except ConfigError as exc:
                done[node_id] = (raw, exc)
        return done


def _split(built: Iterable[tuple[str, NodeConfig | ConfigError]], *, where: str) -> SourceRead:
    nodes: list[NodeConfig] = []
    rejected: dict[str, str] = {}
    seen: set[str] = set()
    for node_id, result in built:
        if node_id in seen:
            rejected.setdefault(node_id, f"{where}: node {node_id!r}: id: duplicate node id")
            continue
        seen.add(node_id)
        if isinstance(result, ConfigError):
            rejected[node_id] = str(result)
        else:
            nodes.append(result)
    return SourceRead(tuple(nodes), rejected)


# --------------------------------------------------------------------------- YAML file


class YamlFileSource:
    """A YAML file with a top-level `nodes:` list (see the module docstring)."""

    strict_start = True

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
        return (await self.read()).strict()

    async def read(self) -> SourceRead:
        # Parsing a large YAML file with the pure-Python loader takes long enough to stall
        # live calls, so it runs off the event loop.
        return await asyncio.to_thread(self._read_blocking)

    def _read_blocking(self) -> SourceRead:
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
        return read_document(document, where=where)

    async def close(self) -> None:
        return None


def _describe_yaml_error(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem or 'invalid YAML'}"
    return f"invalid YAML: {exc}"


def read_document(document: Any, *, where: str) -> SourceRead:
    """Validate a parsed YAML document, node by node: a mapping with a `nodes:` list."""
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
    built: list[tuple[str, NodeConfig | ConfigError]] = []
    for index, raw in enumerate(raw_nodes):
        raw_id = raw.get("id") if isinstance(raw, Mapping) else None
        node_id = str(raw_id)[:64] if isinstance(raw_id, str | int) else f"nodes[{index}]"
        if not isinstance(raw, Mapping):
            built.append((node_id, ConfigError(f"{where}: nodes[{index}] must be a mapping")))
            continue
        try:
            built.append((node_id, build_node(raw, where=where)))
        except ConfigError as exc:
            built.append((node_id, exc))
    return _split(built, where=where)


def nodes_from_document(document: Any, *, where: str) -> NodeSet:
    """All or nothing: the document's nodes, or ConfigError naming each bad one."""
    read = read_document(document, where=where)
    try:
        return read.strict()
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from exc


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


class RedisHashSource:
    """OMniLeads' `OML:CUSTOMERID:<id>` hashes, read live (see the module docstring)."""

    strict_start = False  # edited live by OMniLeads' administrators: one bad hash must not
    # keep the service from starting with the others

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = OML_PREFIX,
        timeout: float = 1.0,
        confirm: bool = False,
        confirm_audio: str = OMNILEADS_CONFIRM_AUDIO,
    ) -> None:
        self.url = url
        self.key_prefix = key_prefix
        # Not in the hashes: applied to every node built (see the module docstring).
        self._read_back: dict[str, Any] = (
            {"confirm": True, "confirm_audio": confirm_audio} if confirm else {}
        )
        self._where = redacted(url)
        self.description = f"redis {self._where} keys {key_prefix}*"
        self._ignored_fields: set[str] = set()
        # Reloads poll; a failed read is retried at the next poll, so redis-py's own retries
        # would only hold the watcher up.
        self._builder = _Builder()
        # Bytes, not text: one hash with a byte that is not UTF-8 must fail that node alone,
        # not the whole read (redis-py would raise UnicodeDecodeError for the pipeline).
        # A synchronous client, used from a worker thread: parsing thousands of hashes in
        # redis-py's Python parser held the event loop for up to 0.6 s per poll.
        # A primary found through Sentinel too (`shared.redis_url`); a bad URL is a ConfigError.
        target = parse_redis_url(url, setting="CALLERID_NODES")
        self._client = sync_client(
            target, timeout=timeout, setting="CALLERID_NODES", decode_responses=False
        )

    async def changed(self) -> bool:
        return True  # Redis has no cheap version stamp; a full read is one round trip

    async def load(self) -> NodeSet:
        return (await self.read()).strict()

    async def read(self) -> SourceRead:
        return await asyncio.to_thread(self._read_blocking)

    def _read_blocking(self) -> SourceRead:
        try:
            keys = sorted(self._client.scan_iter(match=f"{self.key_prefix}*".encode(), count=1000))
            with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                results = pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            raise ConfigError(f"cannot read nodes from {self._where}: {exc}") from exc
        if not keys:
            raise ConfigError(f"{self._where}: no {self.key_prefix}* hashes found")
        raws: list[tuple[str, Mapping[str, Any], Callable[[], NodeConfig]]] = []
        for raw_key, fields in zip(keys, results, strict=True):
            key = raw_key.decode("utf-8", "backslashreplace")
            node_id = key[len(self.key_prefix) :]
            if not fields:
                continue  # deleted between SCAN and HGETALL
            raws.append((node_id, fields, self._builder_for(key, node_id, fields)))
        return _split(self._builder.build(raws), where=self._where)

    def _builder_for(self, key: str, node_id: str, fields: object) -> Callable[[], NodeConfig]:
        """How to build the node of one hash: anything wrong with it, down to a byte that is
        not UTF-8, is that node's ConfigError alone."""
        where = f"{self._where} key {key}"

        def build() -> NodeConfig:
            if isinstance(fields, Exception):  # e.g. WRONGTYPE: the key is not a hash
                raise ConfigError(f"{where}: cannot read: {fields}")
            assert isinstance(fields, dict)
            text: dict[str, str] = {}
            for name, value in fields.items():
                field = name.decode("utf-8", "backslashreplace")
                try:
                    text[field] = value.decode("utf-8")
                except UnicodeDecodeError:
                    ours = OML_FIELDS.get(field, field)
                    raise ConfigError(
                        f"{where}: node {node_id!r}: {ours} ({field}): not valid UTF-8"
                    ) from None
            self._log_ignored_fields(text)
            raw = {**node_from_hash(node_id, text, where=where), **self._read_back}
            try:
                return build_node(raw, where=where)
            except ConfigError as exc:
                raise ConfigError(_with_oml_names(str(exc), node_id)) from exc

        return build

    def _log_ignored_fields(self, fields: Mapping[str, str]) -> None:
        new = set(fields) - OML_FIELDS.keys() - self._ignored_fields
        if new:
            self._ignored_fields |= new
            log.debug("%s: ignoring field(s) %s", self.description, ", ".join(sorted(new)))

    async def close(self) -> None:
        await asyncio.to_thread(self._client.close)


def source_from_setting(
    value: str,
    *,
    omnileads_confirm: bool = True,
    omnileads_confirm_audio: str = OMNILEADS_CONFIRM_AUDIO,
) -> NodeSource:
    """`CALLERID_NODES`: a redis://, rediss:// or unix:// URL, or else a file path.

    `omnileads_confirm` / `omnileads_confirm_audio` are `CALLERID_OMNILEADS_CONFIRM` /
    `_AUDIO` (same defaults): the read-back given to nodes from OMniLeads' hashes. A YAML file
    says per node whether to confirm, so they do not apply to it.
    """
    if value.startswith(REDIS_SCHEMES):
        return RedisHashSource(
            value, confirm=omnileads_confirm, confirm_audio=omnileads_confirm_audio
        )
    return YamlFileSource(os.path.expanduser(value))


# --------------------------------------------------------------------------- the active set


class NodeCheck(Protocol):
    def check_node(self, node: NodeConfig) -> None:
        """ConfigError (naming the node and field) when this process cannot run the node."""
        ...


class CheckedSource:
    """A `NodeSource` whose nodes must also pass a check of this process (a resolver's: the
    CRM secrets a node names are in its environment). A node that fails it is refused like
    any other bad node: alone, keeping its last good version on a reload."""

    def __init__(self, source: NodeSource, check: NodeCheck) -> None:
        self._source = source
        self._check = check
        self.description = source.description
        self.strict_start = source.strict_start

    async def load(self) -> NodeSet:
        return (await self.read()).strict()

    async def read(self) -> SourceRead:
        read = await self._source.read()
        nodes: list[NodeConfig] = []
        rejected = dict(read.rejected)
        for node in read.nodes:
            try:
                self._check.check_node(node)
            except ConfigError as exc:
                rejected[node.id] = f"{self.description}: {exc}"
            else:
                nodes.append(node)
        return SourceRead(tuple(nodes), rejected)

    async def changed(self) -> bool:
        return await self._source.changed()

    async def close(self) -> None:
        await self._source.close()


class NodeStore:
    """Holds the active NodeSet, node by node: a bad node never takes the others down, and a
    bad edit keeps the node's last good version (see the module docstring)."""

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
        self._rejected: dict[str, str] = {}

    @property
    def current(self) -> NodeSet:
        if self._current is None:
            raise RuntimeError("nodes are not loaded yet: call load_initial() first")
        return self._current

    @property
    def rejected(self) -> Mapping[str, str]:
        """The nodes refused by the last read, and why (a node keeping its last good version
        is listed too)."""
        return self._rejected

    async def load_initial(self) -> NodeSet:
        """The first load; a ConfigError here must stop the service. Calls no on_reload."""
        read = await self.source.read()
        if read.rejected and self.source.strict_start:
            raise ConfigError("; ".join(read.rejected.values()))
        self._current = self._assemble(read)
        log.info("loaded %d node(s) from %s", len(self._current), self.source.description)
        return self._current

    async def reload(self) -> bool:
        """Read the source again; True if a different set is now active."""
        try:
            read = await self.source.read()
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
        # Thousands of nodes take long enough to assemble and compare to stall live calls.
        nodes, same = await asyncio.to_thread(self._assemble_and_compare, read)
        if self._rejected and self._on_reload is not None:
            self._on_reload(False, None)
        if same:
            return False
        self._current = nodes
        log.info("activated %d node(s) from %s", len(nodes), self.source.description)
        if self._on_reload is not None:
            self._on_reload(True, nodes)
        return True

    def _assemble_and_compare(self, read: SourceRead) -> tuple[NodeSet, bool]:
        nodes = self._assemble(read)
        return nodes, self._current is not None and tuple(nodes) == tuple(self._current)

    def _assemble(self, read: SourceRead) -> NodeSet:
        """The set to run: the valid nodes read, the last good version of each node that
        became invalid, minus the nodes that break a cross-node rule."""
        previous = self._current
        candidates = {node.id: node for node in read.nodes}
        for node_id in read.rejected:
            last_good = previous.get(node_id) if previous is not None else None
            if last_good is not None:
                candidates[node_id] = last_good
        nodes, stranded = NodeSet.lenient(candidates.values())
        rejected = {**read.rejected}
        for node_id, message in stranded.items():
            rejected.setdefault(node_id, f"{self.source.description}: {message}")
        self._report(rejected, nodes)
        return nodes

    def _report(self, rejected: dict[str, str], nodes: NodeSet) -> None:
        """Each problem once per distinct message, and once more when the node is fine."""
        for node_id, message in rejected.items():
            if self._rejected.get(node_id) != message:
                kept = "keeping its last good version" if nodes.get(node_id) else "not in service"
                log.error("node %s refused (%s): %s", node_id, kept, message)
        for node_id in self._rejected.keys() - rejected.keys():
            log.info("node %s from %s is valid again", node_id, self.source.description)
        self._rejected = rejected

    async def watch(self, interval: float) -> None:
        """Reload whenever the source says it changed; runs until cancelled."""
        while True:
            if await self.source.changed():
                await self.reload()
            await asyncio.sleep(interval)
