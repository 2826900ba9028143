"""Train/validation/test splitting: sparse minibatches, and a shuffle set by the seed and epoch."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from scvi.dataloaders import DataSplitter
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler


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
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from the next iteration on."""
        self.epoch = epoch

    def skip_items(self, n: int) -> None:
        """Leave out the first ``n`` items of the next iteration only (an epoch resumed midway)."""
        self.skip = n

    def __len__(self) -> int:
        return self.n

    def order(self) -> list[int]:
        """The items of the current epoch, in order."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return torch.randperm(self.n, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        yield from self.order()[skip:]


class LengthBucketedSampler(EpochSeededRandomSampler):
    """Random order of ``n`` items in which each run of ``batch_size`` items has similar lengths.

    Per epoch (a function of ``(seed, epoch)`` alone): shuffle, cut into pools of
    ``pool_batches * batch_size`` items, sort each pool by length, cut the pools into batches and
    shuffle the order of the full batches (a last, partial batch stays last, so that a
    :class:`~torch.utils.data.BatchSampler` of the same ``batch_size`` cuts exactly these batches).
    Minibatches are padded to their longest cell, so similar lengths waste less compute on padding.

    Parameters
    ----------
    lengths
        Number of tokens of each item.
    batch_size
        Items per minibatch.
    seed
        Seed of the order.
    pool_batches
        Batches per sorted pool: larger pools give tighter buckets and less randomness.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray | torch.Tensor,
        batch_size: int,
        seed: int,
        pool_batches: int = 50,
    ) -> None:
        super().__init__(len(lengths), seed)
        self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        self.batch_size = batch_size
        self.pool_batches = pool_batches

    def order(self) -> list[int]:
        """The items of the current epoch, in order."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=generator)
        pool = self.batch_size * self.pool_batches
        batches = []
        for start in range(0, self.n, pool):
            chunk = order[start : start + pool]
            chunk = chunk[torch.sort(self.lengths[chunk], stable=True).indices]
            batches += list(chunk.split(self.batch_size))
        partial = [b for b in batches if len(b) < self.batch_size]
        full = [b for b in batches if len(b) == self.batch_size]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        return [i for batch in shuffled + partial for i in batch.tolist()]


def make_resumable(
    loader: DataLoader,
    datamodule: pl.LightningDataModule,
    sampler: Sampler,
    skip: Callable[[int], None],
) -> None:
    """Give a training loader Lightning's ``state_dict`` interface: its position in the epoch.

    Lightning stores the state in each checkpoint and hands it back before the loader is iterated
    in a resumed run; an epoch interrupted after ``k`` minibatches then calls ``skip(k)`` and goes
    on with minibatch ``k + 1``, exactly as the uninterrupted run did.

    Parameters
    ----------
    loader
        The training loader, whose sampler's order is set by the seed and epoch.
    datamodule
        Its data module, attached to the trainer.
    sampler
        The sampler whose ``epoch`` sets the order.
    skip
        Makes the loader's next iteration leave out the given number of minibatches.
    """

    def state_dict() -> dict[str, int]:
        trainer = datamodule.trainer
        return {
            "epoch": trainer.current_epoch,
            "batches": trainer.fit_loop.epoch_loop.batch_progress.current.processed,
        }

    def load_state_dict(state: dict[str, int]) -> None:
        if state["epoch"] == sampler.epoch and state["batches"] > 0:
            skip(state["batches"])

    loader.state_dict = state_dict
    loader.load_state_dict = load_state_dict


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
    lengths
        Optional number of tokens of every cell of the AnnData: the training loader then batches
        cells of similar lengths together (:class:`LengthBucketedSampler`).
    """

    def __init__(self, *args, seed: int, lengths: np.ndarray | torch.Tensor | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.lengths = lengths
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
        if self.lengths is None:
            sampler = EpochSeededRandomSampler(len(batch_sampler.sampler), self.seed)
        else:  # positions of the loader's dataset are its indices into the AnnData
            lengths = torch.as_tensor(self.lengths)[torch.as_tensor(loader.indices)]
            sampler = LengthBucketedSampler(lengths, batch_sampler.batch_size, self.seed)
        # the epoch about to be trained, as Lightning counts it for samplers' set_epoch; also right
        # when the loader is built for a run resumed from a checkpoint
        trainer = getattr(self, "trainer", None)
        sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed if trainer is not None else 0)
        batch_sampler.sampler = sampler
        self._samplers.append(sampler)
        # the loader draws a seed of its own when an iterator starts: keep it off the global RNG
        loader.generator = torch.Generator()
        make_resumable(loader, self, sampler, lambda n: sampler.skip_items(n * batch_sampler.batch_size))
        return loader
