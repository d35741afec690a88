"""An in-memory batch iterator with a checkpointable state, for the trainer tests (the real runs use
d4k_jax.data.input_pipeline's loader)."""

import numpy as np


class ArrayBatches:
    """Batches of a fixed in-memory dataset, shuffled per epoch from one seed: batch i is a function of
    (seed, i) alone. Its state (the batch counter) is checkpointed with the train state."""

    def __init__(self, data: dict[str, np.ndarray], batch_size: int, seed: int = 0):
        self.data, self.batch_size, self.seed, self.i = data, batch_size, seed, 0
        self.n = len(next(iter(data.values())))
        if self.n < batch_size:
            raise ValueError(f"{self.n} examples cannot fill a batch of {batch_size}")

    def get_state(self) -> dict:
        return {"batch": self.i, "seed": self.seed}

    def set_state(self, state: dict) -> None:
        self.i = state["batch"]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        per_epoch = self.n // self.batch_size
        epoch, j = divmod(self.i, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        idx = order[j * self.batch_size : (j + 1) * self.batch_size]
        self.i += 1
        return {k: v[idx] for k, v in self.data.items()}


class Killed(Exception):
    """What DiesAt raises: stands for the process being killed."""


class DiesAt(ArrayBatches):
    """Dies (as a killed run does) when asked for batch `at`: the steps before it are logged, not saved."""

    def __init__(self, data, batch_size, at):
        super().__init__(data, batch_size)
        self.at = at

    def __next__(self):
        if self.i == self.at:
            raise Killed
        return super().__next__()
