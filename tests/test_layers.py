"""The package's layers import one way only: no module imports a layer above its own, no import circle, no file
over 500 lines. Parsed from the source with `ast` (imports inside functions count: a lazy import is still a
dependency), so it holds without importing anything."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "sft"
MAX_LINES = 500

# Rank of each module by its first component under sft (a package and everything in it share one rank); a module
# may import only modules of its own rank or lower. Lowest first: what everything uses, then the stages in the
# order a run's data goes through them, then what composes them.
RANKS = {
    "__init__": 0,  # sft/__init__.py: the version
    "errors": 0,  # SftError, did_you_mean
    "runs": 0,  # run-folder files: atomic writes, locks, redaction
    "hardware": 0,  # measured matmul peak, peak memory
    "console": 0,  # progress lines on stderr
    "config": 1,  # the run config and the train section's trl.SFTConfig
    "data": 2,  # sources, formats, tokens, the tokenized-data cache
    "tokenize": 2,  # sft/tokenize.py: the README's import path, a re-export of sft.data.tokenize
    "model": 3,  # tokenizer and model loading, LoRA, attention, loss head, the stand-in
    "train": 4,  # the trainer, checkpoints, signals, sharded gathers
    "evaluate": 5,  # held-out scores and the report
    "generate": 6,  # inference from an export
    "export": 7,  # adapter/merged folders, card, the fresh-process check
    "plan": 8,  # memory, FLOPs and time per step; --measure
    "pipeline": 9,  # the stages composed: sft train / eval / data
    "sweep": 10,  # many runs of the pipeline, each in its own process
    "cli": 11,  # the command line
    "__main__": 11,
}


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def rank(module: str) -> int:
    parts = module.split(".")
    first = parts[1] if len(parts) > 1 else "__init__"
    assert first in RANKS, f"{module}: not in the rank table of tests/test_layers.py; give it a rank there"
    return RANKS[first]


def imports(path: Path, modules: set[str], root: Path = SRC) -> set[str]:
    """The sft modules a file imports, anywhere in it (module level, functions, TYPE_CHECKING blocks)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y, from .. import z
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from sft.model import lora` names a module; `from sft.model import apply_lora` a name in sft.model
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import sft.data.cache` is sft.data.cache; a name drops off
                target = target.rpartition(".")[0]
            if target.startswith("sft") and target != name:
                found.add(target)
    return found


def graph(root: Path = SRC) -> dict[str, set[str]]:
    """Module -> the sft modules it imports."""
    files = sorted((root / "sft").rglob("*.py"))
    modules = {module_name(p, root) for p in files}
    return {module_name(p, root): imports(p, modules, root) for p in files}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan): each holds at least one import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_rank():
    for module in graph():
        rank(module)


def test_no_module_imports_a_layer_above_its_own():
    upward = [
        f"{source} (rank {rank(source)}) imports {target} (rank {rank(target)})"
        for source, targets in graph().items()
        for target in sorted(targets)
        if rank(target) > rank(source)
    ]
    assert not upward, "upward imports:\n  " + "\n  ".join(upward)


def shortest_circle(edges: dict[str, set[str]], component: list[str]) -> list[str]:
    """The shortest import circle inside a strongly connected component, as modules in import order."""
    members, best = set(component), None
    for start in sorted(component):
        paths, queue = {start: [start]}, [start]
        while queue:
            node = queue.pop(0)
            for nxt in sorted(edges[node] & members):
                if nxt == start:
                    circle = paths[node] + [start]
                    best = circle if best is None or len(circle) < len(best) else best
                    queue = []
                    break
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    queue.append(nxt)
    assert best is not None
    return best


def test_no_import_circle():
    edges = graph()
    found = [
        f"{' -> '.join(shortest_circle(edges, c))} ({len(c)} modules in this knot: {', '.join(c)})"
        for c in cycles(edges)
    ]
    assert not found, "import circles:\n  " + "\n  ".join(found)


def test_no_source_file_over_500_lines():
    long = [
        f"{path.relative_to(SRC)}: {n} lines"
        for path in sorted(PACKAGE.rglob("*.py"))
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    ]
    assert not long, f"files over {MAX_LINES} lines (split them by concern):\n  " + "\n  ".join(long)


def test_the_checker_sees_circles_and_lazy_imports(tmp_path):
    """The parser itself: a function-level import is an edge, and a circle is found with its members."""
    (tmp_path / "sft" / "b").mkdir(parents=True)
    (tmp_path / "sft" / "__init__.py").write_text("")
    (tmp_path / "sft" / "a.py").write_text("def f():\n    from sft.b import g\n")
    (tmp_path / "sft" / "b" / "__init__.py").write_text("from .g import x\n")
    (tmp_path / "sft" / "b" / "g.py").write_text("import sft.a\n")
    edges = graph(tmp_path)
    assert edges == {"sft": set(), "sft.a": {"sft.b.g"}, "sft.b": {"sft.b.g"}, "sft.b.g": {"sft.a"}}
    assert cycles(edges) == [["sft.a", "sft.b.g"]]
    assert shortest_circle(edges, ["sft.a", "sft.b.g"]) == ["sft.a", "sft.b.g", "sft.a"]


def test_the_readme_python_api_still_imports():
    """Names moved into subpackages stay importable where the README's "Python API" section imports them."""
    readme = (SRC.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("from sft")]
    assert len(lines) >= 5, lines
    for line in lines:
        exec(line, {})
    assert "sft.pipeline.train_run(config)" in section
    from sft.pipeline import train_run  # noqa: F401
