"""The random streams of a rank: seeded at the start, saved in checkpoints, restored on resume."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """The same seed on every rank, so the encoders start identical."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_rank_streams(seed: int, rank: int) -> None:
    """A different stream per rank, drawn once the encoder is built (its initial weights come from
    the shared seed): dropout masks and random augmentation must differ between ranks. Every rank
    of a run and every run with the same seed draws the same streams."""
    # Mixed, not seed + rank: rank 1 of seed 0 would draw what rank 0 of seed 1 draws.
    seed_everything(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
