"""pyproject's requires-python is true to the pins, and main.py says so on an older Python."""

import importlib.metadata
import os
import re
import subprocess
import sys

from tests.conftest import REPO

try:
  from packaging.specifiers import SpecifierSet
  from packaging.version import Version
except ImportError:  # pragma: no cover - packaging ships with pip's environments
  SpecifierSet = Version = None


def _read(name: str) -> str:
  with open(os.path.join(REPO, name)) as f:
    return f.read()


def requires_python() -> str:
  """``project.requires-python`` of pyproject.toml."""
  try:
    import tomllib
    return tomllib.loads(_read("pyproject.toml"))["project"]["requires-python"]
  except ImportError:  # pragma: no cover - Python < 3.11 cannot run the tests anyway
    return re.search(r'^requires-python\s*=\s*"([^"]+)"', _read("pyproject.toml"), re.M)[1]


def lower_bound(spec: str) -> tuple[int, ...]:
  """The ``>=X.Y`` bound of a Requires-Python string (``(0,)`` when it has none)."""
  found = re.findall(r">=\s*([0-9]+(?:\.[0-9]+)*)", spec)
  return max((tuple(int(p) for p in v.split(".")) for v in found), default=(0,))


def pinned() -> dict[str, str]:
  """{name: version} of the ``name==version`` lines of requirements.txt."""
  pins = {}
  for line in _read("requirements.txt").splitlines():
    m = re.match(r"\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*==\s*([^\s;#]+)", line)
    if m:
      pins[m[1]] = m[2]
  return pins


def installed_requires_python() -> dict[str, str]:
  """{pin: its Requires-Python} for the pins installed at the pinned version."""
  out = {}
  for name, version in pinned().items():
    try:
      dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
      continue
    if dist.version == version and dist.metadata.get("Requires-Python"):
      out[name] = dist.metadata["Requires-Python"]
  return out


def test_the_parsers():
  assert lower_bound(">=3.11") == (3, 11)
  assert lower_bound(">=3.9, !=3.9.1, <4") == (3, 9)
  assert lower_bound("~=3.8") == (0,)
  assert pinned()["jax"] and "tensorflow-cpu" in pinned()


def test_requires_python_is_true_to_the_pins():
  ours = requires_python()
  floor = lower_bound(ours)
  needs = installed_requires_python()
  assert len(needs) >= 10, f"too few pins installed to check: {sorted(needs)}"
  for name, spec in needs.items():
    if SpecifierSet is not None:
      # every Python our bound admits (its floor, and the next minors) is admitted by the pin
      for minor in range(floor[1], floor[1] + 3):
        v = Version(f"{floor[0]}.{minor}")
        if v in SpecifierSet(ours):
          assert v in SpecifierSet(spec), f"{name} needs Python {spec}; pyproject says {ours}"
    else:  # pragma: no cover
      assert lower_bound(spec) <= floor, f"{name} needs Python {spec}; pyproject says {ours}"
  highest = max(lower_bound(s) for s in needs.values())
  assert floor == highest, (f"requires-python {ours}: the pins' highest minimum is "
                            f"{'.'.join(map(str, highest))} ({sorted(needs.items())})")


def test_ruff_targets_the_same_python():
  floor = lower_bound(requires_python())
  assert f'target-version = "py{floor[0]}{floor[1]}"' in _read("pyproject.toml")


def test_main_refuses_an_older_python_in_one_line():
  """The guard runs before any import that needs 3.11 (here 3.10 is faked, nothing else runs)."""
  code = ("import sys; sys.version_info = (3, 10, 12, 'final', 0); sys.version = '3.10.12 (x)'; "
          "exec(compile(open('main.py').read(), 'main.py', 'exec'), {'__name__': '__main__'})")
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                     timeout=60)
  assert r.returncode == 1
  assert r.stderr.strip().splitlines() == [
      "error: ddpm_jax needs Python >= 3.11, not 3.10.12 (docs/tpu_pod.md)"]


def test_main_parses_with_the_grammar_of_older_pythons():
  """So an old interpreter reaches the guard instead of a SyntaxError."""
  import ast
  ast.parse(_read("main.py"), feature_version=(3, 6))
