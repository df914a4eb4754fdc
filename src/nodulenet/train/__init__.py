"""Training: the loop (single process or DDP), schedule, checkpoints, validation FROC, hard-negative mining.

Entry point: :func:`nodulenet.train.loop.train` with a :class:`nodulenet.train.config.TrainConfig`; the CLI
commands are in :mod:`nodulenet.commands.train`. Imports are lazy so ``import nodulenet.train`` stays cheap.
"""
