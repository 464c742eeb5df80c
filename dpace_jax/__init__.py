"""dpace-jax: D-PACE training of DFlash speculative drafters in JAX/Flax."""

__version__ = "0.1.0"
