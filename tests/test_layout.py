"""The folder layout shows the architecture, and it has no import cycles: every `import` of a
minip2p module inside minip2p (at module level or inside a function) is an edge; the graph must
be acyclic. minip2p never imports the test-time oracles (diffusers, transformers)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "minip2p"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """minip2p modules imported by `path`, resolved to module names."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("minip2p")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not base.startswith("minip2p"):
                continue
            for a in node.names:            # `from . import x` may name a submodule
                sub = f"{base}.{a.name}"
                found.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                          or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else base)
    found.discard(me)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for n in sorted(g.get(m, ())):
            # importing a package runs its __init__, which may import its submodules: not a
            # cycle when a submodule imports a sibling through `from . import x`
            if n in g and not (m.startswith(n + ".") and n != "minip2p"):
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(g):
        visit(m, [])


def test_the_package_never_imports_the_oracles():
    for p in PACKAGE.rglob("*.py"):
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("diffusers", "transformers") for n in names), p


def test_layout_shows_the_architecture():
    names = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")}
    assert {"control.py", "guidance.py", "attention.py", "pipeline.py"} <= names   # the lesson
    assert {"model/unet.py", "model/vae.py", "model/clip.py", "model/tokenizer.py"} <= names
    assert {"load/__init__.py", "load/hub.py", "load/single_file.py"} <= names
    assert {"samplers/ddim.py", "samplers/dpm_solver.py", "samplers/euler_a.py"} <= names
    assert {"methods/p2p.py", "methods/masactrl.py", "methods/pnp.py", "methods/sdedit.py",
            "methods/instruct.py", "methods/noise_reg.py"} <= names
    assert {"real/invert.py", "explore/server.py", "fast/autotune.py", "data/pairs.py"} <= names
    assert {"cli/__init__.py", "cli/common.py", "cli/edit.py"} <= names
    flat = {n for n in names if "/" not in n}
    assert len(flat) <= 10, f"the package root holds {sorted(flat)}: give each a folder"


def test_every_subpackage_is_packaged():
    """A folder of minip2p/ missing from pyproject's `packages` is left out of the wheel."""
    import tomllib
    root = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"minip2p." + p.parent.relative_to(root / "minip2p").as_posix().replace("/", ".")
             for p in (root / "minip2p").rglob("__init__.py") if p.parent != root / "minip2p"}
    assert found <= listed, sorted(found - listed)
