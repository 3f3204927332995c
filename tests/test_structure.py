"""The house has no circles: imports between ddpm_jax modules, read with ast (nothing runs)."""

import ast
import os

from tests.conftest import REPO

PACKAGE = os.path.join(REPO, "ddpm_jax")


def module_imports() -> dict[str, set[str]]:
  """{module: ddpm_jax modules it imports}, lazily (inside functions) or not."""
  files = {}
  for root, _, names in os.walk(PACKAGE):
    for n in names:
      if n.endswith(".py"):
        path = os.path.join(root, n)
        mod = os.path.relpath(path[:-3], REPO).replace(os.sep, ".")
        files[mod.removesuffix(".__init__")] = path
  graph = {}
  for mod, path in files.items():
    deps = set()
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        base = node.module
        names = [f"{base}.{a.name}" for a in node.names]
        deps.update(n for n in names if n in files)
        if base in files and not any(n in files for n in names):
          deps.add(base)
      elif isinstance(node, ast.Import):
        deps.update(a.name for a in node.names if a.name in files)
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
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_building_blocks_do_not_import_orchestration():
  graph = module_imports()
  orchestration = {"ddpm_jax.train", "ddpm_jax.sample", "ddpm_jax.evaluate"}
  for mod, deps in graph.items():
    if mod not in orchestration:
      assert not deps & orchestration, f"{mod} imports {deps & orchestration}"
  assert not any("main" in d for deps in graph.values() for d in deps)


def test_importing_the_package_changes_no_environment():
  import subprocess
  import sys
  code = ("import os; before = dict(os.environ); import ddpm_jax, ddpm_jax.train; "
          "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True)
  assert out.returncode == 0, out.stderr[-2000:]
