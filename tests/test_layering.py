"""Import rules of the tree (DESIGN.md's layout), read from the source with `ast`.

Every import counts, including the ones inside functions: a lazy import is still a
dependency.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _imports(path: pathlib.Path) -> set[str]:
  """Absolute module names `path` imports (`from a.b import c` gives a.b and a.b.c)."""
  tree = ast.parse(path.read_text(), filename=str(path))
  found: set[str] = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:                      # relative: resolve against the file's package
        base = path.relative_to(ROOT).with_suffix("").parts[:-node.level]
        module = ".".join(base + ((node.module,) if node.module else ()))
      else:
        module = node.module or ""
      found.add(module)
      found.update(f"{module}.{alias.name}" for alias in node.names)
  return found


def _package_files(package: str) -> list[pathlib.Path]:
  return sorted((ROOT / package).rglob("*.py"))


def _offenders(files, banned_prefixes) -> list[str]:
  out = []
  for path in files:
    for name in sorted(_imports(path)):
      if any(name == p or name.startswith(p + ".") for p in banned_prefixes):
        out.append(f"{path.relative_to(ROOT)} imports {name}")
  return out


def test_the_rule_reader_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
  pkg = tmp_path / "pkg"
  pkg.mkdir()
  f = pkg / "m.py"
  f.write_text("def g():\n  import configs.models\nfrom . import sibling\nfrom .x import y\n")
  monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
  assert {"configs.models", "pkg", "pkg.sibling", "pkg.x", "pkg.x.y"} <= _imports(f)


def test_library_imports_neither_configs_nor_launch():
  assert _offenders(_package_files("cai_jax"), ("configs", "launch")) == []


def test_configs_are_plain_data():
  assert _offenders(_package_files("configs"), ("cai_jax", "launch")) == []


def test_parallel_depends_on_nothing_in_the_library():
  assert _offenders([ROOT / "cai_jax" / "parallel.py"], ("cai_jax",)) == []


def test_model_knows_no_trainer_sampler_or_server():
  banned = ("cai_jax.train", "cai_jax.sampling", "cai_jax.engine", "cai_jax.serve", "cai_jax.cai",
            "cai_jax.data", "cai_jax.checkpoint")
  assert _offenders(_package_files("cai_jax/model"), banned) == []


def test_serve_does_not_import_train():
  assert _offenders(_package_files("cai_jax/serve"), ("cai_jax.train",)) == []


@pytest.mark.parametrize("package", ["cai_jax/data", "cai_jax/cai"])
def test_data_and_cai_stages_do_not_import_the_trainers(package):
  assert _offenders(_package_files(package), ("cai_jax.train",)) == []


def test_no_import_cycles_in_the_library():
  """Module-level and lazy imports alike: no two library modules depend on each other
  through any chain (a package's __init__ re-exporting its modules does not count)."""
  modules = {}
  for path in _package_files("cai_jax"):
    parts = path.relative_to(ROOT).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    modules[name] = path
  graph = {}
  for name, path in modules.items():
    deps = set()
    for imported in _imports(path):
      while imported and imported not in modules:      # `from a.b import f` -> a.b
        imported = imported.rpartition(".")[0]
      if imported and imported != name and not modules[imported].name == "__init__.py":
        deps.add(imported)
    graph[name] = deps
  # Tarjan's strongly connected components: a component of more than one module is a cycle.
  index, low, on_stack, stack, cycles = {}, {}, set(), [], []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        cycles.append(sorted(component))

  for v in graph:
    if v not in index:
      visit(v)
  assert cycles == []
