"""Where node configurations come from, and how a running service keeps them current.

Two sources, chosen by `CALLERID_NODES` (`source_from_setting`):

- a YAML file (the Kubernetes ConfigMap): a top-level mapping with a `nodes:` list; a
  destination is `{type: 1, id: 3}` or OMniLeads' string `"1,3"`;
- `redis://host:port/db`: OMniLeads' own hashes `OML:CUSTOMERID:<id>`, read live, so the
  gateway can stand beside an existing OMniLeads without a second copy of its nodes.

OMniLeads hash fields (everything else in a hash is ignored):

| field         | node field          | notes                                              |
|---------------|---------------------|----------------------------------------------------|
| NAME          | name                |                                                    |
| TYPE          | interaction         | 1 none, 2 crm_true_false, 3 crm_destination        |
| EXTERNALURL   | url                 | empty for TYPE 1                                   |
| AUDIO         | audio               | a path or file name: directory and extension cut   |
| LENGTH        | expected_length     | empty or 0 = not set                               |
| TIMEOUT       | timeout             | seconds                                            |
| RETRIES       | attempts            |                                                    |
| TRUEDST       | on_identified       | "type,id"                                          |
| FALSEDST      | on_not_identified   | "type,id"                                          |

Validation is `shared.nodes.build_node` for both sources, so a bad value gives the same message
naming the node and the field whichever source it came from.

Reload semantics (`NodeStore`): the first load must succeed (start-up fails loudly otherwise);
later loads replace the active set only when the whole new set is valid. A bad reload is logged
once per distinct error and the last good set stays in force.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import redis.asyncio as aioredis
import yaml
from redis.exceptions import RedisError

from shared.nodes import ConfigError, NodeSet, build_node

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 1 << 20
OML_PREFIX = "OML:CUSTOMERID:"
_TOP_LEVEL_KEYS = {"nodes"}
_OML_FIELDS = {
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
_FIELD_TO_OML = {ours: theirs for theirs, ours in _OML_FIELDS.items()}


class NodeSource(Protocol):
    description: str

    async def load(self) -> NodeSet:
        """The whole current set; ConfigError naming source, node and field."""
        ...

    async def changed(self) -> bool:
        """Whether a reload is worth doing (cheap)."""
        ...

    async def close(self) -> None: ...


class YamlFileSource:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.description = f"file {self.path}"
        self._stamp: tuple[int, int, int] | None = None

    def _current_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    async def changed(self) -> bool:
        return self._current_stamp() != self._stamp

    async def load(self) -> NodeSet:
        self._stamp = self._current_stamp()
        where = str(self.path)
        try:
            size = self.path.stat().st_size
            if size > MAX_FILE_BYTES:
                raise ConfigError(f"{where}: larger than {MAX_FILE_BYTES} bytes")
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{where}: not UTF-8 text") from exc
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or "invalid YAML"
            raise ConfigError(f"{where}:{line}: {problem}") from exc
        return nodes_from_document(document, where=where)

    async def close(self) -> None:
        return None


def nodes_from_document(document: Any, *, where: str) -> NodeSet:
    """Validate a parsed YAML document: a mapping with a `nodes:` list of mappings."""
    if not isinstance(document, Mapping):
        raise ConfigError(f"{where}: expected a mapping with a 'nodes:' list")
    unknown = set(document) - _TOP_LEVEL_KEYS
    if unknown:
        raise ConfigError(
            f"{where}: unknown top-level key(s): {', '.join(sorted(map(str, unknown)))}"
        )
    raw_nodes = document.get("nodes")
    if not isinstance(raw_nodes, list):
        raise ConfigError(f"{where}: 'nodes' must be a list")
    for index, raw in enumerate(raw_nodes):
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: nodes[{index}] must be a mapping")
    return NodeSet(build_node(raw, where=where) for raw in raw_nodes)


def sound_name(stored: str) -> str:
    """OMniLeads may store a path or a file name; Asterisk wants the name without extension."""
    name = PurePosixPath(stored.strip()).name
    stem, dot, ext = name.rpartition(".")
    return (
        stem
        if dot and ext.lower() in {"wav", "gsm", "sln", "ulaw", "alaw", "mp3", "g722"}
        else name
    )


def node_from_hash(node_id: str, fields: Mapping[str, str]) -> dict[str, Any]:
    """An OMniLeads hash as raw node fields (still to be validated by build_node)."""
    raw: dict[str, Any] = {"id": node_id}
    for theirs, value in fields.items():
        ours = _OML_FIELDS.get(theirs)
        if ours is None:
            log.debug("OML:CUSTOMERID:%s: ignoring field %s", node_id, theirs)
            continue
        value = value.strip()
        if ours == "interaction":
            raw[ours] = {"1": "none", "2": "crm_true_false", "3": "crm_destination"}.get(
                value, value
            )
        elif ours == "expected_length":
            if value not in {"", "0"}:
                raw[ours] = value
        elif ours == "audio":
            raw[ours] = sound_name(value)
        elif ours == "url":
            if value:
                raw[ours] = value
        else:
            raw[ours] = value
    return raw


class RedisHashSource:
    def __init__(self, url: str, *, key_prefix: str = OML_PREFIX, timeout: float = 1.0) -> None:
        self.url = url
        self.key_prefix = key_prefix
        self.description = f"redis {_redacted(url)} {key_prefix}*"
        self._client = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry_on_timeout=False,
        )

    async def changed(self) -> bool:
        return True  # a full read is a handful of small hashes

    async def load(self) -> NodeSet:
        where = self.description
        try:
            keys = [
                key async for key in self._client.scan_iter(match=f"{self.key_prefix}*", count=500)
            ]
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                hashes = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise ConfigError(f"cannot read nodes from {where}: {exc}") from exc
        raws = [
            node_from_hash(key[len(self.key_prefix) :], fields)
            for key, fields in sorted(zip(keys, hashes, strict=True))
            if isinstance(fields, dict) and fields
        ]
        try:
            return NodeSet(build_node(raw, where=where) for raw in raws)
        except ConfigError as exc:
            raise ConfigError(_oml_field_names(str(exc))) from exc

    async def close(self) -> None:
        await self._client.aclose()


def _oml_field_names(message: str) -> str:
    """Name the OMniLeads field too, e.g. 'timeout (TIMEOUT): ...'."""
    for ours, theirs in _FIELD_TO_OML.items():
        message = message.replace(f"{ours}: ", f"{ours} ({theirs}): ")
    return message


def _redacted(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return f"{scheme}{sep}{rest}"


def source_from_setting(value: str) -> NodeSource:
    """`CALLERID_NODES`: a redis:// or rediss:// URL, or else a file path."""
    if value.startswith(("redis://", "rediss://", "unix://")):
        return RedisHashSource(value)
    return YamlFileSource(os.path.expanduser(value))


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
            raise RuntimeError("nodes are not loaded yet")
        return self._current

    async def load_initial(self) -> NodeSet:
        """The first load: a ConfigError here must stop the service."""
        self._current = await self.source.load()
        log.info("loaded %d node(s) from %s", len(self._current), self.source.description)
        return self._current

    async def reload(self) -> bool:
        try:
            nodes = await self.source.load()
        except ConfigError as exc:
            message = str(exc)
            if message != self._last_error:
                log.error("config reload failed, keeping the last good nodes: %s", message)
                self._last_error = message
            if self._on_reload is not None:
                self._on_reload(False, None)
            return False
        if self._last_error is not None:
            log.info("config valid again")
            self._last_error = None
        changed = self._current is None or _fingerprint(nodes) != _fingerprint(self._current)
        self._current = nodes
        if changed:
            log.info("reloaded %d node(s) from %s", len(nodes), self.source.description)
        if self._on_reload is not None:
            self._on_reload(True, nodes)
        return changed

    async def watch(self, interval: float) -> None:
        """Reload whenever the source changed; runs until cancelled."""
        while True:
            await asyncio.sleep(interval)
            if await self.source.changed():
                await self.reload()


def _fingerprint(nodes: NodeSet) -> list[str]:
    return [node.model_dump_json() for node in nodes]
