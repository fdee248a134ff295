"""The import rules of README's code map, read from the source: layers import downward only."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import specdm_cli

PACKAGE = Path(specdm_cli.__file__).parent

# Lower number = lower layer. A module may import its own layer's folder or any lower layer.
LAYERS = {
    "specdm_cli": 0,  # __init__: the version
    "specdm_cli.errors": 0,
    "specdm_cli.faults": 0,
    "specdm_cli.config": 1,
    "specdm_cli.presets": 1,  # imports config, its own layer: training recipes are config
    "specdm_cli.manifest": 1,
    "specdm_cli.sources": 2,
    "specdm_cli.stores": 2,
    "specdm_cli.models": 2,
    "specdm_cli.metrics": 2,
    "specdm_cli.pipeline": 3,
    "specdm_cli.cli": 4,
    "specdm_cli.__main__": 5,
}
# Inside pipeline/, a stage may use the stages before it (data flows one way).
STAGES = [
    "signals",
    "devices",
    "runs",
    "prepare",
    "train",
    "synthesize",
    "benchmark",
    "inspect",
    "filter",
]
CLI_MAY_IMPORT = (
    "specdm_cli.pipeline",
    "specdm_cli.config",
    "specdm_cli.presets",
    "specdm_cli.errors",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Iterator[str]:
    """Every module `path` imports, at any depth of the file (lazy imports count too)."""
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            yield base
            # `from specdm_cli.pipeline import rundirs` names a module, not an attribute.
            for alias in node.names:
                if (PACKAGE.parent / f"{base}.{alias.name}".replace(".", "/")).exists() or (
                    PACKAGE.parent / (f"{base}.{alias.name}".replace(".", "/") + ".py")
                ).exists():
                    yield f"{base}.{alias.name}"


def graph() -> dict[str, set[str]]:
    return {
        module_name(path): {name for name in imports(path) if name.startswith("specdm_cli")}
        for path in PACKAGE.rglob("*.py")
    }


def layer(module: str) -> int:
    parts = module.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and README's code map")


def folder(module: str) -> str:
    return ".".join(module.split(".")[:2])


def stage(module: str) -> int | None:
    parts = module.split(".")
    if parts[:2] != ["specdm_cli", "pipeline"] or len(parts) < 3:
        return None
    return STAGES.index(parts[2])


def test_layers_import_downward_only() -> None:
    upward = [
        f"{source} -> {target}"
        for source, targets in graph().items()
        for target in targets
        if layer(target) > layer(source)
        or (layer(target) == layer(source) == 2 and folder(target) != folder(source))
    ]
    assert upward == []


def test_pipeline_stages_import_earlier_stages_only() -> None:
    backward = []
    for source, targets in graph().items():
        for target in targets:
            own, other = stage(source), stage(target)
            if own is not None and other is not None and other > own:
                backward.append(f"{source} -> {target}")
    assert backward == []


def test_the_cli_imports_only_the_pipeline_the_config_and_errors() -> None:
    cli = {module: names for module, names in graph().items() if folder(module) == "specdm_cli.cli"}
    assert len(cli) > 1, "the cli package's modules were not found"
    reached = set().union(*cli.values())
    outside = sorted(
        name
        for name in reached
        if name != "specdm_cli" and not name.startswith((*CLI_MAY_IMPORT, "specdm_cli.cli"))
    )
    assert outside == []


def test_metrics_are_numpy_only() -> None:
    heavy = {
        f"{path.name} -> {name}"
        for path in (PACKAGE / "metrics").glob("*.py")
        for name in imports(path)
        if name.split(".")[0] in {"torch", "zarr", "rasterio", "diffusers"}
        or name.startswith(("specdm_cli.stores", "specdm_cli.pipeline", "specdm_cli.models"))
    }
    assert heavy == set()


def test_no_import_circles() -> None:
    edges = graph()
    modules = set(edges)
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if target not in modules or target == node:
                continue
            if state.get(target) == 1:
                cycles.append([*trail[trail.index(target) :], target])
            elif target not in state:
                visit(target, [*trail, target])
        state[node] = 2

    for module in sorted(modules):
        if module not in state:
            visit(module, [module])
    # A package's __init__ importing its own modules is not a circle of the design.
    real = [c for c in cycles if not all(m.startswith(c[0] + ".") or m == c[0] for m in c)]
    assert real == []
