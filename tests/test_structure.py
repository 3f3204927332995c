"""The house has no circles: imports between ddpm_jax modules, read with ast (nothing runs);
config defaults from one file; benchmarks that name only what the package has."""

import ast
import glob
import os

from tests.conftest import REPO

PACKAGE = os.path.join(REPO, "ddpm_jax")


def _files(root: str, package: str) -> dict[str, str]:
  """{dotted module name: path} of every .py file under ``root`` (the folder of ``package``)."""
  files = {}
  for folder, _, names in os.walk(root):
    for n in names:
      if n.endswith(".py"):
        rel = os.path.relpath(os.path.join(folder, n[:-3]), root).replace(os.sep, ".")
        files[f"{package}.{rel}".removesuffix(".__init__").removesuffix(".__init__")] = \
            os.path.join(folder, n)
  files[package] = os.path.join(root, "__init__.py")
  return files


def imported_names(mod: str, path: str) -> set[str]:
  """Every dotted name a module imports, absolute or relative (``from . import x``,
  ``from ..a import b``: level > 0 is resolved against the module's package), lazily
  (inside functions) or not: for ``from a import b`` both ``a`` and ``a.b``."""
  is_package = path.endswith("__init__.py")
  names = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = mod.split(".") if is_package else mod.split(".")[:-1]
        parts = parts[:len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
      names.add(base)
      names.update(f"{base}.{a.name}" for a in node.names)
    elif isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
  return names


def module_imports(root: str = PACKAGE, package: str = "ddpm_jax") -> dict[str, set[str]]:
  """{module: modules of the package, or ``main``, that it imports}."""
  files = _files(root, package)
  known = set(files) | {"main"}
  graph = {}
  for mod, path in files.items():
    names = imported_names(mod, path)
    deps = {n for n in names if n in known}
    # ``from ddpm_jax import x`` names the module x, not the package itself.
    if any(n.startswith(mod + ".") for n in deps) or package in deps and any(
        n.startswith(package + ".") for n in deps):
      deps.discard(package)
    graph[mod] = deps - {mod}
  return graph


def find_cycle(graph):
  state, stack = {}, []

  def visit(n):
    state[n] = "open"
    stack.append(n)
    for m in sorted(graph.get(n, ())):
      if state.get(m) == "open":
        return stack[stack.index(m):] + [m]
      if m not in state and (c := visit(m)):
        return c
    state[n] = "done"
    stack.pop()
    return None

  for n in sorted(graph):
    if n not in state and (c := visit(n)):
      return c
  return None


def test_no_import_cycles():
  graph = module_imports()
  assert len(graph) > 20 and "ddpm_jax.train" in graph  # the walk found the package
  assert "ddpm_jax.sampling" in graph["ddpm_jax.generate"]  # and reads the imports
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_relative_imports_are_read_and_a_cycle_made_with_them_is_found(tmp_path):
  """A package whose modules import each other relatively (``from . import b``,
  ``from .b import f``, ``from ..pkg import a`` in a sub-package) and lazily: the graph has
  every edge, the cycle is found, and a module importing ``main`` is seen."""
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from . import b\n")
  (pkg / "b.py").write_text("def f():\n  from .sub.c import g\n")
  (pkg / "sub" / "__init__.py").write_text("from . import c\n")
  (pkg / "sub" / "c.py").write_text("from ..a import x\nimport main\n")
  graph = module_imports(str(pkg), "pkg")
  assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.sub.c"}
  assert graph["pkg.sub"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.a", "main"}
  assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
  with_main = {m: d for m, d in graph.items() if "main" in d}
  assert with_main == {"pkg.sub.c": {"pkg.a", "main"}}


def test_building_blocks_do_not_import_orchestration():
  graph = module_imports()
  orchestration = {"ddpm_jax.train", "ddpm_jax.modes", "ddpm_jax.evaluate", "ddpm_jax.distill",
                   "ddpm_jax.consistency_tuning", "ddpm_jax.cli"}
  entry = "ddpm_jax.__main__"  # ``python -m ddpm_jax``: the CLI and nothing else
  assert graph[entry] == {"ddpm_jax.cli"}
  for mod, deps in graph.items():
    if mod not in orchestration | {entry}:
      assert not deps & orchestration, f"{mod} imports {deps & orchestration}"
  # Nor does one orchestrator import another, but for the runs of the trainer's loop with
  # another objective (train.train_and_evaluate): the command line dispatches to them all.
  runs_the_trainer = {"ddpm_jax.distill", "ddpm_jax.consistency_tuning"}
  for mod in orchestration - {"ddpm_jax.cli"}:
    allowed = {"ddpm_jax.train"} if mod in runs_the_trainer else set()
    assert graph[mod] & orchestration <= allowed, f"{mod} imports {graph[mod] & orchestration}"
  # The CLI layer (docs/architecture.md): the command line and the launchers of processes
  # and pods. Nothing below it imports it (tpu_vm once read pod's table of TPU versions).
  cli_layer = {"main", "ddpm_jax.cli", "ddpm_jax.launch", "ddpm_jax.pod"}
  importers = sorted(f"{mod} imports {sorted(deps & cli_layer)}" for mod, deps in graph.items()
                     if mod not in cli_layer | {entry} and deps & cli_layer)
  assert not importers, f"{importers}: the CLI layer is imported from below"


def test_importing_the_package_changes_no_environment():
  import subprocess
  import sys
  # JAX itself sets variables when imported (TPU_SKIP_MDS_QUERY on a machine without TPUs):
  # the baseline is taken after it, so only our own changes count.
  code = ("import os, jax; before = dict(os.environ); import ddpm_jax, ddpm_jax.train; "
          "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True)
  assert out.returncode == 0, out.stderr[-2000:]


def _config_leaves(config, prefix=""):
  """{dotted field: default} of every leaf of a ConfigDict."""
  out = {}
  for k, v in config.items():
    if hasattr(v, "items"):
      out.update(_config_leaves(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def code_defaults() -> list[tuple[str, int, str, object]]:
  """(file, line, field, default) of every ``<x>.get("<field>", <constant>)`` in the code
  whose field is a field of configs/default.py."""
  from configs import default
  names = {path.rsplit(".", 1)[-1] for path in _config_leaves(default.get_config())}
  files = [os.path.join(REPO, "main.py")] + [
      os.path.join(root, n) for root, _, ns in os.walk(PACKAGE) for n in ns if n.endswith(".py")]
  found = []
  for path in files:
    for node in ast.walk(ast.parse(open(path).read())):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == "get" and len(node.args) == 2
          and isinstance(node.args[0], ast.Constant) and node.args[0].value in names):
        try:
          value = ast.literal_eval(node.args[1])
        except ValueError:
          continue
        found.append((os.path.relpath(path, REPO), node.lineno, node.args[0].value, value))
  return found


def drift(found) -> list[str]:
  """The code defaults in ``found`` that configs/default.py does not have for their field."""
  from configs import default
  by_name = {}
  for path, value in _config_leaves(default.get_config()).items():
    by_name.setdefault(path.rsplit(".", 1)[-1], []).append(value)
  return [f"{path}:{line}: {field}={value!r}, configs/default.py has {by_name[field]}"
          for path, line, field, value in found
          if value not in by_name[field]]


def test_code_defaults_cannot_drift_from_configs_default():
  """configs/default.py is the one source of defaults: where code reads a config field with
  a fallback (``section.get("field", value)``), the fallback is the default file's value
  (better, there is none: ``config_lib.with_defaults`` fills every field from the file)."""
  from configs import default
  from ddpm_jax import config_lib
  found = code_defaults()
  # (that the scan sees such reads: the next test; models.py read plain attributes since #26.2)
  assert not drift(found), "\n".join(drift(found))
  # with_defaults fills a config that lacks every section with the file's value of each field.
  empty = default.get_config()
  for section in list(empty.keys()):
    del empty[section]
  full = config_lib.with_defaults(empty)
  for path, value in _config_leaves(default.get_config()).items():
    node = full
    for key in path.split("."):
      node = node[key]
    assert node == value, path
  # ... and keeps the fields a config has (a saved run's own values win over the defaults).
  own = default.get_config()
  own.sampling.guidance_scale = 5.0
  assert config_lib.with_defaults(own).sampling.guidance_scale == 5.0


def test_the_drift_check_catches_a_wrong_fallback(tmp_path, monkeypatch):
  """A module reading ``s.get("guidance_scale", 1.0)`` (the file says 3.0) is caught."""
  pkg = tmp_path / "ddpm_jax"
  pkg.mkdir()
  (pkg / "x.py").write_text('def f(s):\n  return s.get("guidance_scale", 1.0), '
                            's.get("num_groups", 32)\n')
  (tmp_path / "main.py").write_text("")
  import tests.test_structure as me
  monkeypatch.setattr(me, "PACKAGE", str(pkg))
  monkeypatch.setattr(me, "REPO", str(tmp_path))
  found = me.code_defaults()
  assert found == [("ddpm_jax/x.py", 2, "guidance_scale", 1.0),
                   ("ddpm_jax/x.py", 2, "num_groups", 32)]
  assert drift(found) == ["ddpm_jax/x.py:2: guidance_scale=1.0, configs/default.py has [3.0]"]


def _benchmark_references(path: str) -> list[tuple[int, str, list[str]]]:
  """Every ``alias.a.b`` in a benchmark file whose ``alias`` is a ddpm_jax module it imports
  (anywhere in the file: the benchmarks import lazily): (line, module, [a, b, ...])."""
  tree = ast.parse(open(path).read())
  aliases = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module == "ddpm_jax":
      for a in node.names:
        aliases[a.asname or a.name] = f"ddpm_jax.{a.name}"
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and not isinstance(getattr(node, "_parent", None),
                                                          ast.Attribute):
      chain, base = [], node
      while isinstance(base, ast.Attribute):
        chain.insert(0, base.attr)
        base = base.value
      if isinstance(base, ast.Name) and base.id in aliases:
        out.append((node.lineno, aliases[base.id], chain))
    for child in ast.iter_child_nodes(node):
      child._parent = node
  return out


def _missing(module: str, chain: list[str]) -> str | None:
  """The first name of ``chain`` that ``module`` (then each module or class on the way) lacks."""
  import importlib
  import inspect
  obj = importlib.import_module(module)
  for name in chain:
    if not (inspect.ismodule(obj) or inspect.isclass(obj)):
      return None  # a value: its attributes are not ours to know statically
    if not hasattr(obj, name):
      return name
    obj = getattr(obj, name)
  return None


def test_the_benchmarks_name_only_what_the_package_has(tmp_path):
  """The benchmarks run by hand, not in the suite: a function they call that moved or was
  renamed (fid_floor.py once called the pre-#26.4 names) is caught here, by reading them."""
  found = 0
  for path in sorted(glob.glob(os.path.join(REPO, "benchmarks", "*.py"))):
    for line, module, chain in _benchmark_references(path):
      found += 1
      gone = _missing(module, chain)
      assert gone is None, (f"{os.path.relpath(path, REPO)}:{line}: {module}."
                            f"{'.'.join(chain)}: no {gone!r}")
  assert found > 50  # the walk sees the references
  bad = tmp_path / "bad.py"
  bad.write_text("def f():\n  from ddpm_jax import evaluate\n  return evaluate.Reference.nope\n")
  (line, module, chain), = _benchmark_references(str(bad))
  assert (line, module, chain) == (3, "ddpm_jax.evaluate", ["Reference", "nope"])
  assert _missing(module, chain) == "nope"
