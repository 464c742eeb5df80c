"""Llama-3.1-8B-Instruct target (llama3 rope scaling, untied head): block 10 with DFlash's
gamma 5 and batch 10; otherwise the paper recipe of configs/qwen3_4b.py."""

from dpace_jax.config import default_config


def get_config():
    c = default_config()
    c.target.path = "meta-llama/Llama-3.1-8B-Instruct"
    c.drafter.block_size = 10
    c.train.gamma = 5.0
    c.train.batch_size = 10
    return c
