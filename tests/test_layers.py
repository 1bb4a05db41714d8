"""The package's layering, read from the source: no import cycle anywhere in ``src/``, no
trainer imports another trainer, ``data/`` never imports models or rollouts, and the lower
layers never import the higher ones (docs/ARCHITECTURE.md)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "prism_rl"
# the trainers' own helpers, which every stage may import
TRAINER_HELPERS = {"prism_rl.trainers.run", "prism_rl.trainers.checkpoint", "prism_rl.trainers.optim",
                    "prism_rl.trainers.state_io", "prism_rl.trainers.manifest", "prism_rl.trainers.resume_config",
                    "prism_rl.trainers.dist_checkpoint", "prism_rl.trainers.interrupt", "prism_rl.trainers.rl_dist",
                    "prism_rl.trainers.stage_disc"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules ``path`` imports, at module level or inside functions."""
    me = _module(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            # an imported name resolves to the deepest project module it names
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != me:
                found.add(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = sorted(PKG.rglob("*.py"))
    modules = {_module(f) for f in files}
    return {_module(f): _imports(f, modules) for f in files}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path), or None. Packages' __init__ re-exports count as edges."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if n.startswith(m + ".") or m.startswith(n + "."):
                continue  # a package and its own submodules
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_graph_is_read(graph):
    assert "prism_rl.actor" in graph["prism_rl.trainers.rl"]
    assert "prism_rl.data.processing" in graph["prism_rl.data.stream"]


def test_no_import_cycle(graph):
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_no_trainer_imports_another_trainer(graph):
    for m, deps in graph.items():
        if m.startswith("prism_rl.trainers."):
            others = {d for d in deps if d.startswith("prism_rl.trainers.") and d not in TRAINER_HELPERS}
            assert not others, f"{m} imports {others}"


@pytest.mark.parametrize("layer,forbidden", [
    ("prism_rl.data", ("prism_rl.models", "prism_rl.rollout", "prism_rl.actor", "prism_rl.trainers",
                       "prism_rl.eval", "prism_rl.jobs")),
    ("prism_rl.reward", ("prism_rl.models", "prism_rl.rollout", "prism_rl.trainers", "prism_rl.eval")),
    ("prism_rl.models", ("prism_rl.rollout", "prism_rl.actor", "prism_rl.trainers", "prism_rl.eval",
                         "prism_rl.jobs")),
    ("prism_rl.rollout", ("prism_rl.actor", "prism_rl.trainers", "prism_rl.eval", "prism_rl.jobs")),
    ("prism_rl.eval", ("prism_rl.trainers", "prism_rl.jobs")),
    ("prism_rl.jobs", ("prism_rl.trainers",)),
    ("prism_rl.algorithms", ("prism_rl.",)),
    ("prism_rl.config", ("prism_rl.",)),
])
def test_lower_layers_do_not_import_higher_ones(graph, layer, forbidden):
    for m, deps in graph.items():
        if m == layer or m.startswith(layer + "."):
            bad = {d for d in deps if d.startswith(forbidden)}
            assert not bad, f"{m} imports {bad}"
