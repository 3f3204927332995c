"""Settings refused before any work (one line naming the field), what 0 means for the
checkpoint settings, and restart inputs a crash or a user left behind (metrics.jsonl)."""

import json
import os

import jax
import pytest

from ddpm_jax import config_lib, train, writers
from tests.conftest import tiny_config

nan, inf = float("nan"), float("inf")


@pytest.mark.parametrize("field,value", [
    ("training.num_train_steps", 0),  # used to run nothing and exit 0
    ("training.num_train_steps", -5),
    ("training.checkpoint_every_steps", 0),  # used to divide by zero after compiling
    ("training.log_every_steps", 0),  # the same
    ("training.log_every_steps", -1),
    ("training.keep_checkpoints", -1),  # orbax would read it as "keep none"
    ("training.keep_period", -100),
    ("training.sample_every_steps", -2),
    ("training.eval_every_steps", -2),
    ("training.max_bad_steps", 0),  # would stop at the first step however it went
    ("training.checkpoint_every_minutes", -1.0),  # would save at every dispatch
    ("training.checkpoint_every_minutes", nan),
    ("training.ema_decay", 1.5),
    ("optim.learning_rate", nan),  # NaN, inf, <= 0: every step skipped or a dead run
    ("optim.learning_rate", inf),
    ("optim.learning_rate", -1e-4),
    ("optim.learning_rate", 0.0),
    ("optim.warmup_steps", -1),
    ("optim.weight_decay", nan),
    ("optim.b2", 1.0),
    ("optim.eps", 0.0),
    ("optim.grad_clip_norm", -1.0),
])
def test_a_bad_training_value_is_one_line_naming_the_field(field, value):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(tiny_config(**{field: value}), jax.device_count())
  msg = str(e.value)
  assert msg.startswith(f"{field}=") and "\n" not in msg, msg


def test_the_shipped_meanings_of_zero_are_accepted():
  """0 is "off" for these (keep every checkpoint, keep no extra, never sample/eval/save by
  time, no clipping, no warmup): refusing them would break documented settings."""
  config_lib.validate(tiny_config(**{
      "training.keep_checkpoints": 0, "training.keep_period": 0,
      "training.sample_every_steps": 0, "training.eval_every_steps": 0,
      "training.checkpoint_every_minutes": 0.0, "optim.grad_clip_norm": 0.0,
      "optim.warmup_steps": 0, "optim.weight_decay": 0.0}), jax.device_count())


def test_a_refusal_comes_before_data_preparation_and_writes_nothing(tmp_path):
  """The refusal is the first thing training does: nothing prepared in data_dir (minutes on
  a real data set), nothing compiled, nothing written to the workdir."""
  data, work = tmp_path / "data", tmp_path / "work"
  data.mkdir()
  config = tiny_config(**{"data.data_dir": str(data), "training.num_train_steps": 0})
  with pytest.raises(config_lib.ConfigError, match=r"^training\.num_train_steps=0 must be >= 1"):
    train.train_and_evaluate(config, str(work))
  assert os.listdir(data) == [] and not work.exists()


def _steps(workdir) -> list[int]:
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def test_keep_checkpoints_zero_keeps_every_checkpoint_over_a_run_and_its_resume(tmp_path,
                                                                                 data_dir):
  """keep_checkpoints=0 means no pruning (0 = off, as for its neighbours), not orbax's "keep
  none", which deleted every checkpoint, the old ones on a resume too, and exited 0."""
  w = str(tmp_path)
  flags = {"data.data_dir": data_dir, "training.keep_checkpoints": 0,
           "training.keep_period": 0, "training.checkpoint_every_steps": 2}
  train.train_and_evaluate(tiny_config(**flags, **{"training.num_train_steps": 6}), w)
  assert _steps(w) == [2, 4, 6]
  train.train_and_evaluate(tiny_config(**flags, **{"training.num_train_steps": 8}), w)
  assert _steps(w) == [2, 4, 6, 8]  # more than the default 3, and the old ones stay


# ------------------------------------------------- what a crash or a user left behind

def test_foreign_metrics_lines_never_block_a_restart(tmp_path, caplog):
  """A resumed run drops metrics.jsonl lines past its checkpoint (they come again). Lines
  that are not our records (a note, a list, a step that is not a number, garbage bytes) used
  to stop every restart with a traceback; now each is dropped with one warning, our lines up
  to the step stay exactly as they were, and a torn last line goes as before."""
  ours = [json.dumps({"step": s, "loss": 0.5}) + "\n" for s in range(1, 5)]
  foreign = ["[1, 2]\n", '{"note": "restarted by hand"}\n', '{"step": "3"}\n', "null\n",
             '"text"\n', "not json\n", '{"step": NaN}\n']
  path = tmp_path / "metrics.jsonl"
  body = ours[0] + foreign[0] + ours[1] + "".join(foreign[1:]) + ours[2] + ours[3]
  path.write_bytes(body.encode() + b"\xff\xfe\n" + b'{"step": 9, "lo')
  writer = writers.MetricWriter(str(tmp_path))
  with caplog.at_level("WARNING"):
    writer.drop_after(2)
  writer.close()
  assert path.read_text() == ours[0] + ours[1]
  dropped = [r for r in caplog.records if "not a metrics record" in r.getMessage()]
  assert len(dropped) == len(foreign) + 1  # + the undecodable bytes; the torn line is silent
