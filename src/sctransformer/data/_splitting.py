"""Train/validation/test splitting: sparse minibatches, and a shuffle set by the seed and epoch."""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from difflib import get_close_matches
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from scvi.dataloaders import AnnDataLoader, DataSplitter
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler

from sctransformer._constants import SETUP_ARGS


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

    def _permutation(self) -> tuple[torch.Tensor, torch.Generator]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return torch.randperm(self.n, generator=generator), generator

    def order(self) -> list[int]:
        """The items of the current epoch, in order."""
        return self._permutation()[0].tolist()

    def minibatches(self, start: int, sizes: Sequence[int]) -> list[list[int]]:
        """Cut the epoch's order from ``start`` into minibatches of ``sizes`` (a rank's share)."""
        items = self.order()
        bounds = np.cumsum([start, *sizes])
        return [items[bounds[i] : bounds[i + 1]] for i in range(len(sizes))]

    def __iter__(self) -> Iterator[int]:
        yield from self.order()


class LengthBucketedSampler(EpochSeededRandomSampler):
    """Random order of ``n`` items in which each run of ``batch_size`` items has similar lengths.

    Per epoch (a function of ``(seed, epoch)`` alone): shuffle, take a distributed rank's share
    (see :func:`rank_batch_sizes`; items its minibatches leave out under ``drop_last`` are the
    share's last, random ones), cut it into pools of ``pool_batches`` minibatches, sort each pool
    by length, cut the pools into minibatches and shuffle their order (a last, partial minibatch
    stays last, so that a :class:`~torch.utils.data.BatchSampler` of the same ``batch_size`` cuts
    exactly these minibatches from :meth:`order`). Every rank's minibatches are bucketed.
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
        """The items of the current epoch, in order (one process's minibatches, end to end)."""
        _, sizes = rank_batch_sizes(self.n, self.batch_size)
        return [i for batch in self.minibatches(0, sizes) for i in batch]

    def minibatches(self, start: int, sizes: Sequence[int]) -> list[list[int]]:
        """Length-bucketed minibatches of ``sizes`` from the share of the epoch's order at ``start``."""
        permutation, generator = self._permutation()
        share = permutation[start : start + sum(sizes)]
        partial = list(sizes[-1:]) if sizes and sizes[-1] < self.batch_size else []
        whole = list(sizes[: len(sizes) - len(partial)])
        batches = []
        offset = 0
        for first in range(0, len(whole), self.pool_batches):
            pool_sizes = whole[first : first + self.pool_batches]
            chunk = share[offset : offset + sum(pool_sizes)]
            offset += len(chunk)
            chunk = chunk[torch.sort(self.lengths[chunk], stable=True).indices]
            batches += list(chunk.split(pool_sizes))
        shuffled = [batches[i].tolist() for i in torch.randperm(len(batches), generator=generator).tolist()]
        return shuffled + [share[offset:].tolist()] * bool(partial)


def rank_batch_sizes(
    n: int, batch_size: int, rank: int = 0, world_size: int = 1, drop_last: bool = False
) -> tuple[int, list[int]]:
    """Where this rank's share of an epoch's ``n`` items starts, and its minibatch sizes.

    Rank ``r`` of ``world_size`` takes items ``[r * n // world_size, (r + 1) * n // world_size)``,
    so no item goes to two ranks and none is left out. Its minibatches have ``batch_size`` items
    and the last may be partial (left out with ``drop_last``); where that would give ranks
    different numbers of minibatches (Lightning's DDP then waits forever at the epoch end), every
    rank cuts its share into the same number of minibatches of near-equal sizes instead. That
    number is never more than the smallest share, so no minibatch is empty: with
    ``batch_size=1`` and shares of ``m`` and ``m + 1`` items, every rank has ``m`` minibatches
    and one of a rank of ``m + 1`` items holds 2 (every item is still seen once per epoch).
    """
    if n < world_size:
        raise ValueError(
            f"{n} items cannot be shared out between {world_size} distributed ranks; use fewer "
            "devices or more cells"
        )
    bounds = [n * r // world_size for r in range(world_size + 1)]
    shares = [bounds[r + 1] - bounds[r] for r in range(world_size)]

    def cut(m: int) -> list[int]:
        sizes = [batch_size] * (m // batch_size)
        return sizes if drop_last or m % batch_size == 0 else [*sizes, m % batch_size]

    counts = {len(cut(m)) for m in shares}
    if drop_last and min(counts) == 0:
        raise ValueError(
            f"with drop_last=True every one of the {world_size} distributed rank(s) needs at least "
            f"batch_size={batch_size} training cells, but a share holds only {min(shares)}: use a "
            "smaller batch_size, fewer devices or drop_last=False"
        )
    if len(counts) == 1:
        return bounds[rank], cut(shares[rank])
    # more minibatches than the smallest share would leave that rank an empty one
    n_batches = min(counts) if drop_last else min(max(counts), min(shares))
    base, extra = divmod(shares[rank], n_batches)
    sizes = [base + (i < extra) for i in range(n_batches)]
    if drop_last:  # equal counts of full minibatches: the items beyond them are left out
        sizes = [batch_size] * n_batches
    return bounds[rank], sizes


class ResumableBatchSampler(Sampler[list]):
    """Minibatches of one epoch, set by ``(seed, epoch)``, whose first ``n`` can be left out once.

    Subclasses give :meth:`batches`, ``epoch``, :meth:`set_epoch`, ``__len__`` and
    :meth:`order_settings`; leaving out minibatches (:meth:`skip_batches`) is how an epoch resumed
    midway continues.
    """

    skip: int = 0

    def batches(self) -> list:
        """The minibatches of the current epoch."""
        raise NotImplementedError

    def order_settings(self) -> dict[str, int | bool]:
        """What sets the minibatches of every epoch besides the epoch: a resumed run must match it."""
        return {}

    def skip_batches(self, n: int) -> None:
        """Leave out the first ``n`` minibatches of the next iteration only (an epoch resumed midway)."""
        self.skip = n

    def __iter__(self) -> Iterator:
        skip, self.skip = self.skip, 0
        yield from self.batches()[skip:]


class EpochBatchSampler(ResumableBatchSampler):
    """Minibatches of an epoch's order of items: this rank's share, resumable within an epoch.

    Parameters
    ----------
    order
        The sampler that sets the order of each epoch (:class:`EpochSeededRandomSampler` or
        :class:`LengthBucketedSampler`).
    batch_size
        Items per minibatch.
    rank, world_size
        This process's place among distributed processes, see :func:`rank_batch_sizes`.
    drop_last
        Leave out a last, partial minibatch.
    """

    def __init__(
        self,
        order: EpochSeededRandomSampler,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        self.order = order
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last

    @property
    def epoch(self) -> int:
        """The epoch whose order the next iteration follows."""
        return self.order.epoch

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from the next iteration on."""
        self.order.set_epoch(epoch)

    def _sizes(self) -> tuple[int, list[int]]:
        return rank_batch_sizes(len(self.order), self.batch_size, self.rank, self.world_size, self.drop_last)

    def __len__(self) -> int:
        return len(self._sizes()[1])

    def order_settings(self) -> dict[str, int | bool]:
        """What sets the minibatches of every epoch besides the epoch: a resumed run must match it."""
        return {
            "seed": int(self.order.seed),
            "cells": len(self.order),
            "batch_size": int(self.batch_size),
            "drop_last": bool(self.drop_last),
            "world_size": int(self.world_size),
            "length_bucketing": isinstance(self.order, LengthBucketedSampler),
            "batches_per_epoch": len(self),
        }

    def batches(self) -> list[list[int]]:
        """The minibatches of this rank in the current epoch."""
        return self.order.minibatches(*self._sizes())


#: Settings a training loader's checkpointed state records besides its position, as error
#: messages name them: a run resumed with other values would see other minibatches.
ORDER_SETTINGS = {
    "seed": "seed",
    "cells": "number of training cells",
    "cells_checksum": "checksum of which cells are training cells",
    "cell_names_checksum": "checksum of the training cells' names (.obs_names, in order)",
    "genes_checksum": "checksum of the data's genes (their identifiers, in any order)",
    "batch_size": "batch_size",
    "drop_last": "drop_last",
    "world_size": "number of distributed processes (devices x nodes)",
    "length_bucketing": "length_bucketing",
    "batches_per_epoch": "training minibatches per epoch",
    "shuffle_buffer": "shuffle_buffer (None: all blocks shuffled together)",
}
#: Order settings added after checkpoints began to record them, with the value older versions had.
#: The checksums of the data's names added later (``cell_names_checksum``, ``genes_checksum``) are
#: not listed: their value in an older checkpoint is unknown, so a checkpoint without them is not
#: checked for them and still resumes.
LATER_ORDER_SETTINGS = {"shuffle_buffer": None}


def items_checksum(items: np.ndarray | torch.Tensor | Sequence[int]) -> int:
    """CRC-32 of integer ``items`` (e.g. the training cells' positions), to recognise them again."""
    return zlib.crc32(np.ascontiguousarray(np.asarray(items), dtype=np.int64).tobytes())


def names_checksum(names: Iterable[object], chunk_size: int = 65_536) -> int:
    """CRC-32 of ``names`` in order, each as a string (e.g. cell names or gene identifiers).

    Read in chunks, so that millions of cell names are never joined into one string.

    Parameters
    ----------
    names
        The names, e.g. ``adata.obs_names`` of the training cells.
    chunk_size
        Names joined per step (the checksum does not depend on it).
    """
    checksum = 0
    names = list(names) if not isinstance(names, Sequence | np.ndarray | pd.Index) else names
    for start in range(0, len(names), chunk_size):
        chunk = "".join(f"{name}\0" for name in names[start : start + chunk_size])
        checksum = zlib.crc32(chunk.encode("utf-8", "surrogatepass"), checksum)
    return checksum


def settings_differences(
    recorded: Mapping[str, object], current: Mapping[str, object], names: Mapping[str, str]
) -> str:
    """The settings of ``names`` that both record and that differ, described for an error message.

    ``names`` maps each key to its name in messages; the result reads ``"<name>: <value> in the
    checkpoint, <value> now; ..."``, empty where no setting differs.
    """
    return "; ".join(
        f"{name}: {recorded[key]!r} in the checkpoint, {current[key]!r} now"
        for key, name in names.items()
        if key in recorded and key in current and recorded[key] != current[key]
    )


def check_order_settings(recorded: Mapping[str, object], current: Mapping[str, object]) -> None:
    """Raise if a checkpointed loader state was written with other training minibatches than ``current``.

    Only the settings of ``ORDER_SETTINGS`` that both record are compared: a checkpoint of an
    older version, which records none, is not checked; one that records some has the old value of
    those added since (``LATER_ORDER_SETTINGS``).

    Parameters
    ----------
    recorded
        The training loader's state in the checkpoint.
    current
        This run's training loader's state (or its settings).

    Raises
    ------
    ValueError
        Naming each differing setting with its value in the checkpoint and now.
    """
    if any(key in recorded for key in ORDER_SETTINGS):
        recorded = LATER_ORDER_SETTINGS | dict(recorded)
    details = settings_differences(recorded, current, ORDER_SETTINGS)
    if not details:
        return
    raise ValueError(
        "cannot resume from this checkpoint: the run that wrote it cut other training minibatches "
        f"than this run ({details}), so resuming would not continue that run (cells would be "
        "skipped or seen twice). Resume with the same arguments as the run that wrote it (data, "
        "batch_size, seed, train_size, validation_size, devices, length_bucketing, "
        "datasplitter_kwargs), or start a new run: another checkpoint_dir, or resume=False (its "
        "checkpoints then replace this one)"
    )


class ResumableDataModule(pl.LightningDataModule):
    """A data module whose checkpointed state is its training loader's order settings.

    Lightning hands a data module its state from the checkpoint before it asks for the training
    loader, also where the checkpoint's run has nothing left to train (the loader's own state is
    then never checked: training does not start). :func:`make_resumable` checks the loader it makes
    against that state, so a run resumed on other data (other cells or genes, see
    :data:`ORDER_SETTINGS`) is refused before it trains or saves anything, whether the checkpoint
    was written midway or at the end of its run.
    """

    _order_settings: dict[str, Any] | None = None
    _resumed_order_settings: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The order settings of the latest training loader (empty before one was made)."""
        return {} if self._order_settings is None else {"train_order_settings": dict(self._order_settings)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's order settings, to check the next training loader against them."""
        self._resumed_order_settings = state_dict.get("train_order_settings")

    def record_order_settings(self, settings: Mapping[str, Any]) -> None:
        """Record a new training loader's ``settings``; raise if a resumed checkpoint's differ.

        Raises
        ------
        ValueError
            From :func:`check_order_settings`, naming each differing setting.
        """
        resumed, self._resumed_order_settings = self._resumed_order_settings, None
        if resumed is not None:
            check_order_settings(resumed, settings)
        self._order_settings = dict(settings)


def make_resumable(
    loader: DataLoader,
    datamodule: pl.LightningDataModule,
    sampler: ResumableBatchSampler,
    *,
    items: np.ndarray | torch.Tensor | Sequence[int] | None = None,
    cell_names: Iterable[object] | None = None,
    genes: Iterable[object] | None = None,
) -> None:
    """Give a training loader Lightning's ``state_dict`` interface: its position in the epoch.

    Lightning stores the state in each checkpoint and hands it back before the loader is iterated
    in a resumed run; an epoch interrupted after ``k`` minibatches then leaves out its first ``k``
    (:meth:`ResumableBatchSampler.skip_batches`) and goes on with minibatch ``k + 1``, exactly as
    the uninterrupted run did. The state also records what sets the minibatches
    (:meth:`ResumableBatchSampler.order_settings`, checksums of ``items``, ``cell_names`` and
    ``genes``): a run resumed with other ones raises a :class:`ValueError`
    (:func:`check_order_settings`) before it trains; a :class:`ResumableDataModule` checks them
    here, as the loader is made, also against the checkpoint of a finished run.

    Parameters
    ----------
    loader
        The training loader, whose sampler's order is set by the seed and epoch.
    datamodule
        Its data module, attached to the trainer.
    sampler
        The loader's sampler.
    items
        What the sampler's order permutes (the training cells' positions, or blocks of them): its
        checksum is recorded, so that other training cells of the same number are recognised.
    cell_names
        The training cells' names, in the order of ``items``' cells: their checksum is recorded,
        so that other data with as many cells (another file) are recognised.
    genes
        The data's gene identifiers: the checksum of the sorted identifiers is recorded, so that
        data of other genes are recognised (the same genes in another column order are the same
        data: genes are matched by identifier).

    Raises
    ------
    ValueError
        If ``datamodule`` is a :class:`ResumableDataModule` handed the state of a checkpoint whose
        training loader had other settings.
    """
    settings = sampler.order_settings()
    if items is not None:
        settings["cells_checksum"] = items_checksum(items)
    if cell_names is not None:
        settings["cell_names_checksum"] = names_checksum(cell_names)
    if genes is not None:
        settings["genes_checksum"] = names_checksum(sorted(map(str, genes)))
    if isinstance(datamodule, ResumableDataModule):
        datamodule.record_order_settings(settings)

    def state_dict() -> dict[str, int | bool]:
        trainer = datamodule.trainer
        return {
            "epoch": trainer.current_epoch,
            "batches": trainer.fit_loop.epoch_loop.batch_progress.current.processed,
            **settings,
        }

    def load_state_dict(state: dict[str, int | bool]) -> None:
        check_order_settings(state, settings)
        if state["epoch"] == sampler.epoch and state["batches"] > 0:
            sampler.skip_batches(state["batches"])

    loader.state_dict = state_dict
    loader.load_state_dict = load_state_dict


#: Options of the data splitter that ``GeneTransformer.train`` sets from its own arguments
TRAIN_OWNED_SPLITTER_OPTIONS = {
    "batch_size": "batch_size",
    "train_size": "train_size",
    "validation_size": "validation_size",
    "seed": "seed",
    "lengths": "length_bucketing",
    "load_sparse_tensor": None,
    # the training minibatches are train()'s own: drawn by its sampler, one sparse read each
    "shuffle": None,
    "sampler": None,
    "batch_sampler": None,
    "distributed_sampler": None,
    "collate_fn": None,
}


def refuse_train_owned_options(options: Mapping[str, Any]) -> None:
    """Raise if ``options`` (``datasplitter_kwargs``) set what ``GeneTransformer.train`` sets, naming its argument."""
    owned = [key for key in TRAIN_OWNED_SPLITTER_OPTIONS if key in options]
    if owned:
        fixes = [
            f"{key}: train({TRAIN_OWNED_SPLITTER_OPTIONS[key]}=...)"
            if TRAIN_OWNED_SPLITTER_OPTIONS[key]
            else f"{key}: no option, train() sets it"
            for key in owned
        ]
        raise ValueError(
            f"datasplitter_kwargs {owned} are set by train() itself; leave them out, or pass them as its "
            f"arguments where it has one ({'; '.join(fixes)})"
        )


def check_splitter_option_names(options: Mapping[str, Any]) -> None:
    """Raise if ``datasplitter_kwargs`` of in-memory training name an option ``train`` sets or none that exists."""
    refuse_train_owned_options(options)
    sharded_only = sorted({"block_size", "shuffle_buffer"} & set(options))
    if sharded_only:
        raise ValueError(
            f"datasplitter_kwargs {sharded_only} apply to data streamed from shards "
            "(GeneTransformer.from_shards; in the CLI, data.streaming: true); in-memory "
            "AnnData is shuffled cell by cell"
        )
    known = {
        name
        for kind in (DataSplitter, AnnDataLoader, DataLoader)
        for name in inspect.signature(kind.__init__).parameters
        if name not in ("self", "kwargs")
    }
    unknown = sorted(set(options) - known)
    if unknown:
        hints = [
            f"{key!r} (did you mean {close[0]!r}?)"
            for key in unknown
            if (close := get_close_matches(key, known, 1))
        ]
        raise ValueError(
            f"datasplitter_kwargs {unknown} are options of neither scvi-tools' DataSplitter nor its data "
            f"loaders (e.g. num_workers, pin_memory, drop_last, shuffle_set_split, external_indexing)"
            + (f"; {', '.join(hints)}" if hints else "")
        )


def check_splitter_options(options: Mapping[str, Any] | None, n_cells: int) -> dict[str, Any]:
    """The data-splitter options ``options`` of ``GeneTransformer.train``, checked; a new dict.

    Options ``train`` sets itself are refused, naming its argument. ``external_indexing`` must be
    up to three sets of cells (training, validation, test), each as positions in ``[0, n_cells)``
    or a boolean mask, disjoint, without repeats and together every cell; validation and test may
    be empty or left out. They are returned as three arrays of integer positions.
    """
    options = dict(options or {})
    check_splitter_option_names(options)
    indexing = options.get("external_indexing")
    if indexing is None:
        return options
    if (
        isinstance(indexing, str | bytes)
        or not isinstance(indexing, Sequence | np.ndarray)
        or not 1 <= len(indexing) <= 3
    ):
        raise ValueError(
            "datasplitter_kwargs['external_indexing'] must be [train, validation, test]: up to three arrays "
            "of cell positions or boolean masks (validation and test may be empty or left out)"
        )
    sets = []
    padded = [*indexing, *[None] * (3 - len(indexing))]  # as scvi-tools reads a shorter list
    for name, cells in zip(("training", "validation", "test"), padded, strict=True):
        cells = np.asarray([] if cells is None else cells)
        where = f"external_indexing's {name} cells"
        if cells.dtype == bool:
            if cells.shape != (n_cells,):
                raise ValueError(
                    f"{where}, as a boolean mask, must have one entry per cell ({n_cells}), got {cells.shape}"
                )
            cells = np.flatnonzero(cells)
        elif cells.size == 0:
            cells = cells.astype(np.int64)
        if cells.ndim != 1 or not np.issubdtype(cells.dtype, np.integer):
            raise ValueError(
                f"{where} must be a 1-D array of integer cell positions or a boolean mask, got {cells.dtype}"
            )
        if cells.size and (cells.min() < 0 or cells.max() >= n_cells):
            raise ValueError(
                f"{where} must lie in [0, {n_cells}) (positions of the cells; negative positions are not "
                f"read from the end), got {cells.min()} to {cells.max()}"
            )
        repeated = np.unique(cells[pd.Index(cells).duplicated()])
        if repeated.size:
            raise ValueError(f"{where} list cells more than once: {repeated[:10].tolist()}")
        sets.append(cells.astype(np.int64))
    if sets[0].size == 0:
        raise ValueError("external_indexing's training cells are empty; give at least one")
    for (a, name_a), (b, name_b) in (
        ((0, "training"), (1, "validation")),
        ((0, "training"), (2, "test")),
        ((1, "validation"), (2, "test")),
    ):
        shared = np.intersect1d(sets[a], sets[b])
        if shared.size:
            raise ValueError(
                f"external_indexing's {name_a} and {name_b} cells overlap in {shared.size} cells "
                f"(e.g. {shared[:5].tolist()}); each cell may be in one set only"
            )
    missing = np.setdiff1d(np.arange(n_cells), np.concatenate(sets))
    if missing.size:
        raise ValueError(
            f"external_indexing leaves {missing.size} of {n_cells} cells in none of its sets (e.g. "
            f"{missing[:5].tolist()}); every cell must be in one: put the cells to leave out of training "
            "in the test set"
        )
    options["external_indexing"] = sets
    return options


class EpochSeededDataSplitter(DataSplitter, ResumableDataModule):
    """scvi-tools' :class:`~scvi.dataloaders.DataSplitter`, sparse to the end and reproducibly shuffled.

    Minibatches stay sparse CSR on the device (scvi-tools densifies them after the transfer; the
    tokenizer reads CSR directly, so that step is skipped). The training loader visits the cells
    in an order set by ``(seed, epoch)`` alone, through :class:`EpochSeededRandomSampler`, so a run
    resumed from a checkpoint sees the same minibatches as an uninterrupted one; under
    distributed training each rank takes its own share of that order (:class:`EpochBatchSampler`).
    A run resumed from a checkpoint of other cells (by name) or genes is refused
    (:class:`ResumableDataModule`).

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
        self._samplers: list[EpochBatchSampler] = []

    def batches_per_epoch(self, world_size: int = 1) -> int:
        """Training minibatches per epoch on each of ``world_size`` ranks."""
        if not hasattr(self, "train_idx"):
            self.setup()
        batch_size = self.data_loader_kwargs.get("batch_size")
        return len(rank_batch_sizes(len(self.train_idx), batch_size, 0, world_size, self.drop_last)[1])

    def reseed(self, epoch: int) -> None:
        """Use the training order of ``epoch`` from the next iteration of the loaders on."""
        for sampler in self._samplers:
            sampler.set_epoch(epoch)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Keep minibatches sparse: the tokenizer reads CSR on the device."""
        return batch

    def train_dataloader(self) -> DataLoader:
        """Minibatches of the training cells in the order of the current epoch, this rank's share."""
        loader = super().train_dataloader()  # scvi-tools' loader: its dataset reads the training cells
        batch_sampler = loader.sampler
        if not (isinstance(batch_sampler, BatchSampler) and isinstance(batch_sampler.sampler, RandomSampler)):
            return loader  # a user-given sampler keeps its own order
        if self.lengths is None:
            order = EpochSeededRandomSampler(len(loader.dataset), self.seed)
        else:  # positions of the loader's dataset are its indices into the AnnData
            lengths = torch.as_tensor(self.lengths)[torch.as_tensor(loader.indices)]
            order = LengthBucketedSampler(lengths, batch_sampler.batch_size, self.seed)
        trainer = getattr(self, "trainer", None)
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = EpochBatchSampler(
            order,
            batch_sampler.batch_size,
            rank=rank,
            world_size=world_size,
            drop_last=batch_sampler.drop_last,
        )
        # the epoch about to be trained, as Lightning counts it for samplers' set_epoch; also right
        # when the loader is built for a run resumed from a checkpoint
        sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed if trainer is not None else 0)
        self._samplers.append(sampler)
        epoch_loader = DataLoader(
            loader.dataset,
            sampler=sampler,
            batch_size=None,  # the sampler gives whole minibatches: one sparse read each
            num_workers=loader.num_workers,
            persistent_workers=loader.persistent_workers,
            pin_memory=loader.pin_memory,
            # the other loader options of datasplitter_kwargs, as the validation loader takes them
            prefetch_factor=loader.prefetch_factor,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
            generator=torch.Generator(),  # the seed a loader draws per iterator stays off the global RNG
        )
        adata = self.adata_manager.adata
        gene_key = self.adata_manager.registry.get("setup_args", {}).get(SETUP_ARGS.GENE_KEY)
        make_resumable(
            epoch_loader,
            self,
            sampler,
            items=loader.indices,
            cell_names=adata.obs_names[np.asarray(loader.indices)],
            genes=adata.var_names if gene_key is None else adata.var[gene_key],
        )
        return epoch_loader
