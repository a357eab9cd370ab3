"""The modules of `ingest/` import each other without a cycle, and the layers point one way.

Every import counts, at module level or inside a function or an `if TYPE_CHECKING:` block: a
lazy import hides a cycle from the interpreter, not from the reader. Read from the source with
`ast`, so nothing is imported to check it.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "ingest"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The `ingest` modules `name` imports (`from pkg import mod` counts as `pkg.mod`)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_pkg else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in known:
                    out.add(full)
                elif base in known:
                    out.add(base)
    out.discard(name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (iterative DFS, three colours)."""
    colour: dict[str, int] = dict.fromkeys(edges, 0)  # 0 new, 1 on the stack, 2 done
    for start in sorted(edges):
        if colour[start]:
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(edges[start]))]
        colour[start] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                colour[node] = 2
                stack.pop()
                continue
            nxt = todo.pop()
            if colour.get(nxt, 2) == 1:
                path = [n for n, _ in stack]
                return [*path[path.index(nxt) :], nxt]
            if colour.get(nxt) == 0:
                colour[nxt] = 1
                stack.append((nxt, sorted(edges.get(nxt, ()))))
    return None


def test_no_import_cycle_inside_ingest() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_graph_is_read() -> None:
    """The walk sees real edges, lazy ones included (else the cycle test proves nothing)."""
    g = graph()
    assert "ingest.factory" in g["ingest.service"]
    assert "ingest.api.app" in g["ingest.service"]  # imported inside serve()
    assert "ingest.sinks.postgres" in g["ingest.factory"]  # imported inside a builder


# The layers of docs/architecture.md, lowest first: a module imports only from its own layer or
# below. A new module goes into one of them (here and in the doc's module map).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundation",
        (
            "ingest",
            "ingest.records",
            "ingest.errors",
            "ingest.config",
            "ingest.metrics",
            "ingest.formats",
            "ingest.timefmt",
            "ingest.names",
            "ingest.sqlite_params",
            "ingest.native",
            "ingest.logctx",
            "ingest.kafka_log",
            "ingest.datadir",
            "ingest.schema",
            "ingest.transformers",
        ),
    ),
    ("adapters", ("ingest.sources", "ingest.sinks", "ingest.state", "ingest.webhook")),
    ("mechanisms", ("ingest.pipeline", "ingest.auth", "ingest.health", "ingest.disk")),
    ("assembly", ("ingest.factory",)),
    (
        "tools and HTTP",
        ("ingest.replay", "ingest.triage", "ingest.tools", "ingest.api", "ingest.webhook.http"),
    ),
    ("running", ("ingest.service", "ingest.pod")),
    ("entry points", ("ingest.cli",)),
]


def layer_of(module: str) -> int:
    best: tuple[int, int] | None = None  # (prefix length, layer): the longest prefix wins
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            matches = module == p or (module.startswith(p + ".") and p != "ingest")
            if matches and (best is None or len(p) > best[0]):
                best = (len(p), i)
    assert best is not None, (
        f"{module} is in no layer: add it to LAYERS here and to the module map in "
        "docs/architecture.md"
    )
    return best[1]


# Known upward imports, each with its reason. Keep this list short.
UPWARD = {
    # the Redis rate limiter falls back to the local token bucket while Redis is down
    ("ingest.state.ratelimit", "ingest.pipeline.admission"),
}


def test_every_import_points_down_the_layers() -> None:
    wrong = []
    for name, deps in graph().items():
        for dep in deps:
            if layer_of(dep) > layer_of(name) and (name, dep) not in UPWARD:
                wrong.append(
                    f"{name} ({LAYERS[layer_of(name)][0]}) imports "
                    f"{dep} ({LAYERS[layer_of(dep)][0]})"
                )
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    ("module", "must_not_import"),
    [
        # The HTTP layer is typed against a protocol, not the service.
        ("ingest.api.app", "ingest.service"),
        # Tools build through the factory; only `ingest run` runs the service.
        ("ingest.cli.dlqtriage", "ingest.service"),
        ("ingest.cli.replayctl", "ingest.service"),
    ],
)
def test_tools_never_reach_the_service(module: str, must_not_import: str) -> None:
    assert must_not_import not in reachable(graph(), module)


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


DRIVERS = {
    "asyncpg",
    "redis",
    "confluent_kafka",
    "neo4j",
    "typesense",
    "httpx",
    "aiobotocore",
    "botocore",
    "asyncssh",
}


def eager_imports(path: Path) -> set[str]:
    """Top-level names of what a module imports when it is loaded: not inside a function,
    not under `if TYPE_CHECKING:`."""
    out: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                out.add(node.module)
                out.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(ast.parse(path.read_text()).body)
    return out


def test_the_pipeline_never_loads_a_driver() -> None:
    """pipeline/ reaches adapters only through protocols: loading it loads no driver."""
    mods = modules()
    eager = {name: eager_imports(path) for name, path in mods.items()}
    for start in (m for m in mods if m.startswith("ingest.pipeline.")):
        seen, todo = {start}, [start]
        while todo:
            for dep in eager[todo.pop()]:
                if dep.split(".")[0] in DRIVERS:
                    raise AssertionError(f"loading {start} loads the driver {dep}")
                if dep in mods and dep not in seen:
                    seen.add(dep)
                    todo.append(dep)


# -- the cycle finder itself, on generated graphs ------------------------------------------

_names = st.sampled_from([f"m{i}" for i in range(8)])


@given(st.dictionaries(_names, st.sets(_names, max_size=4), max_size=8))
def test_find_cycle_agrees_with_a_topological_sort(edges: dict[str, set[str]]) -> None:
    edges = {n: {d for d in ds if d != n} for n, ds in edges.items()}
    cycle = find_cycle(edges)
    # Kahn's algorithm: the graph is acyclic iff every node can be removed.
    nodes = set(edges) | {d for ds in edges.values() for d in ds}
    indeg = dict.fromkeys(nodes, 0)
    for ds in edges.values():
        for d in ds:
            indeg[d] += 1
    ready = [n for n in nodes if indeg[n] == 0]
    removed = 0
    while ready:
        n = ready.pop()
        removed += 1
        for d in edges.get(n, ()):
            indeg[d] -= 1
            if indeg[d] == 0:
                ready.append(d)
    acyclic = removed == len(nodes)
    assert (cycle is None) == acyclic
    if cycle is not None:
        assert cycle[0] == cycle[-1]
        assert all(b in edges.get(a, set()) for a, b in itertools.pairwise(cycle))
