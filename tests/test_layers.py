"""One-way layers: every import inside ``cna_jax`` (module-level and function-level alike) points down.

Each module has a place in ``LAYERS`` (a list of ranks, each an ordered list of modules); a module may
import only modules placed before it. A new module must be placed here, and an import that runs upward
(or sideways to a later module of the same rank) fails with the offending edge named.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "cna_jax"

# Lowest first. Within a rank the order counts too: a module may import the ones listed before it.
LAYERS = [
    # 0: the package marker, the CPU kernels, the Flax decoder, and leaf utilities that import nothing of ours
    # (precompile: programs compiled once over the processes, below the sharded-jit wrapper that runs them)
    ["", "cpu_kernels", "models.config", "models.llama", "models", "distributed", "data", "neurons", "stats",
     "refusal", "precompile"],
    # 1: meshes, logical-axis rules, layouts, shardings, the sharded-jit wrapper
    ["sharding"],
    # 2: checkpoints in and out (gguf_file: a GGUF file's metadata and tensors)
    ["gguf_file", "convert", "checkpoint", "export", "store"],
    # 3: token batching, and a loaded model (config, params, tokenizer, layout)
    ["batching", "lm"],
    # 4: the generation engine (continuous batching, per-row interventions)
    ["engine"],
    # 5: the computations, each with its sharded entry point beside the pure function
    ["generate", "collect", "damage", "lasso", "graph"],
    # 6: what is built from them
    ["cna", "testbed", "direction", "report", "config"],
    # 7: the study pipeline
    ["study"],
]
RANK = {m: (r, i) for r, mods in enumerate(LAYERS) for i, m in enumerate(mods)}


def _modules() -> dict[str, str]:
    """Dotted name inside the package ('' for the package itself) -> file path."""
    out = {}
    base = os.path.join(ROOT, PACKAGE)
    for dirpath, _, files in os.walk(base):
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), base)[:-3].replace(os.sep, ".")
            name = rel[:-len("__init__")].rstrip(".") if rel.endswith("__init__") else rel
            out[name] = os.path.join(dirpath, f)
    return out


def _resolve(node, module: str, is_package: bool, known) -> list[tuple[str, int]]:
    """The package modules an import statement reaches (with its line), as names of ``known``."""
    def inside(full: str):
        if full == PACKAGE:
            return ""
        if full.startswith(PACKAGE + "."):
            return full[len(PACKAGE) + 1:]
        return None

    targets = []
    if isinstance(node, ast.Import):
        for a in node.names:
            name = inside(a.name)
            if name is not None:
                targets.append(name)
            elif a.name.split(".")[0] in ("launch", "tests"):
                targets.append(a.name)
    else:
        if node.level:  # relative: from the current package
            parts = module.split(".") if module else []
            if not is_package:
                parts = parts[:-1]
            parts = parts[:len(parts) - (node.level - 1)]
            base = ".".join(parts + ([node.module] if node.module else []))
        else:
            if node.module and node.module.split(".")[0] in ("launch", "tests"):
                return [(node.module, node.lineno)]
            base = inside(node.module or "")
            if base is None:
                return []
        for a in node.names:  # `from cna_jax import lm` names a module; `from cna_jax.lm import LM` does not
            sub = f"{base}.{a.name}" if base else a.name
            targets.append(sub if sub in known else base)
    return [(t, node.lineno) for t in targets]


def import_edges() -> list[tuple[str, str, int]]:
    """(importer, imported, line) for every import of a package module, at any nesting depth."""
    mods = _modules()
    edges = []
    for name, path in sorted(mods.items()):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, line in _resolve(node, name, path.endswith("__init__.py"), mods):
                    if target != name:
                        edges.append((name, target, line))
    return edges


def violations(edges) -> list[str]:
    bad = []
    for src, dst, line in edges:
        where = f"{PACKAGE}/{src.replace('.', '/') or '__init__'}.py:{line}"
        if dst not in RANK:
            bad.append(f"{where}: imports {dst!r}, which has no place in LAYERS (launch/ and tests/ are above the package)")
        elif RANK[dst] >= RANK[src]:
            bad.append(f"{where}: {src or PACKAGE} (rank {RANK[src][0]}) imports {dst} (rank {RANK[dst][0]}), "
                       "which is not below it")
    return bad


def test_every_module_has_a_layer():
    mods = set(_modules())
    assert not mods - set(RANK), f"place these modules in LAYERS: {sorted(mods - set(RANK))}"
    assert not set(RANK) - mods, f"LAYERS names modules that do not exist: {sorted(set(RANK) - mods)}"


def test_imports_point_down():
    edges = import_edges()
    assert len(edges) > 30  # the parser finds the package's imports at all
    bad = violations(edges)
    assert not bad, "imports that break the layering:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("src, dst, ok", [("lm", "sharding", True), ("sharding", "generate", False),
                                          ("lm", "testbed", False), ("collect", "graph", False),
                                          ("graph", "lasso", True), ("study", "launch.plan", False)])
def test_the_check_itself(src, dst, ok):
    """Hand-made edges: a downward one passes; upward, same-rank-later and launch/ imports fail."""
    assert (not violations([(src, dst, 1)])) == ok
