"""The parts of a training run that ``pm_dist.train.Trainer`` puts together.

* ``step``: one step's numerics (gather, head, skip rules, backward, optimizer steps)
* ``checkpoints``: saving and restoring every part's state, at any world size
* ``outputs``: run information at the start, the exported encoder at the end
* ``optim``: optimizers and the learning-rate schedule
* ``rng``: the random streams, seeded and saved
"""
