"""Identification node configuration: the model, its rules, and start-up error messages.

The model is the single definition of a node's fields, ranges and defaults (docs/design.md
§4). Loading from a YAML file or from OMniLeads' Redis hashes lives in `node_sources`; both
build the same `NodeConfig` through `build_nodes`, so a bad field produces the same message
whichever source it came from: the node and the field are named.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from shared.asterisk_words import MAX_MUSIC_CLASS, MAX_SOUND, is_music_class, is_sound
from shared.destination import DEFAULT_ALLOWED_TYPES, IDENTIFICATION_NODE_TYPE, Destination
from shared.node_auth import AuthMethods, as_list, check_methods, legacy_auth, url_problem
from shared.outcomes import Interaction

# Asterisk sound names: path segments of letters, digits, '_', '-' and '.', no extension
# needed. Anything else could not be a file name and could break the AGI quoting.
_NODE_ID = re.compile(r"[A-Za-z0-9_\-]{1,64}")


class ConfigError(Exception):
    """A node configuration cannot be used; the message names the node and the field."""


class NodeConfig(BaseModel):
    """One identification node. Times are in seconds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    name: str = Field(min_length=1, max_length=50)
    interaction: Interaction = Interaction.NONE
    url: str | None = None
    audio: str
    expected_length: int | None = Field(default=None, ge=1, le=30)
    timeout: float = Field(default=5, ge=1, le=60)
    attempts: int = Field(default=1, ge=1, le=20)
    # Required except on crm_destination nodes, where the CRM names the route: OMniLeads saves
    # those without TRUEDST when the form's "identified" destination is left empty.
    on_identified: Destination | None = None
    on_not_identified: Destination

    # Beyond OMniLeads.
    inter_digit_timeout: float = Field(default=3, ge=0.5, le=30)
    terminator: str = "#"
    min_length: int = Field(default=1, ge=1, le=30)
    max_length: int = Field(default=20, ge=1, le=30)
    pattern: str | None = None
    invalid_audio: str | None = None
    confirm: bool = False
    confirm_audio: str = "callerid-confirm"
    on_no_input: Destination | None = None
    on_invalid: Destination | None = None
    on_error: Destination | None = None
    crm_timeout: float = Field(default=4, ge=0.1, le=30)
    hold_music_after: float | None = Field(default=None, ge=0, le=30)
    hold_music_class: str = "default"
    allowed_destination_types: frozenset[int] = DEFAULT_ALLOWED_TYPES
    cache_ttl_positive: float = Field(default=300, ge=0, le=86_400)
    cache_ttl_negative: float = Field(default=60, ge=0, le=86_400)
    # Securing CRM calls (docs/design.md §5), all off by default: an OMniLeads CRM works as is.
    # Secrets never live in the config: methods name environment variables the resolver reads.
    # The older crm_token_env / crm_signing_secret_env fields are read as this (`node_auth`).
    auth: AuthMethods = ()
    crm_send_context: bool = False

    @model_validator(mode="before")
    @classmethod
    def _older_auth_fields(cls, data: Any) -> Any:
        return legacy_auth(data)

    @field_validator("auth", mode="before")
    @classmethod
    def _auth_as_list(cls, value: Any) -> Any:
        return as_list(value)

    @field_validator("auth")
    @classmethod
    def _auth_combines(cls, value: AuthMethods) -> AuthMethods:
        return check_methods(value)

    @field_validator(
        "expected_length",
        "timeout",
        "attempts",
        "inter_digit_timeout",
        "min_length",
        "max_length",
        "crm_timeout",
        "hold_music_after",
        "cache_ttl_positive",
        "cache_ttl_negative",
        mode="before",
    )
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        # YAML reads `yes`/`true` as booleans, and pydantic would take them as 1.
        if isinstance(value, bool):
            raise ValueError("must be a number, not a boolean")
        return value

    @field_validator("id", mode="before")
    @classmethod
    def _id_is_word(cls, value: Any) -> str:
        if isinstance(value, bool):
            raise ValueError("must be 1-64 letters, digits, '_' or '-'")
        text = str(value).strip() if isinstance(value, str | int) else value
        if not isinstance(text, str) or not _NODE_ID.fullmatch(text):
            raise ValueError("must be 1-64 letters, digits, '_' or '-'")
        return text

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, value: str) -> str:
        if not value.strip() or not value.isprintable():
            raise ValueError("must be printable and not blank")
        return value.strip()

    @field_validator("allowed_destination_types")
    @classmethod
    def _types_in_range(cls, value: frozenset[int]) -> frozenset[int]:
        if not value or any(not 0 <= t <= 999 for t in value):
            raise ValueError("must be a non-empty list of destination types 0..999")
        return value

    @field_validator("url")
    @classmethod
    def _http_only(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        value = value.strip()
        if not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", value, re.IGNORECASE) or not (
            value.isascii() and value.isprintable()
        ):
            raise ValueError("must be an http:// or https:// URL with a host, no spaces")
        return value

    @field_validator("audio", "invalid_audio", "confirm_audio")
    @classmethod
    def _sound_name(cls, value: str | None) -> str | None:
        # The same rule the AGI commands apply: a node that loads can always be played.
        if value is not None and not is_sound(value):
            raise ValueError(
                f"must be an Asterisk sound name (letters, digits, _ - . /) of at most "
                f"{MAX_SOUND} characters"
            )
        return value

    @field_validator("hold_music_class")
    @classmethod
    def _music_class(cls, value: str) -> str:
        if not is_music_class(value):
            raise ValueError(
                f"must be a music-on-hold class (letters, digits, _ -) of at most "
                f"{MAX_MUSIC_CLASS} characters"
            )
        return value

    @field_validator("terminator")
    @classmethod
    def _terminator(cls, value: str) -> str:
        # Asterisk's GET DATA ends an entry on '#' and on nothing else; a field that accepted
        # other keys would be a setting that silently does nothing.
        if value != "#":
            raise ValueError("must be '#' (the only key Asterisk's GET DATA ends an entry on)")
        return value

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"is not a valid regular expression: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.interaction is not Interaction.NONE and self.url is None:
            raise ValueError(f"url: required for interaction {self.interaction.value}")
        if self.on_identified is None and self.interaction is not Interaction.CRM_DESTINATION:
            raise ValueError(
                f"on_identified: required for interaction {self.interaction.value}"
                f" (only {Interaction.CRM_DESTINATION.value} nodes may leave it out)"
            )
        if problem := url_problem(self.auth, self.url):
            raise ValueError(problem)
        if self.min_length > self.max_length:
            raise ValueError(
                f"min_length: {self.min_length} exceeds max_length {self.max_length}"
                " (no entry could be valid)"
            )
        # expected_length replaces min/max_length; one given beside it must agree with it, or
        # the node says two things at once. Only given bounds count: the defaults (1..20) do
        # not refuse an expected_length of 25.
        given = self.model_fields_set
        if self.expected_length is not None:
            if "min_length" in given and self.min_length > self.expected_length:
                raise ValueError(
                    f"expected_length: {self.expected_length} is shorter than min_length"
                    f" {self.min_length}; give expected_length alone, or bounds that include it"
                )
            if "max_length" in given and self.max_length < self.expected_length:
                raise ValueError(
                    f"expected_length: {self.expected_length} is longer than max_length"
                    f" {self.max_length}; give expected_length alone, or bounds that include it"
                )
        return self

    def static_destinations(self) -> list[tuple[str, Destination]]:
        """The configured destinations, by field name (CRM-named ones come later)."""
        fields = ("on_identified", "on_not_identified", "on_no_input", "on_invalid", "on_error")
        found = ((field, getattr(self, field)) for field in fields)
        return [(field, dest) for field, dest in found if dest is not None]

    @property
    def max_digits(self) -> int:
        return self.expected_length or self.max_length

    @property
    def uses_crm(self) -> bool:
        return self.interaction is not Interaction.NONE

    @property
    def caches(self) -> bool:
        """Whether this node's CRM answers are cached at all (either TTL above 0)."""
        return self.uses_crm and (self.cache_ttl_positive > 0 or self.cache_ttl_negative > 0)

    def entry_is_valid(self, digits: str) -> bool:
        """Whether a collected entry may be used (and written to the AGI socket)."""
        if not digits.isascii() or not digits.isdigit():
            return False
        if self.expected_length is not None:
            if len(digits) != self.expected_length:
                return False
        elif not self.min_length <= len(digits) <= self.max_length:
            return False
        return self.pattern is None or re.fullmatch(self.pattern, digits) is not None


class NodeSet:
    """An immutable, validated set of nodes keyed by id."""

    def __init__(self, nodes: Iterable[NodeConfig]) -> None:
        kept, refused = _consistent_set(nodes)
        if refused:
            raise ConfigError(next(iter(refused.values())))
        self._by_id = kept

    @classmethod
    def lenient(cls, nodes: Iterable[NodeConfig]) -> tuple[NodeSet, dict[str, str]]:
        """The nodes that fit together, and why each other one was left out (by node id): a
        second node with the same id or name, or a type-9 destination naming a node that is
        not in the set (checked again after each removal, as removing one can strand another).
        """
        kept, refused = _consistent_set(nodes)
        node_set = cls([])
        node_set._by_id = kept
        return node_set, refused

    def get(self, node_id: str) -> NodeConfig | None:
        return self._by_id.get(node_id)

    def __iter__(self) -> Iterator[NodeConfig]:
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def names(self) -> list[str]:
        return [node.name for node in self._by_id.values()]


def _consistent_set(nodes: Iterable[NodeConfig]) -> tuple[dict[str, NodeConfig], dict[str, str]]:
    """(kept by id, refused messages by id): the rules a node set keeps across nodes."""
    kept: dict[str, NodeConfig] = {}
    refused: dict[str, str] = {}
    names: set[str] = set()
    for node in nodes:
        if node.id in kept:
            refused.setdefault(node.id, f"node {node.id!r}: id: duplicate node id")
        elif node.name in names:
            refused[node.id] = f"node {node.id!r}: name: {node.name!r} is used by another node"
        else:
            names.add(node.name)
            kept[node.id] = node
    stranded = True
    while stranded:
        stranded = False
        for node in list(kept.values()):
            for field, destination in node.static_destinations():
                if destination.type == IDENTIFICATION_NODE_TYPE and str(destination.id) not in kept:
                    refused[node.id] = (
                        f"node {node.id!r}: {field}: type 9 names node {destination.id},"
                        " which is not configured"
                    )
                    del kept[node.id]
                    stranded = True
                    break
    return kept, refused


def build_node(raw: Mapping[str, Any], *, where: str = "") -> NodeConfig:
    """Validate one raw node; a failure becomes a ConfigError naming node and field."""
    # Only a scalar id is quoted, and only a little of it: `str()` of a YAML alias bomb
    # (a list of lists of the same list...) would take the process down.
    raw_id = raw.get("id", "?")
    node_ref = repr(str(raw_id)[:64] if isinstance(raw_id, str | int) else "?")
    try:
        return NodeConfig.model_validate(dict(raw))
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            # Whole-node checks name their field in the message itself.
            problems.append(f"{field}: {message}" if field else message)
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}node {node_ref}: " + "; ".join(problems)) from exc


def build_nodes(raws: Iterable[Mapping[str, Any]], *, where: str = "") -> NodeSet:
    return NodeSet(build_node(raw, where=where) for raw in raws)
