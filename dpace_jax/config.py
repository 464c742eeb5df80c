"""The run configuration: one ml_collections ConfigDict shared by train.py and evaluate.py.

Config files in configs/ expose `get_config()` that start from `default_config()` and change what
they need; the command line overrides any field with `--config.section.field=value`. Unknown
fields are rejected (a typo never silently does nothing).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from dpace_jax.drafters.block_attention import DEFAULT_FLASH_TILE
from dpace_jax.loss import DEFAULT_ALPHA
from dpace_jax.loss.chunked import DEFAULT_CHUNK_SIZE

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}
DEMO_TARGET_PREFIX = "demo:"


def parse_flags(argv):
    """absl's flag parsing for train.py / evaluate.py, with an unknown config field (which
    ml_collections reports as a bare AttributeError deep in the parser) as a one-line error."""
    import sys

    from absl import flags

    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        detail = " ".join(str(e).replace("\\n", " ").replace("\\'", "").strip("'\"").split())
        given = [a for a in argv[1:] if a.startswith("--config.")]
        sys.exit(f"error: unknown config field {detail} (command line: {' '.join(given)})")
    except flags.Error as e:
        sys.exit(f"error: {e}")


def target_path(config) -> str:
    """config.target.path, refused while it still names a demo target (empty or "demo:...":
    dpace_jax.demo.prepare turns those into a checkpoint directory first)."""
    path = str(config.target.path)
    if not path or path.startswith(DEMO_TARGET_PREFIX):
        raise ValueError(
            f"target.path={path!r} names the embedded demo's target, which train.py, evaluate.py "
            "and `python -m dpace_jax.demo` build (dpace_jax.demo.prepare.prepare(config)); "
            "the library needs an HF checkpoint directory or hub id")
    return path


def parse_dtype(name: str, field: str):
    """A dtype named by a config field or flag; unknown names raise ValueError naming it."""
    if name not in DTYPES:
        raise ValueError(f"{field}={name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def default_config() -> ml_collections.ConfigDict:
    """All fields with their defaults; the model, data and train defaults are the D-PACE paper's
    recipe (docs/design.md §4: 5-layer drafter, block 16, AdamW lr 6e-4, 512 anchors, ...)."""
    c = ml_collections.ConfigDict()
    c.workdir = ""  # run directory: checkpoints, metrics.jsonl, hf/ export, caches
    c.seed = 0
    # Multi-process launch: jax.distributed.initialize() runs when `distributed` is True or a
    # coordinator address is known (here or in JAX_COORDINATOR_ADDRESS); the three fields below
    # are passed on when set, else JAX detects them (SLURM, Cloud TPU, ...).
    c.distributed = False
    c.coordinator_address = ""
    c.num_processes = -1
    c.process_id = -1
    # True: never reach the HF hub (as HF_HUB_OFFLINE=1): hub ids in target.path / data.paths
    # are read from the HF cache only, and a miss is an error instead of a download
    c.offline = False

    c.target = ml_collections.ConfigDict()
    # local HF checkpoint dir or hub id; through train.py / evaluate.py also "" (a tiny random
    # target in WORKDIR/target) or "demo:cpu" / "demo:gpu" (the demo target): dpace_jax.demo
    c.target.path = ""
    c.target.dtype = "bfloat16"

    c.drafter = ml_collections.ConfigDict()
    c.drafter.num_layers = 5
    c.drafter.block_size = 16
    c.drafter.mask_token_id = -1  # -1: the tokenizer's <|MASK|>, else len(tokenizer)
    c.drafter.target_layer_ids = ()  # () -> round(1 + i * (L - 4) / (n - 1))
    c.drafter.init_from = ""  # start from a DFlash HF directory or a run directory
    c.drafter.intermediate_size = 0  # 0: the target's MLP width (Qwen3.5-MoE has none: set it)
    # the drafter's attention layout (0: the target's; its attention is its own)
    c.drafter.num_heads = 0
    c.drafter.num_kv_heads = 0
    c.drafter.head_dim = 0
    # Attention per drafter layer: () -> every layer sliding_attention when sliding_window > 0,
    # else full_attention; or one "full_attention" / "sliding_attention" per layer.
    c.drafter.layer_types = ()
    c.drafter.sliding_window = 0  # W of the sliding layers (0: none)
    # Inside the block: None = sliding_attention layers causal, full_attention bidirectional;
    # True = every layer causal; False = none (z-lab's rule; written to config.json when set).
    c.drafter.is_causal = ml_collections.FieldReference(None, field_type=bool)
    # The drafter family: "dflash", or "dflash2" (docs/dflash2.md) with its convolutions and
    # candidate selector (the published defaults below; the last three: identity by default).
    c.drafter.arch = "dflash"
    c.drafter.conv_kernel_size = 2
    c.drafter.conv_group_size = 16
    c.drafter.selector_rank = 256
    c.drafter.selector_top_k = 16
    c.drafter.output_multiplier = 1.0
    c.drafter.final_logit_softcapping = 0.0  # 0: none
    c.drafter.input_embedding_scale = 1.0

    c.data = ml_collections.ConfigDict()
    c.data.paths = ()  # JSONL / JSON / Parquet files or dirs, or hub ids
    c.data.split = "train"
    c.data.demo = False  # no paths: train.py writes the demo's function-completion chats
    c.data.demo_samples = 512
    c.data.regenerate = False  # replace assistant turns by the target's own answers first
    c.data.regenerate_max_new_tokens = 1024
    c.data.regenerate_batch_size = 16
    c.data.max_length = 3072
    c.data.cache_dir = ""  # "" -> WORKDIR/cache
    c.data.strict = False  # True: the first unusable row is an error (else counted and skipped)

    c.train = ml_collections.ConfigDict()
    # The mode: sft (supervised), opd (on-policy post-training), spd (the SPD draft module);
    # dpace_jax.train.modes. The objective: "" = the mode's default; sft: dpace | dflash |
    # dpace-cumulative-confidence-only | dpace-continuation-value-only; opd: opd | tv; spd: kl.
    c.train.mode = "sft"
    c.train.loss = ""
    c.train.opd_dpace = False  # deprecated: opd.dpace_weights
    c.train.alpha = DEFAULT_ALPHA
    c.train.gamma = 7.0  # DFlash's decay for block 16 (5 for 10, 4 for 8); 0: no decay
    c.train.batch_size = 16
    c.train.num_anchors = 512
    c.train.epochs = 6
    c.train.max_steps = -1  # > 0: stop after this many steps (and size the schedule for them)
    c.train.stop_at = -1  # > 0: save and exit after this step, as if preempted (resumable)
    c.train.lr = 6e-4
    c.train.warmup_ratio = 0.04
    c.train.grad_clip = 1.0
    c.train.compute_dtype = "bfloat16"
    c.train.loss_chunk_size = DEFAULT_CHUNK_SIZE  # draft positions per LM-head chunk
    c.train.remat = False  # recompute drafter layers in the backward pass (saves memory)
    c.train.attention = "dense"  # drafter block attention: dense | flash (block_attention.py)
    c.train.attention_group = 0  # blocks per group (dense: 0 = all at once; flash: 0 = 64)
    c.train.attention_tile = DEFAULT_FLASH_TILE  # context columns per flash step
    # DFlash 2 drafters (drafter.arch=dflash2): the selector's cross-entropy over the unary top-Z,
    # weight alpha after a warm-up and a linear ramp (fractions of the run's steps), position
    # weights "base" (the objective's: D-PACE's or DFlash's) or "uniform", stop_gradient
    # detaching the unary scores and hidden states inside it (docs/dflash2.md)
    c.train.selector_loss_alpha = 1.0
    c.train.selector_warmup_ratio = 0.0
    c.train.selector_ramp_ratio = 0.0
    c.train.selector_weights = "base"
    c.train.selector_stop_gradient = False
    c.train.target_attention = "einsum"  # target forward: einsum | cudnn (GPU, bf16 target)
    c.train.nan_policy = "stop"  # non-finite loss/gradients: stop (naming the step) | skip-step
    # skip-step: stop when more than this many steps in a row were skipped (a broken target or
    # data, not a rare overflow; -1: no limit)
    c.train.max_skipped_steps = 10
    c.train.strict_resume = False  # True: an unreadable checkpoint is an error, not moved aside
    c.train.allow_changed = ()  # fingerprint keys a resume may change (continuations)
    c.train.log_every = 10
    c.train.save_every = 1000
    # > 0: also save when this many minutes passed since the last save (preemptible capacity:
    # bounds what a SIGKILL without a grace period loses; SIGTERM always saves first)
    c.train.save_every_minutes = 0.0
    c.train.keep_checkpoints = 3
    c.train.progress = True

    # On-policy post-training (train.mode=opd, dpace_jax.train.opd): rounds of rollouts with
    # the current drafter on the data's prompts, each followed by training on them.
    c.opd = ml_collections.ConfigDict()
    c.opd.rounds = 4
    c.opd.prompts_per_round = 256  # round r takes the next prompts of the data (wrapping)
    c.opd.epochs_per_round = 1
    c.opd.max_prompt_length = 512  # longer prompts are skipped
    c.opd.max_new_tokens = 512
    c.opd.rollout_batch_size = 8
    c.opd.temperature = 0.0  # 0: greedy rollouts (the target's own sequence)
    c.opd.rule = "dflash"
    c.opd.decay = 0.8  # a rejected draft at block offset j weighs decay^(j-1)
    c.opd.rejected_weight = 1.0
    c.opd.dpace_weights = False  # D-PACE weights (train.alpha) on the realized-token stream
    # The teacher of every stream (docs/opd.md): softmax (the target's T = 1 distribution, as the
    # public Draft-OPD code) | verify (what the rollout's verification accepted against: one-hot
    # on the greedy token at temperature 0, the tempered distribution above it)
    c.opd.teacher = "softmax"
    c.opd.rejected_stream = "first"  # first rejected draft per block | suffix: every draft after
    c.opd.tv_reduce = "position"  # train.loss=tv: mean over positions | block (expected length)

    # Where metrics go besides WORKDIR/metrics.jsonl (written by process 0; dpace_jax.train.metrics)
    c.logging = ml_collections.ConfigDict()
    c.logging.tensorboard = True  # event files in WORKDIR/tensorboard
    # Weights & Biases (needs the wandb package): on when project is set; the other fields are
    # wandb.init's ("": its default); the W&B run id is kept in WORKDIR/wandb_run_id
    c.logging.wandb = ml_collections.ConfigDict()
    c.logging.wandb.project = ""
    c.logging.wandb.entity = ""
    c.logging.wandb.name = ""
    c.logging.wandb.group = ""
    c.logging.wandb.tags = ()
    c.logging.wandb.mode = ""  # online | offline | disabled

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1)  # (data, fsdp, tensor); -1: all remaining devices

    c.eval = ml_collections.ConfigDict()
    c.eval.benchmarks = ("humaneval",)
    c.eval.num_samples = 8
    c.eval.max_new_tokens = 256
    c.eval.temperature = 0.0  # 0: greedy
    c.eval.rule = "dflash"  # dflash | speculative (dpace_jax.infer.sampling.Sampling)
    c.eval.top_k = 0  # 0: off
    c.eval.top_p = 1.0  # 1: off
    c.eval.batch_size = 1
    c.eval.drafter = ""  # "" -> WORKDIR (latest checkpoint, else WORKDIR/hf)
    # DFlash 2 drafters: draft by the candidate selector's walk (False: the unary argmax of the
    # same weights, to measure what the selector adds)
    c.eval.selector = True
    return c
