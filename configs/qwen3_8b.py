"""Qwen3-8B target (36 layers, hidden 4096), 5-layer drafter, block 16."""

from dpace_jax.config import default_config


def get_config():
    c = default_config()
    c.target.path = "Qwen/Qwen3-8B"
    c.drafter.num_layers = 5
    c.drafter.block_size = 16
    c.data.max_length = 3072
    c.train.loss = "dpace"
    c.train.alpha = 0.5
    c.train.gamma = 7.0
    c.train.batch_size = 16
    c.train.num_anchors = 512
    c.train.epochs = 6
    c.train.lr = 6e-4
    return c
