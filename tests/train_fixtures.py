"""Tiny target + drafter + batches for train-step tests (no files, no tokenizer)."""

import jax
import jax.numpy as jnp
import numpy as np

from dpace_jax.config import default_config
from dpace_jax.drafters import dflash as drafter_lib
from dpace_jax.targets import model as model_lib
from dpace_jax.train import step as step_lib

VOCAB, SEQ, BLOCK = 64, 48, 4


def tiny_setup(loss="dpace", steps=100, lr=1e-2, num_anchors=8):
    tcfg = model_lib.ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                 num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
                                 rope_theta=10000.0, tie_word_embeddings=True)
    dcfg = drafter_lib.DrafterConfig.for_target(tcfg, num_layers=1, block_size=BLOCK,
                                                mask_token_id=VOCAB - 1,
                                                target_layer_ids=(0, 2))
    target = model_lib.init_params(tcfg, jax.random.PRNGKey(0), jnp.float32, scale=0.2)
    drafter = drafter_lib.init_drafter_params(dcfg, jax.random.PRNGKey(1))
    c = default_config()
    c.train.loss, c.train.gamma, c.train.num_anchors, c.train.lr = loss, 4.0, num_anchors, lr
    c.train.warmup_ratio, c.train.compute_dtype, c.train.loss_chunk_size = 0.05, "float32", 64
    step_cfg = step_lib.StepConfig.from_config(c, steps)
    return tcfg, dcfg, target, drafter, step_cfg


def batches(seed=0, batch=4):
    """A learnable stream: every row follows one fixed random permutation of the vocabulary
    (token i+1 = PERM[token i]) from a random start, loss on the second half."""
    perm = np.random.default_rng(1234).permutation(VOCAB - 1)
    rng = np.random.default_rng(seed)
    while True:
        tokens = np.zeros((batch, SEQ), np.int32)
        tokens[:, 0] = rng.integers(0, VOCAB - 1, batch)
        for i in range(1, SEQ):
            tokens[:, i] = perm[tokens[:, i - 1]]
        mask = np.zeros_like(tokens)
        mask[:, SEQ // 2:] = 1
        yield {"input_ids": tokens, "loss_mask": mask}
