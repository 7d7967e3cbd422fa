"""pm_dist: distributed face-recognition training with a sharded Prototype Memory head."""

__version__ = "0.1.0"
