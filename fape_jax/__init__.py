"""fape_jax: FAPE-IR all-in-one image restoration in JAX/Flax NNX."""

__version__ = "0.1.0"
