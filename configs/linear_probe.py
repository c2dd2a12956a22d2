"""A linear probe: only the classifier head is trained, every other parameter frozen.

  vit-jax train --config configs/linear_probe.py --workdir workdirs/probe --config.init.path=workdirs/quickstart

Starts from a trained run (here the quickstart's workdir, configs/quickstart.py;
any published-layout .npz works too, with its --config.model.variant) and
re-learns a zero head on its frozen features: `config.optimizer.freeze`
matches every parameter path but `head/...`, so those parameters get no
gradient, no optimizer state and stay bitwise equal. No augmentation or
dropout: the probe measures the features as they are. On the quickstart
model it reaches 98.6% on the digits' test split in 300 steps (the
quickstart run itself: 98.1%), at several times the quickstart's images/s
since the frozen layers need no backward pass.
"""

from configs import quickstart


def get_config():
  config = quickstart.get_config()
  config.total_steps = 300
  config.log_every_steps = 50
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 100

  config.init.path = 'workdirs/quickstart'  # The README's quickstart run (or .npz) whose features are probed.
  config.init.reset_head = True  # A zero head for config.dataset.num_classes.

  config.input.train_crop = 'resize'
  config.model.dropout_rate = 0.0

  config.optimizer.freeze = '^(?!head/)'  # Every parameter whose path does not start with 'head/'.
  config.optimizer.learning_rate = 1e-2
  config.optimizer.warmup_steps = 20
  config.optimizer.weight_decay = 0.0
  config.optimizer.label_smoothing = 0.0
  return config
