"""Weights in and out of Hugging Face diffusers, checked against the real clients (torch CPU,
diffusers): imported models compute what diffusers computes, exported ones load there with
no key warnings and sample the same images, and bad files are one line."""

import io
import json
import logging
import os
import shutil
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import checkpoint, config_lib, diffusion, generate, models, sampling
from ddpm_jax import diffusers_io as dio
from ddpm_jax import state as state_lib
from ddpm_jax.errors import ConfigError, UserError
from tests.conftest import tiny_config

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# google/ddpm-cifar10-32's unet config.json, as published (diffusers 0.0.4 wrote it: fields
# added since then are absent and mean diffusers' defaults).
CIFAR10_CONFIG = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu",
    "attention_head_dim": None, "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
# google/ddpm-celebahq-256 / -church-256 / -bedroom-256 / -cat-256 share this one.
DDPM256_CONFIG = {**CIFAR10_CONFIG, "block_out_channels": [128, 128, 256, 256, 512, 512],
                  "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
                  "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
                  "sample_size": 256}
DDPM_SCHEDULER = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1",
                  "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
                  "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
                  "variance_type": "fixed_small"}
# A small class-conditional v-prediction model with what DDPM's lacks: scale_shift, 4 heads.
COND_CONFIG = {
    "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 8,
    "flip_sin_to_cos": False, "freq_shift": 1, "norm_eps": 1e-6, "sample_size": 16,
    "resnet_time_scale_shift": "scale_shift", "attn_norm_num_groups": 8, "num_class_embeds": 5,
    "dropout": 0.1}


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def theirs(unet, x, t, y=None):
  """diffusers' output for our NHWC batch, back in NHWC."""
  with torch.no_grad():
    out = unet(_nchw(x), torch.from_numpy(np.asarray(t, np.int64)),
               class_labels=None if y is None else torch.from_numpy(np.asarray(y, np.int64)))
  return out.sample.numpy().transpose(0, 2, 3, 1)


def ours(config, params, x, t, y=None):
  model = models.create_model(config)
  return np.asarray(jax.jit(lambda p, x, t, y: models.apply(model, p, x, t, y))(
      params, x, t, y))


def noise(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def perturbed(params, seed, scale=0.1):
  """Params with seeded noise: our output layers start at zero, which would hide mistakes."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: np.asarray(p + scale * rng.standard_normal(p.shape), np.float32),
                      params)


def files(folder):
  out = {}
  for root, _, names in os.walk(folder):
    for n in names:
      p = os.path.join(root, n)
      out[os.path.relpath(p, folder)] = open(p, "rb").read()
  return out


def one_line(excinfo):
  msg = str(excinfo.value)
  assert msg and "\n" not in msg, msg
  return msg


# ----------------------------------------------------------------------------- import

@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
  """A random UNet2DModel of google/ddpm-cifar10-32's config, saved as on the hub (one
  folder: config.json, weights, scheduler_config.json), and imported into a workdir."""
  root = tmp_path_factory.mktemp("cifar")
  torch.manual_seed(0)
  cfg = {k: v for k, v in CIFAR10_CONFIG.items() if not k.startswith("_")}
  unet = diffusers.UNet2DModel(**cfg).eval()
  unet.save_pretrained(root / "hub")
  (root / "hub" / "scheduler_config.json").write_text(json.dumps(DDPM_SCHEDULER))
  config = dio.import_unet(str(root / "hub"), str(root / "wd"))
  params, _ = checkpoint.load_params(config, str(root / "wd"))
  return unet, config, params, root


def test_cifar10_architecture_imports_with_its_parameter_count(cifar):
  unet, config, params, _ = cifar
  assert sum(p.numel() for p in unet.parameters()) == 35_746_307
  assert models.count_params(params) == 35_746_307
  m = config.model
  assert (m.ch, tuple(m.ch_mult), m.num_res_blocks, tuple(m.attn_resolutions), m.num_heads,
          m.downsample_padding) == (128, (1, 2, 2, 2), 2, (16,), 1, "same")
  assert (config.diffusion.schedule, config.diffusion.num_timesteps,
          m.prediction_type, config.sampling.clip_x0) == ("linear", 1000, "epsilon", True)


def test_cifar10_forward_equals_diffusers(cifar):
  """The asymmetric ('SAME') stride-2 padding, the sin-first embedding with freq_shift 1 and
  single-head attention all show in the output: a wrong one of them is far above 1e-4."""
  unet, config, params, _ = cifar
  for seed, t in ((0, [0, 999]), (1, [500, 17])):
    x = noise((2, 32, 32, 3), seed)
    got, want = ours(config, params, x, np.array(t)), theirs(unet, x, t)
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()
    assert np.abs(want).max() > 0.1  # a non-trivial output


def test_ddpm_256_architecture_maps_key_for_key():
  """The 256 px DDPMs (celebahq, church, bedroom, cat): the derived config has their
  113,673,219 parameters, and our tensor names and shapes are exactly diffusers' state dict."""
  config, _ = dio.config_from_diffusers(DDPM256_CONFIG, DDPM_SCHEDULER)
  assert tuple(config.model.ch_mult) == (1, 1, 2, 2, 4, 4)
  assert tuple(config.model.attn_resolutions) == (16,)
  template = dio._template(config)
  assert models.count_params(template) == 113_673_219
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), template)
  mine = {k: v.shape for k, v in dio.to_diffusers(zeros, config).items()}
  with torch.device("meta"):
    unet = diffusers.UNet2DModel(**{k: v for k, v in DDPM256_CONFIG.items()
                                    if not k.startswith("_")})
  assert mine == {k: tuple(v.shape) for k, v in unet.state_dict().items()}


@pytest.fixture(scope="module")
def cond(tmp_path_factory):
  """A random conditional v-prediction UNet2DModel saved as a DDPMPipeline folder."""
  root = tmp_path_factory.mktemp("cond")
  torch.manual_seed(1)
  unet = diffusers.UNet2DModel(**COND_CONFIG).eval()
  sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                  prediction_type="v_prediction", clip_sample=False)
  diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(root / "pipe")
  config = dio.import_unet(str(root / "pipe"), str(root / "wd"))  # finds unet/ by itself
  params, _ = checkpoint.load_params(config, str(root / "wd"))
  return unet, config, params, root


def test_conditional_v_model_forward_equals_diffusers(cond):
  unet, config, params, _ = cond
  assert (config.model.prediction_type, config.diffusion.schedule, config.model.num_heads,
          config.model.time_conditioning, config.model.num_classes) == (
              "v", "cosine", 4, "scale_shift", 5)
  for seed, t, y in ((0, [0, 250, 999], [0, 4, 2]), (1, [10, 600, 333], [3, 1, 0])):
    x = noise((3, 16, 16, 3), seed)
    got, want = ours(config, params, x, np.array(t), np.array(y)), theirs(unet, x, t, y)
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()


def test_a_model_without_a_null_label_gets_a_zero_one_and_conditional_sampling(cond):
  """diffusers' class embedding has no "unconditional" row: ours (label 5) is all zeros, and
  guidance is off (scale 1), so sampling asks only for the labels it was trained on."""
  _, config, params, _ = cond
  table = np.asarray(params["class_emb"]["embedding"])
  assert table.shape[0] == 6 and not table[5].any() and table[:5].any()
  assert config.sampling.guidance_scale == 1.0


def test_bin_and_old_attention_names_import_like_safetensors(cond, tmp_path):
  """The older ``.bin`` (torch's zip pickle, read without torch) and the pre-0.14 attention
  names (query, key, value, proj_attn) give the same parameters."""
  unet, config, params, root = cond
  sd = {k: v.detach().clone() for k, v in unet.state_dict().items()}
  old = {}
  for k, v in sd.items():
    for new, was in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                     ("to_out.0", "proj_attn")):
      k = k.replace(f".{new}.", f".{was}.")
    old[k] = v
  assert any(".proj_attn." in k for k in old)
  for name, state in (("bin", sd), ("old_names", old)):
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(root / "pipe" / "unet" / "config.json", folder / "config.json")
    if name == "bin":
      torch.save(state, folder / dio.BIN_NAME)
    else:
      from safetensors.torch import save_file
      save_file(state, str(folder / dio.SAFETENSORS_NAME))
    tensors, _ = dio._read_weights(str(folder))
    got = dio.from_diffusers(tensors, config, add_null_label=True)
    jax.tree.map(np.testing.assert_array_equal, got, params)


# ----------------------------------------------------------------------------- export

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A tiny model of ours (attention at one level, 2 heads, TF padding, v-prediction, T=100
  so the linear betas are rescaled) in a workdir, exported as a DDPMPipeline folder."""
  root = tmp_path_factory.mktemp("ours")
  config = tiny_config(**{"model.ch_mult": (1, 2, 2), "model.attn_resolutions": (2,),
                          "model.num_heads": 2, "model.downsample_padding": "same",
                          "model.prediction_type": "v"})
  model = models.create_model(config)
  params = perturbed(models.init_params(model, jax.random.key(0), 8), 1)
  ema = perturbed(params, 2, 0.01)
  tx = state_lib.make_optimizer(config)
  st = jax.device_get(state_lib.TrainState(step=jnp.array(4, jnp.int32), params=params,
                                           ema_params=ema, opt_state=tx.init(params)))
  wd = str(root / "wd")
  mngr = checkpoint.make_manager(wd, async_save=False)
  checkpoint.save(mngr, 4, st, config)
  mngr.close()
  dio.export_pipeline(config, wd, str(root / "pipe"))
  return config, params, ema, root


def _diffusers_log():
  """diffusers' log records while loading (it logs to its own, non-propagating logger)."""
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  diffusers.utils.logging.set_verbosity_info()
  diffusers.utils.logging.get_logger("diffusers").addHandler(handler)
  return records, handler


def test_exported_unet_loads_with_no_key_warnings_and_equals_ours(exported):
  config, _, ema, root = exported
  records, handler = _diffusers_log()
  try:
    unet, info = diffusers.UNet2DModel.from_pretrained(str(root / "pipe"), subfolder="unet",
                                                       output_loading_info=True)
  finally:
    diffusers.utils.logging.get_logger("diffusers").removeHandler(handler)
    diffusers.utils.logging.set_verbosity_warning()
  assert not any(info.values()), info
  text = " ".join(r.getMessage() for r in records).lower()
  for word in ("missing", "unexpected", "newly initialized", "not used", "mismatch"):
    assert word not in text, text
  unet.eval()
  for seed, t in ((0, [0, 50, 99]), (1, [7, 70, 33])):
    x = noise((3, 8, 8, 3), seed)
    got, want = ours(config, ema, x, np.array(t)), theirs(unet, x, t)
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()


def test_exported_pipeline_loads_with_our_schedule(exported):
  config, _, ema, root = exported
  pipe = diffusers.DDPMPipeline.from_pretrained(str(root / "pipe"))
  assert isinstance(pipe.scheduler, diffusers.DDPMScheduler)
  s = pipe.scheduler.config
  assert (s.prediction_type, s.num_train_timesteps, s.clip_sample) == ("v_prediction", 100, True)
  ours_ac = np.asarray(diffusion.make_schedule("linear", 100).alphas_cumprod)
  np.testing.assert_allclose(pipe.scheduler.alphas_cumprod.numpy(), ours_ac, rtol=1e-5)
  x = noise((2, 8, 8, 3), 3)
  assert np.abs(ours(config, ema, x, np.array([5, 95])) - theirs(pipe.unet, x, [5, 95])).max() \
      < 1e-4


def test_ddim_in_diffusers_gives_our_samples(exported):
  """Deterministic DDIM (eta 0, clipped x0) from the same noise: diffusers' DDIMScheduler on
  the exported folder and our sampler visit the same timesteps and end at the same images."""
  config, _, ema, root = exported
  unet = diffusers.UNet2DModel.from_pretrained(str(root / "pipe"), subfolder="unet").eval()
  ddim = diffusers.DDIMScheduler.from_pretrained(str(root / "pipe"), subfolder="scheduler")
  steps, x_T = 5, noise((2, 8, 8, 3), 4)
  ddim.set_timesteps(steps)
  model = models.create_model(config)
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  eps_fn = generate.make_eps_fn(model, schedule, ema, config.model.prediction_type)
  want_ts = sampling.timesteps_used("ddim", schedule, steps, "trailing")
  assert list(ddim.timesteps.numpy()) == list(want_ts)
  got = np.asarray(sampling.sample("ddim", eps_fn, schedule, jnp.asarray(x_T),
                                   jax.random.key(0), num_steps=steps, eta=0.0,
                                   spacing="trailing", clip_x0=True))
  x = _nchw(x_T)
  with torch.no_grad():
    for t in ddim.timesteps:
      out = unet(x, t).sample
      x = ddim.step(out, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
  want = x.numpy().transpose(0, 2, 3, 1)
  assert np.abs(got - want).max() < 1e-3, np.abs(got - want).max()
  assert np.abs(got - x_T).max() > 0.1


@pytest.mark.parametrize("which", ["ours", "cond"])
def test_export_import_export_is_byte_identical(which, exported, cond, tmp_path):
  """Ours (unconditional) and the imported conditional model (its added null label kept as
  ours: the last row, marked in config.json) survive a round trip byte for byte."""
  if which == "ours":
    first = exported[3] / "pipe"
  else:
    first = tmp_path / "first"
    dio.export_pipeline(None, str(cond[3] / "wd"), str(first))
  dio.import_unet(str(first), str(tmp_path / "wd2"))
  dio.export_pipeline(None, str(tmp_path / "wd2"), str(tmp_path / "second"))
  a, b = files(first), files(tmp_path / "second")
  assert sorted(a) == ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                       f"unet/{dio.SAFETENSORS_NAME}"]
  assert a == b


def test_imported_workdir_restores_for_training_and_sampling(exported, tmp_path):
  """What train.py restores (the whole TrainState of the config) and what sample/eval load."""
  config, _, ema, root = exported
  got_config = dio.import_unet(str(root / "pipe"), str(tmp_path / "wd"))
  saved = json.loads((tmp_path / "wd" / "config.json").read_text())
  assert saved["model"]["downsample_padding"] == "same" and saved["model"]["num_heads"] == 2
  config_lib.check_compatible(config, saved)
  model, tx = models.create_model(got_config), state_lib.make_optimizer(got_config)
  template = state_lib.create_train_state(got_config, model, tx, jax.random.key(0))
  mngr = checkpoint.make_manager(str(tmp_path / "wd"), read_only=True, async_save=False)
  restored, step = checkpoint.restore_newest(mngr, str(tmp_path / "wd"), template)
  assert step == 0
  jax.tree.map(np.testing.assert_array_equal, restored.params, ema)
  jax.tree.map(np.testing.assert_array_equal, restored.ema_params, ema)


def test_cli_raw_export_and_import(exported, tmp_path, capsys):
  config, params, _, root = exported
  assert dio.main(["export", "--workdir", str(root / "wd"), "--out", str(tmp_path / "raw"),
                   "--raw"]) == 0
  raw = (tmp_path / "raw" / "unet" / dio.SAFETENSORS_NAME).read_bytes()
  tensors = dio.read_safetensors(raw, "raw")
  for k, v in dio.to_diffusers(params, config).items():
    np.testing.assert_array_equal(tensors[k], v)
  assert dio.main(["import", "--model", str(tmp_path / "raw"), "--workdir",
                   str(tmp_path / "wd"), "--subfolder", "unet"]) == 0
  assert dio.main(["import", "--model", str(tmp_path / "raw"), "--workdir",
                   str(tmp_path / "wd")]) == 1  # a second import into the same workdir
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "already holds" in err[0]


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("field,value", [("model.attention", "linear"),
                                         ("model.resample", "pool")])
def test_export_refuses_what_unet2dmodel_cannot_compute(field, value):
  with pytest.raises(ConfigError) as e:
    dio.unet_config(tiny_config(**{field: value}))
  assert field in one_line(e)


def test_export_refuses_head_counts_diffusers_cannot_express():
  """Our head count is per level; diffusers' head size is: 2 heads at 8 and 16 channels."""
  with pytest.raises(ConfigError) as e:
    dio.unet_config(tiny_config(**{"model.attn_resolutions": (8,), "model.num_heads": 2}))
  assert "model.num_heads" in one_line(e)


@pytest.mark.parametrize("change,named", [
    ({"flip_sin_to_cos": True}, "flip_sin_to_cos"), ({"freq_shift": 0}, "freq_shift"),
    ({"norm_eps": 1e-5}, "norm_eps"), ({"act_fn": "gelu"}, "act_fn"),
    ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D",
                           "DownBlock2D"]}, "CrossAttnDownBlock2D"),
    ({"up_block_types": ["UpBlock2D"] * 4}, "up_block_types"),
    ({"class_embed_type": "timestep"}, "class_embed_type"), ({"some_new_field": 1},
                                                             "some_new_field")])
def test_import_refuses_foreign_architectures(change, named):
  with pytest.raises(ConfigError) as e:
    dio.config_from_diffusers({**CIFAR10_CONFIG, **change}, DDPM_SCHEDULER)
  assert named in one_line(e)


@pytest.mark.parametrize("change,named", [
    ({"beta_schedule": "scaled_linear"}, "beta_schedule"),
    ({"beta_end": 0.012}, "beta_end"), ({"variance_type": "learned_range"}, "variance_type"),
    ({"prediction_type": "flow"}, "prediction_type"), ({"trained_betas": [0.1]}, "trained_betas")])
def test_import_refuses_foreign_schedules(change, named):
  with pytest.raises(ConfigError) as e:
    dio.config_from_diffusers(CIFAR10_CONFIG, {**DDPM_SCHEDULER, **change})
  assert named in one_line(e)


def _safetensors(header: dict, data: bytes) -> bytes:
  h = json.dumps(header).encode()
  return len(h).to_bytes(8, "little") + h + data


@pytest.mark.parametrize("raw,says", [
    (b"\x01\x02", "8-byte"),
    ((10**9).to_bytes(8, "little") + b"{}", "header of"),
    ((4).to_bytes(8, "little") + b"nope", "not JSON"),
    (_safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
     "offsets"),
    (_safetensors({"w": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
     "dtype"),
    (_safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                   "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
     "overlap"),
    (_safetensors({"w": {"dtype": "F32", "shape": "x", "data_offsets": [0, 4]}}, b"\0" * 4),
     "malformed")])
def test_corrupt_safetensors_is_one_line(raw, says):
  with pytest.raises(dio.DiffusersError) as e:
    dio.read_safetensors(raw, "f.safetensors")
  assert says in one_line(e)


def test_our_safetensors_reads_in_the_safetensors_library(exported):
  from safetensors.numpy import load_file
  _, _, ema, root = exported
  path = root / "pipe" / "unet" / dio.SAFETENSORS_NAME
  theirs_ = load_file(str(path))
  mine = dio.read_safetensors(path.read_bytes(), "x")
  assert sorted(theirs_) == sorted(mine)
  for k in mine:
    np.testing.assert_array_equal(theirs_[k], mine[k])


@pytest.mark.parametrize("edit,says", [("drop", "missing"), ("add", "unexpected"),
                                       ("shape", "shape")])
def test_weights_that_do_not_fit_the_config_are_one_line(edit, says, exported, tmp_path):
  _, _, _, root = exported
  shutil.copytree(root / "pipe", tmp_path / "pipe")
  path = tmp_path / "pipe" / "unet" / dio.SAFETENSORS_NAME
  tensors = dio.read_safetensors(path.read_bytes(), "x")
  if edit == "drop":
    tensors.pop("mid_block.attentions.0.to_q.weight")
  elif edit == "add":
    tensors["extra.weight"] = np.zeros(3, np.float32)
  else:
    tensors["conv_in.weight"] = np.zeros((8, 3, 5, 5), np.float32)
  dio.write_safetensors(str(path), tensors)
  with pytest.raises(dio.DiffusersError) as e:
    dio.import_unet(str(tmp_path / "pipe"), str(tmp_path / "wd"))
  assert says in one_line(e)
  assert not (tmp_path / "wd" / "checkpoints").exists() or \
      not os.listdir(tmp_path / "wd" / "checkpoints")


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_a_bin_that_runs_code_is_one_line_and_nothing_runs(exported, tmp_path):
  _, _, _, root = exported
  folder = tmp_path / "unet"
  folder.mkdir()
  shutil.copy(root / "pipe" / "unet" / "config.json", folder / "config.json")
  marker = tmp_path / "ran"
  torch.save({"conv_in.weight": torch.zeros(1), "x": _Evil(marker)}, folder / dio.BIN_NAME)
  with pytest.raises(dio.DiffusersError) as e:
    dio.import_unet(str(folder), str(tmp_path / "wd"))
  assert "system" in one_line(e) and not marker.exists()
  # and a zip that is no torch file
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    z.writestr("a.txt", "hello")
  (folder / dio.BIN_NAME).write_bytes(buf.getvalue())
  with pytest.raises(dio.DiffusersError) as e:
    dio.import_unet(str(folder), str(tmp_path / "wd"))
  one_line(e)


def test_cli_errors_are_one_line(tmp_path, capsys):
  (tmp_path / "m").mkdir()
  (tmp_path / "m" / "config.json").write_text("{not json")
  assert dio.main(["import", "--model", str(tmp_path / "m"), "--workdir",
                   str(tmp_path / "wd")]) == 1
  assert dio.main(["export", "--workdir", str(tmp_path / "none"), "--out",
                   str(tmp_path / "o")]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2 and all(e.startswith("error: ") for e in err), err
  assert issubclass(dio.DiffusersError, UserError)
