"""The package's shape: no import cycles, the library never imports the CLI, one top-level package."""
import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "sdsurgery"


def _imports(path: Path) -> set[str]:
    """sdsurgery modules ``path`` imports, at any depth (lazy imports count), except under
    ``if TYPE_CHECKING:`` (never executed)."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:  # a submodule, else an attribute of the module `target`
                sub = f"{target}.{a.name}"
                found.add(sub if (ROOT / Path(*sub.split("."))).with_suffix(".py").is_file()
                          or (ROOT / Path(*sub.split(".")) / "__init__.py").is_file() else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {f for f in found if f.split(".")[0] in ("sdsurgery", "sdsurgery_cli")}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def test_no_import_cycles_inside_the_package():
    mods = _modules()
    graph = {m: {d for d in _imports(p) if d in mods and d != m and m != "sdsurgery.__main__"}
             for m, p in mods.items()}
    state, cycles = {}, []

    def walk(m, trail):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(trail[trail.index(d):] + [d])
            elif d not in state:
                walk(d, trail + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            walk(m, [m])
    assert not cycles, " | ".join(" -> ".join(c) for c in cycles)


def test_the_library_never_imports_the_cli():
    offenders = [m for m, p in _modules().items() if m != "sdsurgery.__main__"
                 and any(d.startswith("sdsurgery_cli") for d in _imports(p))]
    assert not offenders


def test_installing_puts_one_top_level_package_and_its_cli(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("sdsurgery", "cli"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = zipfile.ZipFile(next((tmp_path / "dist").glob("*.whl")))
    top = {n.split("/")[0] for n in wheel.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"sdsurgery", "sdsurgery_cli"}
    entry = next(n for n in wheel.namelist() if n.endswith("entry_points.txt"))
    assert "sdsurgery = sdsurgery_cli:run" in wheel.read(entry).decode()


def test_every_graph_rewrite_is_linted():
    """Each function that edits an fx graph calls ``lint()`` on it before the graph is used."""
    editors = {}
    for m, p in _modules().items():
        tree = ast.parse(p.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef):
                src = ast.unparse(fn)
                if any(op in src for op in (".erase_node(", ".replace_input_with(", ".node_copy(",
                                            ".inserting_before(", ".inserting_after(")):
                    editors[f"{m}.{fn.name}"] = ".lint()" in src
    assert editors and all(editors.values()), [k for k, v in editors.items() if not v]


def test_every_module_says_what_it_exports():
    """``__all__`` in every module of the library and the CLI, naming only what exists."""
    import importlib
    missing, unknown = [], []
    paths = dict(_modules())
    paths.update({"sdsurgery_cli." + p.stem if p.stem != "__init__" else "sdsurgery_cli": p
                  for p in (ROOT / "cli").glob("*.py")})
    for name, path in sorted(paths.items()):
        if path.name == "__main__.py":
            continue
        mod = importlib.import_module(name)
        if "__all__" not in vars(mod):
            missing.append(name)
            continue
        unknown += [f"{name}.{n}" for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing and not unknown, (missing, unknown)


def test_functions_and_classes_stay_readable():
    """No function over 80 lines and no class over 250 in the library (the issue-12 limits)."""
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            limit = 250 if isinstance(node, ast.ClassDef) else 80
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                    and node.end_lineno - node.lineno + 1 > limit:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long, long
