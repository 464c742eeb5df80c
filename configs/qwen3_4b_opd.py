"""On-policy post-training (Draft-OPD) of a Qwen3-4B DFlash drafter, the public recipe's settings:
AdamW lr 3e-4, warmup 5%, prompts of at most 512 tokens, responses up to 4096, one greedy rollout
per prompt (16K prompts: 8 rounds of 2048), decay 0.8 for rejected drafts. Start from an SFT
drafter (a run directory or a DFlash HF directory, e.g. a published one) and name the prompts'
chat data:

    python train.py --config configs/qwen3_4b_opd.py --config.workdir=runs/opd \
        --config.drafter.init_from=runs/sft --config.data.paths="('data/train.jsonl',)"

The objective is the public recipe's: the temperature-1 softmax teacher and every rejected draft
after the first rejection (their code's defaults; docs/opd.md quotes it). On the demo no variant
beat continued SFT; the closest (a tie) was --config.opd.teacher=verify
--config.opd.rejected_weight=0. --config.opd.dpace_weights=True adds D-PACE weights to the
realized-token stream.
"""

from dpace_jax.config import default_config


def get_config():
    c = default_config()
    c.target.path = "Qwen/Qwen3-4B"
    c.train.mode = "opd"
    c.train.lr = 3e-4
    c.train.warmup_ratio = 0.05
    c.train.num_anchors = 1024  # blocks per sequence: 4096 response tokens at tau >= 4
    c.data.max_length = 4608  # prompt + response
    c.opd.rounds = 8
    c.opd.prompts_per_round = 2048
    c.opd.max_prompt_length = 512
    c.opd.max_new_tokens = 4096
    c.opd.rollout_batch_size = 32
    c.opd.teacher = "softmax"  # the public recipe (docs/opd.md)
    c.opd.rejected_stream = "suffix"
    return c
