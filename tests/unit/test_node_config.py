"""The node model (shared/nodes.py): ranges, defaults, url rules, destinations, entry checks.

Every rejection must be a ConfigError whose message names the node and the field, because
that message is what an operator sees when the service refuses to start.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agi_gateway.commands import GetData, ReadDigits, SetMusic, StreamFile
from shared.destination import DEFAULT_ALLOWED_TYPES, Destination
from shared.nodes import ConfigError, NodeConfig, NodeSet, build_node, build_nodes
from shared.outcomes import Interaction

BASE: dict[str, Any] = {
    "id": 7,
    "name": "gold",
    "audio": "customer-id-prompt",
    "on_identified": {"type": 1, "id": 3},
    "on_not_identified": {"type": 1, "id": 4},
}


def node(**changes: Any) -> NodeConfig:
    return build_node({**BASE, **changes}, where="nodes.yaml")


def rejection(**changes: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        node(**changes)
    return str(caught.value)


def test_defaults_of_a_minimal_node() -> None:
    """A node with only the required fields gets the documented defaults (docs/design.md §4)."""
    n = node()
    assert n.id == "7"
    assert n.interaction is Interaction.NONE
    assert n.url is None
    assert n.expected_length is None
    assert n.timeout == 5
    assert n.attempts == 1
    assert n.inter_digit_timeout == 3
    assert n.terminator == "#"
    assert (n.min_length, n.max_length) == (1, 20)
    assert n.pattern is None
    assert n.confirm is False
    assert n.on_no_input is None
    assert n.on_invalid is None
    assert n.on_error is None
    assert n.crm_timeout == 4
    assert n.hold_music_after is None
    assert n.allowed_destination_types == DEFAULT_ALLOWED_TYPES == frozenset({1, 2, 3, 5, 9})
    assert (n.cache_ttl_positive, n.cache_ttl_negative) == (300, 60)
    assert n.max_digits == 20
    assert n.uses_crm is False


@pytest.mark.parametrize(
    ("field", "low", "high", "too_low", "too_high"),
    [
        ("expected_length", 1, 30, 0, 31),
        ("timeout", 1, 60, 0.5, 61),
        ("attempts", 1, 20, 0, 21),
        ("inter_digit_timeout", 0.5, 30, 0.4, 31),
        ("min_length", 1, 20, 0, 31),
        ("max_length", 1, 30, 0, 31),
        ("crm_timeout", 0.1, 30, 0.05, 31),
        ("hold_music_after", 0, 30, -1, 31),
        ("cache_ttl_positive", 0, 86_400, -1, 86_401),
        ("cache_ttl_negative", 0, 86_400, -1, 86_401),
    ],
)
def test_numeric_ranges(
    field: str, low: float, high: float, too_low: float, too_high: float
) -> None:
    """Each numeric field accepts its documented edges and names itself when out of range."""
    assert getattr(node(**{field: low}), field) == low
    assert getattr(node(**{field: high}), field) == high
    for bad in (too_low, too_high):
        message = rejection(**{field: bad})
        assert "node '7'" in message
        assert f"{field}:" in message
        assert message.startswith("nodes.yaml: ")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 51}, "name"),
        ({"id": "has space"}, "id"),
        ({"id": "x" * 65}, "id"),
        ({"audio": "prompt.wav?"}, "audio"),
        ({"audio": "/abs/path"}, "audio"),
        ({"audio": "a b"}, "audio"),
        ({"invalid_audio": "bad\nsound"}, "invalid_audio"),
        ({"terminator": "x"}, "terminator"),
        ({"terminator": "*"}, "terminator"),
        ({"pattern": "(unclosed"}, "pattern"),
        ({"interaction": "crm"}, "interaction"),
        ({"typo_field": 1}, "typo_field"),
        ({"attempts": "many"}, "attempts"),
    ],
)
def test_bad_values_name_node_and_field(changes: dict[str, Any], field: str) -> None:
    """A bad value is refused with a message naming the node and the offending field."""
    message = rejection(**changes)
    assert f"{field}:" in message
    node_ref = repr(str(changes.get("id", 7))[:64])  # long ids are cut in messages
    assert f"node {node_ref}" in message


def test_required_fields_are_named_when_missing() -> None:
    """name, audio and on_not_identified are required, each named when absent."""
    for field in ("name", "audio", "on_not_identified"):
        raw = {key: value for key, value in BASE.items() if key != field}
        with pytest.raises(ConfigError, match=rf"node '7': .*{field}: Field required"):
            build_node(raw)


@pytest.mark.parametrize("interaction", ["none", "crm_true_false"])
def test_on_identified_is_required_unless_the_crm_names_the_route(interaction: str) -> None:
    """Without on_identified only a crm_destination node is valid (OMniLeads saves its type 3
    without TRUEDST); the others need it, and the message says which interactions may omit it."""
    raw = {key: value for key, value in BASE.items() if key != "on_identified"}
    url = {"url": "https://crm.example/x"}
    with pytest.raises(ConfigError, match="on_identified: required for interaction"):
        build_node({**raw, "interaction": interaction, **url})
    routed_by_crm = build_node({**raw, "interaction": "crm_destination", **url})
    assert routed_by_crm.on_identified is None


def test_several_problems_are_reported_together() -> None:
    """All bad fields of one node appear in one message, so one edit fixes them all."""
    message = rejection(timeout=0, attempts=0)
    assert "timeout:" in message
    assert "attempts:" in message


def test_int_and_string_ids_are_the_same_id() -> None:
    """An id written as 3 or "3" (YAML vs Redis key suffix) is the string "3"."""
    assert node(id=3).id == node(id=" 3 ").id == "3"


@pytest.mark.parametrize(
    "url",
    ["http://crm.example.com/identify", "https://10.0.0.1:8443/x?y=1", "HTTPS://crm"],
)
def test_http_and_https_urls_are_accepted(url: str) -> None:
    """http and https URLs with a host are accepted for CRM nodes."""
    assert node(interaction="crm_true_false", url=url).url == url


@pytest.mark.parametrize(
    "url", ["ftp://crm/x", "file:///etc/passwd", "crm.example.com/identify", "http://", "http:///x"]
)
def test_other_urls_are_refused(url: str) -> None:
    """Only http(s) URLs with a host can aim the resolver somewhere."""
    message = rejection(interaction="crm_true_false", url=url)
    assert "url:" in message


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://crm/ident ify", id="space"),
        pytest.param("http://crm/x\r\nX-Injected: 1", id="crlf"),
    ],
)
def test_urls_with_whitespace_or_line_breaks_are_refused(url: str) -> None:
    """A URL with whitespace or a line break is not a URL and must be refused."""
    rejection(interaction="crm_true_false", url=url)


@pytest.mark.parametrize("interaction", ["crm_true_false", "crm_destination"])
@pytest.mark.parametrize("url", [None, "", "   "])
def test_url_is_required_unless_none(interaction: str, url: str | None) -> None:
    """CRM interactions need a url (an empty string counts as none); `none` does not."""
    message = rejection(interaction=interaction, url=url)
    assert "url: required" in message
    assert node(interaction="none", url=url).url is None


@pytest.mark.parametrize(
    "value",
    ["1,3", "(1,3)", " 1 , 3 ", "[1, 3]", {"type": 1, "id": 3}, [1, 3], ("1", "3")],
)
def test_destination_forms(value: Any) -> None:
    """A destination may be a dict, OMniLeads' "type,id" string (with variants) or a pair."""
    assert node(on_identified=value).on_identified == Destination(type=1, id=3)


@pytest.mark.parametrize(
    "value", ["1;3", "1,3,4", "a,b", "", "-1,3", {"type": 1}, [1, 2, 3], {"type": 1000, "id": 1}]
)
def test_bad_destinations_name_the_field(value: Any) -> None:
    """A malformed destination is refused naming the destination field."""
    assert "on_error" in rejection(on_error=value)


def test_destination_prints_as_omnileads_string() -> None:
    """str(Destination) is the "type,id" form OMniLeads and the AGI variables use."""
    assert str(Destination.parse("(9, 4)")) == "9,4"


def test_min_length_must_not_exceed_max_length() -> None:
    """Inconsistent length bounds are refused naming min_length."""
    assert "min_length:" in rejection(min_length=5, max_length=4)
    assert node(min_length=4, max_length=4).max_length == 4


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"expected_length": 5, "min_length": 6}, ("expected_length: 5", "min_length 6")),
        ({"expected_length": 8, "max_length": 6}, ("expected_length: 8", "max_length 6")),
        (
            {"expected_length": 8, "min_length": 3, "max_length": 6},
            ("expected_length: 8", "max_length 6"),
        ),
        ({"min_length": 7, "max_length": 6}, ("min_length: 7", "max_length 6")),
    ],
)
def test_contradictory_length_rules_are_refused(
    changes: dict[str, Any], named: tuple[str, ...]
) -> None:
    """Length rules no entry could satisfy are refused with a message naming both fields and
    their values, so the operator sees which two lines of the node disagree."""
    message = rejection(**changes)
    assert message.startswith("nodes.yaml: node '7': ")
    for text in named:
        assert text in message


def test_expected_length_with_agreeing_or_default_bounds_loads() -> None:
    """expected_length alone ignores the default bounds (25 > the default max_length 20, as
    OMniLeads' LENGTH may be); bounds given beside it that include it are accepted."""
    assert node(expected_length=25).max_digits == 25
    assert node(expected_length=5, min_length=5, max_length=5).max_digits == 5
    assert node(expected_length=5, min_length=3, max_length=10).entry_is_valid("12345")


def test_entry_validity_with_expected_length() -> None:
    """With expected_length, only entries of exactly that many digits are valid."""
    n = node(expected_length=5)
    assert n.entry_is_valid("12345")
    assert not n.entry_is_valid("1234")
    assert not n.entry_is_valid("123456")
    assert n.max_digits == 5


def test_entry_validity_with_min_and_max_length() -> None:
    """Without expected_length, the entry's length must be within min_length..max_length."""
    n = node(min_length=3, max_length=5)
    assert [n.entry_is_valid("1" * size) for size in range(2, 7)] == [
        False,
        True,
        True,
        True,
        False,
    ]
    assert n.max_digits == 5


@pytest.mark.parametrize("entry", ["", "12a45", "12 45", "12#45", "١٢٣٤٥", "12345\n", "-1234"])
def test_entry_validity_refuses_non_digits(entry: str) -> None:
    """Only ASCII digits are ever valid: nothing else may reach the AGI socket."""
    assert not node(min_length=1, max_length=10).entry_is_valid(entry)


def test_entry_validity_with_pattern() -> None:
    """A pattern must match the whole entry, on top of the length rules."""
    n = node(pattern=r"9\d+", min_length=3)
    assert n.entry_is_valid("9123")
    assert not n.entry_is_valid("8123")
    assert not n.entry_is_valid("91")  # matches the pattern but is too short
    assert not node(pattern=r"9\d").entry_is_valid("9123")  # a prefix match is not enough


def test_empty_pattern_means_none() -> None:
    """An empty pattern is no pattern (OMniLeads-style empty fields)."""
    assert node(pattern="").pattern is None


def test_duplicate_ids_are_refused() -> None:
    """Two nodes with the same id (even as int and string) are refused, naming the id."""
    with pytest.raises(ConfigError, match=r"node '7': id: duplicate"):
        build_nodes([BASE, {**BASE, "id": "7", "name": "other"}])


def test_node_set_lookup() -> None:
    """A NodeSet finds nodes by string id, iterates in order and lists names for metrics."""
    nodes = build_nodes([BASE, {**BASE, "id": 8, "name": "silver"}])
    assert len(nodes) == 2
    assert nodes.get("8") is not None
    assert nodes.get("9") is None
    assert [n.id for n in nodes] == ["7", "8"]
    assert nodes.names() == ["gold", "silver"]


def test_nodes_are_immutable() -> None:
    """A loaded node cannot be changed in place (a reload swaps whole sets instead)."""
    n = node()
    with pytest.raises(ValueError, match="frozen"):
        n.timeout = 10  # type: ignore[misc]
    assert isinstance(NodeSet([n]).get("7"), NodeConfig)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", True),
        ("timeout", True),
        ("attempts", False),
        ("audio", "oml/../../etc/passwd"),
        ("name", "   "),
        ("allowed_destination_types", [-1]),
        ("allowed_destination_types", []),
    ],
)
def test_values_that_only_look_valid_are_refused(field: str, value: Any) -> None:
    """YAML booleans are not numbers or ids, sounds stay inside the sounds directory,
    names are not blank, destination types are in range."""
    assert f"{field}:" in rejection(**{field: value})


def test_whole_node_errors_name_their_field_once() -> None:
    """A cross-field error reads `node '1': url: ...`, not `node: url: ...`."""
    message = rejection(interaction="crm_true_false", url=None)
    assert ": node:" not in message


def test_node_names_are_unique_because_they_are_metric_labels() -> None:
    """Two nodes with one name would merge their metrics: refused."""
    with pytest.raises(ConfigError, match="name: 'x' is used by another node"):
        NodeSet([node(id="1", name="x"), node(id="2", name="x")])


def test_static_type_9_destinations_must_name_a_configured_node() -> None:
    """A type-9 link to a node that does not exist is a start-up error, not a live-call one."""
    with pytest.raises(ConfigError, match="on_identified: type 9 names node 7"):
        NodeSet([node(id="1", on_identified="9,7")])
    assert len(NodeSet([node(id="1", on_identified="9,2"), node(id="2", name="two")])) == 2


@pytest.mark.parametrize(
    ("changes", "caches"),
    [
        ({}, False),  # no CRM: nothing to cache
        ({"interaction": "crm_true_false", "url": "https://crm.example.com/x"}, True),
        (
            {
                "interaction": "crm_true_false",
                "url": "https://crm.example.com/x",
                "cache_ttl_positive": 0,
            },
            True,  # false answers are still cached
        ),
        (
            {
                "interaction": "crm_true_false",
                "url": "https://crm.example.com/x",
                "cache_ttl_positive": 0,
                "cache_ttl_negative": 0,
            },
            False,
        ),
    ],
)
def test_a_node_caches_when_it_asks_a_crm_and_a_ttl_is_above_zero(
    changes: dict[str, Any], caches: bool
) -> None:
    assert node(**changes).caches is caches


@settings(max_examples=300, deadline=None)
@given(
    sound=st.one_of(st.text(max_size=300), st.from_regex(r"[a-z/._-]{1,300}", fullmatch=True)),
    music=st.one_of(st.text(max_size=100), st.from_regex(r"[a-z_-]{1,100}", fullmatch=True)),
)
def test_a_node_that_loads_can_always_build_its_commands(sound: str, music: str) -> None:
    """Node validation and the AGI commands share one rule for sound names and music classes:
    whatever a node accepts, the commands that play it accept too (e.g. a 300-character AUDIO
    is refused at load, not mid-call)."""
    try:
        loaded = node(audio=sound, confirm_audio=sound, invalid_audio=sound, hold_music_class=music)
    except ConfigError:
        return
    ReadDigits("CALLERID_ENTRY", loaded.audio, loaded.max_digits)
    GetData(loaded.confirm_audio, 5000, 1)
    assert loaded.invalid_audio is not None
    StreamFile(loaded.invalid_audio)
    SetMusic(True, loaded.hold_music_class)
