"""Qwen3-4B target, 5-layer drafter, block 16: the D-PACE paper's recipe."""

from dpace_jax.config import default_config


def get_config():
    c = default_config()
    c.target.path = "Qwen/Qwen3-4B"
    c.drafter.num_layers = 5
    c.drafter.block_size = 16
    c.data.paths = ()  # regenerated chat data: --config.data.paths="('data/train.jsonl',)"
    c.data.max_length = 3072
    c.train.loss = "dpace"
    c.train.alpha = 0.5
    c.train.gamma = 7.0
    c.train.batch_size = 16
    c.train.num_anchors = 512
    c.train.epochs = 6
    c.train.lr = 6e-4
    c.train.warmup_ratio = 0.04
    c.train.grad_clip = 1.0
    return c
