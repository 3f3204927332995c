"""Host-side agreement between processes (``parallel.exchange``, ``process_0_then_all``) in one
2-process job launched as a pod runs it, and the torn-line rule of the logs those processes
append to (``fs.GrowingFile``)."""

import json
import re

from ddpm_jax import fs
from tests import cli

AGREEMENT_SCRIPT = """
import json, os, sys
sys.path.insert(0, {repo!r})
from ddpm_jax import run_utils
run_utils.set_process_defaults()
from ddpm_jax import errors, parallel
parallel.initialize_distributed()
import jax
me = jax.process_index()
out = {{"exchange": [parallel.exchange("x", f"first from {{me}}"),
                     parallel.exchange("x", f"second from {{me}}")]}}

def fails_with(cls):
  def fn():
    raise cls(f"{{cls.__name__}} on process 0")
  return fn

out["ok"] = parallel.process_0_then_all("p0", lambda: "done")
for cls in (errors.ConfigError, errors.NoCheckpointError):
  try:
    parallel.process_0_then_all("p0", fails_with(cls))
    out[cls.__name__] = "no error"
  except errors.UserError as e:
    out[cls.__name__] = [type(e).__name__, str(e)]
print("result", json.dumps(out), flush=True)
parallel.leave_together(0)
"""


def test_successive_calls_with_one_name_agree_on_their_own_values_and_error_classes(
    tmp_path, capfd):
  """Every process makes the same calls in order, so the n-th call of a name must read the
  n-th values (not the first call's again); and the others raise process 0's error as its own
  class, which callers and main.py tell apart (a config error, no checkpoint yet)."""
  from ddpm_jax import launch
  script = tmp_path / "agree.py"
  script.write_text(AGREEMENT_SCRIPT.format(repo=cli.REPO))
  rc = launch.launch([], 2, 1, script=str(script), grace_s=60)
  out = "".join(capfd.readouterr())
  assert rc == 0, out[-3000:]
  results = {int(p): json.loads(r) for p, r in re.findall(r"^\[p(\d)\] result (.*)$", out, re.M)}
  assert sorted(results) == [0, 1], out[-3000:]
  for p, r in results.items():
    assert r["exchange"] == [["first from 0", "first from 1"],
                             ["second from 0", "second from 1"]], (p, r)
    assert r["ok"] == ("done" if p == 0 else None)
    assert r["ConfigError"] == ["ConfigError", "ConfigError on process 0"], (p, r)
    assert r["NoCheckpointError"] == ["NoCheckpointError", "NoCheckpointError on process 0"]


def test_keep_lines_drops_a_torn_last_line_so_the_next_line_stays_whole(tmp_path):
  """A run killed mid-write leaves a last line without its newline (here even valid JSON, or
  cut off inside the JSON); kept, the resumed run's first line would be glued onto it."""
  for torn in (b'{"step": 3}', b'{"step": 3, "lo'):
    p = tmp_path / "metrics.jsonl"
    p.write_bytes(b'{"step": 1}\n{"step": 2}\n' + torn)
    f = fs.GrowingFile(str(p))
    f.keep_lines(lambda line: json.loads(line)["step"] <= 5)
    f.write(b'{"step": 4}\n')
    f.flush()
    assert [json.loads(x)["step"] for x in open(p)] == [1, 2, 4], (torn, p.read_bytes())
