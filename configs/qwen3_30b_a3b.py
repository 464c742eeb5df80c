"""Qwen3-30B-A3B target (Qwen3-MoE: 48 layers, D 2048, 32 q / 4 kv heads of 128, 128 experts of
width 768, 8 per token, V 151936, untied; 30.5 B parameters, 3.3 B active), 5-layer drafter, block
16, D-PACE (alpha 0.5), the paper's recipe otherwise (dpace_jax/config.py's defaults).

Drafter: z-lab's published DFlash drafter for this family (z-lab/Qwen3-Coder-30B-A3B-DFlash) is
listed with block 16; its layer count and feature layers were not found, so these are DFlash's
defaults: 5 layers (the target's widths: D 2048, F 6144, 32/4 heads), feature layers
round(1 + i*(48-4)/4) = [1, 12, 23, 34, 45] (the same ids a public Qwen3-30B-A3B DFlash training
config uses). About 0.30 B drafter parameters.

Mesh: every device on fsdp, (1, -1, 1): the experts split over fsdp (dpace_jax/sharding.py), 61 GB
of bf16 target weights -> 7.6 GB per device on 8 x 80 GB GPUs, 15.3 GB per chip on a TPU v5p-8
(4 chips). Drafter attention "flash": the dense one would keep ~55 GB of scores per GPU. On paper
(docs/moe.md, bench/moe_memory.py) the step needs ~22 GB per GPU on 8 x 80 GB, ~38 GB per chip on
a v5p-8. Name the regenerated chat data with --config.data.paths="('data/train.jsonl',)"."""

from dpace_jax.config import default_config


def get_config():
    c = default_config()
    c.target.path = "Qwen/Qwen3-30B-A3B"
    c.drafter.num_layers = 5
    c.drafter.block_size = 16
    c.train.attention = "flash"
    c.mesh.shape = (1, -1, 1)
    return c
