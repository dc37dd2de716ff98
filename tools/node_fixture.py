"""The node set tests and tools share, read from one file: `tools/fixtures/nodes.yaml`.

What belongs here: reading that file and filling in its three placeholders (`${crm}`,
`${crm_timeout}`, `${id_length}`). What does not: what the nodes decide (tools.stack's
DEFAULT_DECISIONS, the load generator's expectations) and starting anything.

The file ships inside the `tools` package (pyproject's package-data), so the installed tools
find it without the repository.
"""

from __future__ import annotations

import string
from importlib import resources

FIXTURE = "fixtures/nodes.yaml"
ID_LENGTH = 5
"""The customer-id length of the tests' nodes (the load generator uses 8)."""


def fixture_text() -> str:
    """The file as shipped, placeholders and all."""
    return resources.files("tools").joinpath(FIXTURE).read_text(encoding="utf-8")


def nodes_template(*, id_length: int = ID_LENGTH) -> str:
    """The nodes as a `tools.stack.Stack` nodes_template: `str.format` text with `{crm}` and
    `{crm_timeout}` left to fill in (the stack knows them once its mock CRM runs)."""
    # The YAML's own braces ({type: 1, id: 3}) are doubled for str.format; the two fields
    # left open go in as markers first, so the doubling leaves them alone.
    marked = string.Template(fixture_text()).substitute(
        crm="\0crm\0", crm_timeout="\0crm_timeout\0", id_length=id_length
    )
    escaped = marked.replace("{", "{{").replace("}", "}}")
    return escaped.replace("\0crm\0", "{crm}").replace("\0crm_timeout\0", "{crm_timeout}")


def nodes_yaml(crm: str, *, crm_timeout: float, id_length: int = ID_LENGTH) -> str:
    """The nodes for a CRM at `crm` (its base URL, no trailing slash), ready to write out."""
    return nodes_template(id_length=id_length).format(crm=crm, crm_timeout=crm_timeout)
