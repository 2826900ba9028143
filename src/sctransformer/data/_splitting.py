"""Train/validation/test splitting: sparse minibatches, and a shuffle set by the seed and epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from scvi.dataloaders import DataSplitter
from torch.utils.data import BatchSampler, RandomSampler, Sampler


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of everything random in one training epoch."""
    return seed * 1_000_003 + epoch


class EpochSeededRandomSampler(Sampler[int]):
    """Random order of ``n`` items that is a function of ``(seed, epoch)`` alone.

    Every iteration draws its permutation from a fresh generator, so the order does not depend on
    how many iterators were made before (Lightning makes more than one when it resumes).
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from the next iteration on."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        yield from torch.randperm(self.n, generator=generator).tolist()


class EpochSeededDataSplitter(DataSplitter):
    """scvi-tools' :class:`~scvi.dataloaders.DataSplitter`, sparse to the end and reproducibly shuffled.

    Minibatches stay sparse CSR on the device (scvi-tools densifies them after the transfer; the
    tokenizer reads CSR directly, so that step is skipped). The training loader visits the cells
    in an order set by ``(seed, epoch)`` alone, through :class:`EpochSeededRandomSampler`, so a run
    resumed from a checkpoint sees the same minibatches as an uninterrupted one.

    Parameters
    ----------
    *args, **kwargs
        Passed to :class:`~scvi.dataloaders.DataSplitter`.
    seed
        Seed of the training order.
    """

    def __init__(self, *args, seed: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed
        self._samplers: list[EpochSeededRandomSampler] = []

    def reseed(self, epoch: int) -> None:
        """Use the training order of ``epoch`` from the next iteration of the loaders on."""
        for sampler in self._samplers:
            sampler.set_epoch(epoch)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Keep minibatches sparse: the tokenizer reads CSR on the device."""
        return batch

    def train_dataloader(self):
        """The training loader of scvi-tools, visiting cells in the order of the current epoch."""
        loader = super().train_dataloader()
        batch_sampler = loader.sampler
        if not (isinstance(batch_sampler, BatchSampler) and isinstance(batch_sampler.sampler, RandomSampler)):
            return loader  # a distributed or user-given sampler keeps its own shuffling
        sampler = EpochSeededRandomSampler(len(batch_sampler.sampler), self.seed)
        # the epoch about to be trained, as Lightning counts it for samplers' set_epoch; also right
        # when the loader is built for a run resumed from a checkpoint
        trainer = getattr(self, "trainer", None)
        sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed if trainer is not None else 0)
        batch_sampler.sampler = sampler
        self._samplers.append(sampler)
        # the loader draws a seed of its own when an iterator starts: keep it off the global RNG
        loader.generator = torch.Generator()
        return loader
