"""tunec's runtime: executes a compiled plan (training). Imports the compiler, never the reverse.

Modules, in the order a run uses them (see ``runtime/README.md``):

- :mod:`runtime.run`: ``tunec run``: checks the build, runs its stages in order
- :mod:`runtime.data`: memory-mapped shards, seeded row order, each rank's slice
- :mod:`runtime.model`: device, model building/loading, LoRA, packed attention
- :mod:`runtime.loop`: AdamW, warmup + cosine, accumulation, clipping, autocast
- :mod:`runtime.evaluate`: loss per eval task
- :mod:`runtime.checkpoint`: atomic checkpoints, exact resume
- :mod:`runtime.outputs`: ``OUT/runs/<stage>/``, chaining stages
- :mod:`runtime.log`: ``metrics.jsonl``, TensorBoard, progress bar
- :mod:`runtime.dist`: ``torchrun`` process groups
- :mod:`runtime.generate`: ``tunec generate``
"""
