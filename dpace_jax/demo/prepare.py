"""What a run config asks of the embedded demo, turned into ordinary inputs before the library
runs: the library itself never imports `dpace_jax.demo`.

- `target.path` "demo:cpu" / "demo:gpu": the demo target (`build_demo_target`), built once at
  WORKDIR/target;
- `target.path` "": a tiny random-weight Qwen3 target with the demo tokenizer
  (`build_random_target`), built once at WORKDIR/target;
- `data.demo` with no `data.paths`: function-completion chats written once to
  WORKDIR/data/demo.jsonl.

`prepare(config)` replaces those fields by the paths it built, so the trainer and the evaluation
see a plain HF checkpoint directory and plain data files. train.py, evaluate.py, `python -m
dpace_jax.demo` and bench/compare_losses.py call it. Builds are cached and atomic, so train.py and
evaluate.py resolve the same directory; with `build=False` (evaluating a finished run) nothing is
built and the target must already be there.
"""

from __future__ import annotations

from pathlib import Path

from dpace_jax.config import DEMO_TARGET_PREFIX


def needs_demo(config) -> bool:
    path = str(config.target.path)
    return not path or path.startswith(DEMO_TARGET_PREFIX) or bool(
        config.data.demo and not config.data.paths)


def prepare(config, *, build: bool = True):
    """Resolve the demo parts of `config` in place (see the module doc); returns config."""
    if not needs_demo(config):
        return config
    if not config.workdir:
        raise ValueError(f"target.path={config.target.path!r} / data.demo build the demo inside "
                         "the run directory: set --config.workdir")
    workdir = Path(config.workdir).expanduser().absolute()
    path = str(config.target.path)
    if not path or path.startswith(DEMO_TARGET_PREFIX):
        config.target.path = str(_target(config, path, workdir / "target", build))
    if config.data.demo and not config.data.paths and build:
        from dpace_jax.demo import data as demo_data

        config.data.paths = (str(demo_data.write_demo_conversations(
            workdir / "data" / "demo.jsonl", num_samples=config.data.demo_samples,
            seed=config.seed)),)
    return config


def _target(config, path: str, out: Path, build: bool) -> Path:
    if not build:
        if not (out / "config.json").is_file():
            raise FileNotFoundError(
                f"{out} does not exist: target.path={path!r} means the run's WORKDIR/target "
                "(train first, or set --config.target.path)")
        return out
    from dpace_jax.demo import target as demo_target

    if not path:
        return demo_target.build_random_target(out, seed=int(config.seed))
    size = path[len(DEMO_TARGET_PREFIX):]
    if size not in demo_target.DEMO_SIZES:
        raise ValueError(f"target.path={path!r}: unknown demo size {size!r}; expected one of "
                         f"{sorted(demo_target.DEMO_SIZES)}")
    return demo_target.build_demo_target(out, size=size, seed=int(config.seed),
                                         progress=bool(config.train.progress))
