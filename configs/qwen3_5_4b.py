"""Qwen3.5-4B target (a hybrid: 32 layers, three gated-DeltaNet layers to one gated-attention layer,
D 2560, F 9216, 16 q / 4 kv heads of 256 with RoPE on a quarter of each head, linear attention
with 16 key / 32 value heads of 128, V 248320, tied embeddings;
dpace_jax/targets/qwen3_5/parts.py), 5-layer drafter, block 16, D-PACE (alpha 0.5), the paper's
recipe otherwise (dpace_jax/config.py).

The hub checkpoint is the multimodal `Qwen3_5ForConditionalGeneration`: only its text model is
read (the vision tower and the MTP head are skipped, dpace_jax/qwen3_5.text_tensors). Drafter:
DFlash's defaults, 5 layers with the target's widths (head_dim 256) and feature layers
round(1 + i*(32-4)/4) = [1, 8, 15, 22, 29]; a published Qwen3.5 DFlash drafter's depth, block size
and feature layers could not be read here, so change them to match one before fine-tuning it
(drafter.init_from). The shapes above are the published config.json's as quoted in public code,
not read from the checkpoint here. Name the regenerated chat data with
--config.data.paths="('data/train.jsonl',)"."""

from dpace_jax.config import default_config


def get_config():
    c = default_config()
    c.target.path = "Qwen/Qwen3.5-4B"
    c.drafter.num_layers = 5
    c.drafter.block_size = 16
    return c
