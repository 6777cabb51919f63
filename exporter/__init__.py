"""The live Mamba-2 model (flax.nnx) and its lowering to jax.export artifacts."""
