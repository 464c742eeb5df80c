"""openai/gpt-oss-20b target (24 layers, hidden 2880, 32 experts top 4, alternating 128-token
sliding-window / full attention, YaRN; MXFP4 experts dequantized to bf16 at load), otherwise the
paper recipe of configs/qwen3_4b.py.

Drafter: block 8 (z-lab/gpt-oss-20b-DFlash is served with 7 speculative tokens, i.e. block 8) and
5 layers reading the default feature layers (1, 6, 11, 16, 21). The published drafter's depth and
feature layers could not be checked here (no download): 5 layers is our default, not a verified
copy of theirs.

Mask token: the trainer's default (`<|MASK|>`, else len(tokenizer)) would pick an id past the
o200k_harmony tokenizer's last token; this config names one of its reserved special tokens,
<|reserved_200017|> (id 200017, never produced by the chat template), inside the 201088-row
embedding.
"""

from dpace_jax.config import default_config


def get_config():
    c = default_config()
    c.target.path = "openai/gpt-oss-20b"
    c.drafter.block_size = 8
    c.drafter.num_layers = 5
    c.drafter.mask_token_id = 200017
    return c
