"""Fuzzing the CRM answer parser and node configurations, and replaying their corpora.

CRM answers: valid bodies damaged byte-wise, and JSON documents built around the keys the
parser looks at; the result is always a `CrmAnswer` whose destination is within bounds, or a
`CrmError`, quickly, for any of them (test_crm_response.py covers arbitrary bytes).

Node configs: random YAML-ish mappings (the real field names with values of every YAML type,
plus stray keys) through `build_node` give a `NodeConfig` or a `ConfigError` naming the
node, never another exception; whole documents through `nodes_from_document` likewise.

tests/corpus/crm/ and tests/corpus/nodes/ keep the inputs worth keeping, replayed here with
a time bound: alias bombs, deep nesting, huge numbers, injection attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crm_resolver.crm_response import MAX_BODY, parse_crm_response
from crm_resolver.ports import CrmAnswer, CrmError
from shared.destination import Destination
from shared.node_sources import YamlFileSource, nodes_from_document
from shared.nodes import ConfigError, NodeConfig, build_node
from shared.outcomes import Verdict

CORPUS = Path(__file__).parents[1] / "corpus"
CRM_CORPUS = sorted((CORPUS / "crm").glob("*.json"))
NODE_CORPUS = sorted((CORPUS / "nodes").glob("*.yaml"))
EXAMPLES = int(os.environ.get("CALLERID_FUZZ_EXAMPLES", "150"))
_settings = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
# Slack for a loaded machine; a parse of the worst saved input takes milliseconds.
TIME_BOUND = 1.0


# --- CRM answers ---------------------------------------------------------------------------


def check_answer(body: bytes) -> None:
    started = time.perf_counter()
    error: CrmError | None = None
    try:
        answer = parse_crm_response(body)
    except CrmError as exc:
        error = exc
    if error is not None:
        assert len(str(error)) < 200  # error messages quote little of what the CRM sent
    else:
        assert isinstance(answer, CrmAnswer)
        if answer.verdict is Verdict.DESTINATION:
            assert isinstance(answer.destination, Destination)
            assert 0 <= answer.destination.type <= 999
            assert 0 <= answer.destination.id <= 2**31 - 1
    assert time.perf_counter() - started < TIME_BOUND


_VALID = [
    b'{"status": "ok", "destination": "true"}',
    b'{"status": "ok", "destination": "1,3"}',
    b'{"status": "fail", "destination": "false"}',
    b'{"response": [9, 4]}',
    b'{"status": "OK", "destination": " (5, 1) "}',
]
_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["true", "false", "1,3", "(1,3)", "[1,3]", " 9 , 4 ", "ok", "fail", "1,3,"]),
)
_json_values = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
_documents = st.dictionaries(
    st.sampled_from(["status", "destination", "response", "Destination", "extra"]),
    _json_values,
    max_size=4,
)


@st.composite
def damaged_bodies(draw: st.DrawFn) -> bytes:
    body = draw(st.sampled_from(_VALID))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(body)))
        action = draw(st.sampled_from(["insert", "delete", "flip"]))
        if action == "insert":
            body = body[:position] + draw(st.binary(min_size=1, max_size=4)) + body[position:]
        elif action == "delete":
            body = body[:position] + body[position + draw(st.integers(1, 4)) :]
        elif position < len(body):
            flipped = body[position] ^ (1 << draw(st.integers(0, 7)))
            body = body[:position] + bytes([flipped]) + body[position + 1 :]
    return body


@_settings
@given(damaged_bodies())
def test_damaged_crm_bodies(body: bytes) -> None:
    """Valid answers with bytes inserted, deleted or flipped: an answer or a CrmError."""
    check_answer(body)


@_settings
@given(_documents)
def test_json_documents_around_the_known_keys(document: dict[str, Any]) -> None:
    """Any JSON object over the keys the parser reads: an answer in bounds or a CrmError."""
    check_answer(json.dumps(document).encode())


@pytest.mark.parametrize("path", CRM_CORPUS, ids=[p.name for p in CRM_CORPUS])
def test_crm_corpus_replays(path: Path) -> None:
    """Saved hostile bodies (deep nesting, huge numbers, foreign digits, CR/LF...)."""
    check_answer(path.read_bytes())


def test_crm_corpus_boundaries_mean_what_they_say() -> None:
    """The two size fixtures sit on either side of the 64 KiB cap."""
    under = (CORPUS / "crm" / "big_but_under_cap.json").read_bytes()
    over = (CORPUS / "crm" / "one_over_cap.json").read_bytes()
    assert len(under) <= MAX_BODY < len(over)
    assert parse_crm_response(under).verdict is Verdict.DESTINATION
    with pytest.raises(CrmError):
        parse_crm_response(over)


# --- node configurations -------------------------------------------------------------------

_FIELDS = sorted(NodeConfig.model_fields)
_yaml_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(),  # includes NaN and infinities, as YAML's .nan / .inf
    st.text(max_size=30),
    st.sampled_from(["1,3", "(1,3)", "none", "crm_destination", "http://crm/x", "#", "5"]),
)
_yaml_values = st.recursive(
    _yaml_scalar,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["type", "id", "x"]) | st.text(max_size=4), inner)
    ),
    max_leaves=6,
)
_raw_nodes = st.dictionaries(
    st.sampled_from(_FIELDS) | st.text(max_size=10), _yaml_values, max_size=len(_FIELDS)
)
_plausible = st.fixed_dictionaries(
    {
        "id": st.integers(0, 99) | st.text(max_size=6),
        "name": st.text(max_size=60),
        "audio": st.sampled_from(["prompt", "a/b", "x y", ""]),
        "on_identified": _yaml_values,
        "on_not_identified": st.sampled_from(["1,4", {"type": 1, "id": 4}, "x"]),
    },
    optional={
        field: _yaml_values
        for field in _FIELDS
        if field not in {"id", "name", "audio", "on_identified", "on_not_identified"}
    },
)


def check_node(raw: dict[str, Any]) -> None:
    started = time.perf_counter()
    error: ConfigError | None = None
    try:
        node = build_node(raw, where="fuzz")
    except ConfigError as exc:
        error = exc
    if error is not None:
        assert str(error).startswith("fuzz: node ")
    else:
        assert isinstance(node, NodeConfig)
        assert node.min_length <= node.max_length
        assert not math.isnan(node.timeout)
        assert not math.isnan(node.crm_timeout)
    assert time.perf_counter() - started < TIME_BOUND


@_settings
@given(_raw_nodes)
def test_random_node_mappings(raw: dict[str, Any]) -> None:
    """Any mapping of YAML values: a NodeConfig or a ConfigError, never another exception."""
    check_node(raw)


@_settings
@given(_plausible)
def test_nearly_valid_nodes(raw: dict[str, Any]) -> None:
    """Mappings with the required fields present and the rest random: same rule."""
    check_node(raw)


@_settings
@given(st.one_of(_yaml_values, st.dictionaries(st.just("nodes"), _yaml_values)))
def test_random_documents(document: Any) -> None:
    """A whole parsed document of any shape: a NodeSet or a ConfigError."""
    with contextlib.suppress(ConfigError):
        nodes_from_document(document, where="fuzz")


# Inputs on which PyYAML itself raises ValueError or RecursionError (not YAMLError), which
# YamlFileSource does not turn into a ConfigError yet: a start-up traceback instead of a
# message, and a reload that raises out of NodeStore.reload. The fix belongs in
# shared/node_sources.py (YamlFileSource._load_blocking: also catch ValueError and
# RecursionError from yaml.safe_load); strict, so this list must shrink when it lands.
@pytest.mark.parametrize("path", NODE_CORPUS, ids=[p.name for p in NODE_CORPUS])
async def test_node_corpus_replays(path: Path) -> None:
    """Every saved config file loads to a NodeSet or a ConfigError, quickly (alias bombs,
    deep nesting, injection attempts, wrong types)."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(5):
            await YamlFileSource(path).load()
    except ConfigError:
        pass
    assert time.perf_counter() - started < 5


def test_alias_bomb_id_is_refused_without_expanding_it() -> None:
    """Regression: a node whose id is a YAML alias bomb (10^8 leaves) used to hang in
    build_node's error message; now it is a ConfigError in milliseconds."""
    leaf: list[Any] = ["x"] * 10
    for _ in range(8):
        leaf = [leaf] * 10
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="node '\\?': id:"):
        build_node({"id": leaf, "name": "n"})
    assert time.perf_counter() - started < TIME_BOUND
