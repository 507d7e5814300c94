"""tunec's runtime: executes a compiled plan (training). Imports the compiler, never the reverse.

Modules, in the order a run uses them (see ``runtime/README.md``):

- :mod:`tunec.runtime.run`: ``tunec run``: checks the build, runs its stages in order
- :mod:`tunec.runtime.data`: memory-mapped shards, seeded row order, each rank's slice
- :mod:`tunec.runtime.model`: device, model building/loading, LoRA, packed attention
- :mod:`tunec.runtime.loop`: AdamW, warmup + cosine, accumulation, clipping, autocast
- :mod:`tunec.runtime.evaluate`: loss per eval task
- :mod:`tunec.runtime.checkpoint`: atomic checkpoints, exact resume
- :mod:`tunec.runtime.outputs`: ``OUT/runs/<stage>/``, model cards, chaining stages
- :mod:`tunec.runtime.log`: ``metrics.jsonl``, progress bar, progress lines
- :mod:`tunec.runtime.loggers`: TensorBoard, W&B, MLflow (``--log``)
- :mod:`tunec.runtime.dist`: ``torchrun`` process groups
- :mod:`tunec.runtime.generate`: ``tunec generate``
"""
