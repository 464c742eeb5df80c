"""The embedded demo run: the small stdlib-trained target, regenerated data, a D-PACE drafter.

Sized to finish (target build, data regeneration, training, HumanEval evaluation) in about ten
minutes on a 2-core CPU. `configs/demo.py` exposes it to train.py / evaluate.py; `size="gpu"` is
the larger target for a GPU, `size="cpu-qwen3.5"` the cpu recipe with a Qwen3.5 hybrid target
(runs/demo-qwen3.5), `size="cpu-dflash2"` the cpu recipe with a DFlash 2 drafter on the cpu
target (runs/demo-dflash2).
"""

from dpace_jax.config import default_config


def get_config(size: str = "cpu"):
    c = default_config()
    c.workdir = {"cpu-qwen3.5": "runs/demo-qwen3.5",
                 "cpu-dflash2": "runs/demo-dflash2"}.get(size, "runs/demo")
    c.target.path = "demo:cpu" if size == "cpu-dflash2" else f"demo:{size}"
    if size == "cpu-dflash2":
        # DFlash 2's published settings (conv 2 / 16, top-16 candidates) with the selector's rank
        # cut to the demo's width (the published 256 is twice the demo target's hidden size)
        c.drafter.arch = "dflash2"
        c.drafter.selector_rank = 64
    size = "cpu" if size.startswith("cpu") else size  # the recipe of the cpu sizes
    c.target.dtype = "float32" if size == "cpu" else "bfloat16"

    c.drafter.num_layers = 2 if size == "cpu" else 3
    c.drafter.block_size = 8
    # The demo targets are shallow (4 / 8 layers): spread the features over them, short of the
    # last layer (whose HF feature is after the final norm, which serving engines may not take).
    c.drafter.target_layer_ids = (1, 2) if size == "cpu" else (1, 4, 6)

    c.data.demo = True
    c.data.demo_samples = 384 if size == "cpu" else 4096
    c.data.regenerate = True
    c.data.regenerate_max_new_tokens = 128 if size == "cpu" else 256
    c.data.regenerate_batch_size = 32 if size == "cpu" else 128
    c.data.max_length = 384 if size == "cpu" else 768

    c.train.gamma = 4.0  # DFlash's decay for block 8 (when train.loss=dflash)
    c.train.batch_size = 8 if size == "cpu" else 32
    c.train.num_anchors = 32 if size == "cpu" else 64
    c.train.max_steps = 300 if size == "cpu" else 3000
    c.train.lr = 2e-3 if size == "cpu" else 1e-3
    c.train.compute_dtype = "float32" if size == "cpu" else "bfloat16"
    c.train.loss_chunk_size = 1024
    c.train.save_every = 100

    c.eval.num_samples = 16 if size == "cpu" else 164
    c.eval.max_new_tokens = 128 if size == "cpu" else 256
    c.eval.batch_size = 8
    return c
