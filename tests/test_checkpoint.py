"""What a checkpoint that does not restore costs: only damaged bytes set it aside; a changed
setting or a failed read is one line and nothing moves (local disk here; gs:// and several
processes in test_gcs.py and test_multihost.py)."""

import glob
import os

import jax
import numpy as np
import pytest

from ddpm_jax import checkpoint as ckpt_lib
from ddpm_jax import models
from ddpm_jax import state as state_lib
from ddpm_jax.errors import ConfigError, UserError
from tests.conftest import tiny_config


def _workdir_with_two_checkpoints(path, config):
  model, tx = models.create_model(config), state_lib.make_optimizer(config)
  state = state_lib.create_train_state(config, model, tx, jax.random.key(0))
  mngr = ckpt_lib.make_manager(str(path), async_save=False)
  for step in (2, 4):
    ckpt_lib.save(mngr, step, state.replace(step=np.int32(step)), config)
  mngr.wait_until_finished()
  return state


def _steps(path):
  return sorted(int(s) for s in os.listdir(path / "checkpoints"))


def _data_files(path, step):
  return [f for f in glob.glob(str(path / "checkpoints" / str(step) / "state" / "**"),
                               recursive=True) if os.path.isfile(f) and "/d/" in f]


@pytest.mark.parametrize("change", [{"optim.grad_clip_norm": 0.0}, {"optim.optimizer": "adam"},
                                    {"model.ch": 24}])
def test_a_changed_setting_is_one_line_and_moves_nothing(tmp_path, change):
  _workdir_with_two_checkpoints(tmp_path, tiny_config())
  changed = tiny_config(**change)
  mngr = ckpt_lib.make_manager(str(tmp_path), read_only=True, async_save=False)
  with pytest.raises(ConfigError, match=r"checkpoint 4 .* does not fit this config") as e:
    ckpt_lib.restore_newest(mngr, str(tmp_path), state_lib.abstract_train_state(changed))
  assert "\n" not in str(e.value)
  if "optim" in next(iter(change)):
    assert "optimizer settings (optim.*)" in str(e.value)
  assert _steps(tmp_path) == [2, 4] and not (tmp_path / "checkpoints_unreadable").exists()


def test_sampling_reads_the_parameters_whatever_the_optimizer(tmp_path):
  state = _workdir_with_two_checkpoints(tmp_path, tiny_config())
  # A "read-only" sample with another optimizer: the parameters are all it needs.
  changed = tiny_config(**{"optim.optimizer": "adam", "optim.grad_clip_norm": 0.0})
  params, step = ckpt_lib.load_params(changed, str(tmp_path))
  assert step == 4
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.ema_params), strict=True):
    np.testing.assert_array_equal(a, b)
  # ... but not with another network.
  with pytest.raises(ConfigError, match="network settings"):
    ckpt_lib.load_params(tiny_config(**{"model.ch": 24}), str(tmp_path))
  assert _steps(tmp_path) == [2, 4]


def test_damaged_bytes_fall_back_to_the_step_before(tmp_path):
  config = tiny_config()
  _workdir_with_two_checkpoints(tmp_path, config)
  big = max(_data_files(tmp_path, 4), key=os.path.getsize)
  with open(big, "r+b") as f:
    f.truncate(os.path.getsize(big) // 2)
  mngr = ckpt_lib.make_manager(str(tmp_path), read_only=True, async_save=False)
  state, step = ckpt_lib.restore_newest(mngr, str(tmp_path),
                                        state_lib.abstract_train_state(config), retries=0,
                                        set_aside=True)
  assert step == 2 and int(state.step) == 2
  assert _steps(tmp_path) == [2]
  assert [d.split("-")[0] for d in os.listdir(tmp_path / "checkpoints_unreadable")] == ["4"]


def test_a_failed_read_that_is_not_damage_moves_nothing(tmp_path, monkeypatch):
  config = tiny_config()
  _workdir_with_two_checkpoints(tmp_path, config)
  mngr = ckpt_lib.make_manager(str(tmp_path), read_only=True, async_save=False)
  calls = []

  def denied(*args, **kwargs):  # what a 403 from a bucket looks like to the caller
    calls.append(1)
    raise PermissionError("403 Forbidden: caller does not have storage.objects.get access")
  monkeypatch.setattr(mngr, "restore", denied)
  with pytest.raises(UserError, match=r"could not be read: PermissionError: 403.*nothing was "
                                      r"changed"):
    ckpt_lib.restore_newest(mngr, str(tmp_path), state_lib.abstract_train_state(config),
                            retries=1)
  assert len(calls) == 2  # retried once
  assert _steps(tmp_path) == [2, 4] and not (tmp_path / "checkpoints_unreadable").exists()


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start_and_stays_one(tmp_path):
  """The refusal must outlast the run that set them aside: the rerun its own message, `pod
  watch`, systemd or a SLURM requeue asks for finds checkpoints/ empty and must not train
  from step 0 over the run (nor truncate its metrics)."""
  config = tiny_config()
  _workdir_with_two_checkpoints(tmp_path, config)
  for step in (2, 4):
    (tmp_path / "checkpoints" / str(step) / "state" / "_METADATA").write_text("{torn")
  mngr = ckpt_lib.make_manager(str(tmp_path), read_only=True, async_save=False)
  for _ in range(2):  # the run that sets them aside, then its rerun
    with pytest.raises(UserError, match=r"not starting from step 0 on my own.*move "
                                        r"checkpoints_unreadable/ out of the workdir") as e:
      ckpt_lib.restore_newest(mngr, str(tmp_path), state_lib.abstract_train_state(config),
                              retries=0, set_aside=True)
    assert "steps 4, 2" in str(e.value) and "\n" not in str(e.value)
    mngr.reload()
  assert sorted(d.split("-")[0] for d in os.listdir(tmp_path / "checkpoints_unreadable")) == [
      "2", "4"]
  # Moved away by the user: a fresh start is what was asked for.
  os.rename(tmp_path / "checkpoints_unreadable", tmp_path / "old")
  assert ckpt_lib.restore_newest(mngr, str(tmp_path), state_lib.abstract_train_state(config),
                                 set_aside=True) == (None, None)


def test_a_reader_beside_a_live_trainer_moves_nothing(tmp_path):
  """Sampling, eval and a distillation's teacher read hold no lock while a trainer may hold
  it: a checkpoint that fails to read is skipped, never moved (it may be one the trainer just
  rotated away); one that is gone is skipped silently; without a trainer a reader may set
  damaged ones aside as before."""
  import subprocess
  import sys

  from tests import cli
  config = tiny_config()
  _workdir_with_two_checkpoints(tmp_path, config)
  big = max(_data_files(tmp_path, 4), key=os.path.getsize)
  with open(big, "r+b") as f:
    f.truncate(os.path.getsize(big) // 2)
  trainer = subprocess.Popen(
      [sys.executable, "-c", "import time; from ddpm_jax import lock as lock_lib; "
       f"lock_lib.WorkdirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); "
       "time.sleep(600)"], stdout=subprocess.PIPE, text=True, env=cli.env())
  try:
    assert trainer.stdout.readline().strip() == "held"
    params, step = ckpt_lib.load_params(config, str(tmp_path))
    assert step == 2
    assert _steps(tmp_path) == [2, 4] and not (tmp_path / "checkpoints_unreadable").exists()
    # The trainer's rotation deletes step 4 after the reader listed it.
    mngr = ckpt_lib.make_manager(str(tmp_path), read_only=True, async_save=False)
    assert mngr.all_steps() == [2, 4]
    import shutil
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    _, step = ckpt_lib.restore_newest(mngr, str(tmp_path),
                                      state_lib.abstract_train_state(config), retries=0)
    assert step == 2 and not (tmp_path / "checkpoints_unreadable").exists()
  finally:
    trainer.kill()
    trainer.wait()
  assert os.path.exists(tmp_path / "trainer.lock")  # the dead holder's file, nobody's lock


def test_checkpoints_whose_configs_do_not_read_are_not_called_missing(tmp_path):
  from ddpm_jax.errors import NoCheckpointError
  config = tiny_config()
  _workdir_with_two_checkpoints(tmp_path, config)
  for step in (2, 4):
    for f in glob.glob(str(tmp_path / "checkpoints" / str(step) / "config" / "*")):
      open(f, "w").write("{torn")
  mngr = ckpt_lib.make_manager(str(tmp_path), read_only=True, async_save=False)
  with pytest.raises(UserError, match="the config of no checkpoint .* can be read") as e:
    ckpt_lib.newest_config(mngr, str(tmp_path))
  assert not isinstance(e.value, NoCheckpointError) and "train first" not in str(e.value)


def test_corruption_is_told_apart_from_other_failures():
  assert ckpt_lib.is_corrupt(ValueError("OUT_OF_RANGE: Requested byte range [1, 2) is not "
                                        "valid for value of size 1"))
  assert ckpt_lib.is_corrupt(ValueError("FAILED_PRECONDITION: Truncated Zstd-compressed stream"))
  assert ckpt_lib.is_corrupt(FileNotFoundError("_METADATA does not exist"))
  assert not ckpt_lib.is_corrupt(PermissionError("403"))
  assert not ckpt_lib.is_corrupt(ValueError("UNAVAILABLE: connection reset"))
  assert not ckpt_lib.is_corrupt(MemoryError())
  assert not ckpt_lib.is_corrupt(ValueError("Structure mismatch: opt_state"))


def test_a_changed_optimizer_through_the_cli_moves_nothing(tmp_path, data_dir):
  """The issue's case: resuming (or sampling, or evaluating) with another optimizer setting
  once emptied checkpoints/ and trained from step 0 with exit 0."""
  from tests import cli
  w = str(tmp_path / "w")
  cli.run(cli.main_py(*cli.tiny_flags(data_dir, "--config.training.num_train_steps=4"),
                      "--workdir", w, cwd=tmp_path))
  before = open(os.path.join(w, "metrics.jsonl")).read()
  job = cli.main_py(*cli.tiny_flags(data_dir, "--config.training.num_train_steps=8",
                                    "--config.optim.grad_clip_norm=0"), "--workdir", w,
                    cwd=tmp_path)
  assert job.finish() == 1
  errors = [x for x in job.lines if x.startswith("error:")]
  assert len(errors) == 1 and "optimizer settings (optim.*)" in errors[0], job.output[-2000:]
  assert "Traceback" not in job.output
  assert _steps(tmp_path / "w") == [2, 4] and not os.path.exists(
      os.path.join(w, "checkpoints_unreadable"))
  assert open(os.path.join(w, "metrics.jsonl")).read() == before
  # Sampling and eval read the parameters only: the optimizer cannot matter to them.
  from ddpm_jax import evaluate, modes
  changed = tiny_config(**{"data.data_dir": data_dir, "optim.optimizer": "adam",
                           "sampling.num_frames": 0, "eval.num_samples": 0})
  assert os.path.exists(os.path.join(modes.sample_and_save(changed, w), "grid.png"))
  assert evaluate.evaluate(changed, w)[0]["step"] == 4
  assert _steps(tmp_path / "w") == [2, 4]


def test_a_stop_signal_during_start_up_stops_within_seconds(tmp_path):
  """Before the first step there is nothing new to save: a Spot VM's notice (about 30 s)
  must not wait for data preparation or compilation."""
  import signal

  from tests import cli
  from tests.test_prepared_records import _write_images
  _write_images(str(tmp_path / "imgs"), 0, 300)
  job = cli.main_py(*cli.tiny_flags(str(tmp_path / "tfds"), "--config.data.dataset=image_folder",
                                    f"--config.data.folder={tmp_path / 'imgs'}"),
                    "--workdir", str(tmp_path / "w"), cwd=tmp_path)
  job.wait_for(r"model: [\d,]+ parameters")  # restored (nothing), about to prepare the data
  job.proc.send_signal(signal.SIGTERM)
  assert job.finish(timeout=60) == 0, job.output[-3000:]  # the notice is ~30 s
  assert "SIGTERM received during start-up" in job.output
  assert not os.path.exists(tmp_path / "w" / "trainer.lock")
  assert not [s for s in os.listdir(tmp_path / "w" / "checkpoints") if s.isdigit()]
