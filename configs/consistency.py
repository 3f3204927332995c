"""Easy consistency tuning (ECT) of a trained workdir into a 1-2 call model (--mode=consistency).

  python main.py --mode=consistency --config configs/consistency.py \
      --config.consistency.teacher=runs/anime32 --workdir runs/anime32_ect
  python main.py --mode=sample --workdir runs/anime32_ect          # 1 network call a sample
  python main.py --mode=sample --workdir runs/anime32_ect --config.consistency.num_steps=2

One training run of training.num_train_steps that starts from the teacher's weights; the
gap between the two noise levels shrinks 8 times over it (consistency.double_every_steps
0). The model, data and schedule are the teacher's (override data.* on the command line if
its images moved). As ECT (github.com/locuslab/ect, CIFAR-10): Adam at a constant learning
rate of 1e-4 with no warm-up; batch 32 as in configs/distill.py and 2,000 steps (twice a
distillation round), sized for a CPU. See docs/architecture.md.
"""

from configs import default


def get_config():
  config = default.get_config()
  t = config.training
  t.batch_size = 32
  t.num_train_steps = 2000
  t.checkpoint_every_steps = 500
  t.log_every_steps = 50
  t.ema_decay = 0.999
  t.keep_period = 0
  o = config.optim
  o.learning_rate = 1e-4  # ECT: a fine-tune at the teacher's scale, constant
  o.warmup_steps = 0
  o.lr_schedule = "constant"
  return config
