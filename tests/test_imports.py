"""The import rules of the Python packages, checked on their source (ast): no module imports another in a circle,
none imports a package above its own (LAYERS), none takes another module's private name, only kforcing_ops and the
tests import kforcing_ops.reference, and pyproject.toml installs every package."""

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"kforcing": ROOT / "python" / "kforcing", "kforcing_ops": ROOT / "kforcing_ops"}

# The floors of the code, lowest first: a module may import its own floor and the floors below, never one above.
# Within a floor only the circle test applies. `kforcing` itself (its __init__, the public names) is the roof.
LAYERS = [
    ["kforcing_ops"],
    ["kforcing.runtime", "kforcing.noise", "kforcing.options"],
    ["kforcing.data"],
    ["kforcing.models"],
    ["kforcing.teachers"],
    ["kforcing.checkpoints"],
    ["kforcing.decoding"],
    ["kforcing.evaluation"],
    ["kforcing.training"],
    ["kforcing.students"],
    ["kforcing.workflows"],
    ["kforcing.serving"],
    ["kforcing.cli"],
]


def _module_name(package, path):
    parts = path.relative_to(PACKAGES[package]).with_suffix("").parts
    return ".".join((package,) + (parts[:-1] if parts[-1] == "__init__" else parts))


def _imports(package, path):
    """(module imported, name taken from it or None) of every import statement in the file, relative ones resolved;
    imports inside functions count too (a circle through a deferred import is still a circle)."""
    module = _module_name(package, path)
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            source = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            for alias in node.names:
                yield source, alias.name


def _is_submodule(source, name, modules):
    """Whether `from source import name` imports a submodule: a Python one, or a compiled one such as _C."""
    if f"{source}.{name}" in modules:
        return True
    package = modules.get(source)
    return package is not None and package[1].name == "__init__.py" and any(package[1].parent.glob(f"{name}.*"))


def _graph():
    """(edges {module: modules it imports}, private names taken, modules importing kforcing_ops.reference)."""
    modules = {_module_name(package, path): (package, path)
               for package, folder in PACKAGES.items() for path in folder.rglob("*.py")}
    edges, private, reference = {name: set() for name in modules}, [], []
    for name, (package, path) in modules.items():
        for source, taken in _imports(package, path):
            submodule = taken is not None and _is_submodule(source, taken, modules)
            target = f"{source}.{taken}" if submodule else source
            if target in modules and target != name:
                edges[name].add(target)
                if target == "kforcing_ops.reference" and not name.startswith("kforcing_ops"):
                    reference.append(name)
            if taken and taken.startswith("_") and not taken.startswith("__") and not submodule and source != name:
                private.append(f"{name} takes {source}.{taken}")
    return edges, private, reference


def _circles(edges):
    circles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return circles


def test_no_module_imports_another_in_a_circle():
    edges, _, _ = _graph()
    assert not _circles(edges)


def _floor(module):
    """The index in LAYERS of a module's floor; the `kforcing` package itself is the roof."""
    if module == "kforcing":
        return len(LAYERS)
    for index, floor in enumerate(LAYERS):
        if any(module == name or module.startswith(name + ".") for name in floor):
            return index
    raise AssertionError(f"{module} is on no floor: add its package to LAYERS in tests/test_imports.py")


def _upward_imports(edges):
    return sorted(f"{module} imports {target}" for module, targets in edges.items() for target in targets
                  if _floor(target) > _floor(module))


def test_no_module_imports_a_package_above_its_own():
    edges, _, _ = _graph()
    assert not _upward_imports(edges)


def test_the_floors_catch_an_upward_import():
    """A model importing the decoding package is found; the decoding package importing a model is not."""
    edges = {"kforcing.models.transformer": {"kforcing.decoding.generate"},
             "kforcing.decoding.generate": {"kforcing.models.transformer"}}
    assert _upward_imports(edges) == ["kforcing.models.transformer imports kforcing.decoding.generate"]


def test_pyproject_installs_every_package():
    """A subpackage missing from [tool.setuptools] packages would be left out of a regular (non-editable) install."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {_module_name(package, path) for package, folder in PACKAGES.items()
             for path in folder.rglob("__init__.py")}
    assert found == listed


def test_the_rules_catch_what_they_forbid(tmp_path, monkeypatch):
    """The walk itself, on a made-up package: a circle through a deferred import, a private name taken from a
    sibling and an import of kforcing_ops.reference are all found; a private submodule import is not a finding."""
    package = tmp_path / "kforcing"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import _secret\nfrom . import _helpers\n")
    (package / "b.py").write_text("def f():\n    from . import a\n_secret = 1\n")
    (package / "_helpers.py").write_text("from kforcing_ops.reference import cdf_interval\n")
    monkeypatch.setitem(PACKAGES, "kforcing", package)
    edges, private, reference = _graph()
    assert ["kforcing.a", "kforcing.b", "kforcing.a"] in _circles(edges)
    assert private == ["kforcing.a takes kforcing.b._secret"]
    assert reference == ["kforcing._helpers"]


def test_no_module_takes_another_modules_private_name():
    _, private, _ = _graph()
    assert not private


def test_only_kforcing_ops_imports_its_references():
    _, _, reference = _graph()
    assert not reference
