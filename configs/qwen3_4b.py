"""Qwen3-4B target, 5-layer drafter, block 16, D-PACE (alpha 0.5): the paper's recipe, which is
what the defaults of dpace_jax/config.py hold (AdamW lr 6e-4, warmup 0.04, clip 1.0, 6 epochs,
batch 16, 512 anchors, max length 3072). Name the regenerated chat data with
--config.data.paths="('data/train.jsonl',)"."""

from dpace_jax.config import default_config


def get_config():
    c = default_config()
    c.target.path = "Qwen/Qwen3-4B"
    return c
