"""The SPD draft module of the demo target (run `python -m dpace_jax.demo` first, which builds the
target and its regenerated chats in runs/demo): the demo's 4 target layers split into `stages`
pipeline stages (2 or 4), a 2-layer draft module trained with KL to the target's next-token
distribution on the same regenerated chats and data pipeline as the DFlash drafter (docs/spd.md).
A few minutes on a 2-core CPU.

    python train.py --config configs/demo_spd.py            # 4 stages -> runs/demo_spd4
    python train.py --config configs/demo_spd.py:2          # 2 stages -> runs/demo_spd2
"""

from dpace_jax.demo.config import get_config as _demo_config

DEMO_TARGET_LAYERS = 4


def get_config(stages: str = "4"):
    n = int(stages or 4)
    c = _demo_config("cpu-dflash")  # the draft module is DFlash-style (train.mode=spd)
    c.workdir = f"runs/demo_spd{n}"
    c.target.path = "runs/demo/target"
    c.data.demo, c.data.regenerate = False, False
    c.data.paths = ("runs/demo/data/regenerated.jsonl",)  # the demo drafter's training data
    c.drafter.num_layers = 2
    c.drafter.block_size = n  # the draft module's window: one position per stage
    c.drafter.mask_token_id = 0  # unused by the draft module
    c.drafter.target_layer_ids = tuple((s + 1) * DEMO_TARGET_LAYERS // n - 1 for s in range(n))
    c.train.mode = "spd"
    c.train.num_anchors = 128  # heads per sequence (one prediction each)
    c.train.max_steps = 300
    c.train.lr = 2e-3
    return c
