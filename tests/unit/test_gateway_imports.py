"""The gateway and the resolver meet only in shared code and in the gateway's composition root.

The gateway runs without a resolver in its process (RabbitMQ mode), so its modules may know the
resolver only through `shared/`: the answer type and its rules (`shared.crm_answer`), the
vocabulary (`shared.outcomes`), the ports (`shared.ports`). Only `agi_gateway.app`, which wires
the embedded resolver in, imports `crm_resolver`. And `shared/` imports neither service.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = ROOT / "services" / "agi_gateway"
SHARED = ROOT / "shared"
COMPOSITION_ROOT = GATEWAY / "app.py"


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (inside functions too), by absolute name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def imports_of(path: Path, package: str) -> set[str]:
    return {m for m in imported_modules(path) if m == package or m.startswith(package + ".")}


def modules(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


@pytest.mark.parametrize(
    "path",
    [p for p in modules(GATEWAY) if p != COMPOSITION_ROOT],
    ids=lambda p: p.name,
)
def test_gateway_modules_do_not_import_the_resolver(path: Path) -> None:
    """Outside its composition root, no gateway module imports crm_resolver."""
    assert imports_of(path, "crm_resolver") == set(), (
        f"{path.relative_to(ROOT)} imports the resolver: move what it needs to shared/"
    )


@pytest.mark.parametrize("path", modules(SHARED), ids=lambda p: p.name)
def test_shared_modules_import_no_service(path: Path) -> None:
    """shared/ is below both services: it imports neither."""
    assert imports_of(path, "crm_resolver") | imports_of(path, "agi_gateway") == set()


def test_the_check_sees_imports() -> None:
    """The check can fail: it finds the composition root's resolver imports, which exist."""
    assert COMPOSITION_ROOT.exists()
    assert imports_of(COMPOSITION_ROOT, "crm_resolver"), "app.py no longer wires the resolver?"
    assert len(modules(GATEWAY)) > 5
