"""Coverage-guided fuzz targets for atheris (libFuzzer): `python atheris_targets.py <target>
[libFuzzer flags] [corpus dirs]`. Targets: agi (the AGI parser, any chunking), crm (the CRM
answer parser), nodes (YAML text through the node loader). A crash is any exception outside
the module's own error tree; libFuzzer then writes the input as crash-<sha1>.

Run by tests/unit/test_fuzz_atheris.py (short by default, long behind `slow`). Inputs worth
keeping go to tests/corpus/<target>/.
"""

from __future__ import annotations

import contextlib
import sys

import atheris  # type: ignore[import-untyped]

# Third-party packages are imported before instrumenting: only this project's modules are
# instrumented, which keeps start-up to about a second.
import pydantic  # noqa: F401
import yaml

with atheris.instrument_imports(include=["agi_gateway", "crm_resolver", "shared"]):
    from agi_gateway.protocol import AgiParser, AgiProtocolError
    from crm_resolver.crm_response import parse_crm_response
    from crm_resolver.ports import CrmError
    from shared.node_sources import nodes_from_document
    from shared.nodes import ConfigError


def agi(data: bytes) -> None:
    if not data:
        return
    step = data[0] % 16 + 1
    parser = AgiParser(max_line=256, max_env_lines=16, max_usage_lines=16)
    try:
        for start in range(1, len(data), step):
            parser.feed(data[start : start + step])
            assert len(parser._buffer) <= 257
        parser.feed_eof()
    except AgiProtocolError:
        pass


def crm(data: bytes) -> None:
    with contextlib.suppress(CrmError):
        parse_crm_response(data)


def nodes(data: bytes) -> None:
    try:
        document = yaml.safe_load(data)
    except (yaml.YAMLError, ValueError, RecursionError):
        # PyYAML's own failures (ValueError/RecursionError not yet mapped by YamlFileSource:
        # see YAML_ESCAPES in tests/unit/test_fuzz_config_and_crm.py); the target is our code.
        return
    with contextlib.suppress(ConfigError):
        nodes_from_document(document, where="fuzz")


TARGETS = {"agi": agi, "crm": crm, "nodes": nodes}

if __name__ == "__main__":
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()
