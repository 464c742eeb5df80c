"""Where a run's target comes from: `config.target.path` resolved to an HF checkpoint directory.

- a local directory or a hub id: used as it is (hub ids through the HF cache);
- `demo:cpu` / `demo:gpu`: the embedded demo target (dpace_jax.demo), built once at WORKDIR/target;
- empty: a tiny random Qwen3 target with the demo tokenizer, built once at WORKDIR/target.

Builds are cached and atomic, so train.py and evaluate.py resolve the same directory.
"""

from __future__ import annotations

from pathlib import Path

from dpace_jax import convert

DEMO_PREFIX = "demo:"


def resolve(config, *, build: bool = True) -> Path:
    """The target checkpoint directory of `config`; with `build=False`, a target that would
    have to be built must already exist (evaluation of a finished run)."""
    path = str(config.target.path)
    if path and not path.startswith(DEMO_PREFIX):
        return convert.resolve_checkpoint(path)
    if not config.workdir:
        raise ValueError(f"target.path={path!r} builds the target inside the run directory: "
                         "set --config.workdir")
    out = Path(config.workdir).expanduser().absolute() / "target"
    if not build:
        if not (out / "config.json").is_file():
            raise FileNotFoundError(
                f"{out} does not exist: target.path={path!r} means the run's WORKDIR/target "
                "(train first, or set --config.target.path)")
        return out
    from dpace_jax.demo import target as demo_target

    if not path:
        return demo_target.build_random_target(out, seed=int(config.seed))
    size = path[len(DEMO_PREFIX):]
    if size not in demo_target.DEMO_SIZES:
        raise ValueError(f"target.path={path!r}: unknown demo size {size!r}; expected one of "
                         f"{sorted(demo_target.DEMO_SIZES)}")
    return demo_target.build_demo_target(out, size=size, seed=int(config.seed),
                                         progress=bool(config.train.progress))
