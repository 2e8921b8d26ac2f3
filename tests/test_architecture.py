"""The shape of the house: no import circle in batch/, no module over 500 lines, one
exit-code table that the docs show."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from typer.testing import CliRunner

from batch import errors
from batch.cli import app
from batch.errors import EXIT_MEANINGS, ExitCode

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "batch"
MAX_LINES = 500


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Each module of the package and the package's modules it imports, at the top or
    inside a function (a lazy import is an edge too). ``from batch.x import y`` is an edge
    to ``batch.x.y`` when that is a module, else to ``batch.x``."""
    modules = {_module_name(p, package.parent): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    found.add(child if child in modules else node.module)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected parts of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            part = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                part.append(top)
                if top == node:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_circle_and_a_lazy_import_counts(tmp_path: Path) -> None:
    package = tmp_path / "batch"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from batch.b import thing\n")
    (package / "b.py").write_text("def f():\n    from batch import c\n")
    (package / "c.py").write_text("import batch.a\n")
    (package / "d.py").write_text("from batch.a import thing\n")
    assert cycles(import_graph(package)) == [["batch.a", "batch.b", "batch.c"]]


def test_batch_has_no_import_circle() -> None:
    graph = import_graph()
    assert "batch.model" in graph and graph["batch.model"] <= {
        "batch.errors",
        "batch.pulse.protocol",
    }
    assert cycles(graph) == []


def test_no_module_is_over_500_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): lines
        for path in PACKAGE.rglob("*.py")
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}


def _codes_in_table(text: str, header: str) -> set[int]:
    table = text.split(header, 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| ([\d /]+) \|", table, re.M)
    return {int(n) for row in rows for n in row.split("/")}


def test_the_docs_and_the_help_show_every_exit_code_and_no_other() -> None:
    codes = {int(code) for code in ExitCode}
    assert set(EXIT_MEANINGS) == set(ExitCode)
    text = (ROOT / "docs" / "resilience.md").read_text(encoding="utf-8")
    assert _codes_in_table(text, "| exit code | meaning |") == codes
    assert _codes_in_table(text, "| exit | what happened | what to do |") == codes
    for args in (["--help"], ["run", "--help"]):  # run's own help too: what cron acts on
        shown = CliRunner().invoke(app, args, terminal_width=1000).output
        assert all(f"{code} {EXIT_MEANINGS[code]}" in shown for code in ExitCode), shown
    listed = CliRunner().invoke(app, ["--help"], terminal_width=1000).output.split("Commands:")
    assert listed[1].split()[0] == "run", listed  # the everyday command first, serve last


def test_the_error_drawing_and_exit_code_for_agree() -> None:
    """Every error the drawing in errors.py gives an exit code gets it from `exit_code_for`
    (what the CLI uses)."""
    made = {
        "ManifestError": errors.ManifestError("m.yaml", "bad"),
        "ShardError": errors.ShardError("--shard", "bad"),
        "ExportError": errors.ExportError("--where", "bad"),
        "LockedError": errors.LockedError("held"),
        "ShardCountConflict": errors.ShardCountConflict("held"),
        "OutputError": errors.OutputError("out", "write", "full"),
        "SpendCapReached": errors.SpendCapReached("cap"),
        "JobAborted": errors.JobAborted("401"),
        "ServiceRefusing": errors.ServiceRefusing(3, RuntimeError("429")),
        "ServiceUnreachable": errors.ServiceUnreachable(3, RuntimeError("refused"), "h:1"),
        "ServiceStalling": errors.ServiceStalling(3, RuntimeError("silent")),
    }
    drawn = {
        name: int(code)
        for name, code in re.findall(r"(\w+) {2,}[^\n]*?exit (\d+)", errors.__doc__ or "")
    }
    assert set(drawn) == set(made)
    assert {name: errors.exit_code_for(made[name]) for name in drawn} == drawn
