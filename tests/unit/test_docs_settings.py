"""The README's settings tables say what the code does.

"Service settings" lists every `CALLERID_*` variable the gateway's and the resolver's settings
classes read, once, with its default, the service that reads it and its flag, and nothing
else; the flag column is what the two argparse parsers define. "Configure a node" lists every
node field, and the fields without a default say "required".
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from agi_gateway.app import build_parser as gateway_parser
from agi_gateway.settings import GatewaySettings
from crm_resolver.app import build_parser as resolver_parser
from crm_resolver.settings import ResolverSettings
from shared.nodes import NodeConfig
from shared.settings import CommonSettings, describe_default, env_name

README = Path(__file__).resolve().parents[2] / "README.md"
SERVICES: dict[str, type[BaseSettings]] = {
    "gateway": GatewaySettings,
    "resolver": ResolverSettings,
}
NO_FLAG = "—"


def section(title: str) -> str:
    """The README text under the heading `title`, up to the next heading."""
    text = README.read_text()
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ )", text, re.MULTILINE | re.DOTALL)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def table(title: str) -> list[dict[str, str]]:
    """The first table of a README section, as one dict per row keyed by the header."""
    lines = [line for line in section(title).splitlines() if line.startswith("|")]
    header, rows = lines[0], lines[2:]

    def cells(line: str) -> list[str]:
        return [cell.strip() for cell in line.strip().strip("|").split("|")]

    names = cells(header)
    parsed = []
    for line in rows:
        values = cells(line)
        assert len(values) == len(names), f"row does not match the header {names}: {line}"
        parsed.append(dict(zip(names, values, strict=True)))
    return parsed


def code(cell: str) -> list[str]:
    """The `code` spans of a table cell."""
    return re.findall(r"`([^`]+)`", cell)


def words(cell: str) -> set[str]:
    """A cell's words, backticks dropped: `0.0.0.0:9100` gateway, 5 -> {0.0.0.0:9100, ...}."""
    return {word for word in re.split(r"[\s,;()]+", cell.replace("`", "")) if word}


def settings_rows() -> dict[str, dict[str, str]]:
    rows: dict[str, dict[str, str]] = {}
    for row in table("Service settings"):
        (variable,) = code(row["variable"])
        assert variable not in rows, f"{variable} is listed twice"
        rows[variable] = row
    return rows


def fields_by_variable() -> dict[str, tuple[str, dict[str, type[BaseSettings]]]]:
    """Each variable the services read: its field and the settings classes that read it."""
    found: dict[str, tuple[str, dict[str, type[BaseSettings]]]] = {}
    for service, settings in SERVICES.items():
        for field in settings.model_fields:
            variable = env_name(settings, field)
            found.setdefault(variable, (field, {}))[1][service] = settings
    return found


def documented_fields() -> list[tuple[str, str, dict[str, type[BaseSettings]], dict[str, str]]]:
    """(variable, field, reading classes, README row) for each setting the README lists (the
    ones it leaves out fail the first test, not every test)."""
    rows = settings_rows()
    return [
        (variable, field, readers, rows[variable])
        for variable, (field, readers) in sorted(fields_by_variable().items())
        if variable in rows
    ]


def parser_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Settings field -> its flag, for every flag of a parser but --help."""
    return {
        action.dest: action.option_strings[-1]
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
    }


PARSERS = {"gateway": gateway_parser(), "resolver": resolver_parser()}


def test_every_setting_is_in_the_table_and_every_row_is_a_setting() -> None:
    """No setting left out, no row for a variable nothing reads, none listed twice."""
    documented = set(settings_rows())
    read = set(fields_by_variable())
    assert not read - documented, f"settings missing from the README: {sorted(read - documented)}"
    assert not documented - read, f"README rows that are no setting: {sorted(documented - read)}"


def test_each_row_gives_the_default_of_every_service_that_reads_it() -> None:
    """The default column holds each reading service's default as `--help` writes it."""
    for variable, field, readers, row in documented_fields():
        cell = row["default"]
        for settings in readers.values():
            default = describe_default(settings, field)
            assert default in words(cell), f"{variable}: default {default!r}, README says {cell!r}"


def test_service_column_names_the_services_that_read_it() -> None:
    """`both` for the common settings, else the one service whose class has the field."""
    for variable, field, readers, row in documented_fields():
        expected = "both" if field in CommonSettings.model_fields else " ".join(sorted(readers))
        assert row["service"] == expected, variable


def test_flag_column_matches_the_parsers() -> None:
    """A row names the flag both parsers (or its one service's parser) define, or says it has
    none; a common setting's flag exists on both services."""
    for variable, field, readers, row in documented_fields():
        defined = {
            service: parser_flags(PARSERS[service])[field]
            for service in readers
            if field in parser_flags(PARSERS[service])
        }
        cell = row["flag"]
        if not defined:
            assert cell == NO_FLAG, f"{variable}: README names flag {cell}, no parser has one"
            continue
        assert set(defined) == set(readers), f"{variable}: flag only on {sorted(defined)}"
        (flag,) = set(defined.values())
        assert code(cell) == [flag], f"{variable}: README says {cell!r}, the parser {flag}"


def test_every_flag_sets_a_setting_of_its_service() -> None:
    """A flag that set nothing would be silently ignored: every parser dest is a field."""
    for service, parser in PARSERS.items():
        for field in parser_flags(parser):
            assert field in SERVICES[service].model_fields, f"{service}: flag for {field!r}"


def test_node_table_lists_every_field_and_marks_the_required_ones() -> None:
    """Every node field is in "Configure a node"; a field without a default says required."""
    rows = table("Configure a node")
    named = {name: row for row in rows for name in code(row["field"])}
    for field, info in NodeConfig.model_fields.items():
        assert field in named, f"node field {field} missing from the README's node table"
        if info.is_required():
            assert "required" in named[field]["default"], field
    assert not set(named) - set(NodeConfig.model_fields), "README names a node field that is not"


@pytest.mark.parametrize("parser", PARSERS.values(), ids=PARSERS.keys())
def test_help_is_written_for_operators(parser: argparse.ArgumentParser) -> None:
    """`--help` says how the service is configured and where every setting is listed, and
    its settings list renders defaults from the model."""
    text = parser.format_help()
    assert "Composition root" not in text
    assert "CALLERID_NODES" in text
    assert "required" in text
    assert '"Service settings"' in text
