"""The embedded demo run: the small stdlib-trained target, regenerated data, a DFlash 2 drafter
trained with D-PACE.

Sized to finish (target build, data regeneration, training, HumanEval evaluation) in about ten
minutes on a 2-core CPU. `configs/demo.py` exposes it to train.py / evaluate.py. The recipes:
`cpu` (the default, runs/demo), `gpu` (the larger target, for a GPU), `cpu-qwen3.5` (the cpu recipe
on a Qwen3.5 hybrid target, runs/demo-qwen3.5), `cpu-dflash` (the cpu recipe with a DFlash
drafter, runs/demo-dflash: the demo's default until 2026-12-03, which the OPD, SPD, loss and
decoding-speed comparisons in docs/ were measured with) and `cpu-dflash2` (the cpu recipe under
its own name, runs/demo-dflash2).

DFlash 2 is the default because it won the demo comparison (docs/dflash2.md): +52% tau over
DFlash with DFlash's CE and +58% with D-PACE, 3 training seeds, 164 held-out HumanEval prompts.
"""

from dpace_jax.config import default_config

RECIPES = ("cpu", "gpu", "cpu-qwen3.5", "cpu-dflash", "cpu-dflash2")


def get_config(size: str = "cpu"):
    if size not in RECIPES:
        raise ValueError(f"configs/demo.py: unknown demo recipe {size!r}; expected one of "
                         f"{', '.join(RECIPES)}")
    c = default_config()
    c.workdir = "runs/demo" if size in ("cpu", "gpu") else f"runs/demo-{size.removeprefix('cpu-')}"
    c.target.path = "demo:cpu-qwen3.5" if size == "cpu-qwen3.5" else f"demo:{size[:3]}"
    # DFlash 2 with the published settings (conv 2 / 16, top-16 candidates, selector rank 256),
    # the rank cut to 64 on the cpu targets (256 is twice their hidden size)
    c.drafter.arch = "dflash" if size == "cpu-dflash" else "dflash2"
    if size.startswith("cpu") and c.drafter.arch == "dflash2":
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
