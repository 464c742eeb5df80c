"""Qwen3-8B target (36 layers, hidden 4096), otherwise the paper recipe of configs/qwen3_4b.py."""

from dpace_jax.config import default_config


def get_config():
    c = default_config()
    c.target.path = "Qwen/Qwen3-8B"
    return c
