"""Progressive distillation of a trained workdir into a 4-step sampler (--mode=distill).

  python main.py --mode=distill --config configs/distill.py \
      --config.distill.teacher=runs/anime32 --workdir runs/anime32_distill
  python main.py --mode=sample --workdir runs/anime32_distill/steps4

Four rounds (64 -> 32 -> 16 -> 8 -> 4 steps) of training.num_train_steps each, into
<workdir>/steps32, steps16, steps8 and steps4: every round is a workdir that samples with
its own step count and grid. The model, data and schedule are the teacher's (override
data.* on the command line if its images moved). See docs/architecture.md.
"""

from configs import default


def get_config():
  config = default.get_config()
  d = config.distill
  d.start_steps = 64
  d.end_steps = 4
  d.prediction_type = "v"
  d.weighting = "truncated_snr"
  t = config.training
  t.batch_size = 32
  t.num_train_steps = 1000  # per round
  t.checkpoint_every_steps = 250
  t.log_every_steps = 50
  t.ema_decay = 0.999  # the next round's teacher is the EMA of this one's student
  t.keep_period = 0  # rounds are short: keep_checkpoints of each is enough
  o = config.optim
  o.learning_rate = 3e-4  # a fine-tune of the teacher's weights, not training from scratch
  o.warmup_steps = 50
  o.lr_schedule = "cosine"  # to 0 at the end of each round
  return config
