"""Llama-3.1-8B-Instruct target (llama3 rope scaling, untied head), block 10 (gamma 5)."""

from dpace_jax.config import default_config


def get_config():
    c = default_config()
    c.target.path = "meta-llama/Llama-3.1-8B-Instruct"
    c.drafter.num_layers = 5
    c.drafter.block_size = 10
    c.data.max_length = 3072
    c.train.loss = "dpace"
    c.train.alpha = 0.5
    c.train.gamma = 5.0
    c.train.batch_size = 10
    c.train.num_anchors = 512
    c.train.epochs = 6
    c.train.lr = 6e-4
    return c
