"""Writers and tools: atomic directory writes, the manifest and orbax writers, seeded random
weights, and the `mamba2-aot` command line. Not needed to load and run an artifact."""
