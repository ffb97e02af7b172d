"""Each package's `__init__` says what it offers (docs/index.md): every name that code, tests,
benchmarks and the docs use from outside a package is reachable from the package, and nothing
outside a package uses its private names. Read from the sources with `ast`; nothing is run."""

import ast
import importlib
import re
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The packages whose `__init__` offers names (`__all__`). The private-name rule holds for every
# package, these included.
OFFERING = ("np_jax.chip", "np_jax.quant", "np_jax.appliance", "np_jax.cost", "models", "models.io", "models.train",
            "models.evaluate")

# Uses that break a rule, each with its reason; the set must not grow, and an entry that no longer
# occurs fails the test (so that it is removed).
EXCEPTIONS = {
    # white-box tests of an internal step, each reached through its module:
    ("tests/test_gptq.py", "np_jax.quant.gptq", "_gptq_sweep"): "the jit cache of the sweep: no recompilation",
    ("tests/test_hadamard.py", "np_jax.quant.hadamard", "_apply_factors"): "the factors `apply` picks",
    ("tests/test_quant.py", "np_jax.quant.products", "_fake_product"): "the fake-quant oracle of the integer product",
    # a command's own steps, checked directly:
    ("tests/test_smollm2.py", "models.commands.run", "_shape_and_source"): "the model the run command plans",
    ("tests/test_run_cli.py", "models.commands.run", "_how_loaded"): "how the run command loaded the model",
    ("tests/test_train.py", "models.commands.train", "_model_context"): "the context the train command reads",
}


def _is_package(mod: str) -> bool:
    return (ROOT / mod.replace(".", "/")).is_dir()


def _is_module(mod: str) -> bool:
    return _is_package(mod) or (ROOT / (mod.replace(".", "/") + ".py")).is_file()


def _package_of(mod: str) -> str:
    return mod if _is_package(mod) else mod.rpartition(".")[0]


def _sources():
    """(where, Python source): the project's files and the docs' Python snippets."""
    for top in ("np_jax", "models", "tests", "benchmarks"):
        for f in sorted((ROOT / top).rglob("*.py")):
            yield str(f.relative_to(ROOT)), f.read_text()
    for f in sorted((ROOT / "docs").glob("*.md")):
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", f.read_text(), re.S)):
            yield f"{f.relative_to(ROOT)} (Python snippet {i + 1})", block


def _uses():
    """Every (where, module, name, how) the sources take from a project module: `from M import
    name` ("from"), `M.name` through an imported module ("attr"), and the docs' dotted names in
    backquotes ("doc")."""
    out = []
    for where, text in _sources():
        tree = ast.parse(text)
        alias = {}  # local name -> the project module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in ("np_jax",
                                                                                                      "models"):
                for a in node.names:
                    out.append((where, node.module, a.name, "from"))
                    if _is_module(f"{node.module}.{a.name}"):
                        alias[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in ("np_jax", "models"):
                        alias[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):  # `a.b.c` and its inner `a.b`: each a use
                chain, n = [], node
                while isinstance(n, ast.Attribute):
                    chain.append(n.attr)
                    n = n.value
                if isinstance(n, ast.Name) and n.id in alias:
                    out += _resolve(where, alias[n.id].split(".") + chain[::-1], "attr")
    for f in sorted((ROOT / "docs").glob("*.md")):
        for ref in sorted(set(re.findall(r"`((?:np_jax|models)(?:\.\w+)+)", f.read_text()))):
            out += _resolve(str(f.relative_to(ROOT)), ref.split("."), "doc")
    return sorted(set(out))


def _resolve(where, parts, how):
    """The use in a dotted chain: the longest module prefix and the name after it (none if the
    whole chain is a module)."""
    for k in range(len(parts) - 1, 0, -1):
        if _is_module(".".join(parts[:k])):
            return [(where, ".".join(parts[:k]), parts[k], how)]
    return []


USES = _uses()
OUTSIDE = [(w, m, n, h) for w, m, n, h in USES if not w.startswith(_package_of(m).replace(".", "/") + "/")]


def _reachable(pkg: str, mod: str, name: str, how: str) -> bool:
    """Whether `name`, taken from `mod` in package `pkg`, is offered by the package: as a name of
    `__all__` (the same object), or, used through a module the package offers, as that module's."""
    offer, module = importlib.import_module(pkg), importlib.import_module(mod)
    obj = getattr(module, name, None)
    if name in offer.__all__ and getattr(offer, name) is obj:
        return True
    if mod == pkg:
        return False
    if how != "from" and mod.rpartition(".")[2] in offer.__all__ and mod.rpartition(".")[0] == pkg:
        return hasattr(module, name)
    # imported through a module that imports it itself: reachable from the package that defines it
    home = getattr(obj, "__module__", None) or ""
    home_pkg = _package_of(home) if _is_module(home) else None
    return home_pkg in OFFERING and home_pkg != pkg and _reachable(home_pkg, home, name, how)


def test_the_scan_sees_the_project():
    """The scan finds the uses it is about (guards against a scan that silently finds nothing)."""
    assert ("models/appliance.py", "np_jax.chip.array", "dot_form", "from") in USES
    assert ("models/llama.py", "np_jax.quant", "products", "from") in USES
    assert any(w == "docs/training.md (Python snippet 1)" and m == "models.train" for w, m, _, _ in USES)
    assert any(h == "doc" and n == "dot_form" for _, _, n, h in USES)
    assert any(h == "attr" and m == "models.llama" for _, m, _, h in USES)


@pytest.mark.parametrize("pkg", OFFERING)
def test_every_name_used_from_outside_a_package_is_offered(pkg):
    offer = importlib.import_module(pkg)
    assert all(hasattr(offer, n) for n in offer.__all__), [n for n in offer.__all__ if not hasattr(offer, n)]
    missing = sorted({(w, m, n) for w, m, n, h in OUTSIDE
                      if _package_of(m) == pkg and not n.startswith("_") and (w, m, n) not in EXCEPTIONS
                      and not _reachable(pkg, m, n, h)})
    assert not missing, missing


@pytest.mark.parametrize("pkg", OFFERING)
def test_a_package_docstring_names_the_modules_it_offers(pkg):
    offer = importlib.import_module(pkg)
    modules = [n for n in offer.__all__ if isinstance(getattr(offer, n), types.ModuleType)]
    assert all(f"`{m}`" in offer.__doc__ for m in modules), [m for m in modules if f"`{m}`" not in offer.__doc__]


def test_nothing_outside_a_package_uses_its_private_names():
    private = sorted({(w, m, n) for w, m, n, _ in OUTSIDE
                      if n.startswith("_") and not n.startswith("__") and (w, m, n) not in EXCEPTIONS})
    assert not private, private


def test_every_listed_exception_still_occurs():
    used = {(w, m, n) for w, m, n, _ in OUTSIDE}
    assert not set(EXCEPTIONS) - used, sorted(set(EXCEPTIONS) - used)
