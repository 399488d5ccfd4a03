"""Every event kind is a member of event_kinds.Kind, at every producer and every consumer: a misspelt or stray
string kind would be an event that the log shows but that systemd STATUS, metrics and streams never hear."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import supervisor
from supervisor.event_kinds import Kind

PACKAGE = Path(supervisor.__file__).parent


def modules() -> Iterator[tuple[str, ast.AST]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield str(path.relative_to(PACKAGE)), ast.parse(path.read_text())


def where(name: str, node: ast.AST) -> str:
    return f"{name}:{getattr(node, 'lineno', '?')}: {ast.unparse(node)[:90]}"


def test_every_emitted_kind_is_a_member() -> None:
    stray = []
    for name, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("emit", "_warn"):
                if name == "logsink.py" or not node.args:  # logging.Handler.emit(record): not an event
                    continue
                kinds = [child for child in ast.walk(node.args[0]) if isinstance(child, ast.Constant)]
                if kinds or not _names_a_member(node.args[0]):
                    stray.append(where(name, node))
    assert stray == []


def test_no_kind_is_matched_by_a_string() -> None:
    """Consumers match `event.kind` (probe and failure kinds have their own vocabularies)."""
    values = {kind.value for kind in Kind}
    stray = []
    for name, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and ast.unparse(node.left).endswith("event.kind"):
                literals = [child.value for child in ast.walk(node) if isinstance(child, ast.Constant)]
                if any(value in values for value in literals):
                    stray.append(where(name, node))
    assert stray == []


def test_every_member_used_exists_and_names_its_value() -> None:
    for name, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "Kind":
                assert node.attr in Kind.__members__, where(name, node)
    assert all(kind.name == kind.value.upper().replace("-", "_") for kind in Kind)


def _names_a_member(node: ast.expr) -> bool:
    """`Kind.X`, `a if c else b` of members, or a parameter typed Kind (history's _warn(kind, …))."""
    if isinstance(node, ast.IfExp):
        return _names_a_member(node.body) and _names_a_member(node.orelse)
    if isinstance(node, ast.Attribute):
        return isinstance(node.value, ast.Name) and node.value.id == "Kind"
    return isinstance(node, ast.Name) and node.id == "kind"
