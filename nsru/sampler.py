"""The trainer's data sampler: deterministic, resumable batches from a list of encoded examples,
each process taking its share of every global batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from nsru.data import pad_encodings


class Stream:
    """Deterministic batches from a list of examples.

    Each epoch is a permutation drawn from ``(seed, salt, epoch)``; a step takes the next
    ``batch_size`` indices of the global order (wrapping into the next epoch), and this process
    takes every ``world``-th of them. The state is two integers, so resuming is exact.
    """

    def __init__(self, examples: Sequence[Mapping], batch_size: int, seed: int = 0, salt: int = 0, pad_id: int = 0):
        if not examples:
            raise ValueError("cannot draw batches from an empty dataset")
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.salt = salt
        self.pad_id = pad_id
        self.epoch = 0
        self.pos = 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.salt * 7_919 + epoch) % (2**63))
        return torch.randperm(len(self.examples), generator=gen).tolist()

    def next_indices(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            if self.pos >= len(self._perm):
                self.epoch += 1
                self.pos = 0
                self._perm = self._permutation(self.epoch)
            take = min(self.batch_size - len(out), len(self._perm) - self.pos)
            out.extend(self._perm[self.pos:self.pos + take])
            self.pos += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: Mapping) -> None:
        self.epoch = int(state["epoch"])
        self.pos = int(state["pos"])
        self._perm = self._permutation(self.epoch)

    def collate(self, indices: Sequence[int]) -> dict[str, dict[str, torch.Tensor]]:
        """Pad every part (``forget``, ``safe``, ``retain``...) of the chosen examples."""
        rows = [self.examples[i] for i in indices]
        return {key: pad_encodings([r[key] for r in rows], self.pad_id) for key in rows[0]}


def split(indices: list[int], parts: int) -> list[list[int]]:
    """``indices`` cut into ``parts`` equal consecutive pieces (the micro-batches of one step)."""
    size = len(indices) // parts
    return [indices[i * size:(i + 1) * size] for i in range(parts)]
