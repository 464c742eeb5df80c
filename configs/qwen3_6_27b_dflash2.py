"""Qwen3.6-27B target with a DFlash 2 drafter in the published settings, trained with D-PACE.

Target (the Qwen3.5 architecture, dense hybrid; dpace_jax/targets/qwen3_5/): 64 layers in 16
periods of three gated-DeltaNet layers and one gated-attention layer, D 5120, MLP 17408, 24 q / 4 kv
heads of 256 with RoPE on a quarter of each head (theta 1e7), linear attention 16 key / 48 value
heads of 128 with a width-4 convolution, V 248320, untied embeddings; 26.90 B parameters in the
text model (our schema; "27B" published). The hub checkpoint is the multimodal
`Qwen3_5ForConditionalGeneration`: only its text model is read. Shapes and their sources:
docs/dflash2_memory.md (the model card's numbers; the config.json fields as quoted in public
code, not read from the checkpoint here). The FP8 checkpoint (Qwen3.6-27B-FP8) does not load:
our reader has no FP8 dequantization.

Drafter: SpecForge's `configs/qwen3.6-27b-dflash2.json` (sgl-project/SpecForge @5943b2f6, which
agrees with z-lab's Qwen3.8-27B-DFlash2 config.json as quoted in public code): DFlash2DraftModel,
block 8, 5 layers all sliding_attention with window 2048 and is_causal false, feature layers
[5, 19, 33, 47, 61], mask token 248070, convolution 2 taps / groups of 16, selector rank 256 /
top 16; the selector's warm-up and ramp (0.05% of the steps each) from SpecForge's
qwen3.6-27b-dflash2 training YAML. Other versions differ: SpecForge's docs/concepts/DFlash2.md
shows feature layers [1, 16, 31, 46, 61], and a window of 4096 is reported for one version of
the JSON (not found in any stored copy); change the two fields to match a drafter you fine-tune
(drafter.init_from reads them from its config.json anyway).
The attention layout is the published drafter's too: 32 q / 8 kv heads of 128 (drafter.num_heads,
num_kv_heads, head_dim; the target has 24 / 4 of 256), 1,924,404,480 parameters as published.

Memory (docs/dflash2_memory.md, bench/dflash2_memory.py; on paper, nothing measured): every
device on fsdp, (1, -1, 1), and the flash drafter attention. The selector's codebooks (2 x
248320 x 256 = 127 M parameters) have no axis on fsdp, so each device holds their 2.3 GB of
optimizer state whole. Per device: ~38 GB per GPU on 8 x H100 80 GB or 8 x H200 (2 sequences
each), ~59 GB per chip on a TPU v5p-8 (4 chips, 4 sequences each); neither remat nor a fused
target attention is needed. Replicating the target, (8, 1, 1), fits only on the H200s (~109 GB).
Name the regenerated chat data with --config.data.paths="('data/train.jsonl',)"."""

from dpace_jax.config import default_config

PUBLISHED = {  # DFlash 2's published drafter (the drafter.* fields of the same names)
    "arch": "dflash2",
    "num_layers": 5,
    "block_size": 8,
    "layer_types": ("sliding_attention",) * 5,
    "sliding_window": 2048,
    "is_causal": False,
    "target_layer_ids": (5, 19, 33, 47, 61),
    "mask_token_id": 248070,
    "conv_kernel_size": 2,
    "conv_group_size": 16,
    "selector_rank": 256,
    "selector_top_k": 16,
    # the attention layout of the published checkpoint's config.json (num_attention_heads 32,
    # num_key_value_heads 8, head_dim 128: z-lab's Qwen3.8-27B-DFlash2 as quoted in public code,
    # and SpecForge's qwen3.6-27b-dflash2.json), not the target's 24 / 4 heads of 256
    "num_heads": 32,
    "num_kv_heads": 8,
    "head_dim": 128,
}


def get_config():
    c = default_config()
    c.target.path = "Qwen/Qwen3.6-27B"
    for name, value in PUBLISHED.items():
        setattr(c.drafter, name, value)
    c.train.selector_warmup_ratio = 0.0005
    c.train.selector_ramp_ratio = 0.0005
    c.train.gamma = 4.0  # DFlash's decay for block 8, used by --config.train.loss=dflash
    c.train.attention = "flash"
    c.mesh.shape = (1, -1, 1)
    return c
