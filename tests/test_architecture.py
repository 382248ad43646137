"""The layout of dpo/ (docs/architecture.md): a few subpackages, and imports that flow one way between them.

Every module's imports are read with `ast`, those inside functions too (they run later, but they tie the modules
together all the same). No module may reach itself through its imports (a cycle), a subpackage imports only the
subpackages ALLOWED below it, nothing but the command (dpo/cli.py) lives directly in dpo/, and the report modules
are imported only by each other. The checker itself is tried on small packages planted in tmp_path, each with one
violation, so that a check that finds nothing is known to look.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# subpackage -> the subpackages its modules may import besides its own (docs/architecture.md, the same order)
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "engine": {"core", "data"},
    "audit": {"core", "data", "engine"},
    "train": {"core", "data", "engine", "audit"},
    "eval": {"core", "data", "engine"},
    "study": {"core", "data", "engine", "audit", "train", "eval"},
}
TOP = ("cli", "__main__")  # the command, directly in dpo/: may import everything, imported by nothing but itself
PRESENTATION = "report"  # modules named report*: what `dpo report` writes, imported only by each other and the top


def module_names(root: Path, package: str) -> dict:
    """dotted name -> path of every module of the package folder root (a package's __init__ is the package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict) -> set:
    """The modules of the package that module `name` imports anywhere in its file (function-local imports
    included): `from a.b import c` is module a.b.c where that is a module, else a.b."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package up
                anchor = here[:len(here) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in found if m in known and m != name}


def import_graph(root: Path, package: str) -> dict:
    known = module_names(root, package)
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(graph: dict) -> list:
    """The strongly connected groups of two or more modules (Tarjan), each sorted: every one holds a cycle."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def room(name: str, rooms: set) -> str:
    """The subpackage a module lives in; 'top' for a module directly in the package; '' for the package itself."""
    parts = name.split(".")
    if len(parts) == 1:
        return ""
    return parts[1] if parts[1] in rooms else "top"


def violations(root: Path, package: str, allowed: dict) -> list:
    """Every import against the direction, and every module out of place, as lines."""
    known = module_names(root, package)
    rooms = {n.split(".")[1] for n, p in known.items() if p.name == "__init__.py" and n.count(".") == 1}
    graph = import_graph(root, package)
    out = []
    for name, path in known.items():
        parts = name.split(".")
        where = room(name, rooms)
        if where == "top" and parts[-1] not in TOP:
            out.append(f"{name}: a module directly in {package}/ belongs in a subpackage ({', '.join(allowed)})")
        if where not in ("", "top") and where not in allowed:
            out.append(f"{name}: {package}/{where}/ is no subpackage of the stated direction ({', '.join(allowed)})")
        if path.name == "__init__.py" and name != package:
            tree = ast.parse(path.read_text())
            if not ast.get_docstring(tree):
                out.append(f"{name}: its __init__.py has no docstring (what lives there, what it may import)")
            if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree)):
                out.append(f"{name}: its __init__.py imports (keep it to a docstring)")
        for target in sorted(graph[name]):
            to = room(target, rooms)
            if to == "":  # the package's own __init__ (the version)
                continue
            if to == "top" and where != "top":
                out.append(f"{name} imports {target}: only the command imports the command")
            elif where not in ("", "top", to) and to != "top" and to not in allowed.get(where, ()):
                out.append(f"{name} imports {target}: {where} may import only "
                           f"{', '.join(sorted(allowed.get(where, ()))) or 'itself'}")
            if target.split(".")[-1].startswith(PRESENTATION) and where != "top" \
                    and not parts[-1].startswith(PRESENTATION):
                out.append(f"{name} imports {target}: the report modules present, nothing below them imports them")
    return out


# ------------------------------------------------------------------------------------------------ dpo itself

def test_dpo_has_no_import_cycle():
    graph = import_graph(ROOT / "dpo", "dpo")
    assert len(graph) > 40  # every module was read
    assert cycles(graph) == []


def test_dpo_imports_flow_one_way():
    assert violations(ROOT / "dpo", "dpo", ALLOWED) == []


def test_the_architecture_page_names_every_subpackage():
    page = (ROOT / "docs" / "architecture.md").read_text()
    on_disk = {p.parent.name for p in (ROOT / "dpo").glob("*/__init__.py")}
    assert on_disk == set(ALLOWED)
    for name in ALLOWED:
        assert f"dpo/{name}/" in page, name


def test_function_local_imports_are_read():
    """The audit command imports the reference pass inside a function: the graph has that edge."""
    graph = import_graph(ROOT / "dpo", "dpo")
    assert "dpo.engine.reference" in graph["dpo.audit.audit"]


# ------------------------------------------------------------------------------------ the checker, on plants

def plant(root: Path, files: dict) -> Path:
    """A package `house` under root: path -> source (a subpackage's __init__.py gets a docstring unless given)."""
    pkg = root / "house"
    for rel, text in files.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in [pkg, *[p for p in pkg.rglob("*") if p.is_dir()]]:
        if not (folder / "__init__.py").exists():
            (folder / "__init__.py").write_text('"""A room."""\n')
    return pkg


SOUND = {"core/files.py": "import os\n",
         "core/config.py": "from house.core import files\n",
         "data/pairs.py": "from house.core.config import files\nfrom . import hellaswag\n",
         "data/hellaswag.py": "from ..core import files\n",
         "cli.py": "from house.data import pairs\nfrom house import __version__\n"}
TWO_ROOMS = {"core": set(), "data": {"core"}}


def test_a_sound_plant_passes(tmp_path):
    pkg = plant(tmp_path, SOUND)
    assert cycles(import_graph(pkg, "house")) == []
    assert violations(pkg, "house", TWO_ROOMS) == []


def test_a_cycle_through_a_function_local_import_is_found(tmp_path):
    """The old flat layout's cycle: config imports audit at the top, audit imports data inside a function, data
    imports config."""
    pkg = plant(tmp_path, {"config.py": "from house import audit\n",
                           "audit.py": "def run():\n    from house.data import load\n    return load\n",
                           "data.py": "from house.config import Settings\n"})
    assert cycles(import_graph(pkg, "house")) == [["house.audit", "house.config", "house.data"]]


def test_a_relative_import_cycle_is_found(tmp_path):
    pkg = plant(tmp_path, {**SOUND, "data/hellaswag.py": "from . import pairs\n"})
    assert cycles(import_graph(pkg, "house")) == [["house.data.hellaswag", "house.data.pairs"]]


@pytest.mark.parametrize("planted, expected", [
    ({"core/config.py": "def f():\n    from house.data import pairs\n"}, "house.core.config imports house.data.pairs"),
    ({"core/config.py": "import house.data.hellaswag\n"}, "house.core.config imports house.data.hellaswag"),
    ({"core/config.py": "from ..data.pairs import read\n"}, "house.core.config imports house.data.pairs"),
    ({"data/pairs.py": "from house import cli\n"}, "only the command imports the command"),
    ({"helpers.py": "x = 1\n"}, "house.helpers: a module directly in house/ belongs in a subpackage"),
    ({"attic/old.py": "x = 1\n"}, "house/attic/ is no subpackage"),
    ({"data/__init__.py": '"""Data."""\nfrom house.data import pairs\n'}, "its __init__.py imports"),
    ({"data/__init__.py": "x = 1\n"}, "its __init__.py has no docstring"),
    ({"data/results.py": "from house.data import report_audit\n", "data/report_audit.py": "x = 1\n"},
     "the report modules present"),
])
def test_an_import_against_the_direction_is_found(tmp_path, planted, expected):
    pkg = plant(tmp_path, {**SOUND, **planted})
    found = violations(pkg, "house", TWO_ROOMS)
    assert any(expected in line for line in found), found
