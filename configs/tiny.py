"""A tiny run for this CPU: a random Qwen3 target built in WORKDIR/target (target.path "", the
default), demo chat data from the standard library, a 2-layer drafter with block 8. About a
minute end to end."""

from dpace_jax.config import default_config


def get_config():
    c = default_config()
    c.target.dtype = "float32"
    c.drafter.num_layers = 2
    c.drafter.block_size = 8
    c.drafter.target_layer_ids = (0, 1)  # the random target has 3: avoid the last one
    c.data.demo = True
    c.data.demo_samples = 256
    c.data.max_length = 256
    c.train.gamma = 4.0
    c.train.batch_size = 4
    c.train.num_anchors = 16
    c.train.max_steps = 60
    c.train.lr = 1e-3
    c.train.compute_dtype = "float32"
    c.train.loss_chunk_size = 512
    c.train.save_every = 30
    c.eval.num_samples = 4
    c.eval.max_new_tokens = 48
    return c
