"""Loading and running an artifact: what a production process imports (`runtime.load`).

Checkpoint readers, weight checks and device placement, compiled programs per shape, request
validation, and the generation loop. Imports nothing that writes (runtime.tools).
"""
