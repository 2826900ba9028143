"""Many ``.h5ad`` shards read as one data set: rows are streamed from disk, never loaded whole."""

from __future__ import annotations

import copy
import inspect
import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scvi.dataloaders._data_splitting import validate_data_split
from torch.utils.data import DataLoader, Dataset

from sctransformer._constants import REGISTRY_KEYS, SETUP_ARGS, phenotype_registry_key

from ._fields import category_codes, observed_categories
from ._loader import to_torch_csr
from ._splitting import (
    ResumableBatchSampler,
    ResumableDataModule,
    epoch_seed,
    make_resumable,
    rank_batch_sizes,
    refuse_train_owned_options,
)
from ._validation import (
    check_key_names,
    check_label_values,
    count_values_problem,
    duplicate_genes_fix,
    positive_int,
    warn_label_problems,
)

logger = logging.getLogger("sctransformer")

Segment = tuple[int, int, int]
"""Rows ``start:stop`` of shard ``i``, as ``(i, start, stop)``."""


def _read_values(group: h5py.Group, key: str) -> np.ndarray | pd.Categorical:
    """One ``.obs``/``.var`` column as stored, categorical columns of anndata 0.7's layout decoded.

    anndata 0.7 stored a categorical column as a dataset of integer codes whose ``categories``
    attribute refers to the names (in ``__categories``); ``read_elem`` alone returns the codes.
    """
    element = group[key]
    if isinstance(element, h5py.Dataset) and "categories" in element.attrs:
        names = group[element.attrs["categories"]]
        ordered = bool(names.attrs.get("ordered", False))
        return pd.Categorical.from_codes(ad.io.read_elem(element), ad.io.read_elem(names), ordered=ordered)
    return ad.io.read_elem(element)


def _read_column(group: h5py.Group, key: str) -> pd.Series:
    """One ``.obs``/``.var`` column (or the index, by its name) of an on-disk AnnData."""
    return pd.Series(np.asarray(_read_values(group, key), dtype=object))


def _read_labels(group: h5py.Group, key: str) -> pd.Series:
    """One ``.obs`` column of an on-disk AnnData, in its stored dtype (int, float, categorical, ...)."""
    return pd.Series(_read_values(group, key))


def _concat_labels(columns: Sequence[pd.Series | None], sizes: Sequence[int]) -> pd.Series:
    """The columns of all shards as one, typed as when the shards are concatenated in memory.

    Values become category names through ``str``, so their common dtype decides the names: e.g.
    integers of one shard and floats of another are all floats (``"1.0"``), as in
    ``ad.concat(..., join="outer")``, where a shard without the column also holds missing values.
    """
    parts = [
        pd.Series(np.full(int(n), np.nan)) if column is None else column
        for column, n in zip(columns, sizes, strict=True)
    ]
    return pd.concat(parts, ignore_index=True)


def _index_key(group: h5py.Group, path: Path) -> str:
    """Name of the column holding the index of an on-disk ``.obs``/``.var`` (anndata 0.7 and later)."""
    if "_index" not in group.attrs:
        raise ValueError(
            f"cannot read shard {path}: its {group.name} has no '_index' attribute, so it was not "
            "written by anndata (0.7 or later); rewrite it with anndata: "
            f"anndata.read_h5ad({str(path)!r}).write_h5ad(<new path>)"
        )
    return group.attrs["_index"]


def check_h5ad_layout(file: h5py.File, path: Path) -> None:
    """Raise if ``file`` is not an ``.h5ad`` file in the layout of anndata 0.7 and later.

    Files of anndata before 0.7 store ``.obs`` and ``.var`` as compound datasets (and sparse
    matrices without encoding attributes), which can only be read whole; ``anndata.read_h5ad``
    reads them, and ``write_h5ad`` rewrites them in the current layout, readable by row blocks.

    Raises
    ------
    ValueError
        Naming the file and the one-line rewrite that fixes it.
    """
    missing = [name for name in ("obs", "var") if name not in file]
    if missing:
        raise ValueError(f"cannot read shard {path}: it has no {missing}; is it an .h5ad file?")
    legacy = [name for name in ("obs", "var") if not isinstance(file[name], h5py.Group)]
    if legacy:
        raise ValueError(
            f"cannot read shard {path} from disk: it is in the .h5ad layout of anndata before 0.7 "
            f"({'/'.join(legacy)} stored as a table, not a group of columns); rewrite it once in the "
            f"current layout, e.g. anndata.read_h5ad({str(path)!r}).write_h5ad(<new path>), and use "
            "the new file"
        )


def _read_element(path: Path, where: str, read: Callable, *args: object):
    """``read(*args)``, an error of which (a damaged chunk, an encoding anndata cannot read) names the file."""
    try:
        return read(*args)
    except Exception as err:  # h5py and anndata raise many types (OSError, IORegistryError, ...)
        raise ValueError(f"cannot read {where} of shard {path}: {type(err).__name__}: {err}") from err


def var_columns(var: h5py.Group) -> list[str]:
    """The columns of an on-disk ``.var`` (not its index, nor anndata 0.7's ``__categories``).

    As its ``column-order`` lists them: the index may share its dataset with a column of the same
    name (``adata.var_names = adata.var["gene_ids"]`` keeps the column).
    """
    if "column-order" in var.attrs:
        return [str(c) for c in np.atleast_1d(var.attrs["column-order"])]
    return [k for k in var if k not in ("__categories", var.attrs.get("_index"))]


def check_gene_column(
    path: str | os.PathLike,
    columns: Sequence[str],
    gene_key: str,
    fix: str = "pass gene_key= a .var column of gene identifiers that every file has, or None for the var names",
) -> None:
    """Raise if a data file's ``.var`` has no column ``gene_key`` (its ``columns``).

    One check for shards and for files loaded into memory (the command line's ``data.gene_key``);
    ``fix`` says how to choose another column where it is chosen.

    Raises
    ------
    KeyError
        Naming the file, its columns and the fix.
    """
    if gene_key not in columns:
        raise KeyError(
            f"{path}: .var has no column {gene_key!r} (gene_key; its columns: {list(columns)}); {fix}"
        )


def check_gene_identifiers(
    path: str | os.PathLike, identifiers: Sequence | pd.Index | pd.Series, gene_key: str | None
) -> list[str]:
    """A data file's gene identifiers as strings; raise if one is missing or two are the same.

    One check for shards and for files loaded into memory: the genes of several files are joined
    by identifier, which must name one gene of each file.

    Parameters
    ----------
    path
        The file, named in errors.
    identifiers
        Its ``.var[gene_key]``, or its var names where ``gene_key`` is ``None``.
    gene_key
        The ``.var`` column they were read from (``None``: the var names).

    Raises
    ------
    ValueError
        Naming the file, the first repeated identifiers and the fix.
    """
    where = ".var_names" if gene_key is None else f".var[{gene_key!r}]"
    values = pd.Series(np.asarray(identifiers, dtype=object))
    if values.isna().any():  # else NaN would be read as the gene "nan"
        raise ValueError(f"{path}: {where} has missing gene identifiers; fill or drop them")
    genes = values.astype(str)
    if not genes.is_unique:
        repeated = genes[genes.duplicated()].unique()[:5].tolist()
        raise ValueError(
            f"{path}: the gene identifiers in {where} are not unique (e.g. {repeated}); make them "
            f"unique, e.g. {duplicate_genes_fix(gene_key, can_pass_gene_key=True)}"
        )
    return genes.tolist()


def check_layer(
    path: str | os.PathLike,
    layers: Sequence[str],
    layer: str,
    fix: str = "every file needs the layer of raw counts (layer=None reads X)",
) -> None:
    """Raise if a data file has no ``layer`` among its ``layers``.

    One check for shards and for files loaded into memory, where an inner join would otherwise
    drop a layer that one file lacks from all of them; ``fix`` says how to choose another layer.

    Raises
    ------
    KeyError
        Naming the file, its layers and the fix.
    """
    if layer not in layers:
        raise KeyError(f"{path}: layer {layer!r} not found (available: {list(layers)}); {fix}")


#: Open sparse matrices without caching their whole ``indptr``: a shard reopened for each block
#: (more shards than ``MAX_OPEN``) would otherwise read all of it on every open, for a few rows.
#: anndata versions without the option keep their cache.
_SPARSE_OPTIONS = (
    {"should_cache_indptr": False}
    if "should_cache_indptr" in inspect.signature(ad.io.sparse_dataset).parameters
    else {}
)


def _check_block(values: np.ndarray, path: Path, where: str) -> None:
    """Raise if counts read from disk are not finite, non-negative integers that float32 holds."""
    problem = count_values_problem(values)
    if problem is not None:
        kind, what = problem
        remedy = {
            "fractional": "pass raw counts (layer=...), not normalised data",
            "negative": "pass raw, non-negative counts",
        }.get(kind, "fix the shard")
        raise ValueError(f"{path}: {where} holds {what}; {remedy}")


class ShardedAnnData:
    """A list of ``.h5ad`` files ("shards") used as one data set, with bounded memory.

    Only ``.obs`` and ``.var`` are read when the object is made (one pass over the shards); count
    rows are read from disk in row blocks when they are needed, checked as they are read, and put
    into the columns of the shared gene vocabulary. Shards whose genes differ are aligned by
    identifier (``join="inner"`` keeps the genes of every shard, as the safe default, since a gene
    a shard did not measure is not a zero; ``"outer"`` keeps the genes of any shard). For a
    trained model's inference the join does not matter: each shard is read onto the model's genes
    (:meth:`with_genes`), so that a cell keeps every gene of the model it measured.

    Parameters
    ----------
    paths
        The ``.h5ad`` files. Empty ones are skipped with a warning; one that cannot be read (or
        whose ``.obs``/``.var`` columns or counts cannot be decoded) is an error naming it, and so
        is a file listed twice (compared as resolved paths, e.g. ``a.h5ad`` and ``./a.h5ad``).
    layer
        Layer holding raw counts (sparse CSR or dense); ``None`` for ``X``.
    phenotype_keys
        Categorical ``.obs`` columns modelled as phenotype tokens (one key may be a string). A
        shard without the column counts as unknown for it; categories are the sorted union over
        shards, named as for the shards concatenated in memory (a column of integers in one shard
        and of floats in another gives ``"1.0"``, not both ``"1"`` and ``"1.0"``).
    batch_key
        ``.obs`` column of batch labels; every shard needs it.
    gene_key
        ``.var`` column of gene identifiers; default the var names.
    join
        ``"inner"`` or ``"outer"``: the genes kept (see above).

    Examples
    --------
    >>> data = sct.data.ShardedAnnData(["atlas_000.h5ad", "atlas_001.h5ad"], layer="counts",
    ...                                phenotype_keys=["cell_type"])
    >>> model = sct.GeneTransformer.from_shards(data)
    >>> model.train()
    >>> embedding = model.get_latent_representation(data)
    """

    #: Shard files kept open per process (the least recently read are closed beyond it).
    MAX_OPEN = 16

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        *,
        layer: str | None = None,
        phenotype_keys: str | Sequence[str] | None = None,
        batch_key: str | None = None,
        gene_key: str | None = None,
        join: str = "inner",
    ) -> None:
        if isinstance(paths, str | os.PathLike):
            paths = [paths]
        if not paths:
            raise ValueError("ShardedAnnData needs at least one .h5ad path")
        if join not in ("inner", "outer"):
            raise ValueError(f"join must be 'inner' or 'outer', got {join!r}")
        if isinstance(phenotype_keys, str):  # one key, as setup_anndata accepts it
            phenotype_keys = [phenotype_keys]
        phenotype_keys = list(phenotype_keys or [])
        if len(set(phenotype_keys)) != len(phenotype_keys):
            raise ValueError(f"phenotype_keys has duplicates: {phenotype_keys}")
        check_key_names(phenotype_keys=phenotype_keys, batch_key=batch_key, gene_key=gene_key, layer=layer)
        if batch_key is not None and batch_key in phenotype_keys:
            raise ValueError(f"{batch_key!r} is both batch_key and a phenotype key; choose one role")
        self.layer = layer
        self.batch_key = batch_key
        self.gene_key = gene_key
        self.phenotype_keys = phenotype_keys
        self._handles: OrderedDict[int, tuple[h5py.File, object]] = OrderedDict()
        self._pid = os.getpid()
        seen: dict[Path, int] = {}
        for i, path in enumerate(paths):  # its cells would be counted twice, in training and validation
            first = seen.setdefault(Path(path).resolve(), i)
            if first != i:
                raise ValueError(
                    f"shard {path} is listed twice (also as {paths[first]}); list each file once"
                )

        shards, sizes, genes, labels, batches = [], [], [], {k: [] for k in phenotype_keys}, []
        for path in map(Path, paths):
            n_obs, shard_genes, shard_labels, shard_batches = self._scan(path)
            if n_obs == 0:
                warnings.warn(f"shard {path} has no cells; it is skipped", UserWarning, stacklevel=2)
                continue
            shards.append(path)
            sizes.append(n_obs)
            genes.append(shard_genes)
            for key in phenotype_keys:
                labels[key].append(shard_labels[key])
            batches.append(shard_batches)
        if not shards:
            raise ValueError(f"every shard is empty ({len(paths)} given); there are no cells")
        self.paths = shards
        self.shard_sizes = np.asarray(sizes, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_sizes)])

        if join == "inner":
            shared = set(genes[0]).intersection(*genes[1:])
            vocabulary = [g for g in genes[0] if g in shared]
        else:
            vocabulary = list(dict.fromkeys(g for shard_genes in genes for g in shard_genes))
        if not vocabulary:
            raise ValueError(
                "the shards share no gene identifier; check that they use the same kind of identifier "
                "(gene_key= names the .var column), or pass join='outer'"
            )
        self.shard_genes = [pd.Index(g) for g in genes]
        self.genes = pd.Index(vocabulary)
        self._column_to_gene = [self.genes.get_indexer(g).astype(np.int64) for g in self.shard_genes]
        for path, shard_genes, mapping in zip(self.paths, genes, self._column_to_gene, strict=True):
            n_kept = int((mapping >= 0).sum())
            if n_kept < len(shard_genes) or n_kept < len(self.genes):
                logger.info(
                    "%s: %d of its %d genes kept (%d of the %d shared genes present)",
                    path,
                    n_kept,
                    len(shard_genes),
                    n_kept,
                    len(self.genes),
                )

        self.phenotype_categories: dict[str, list[str]] = {}
        self.phenotype_codes: dict[str, np.ndarray] = {}
        for key in phenotype_keys:
            if all(c is None for c in labels[key]):
                raise KeyError(f"phenotype column {key!r} is in no shard's .obs")
            # one column over all shards, so that the same value has one name in every shard
            values = _concat_labels(labels[key], self.shard_sizes)
            if not all(c is None or isinstance(c.dtype, pd.CategoricalDtype) for c in labels[key]):
                check_label_values(values, key)  # as setup_anndata checks an AnnData's (not categoricals)
            categories = observed_categories(values)  # named as in memory (e.g. float32, dates)
            if not categories:
                raise ValueError(f"phenotype column {key!r} has no known value in any shard")
            warn_label_problems(values, key, shards=True)
            self.phenotype_categories[key] = categories
            self.phenotype_codes[key] = category_codes(values, categories).astype(np.int32)
        self.batch_categories: list[str] | None = None
        self.batch_codes: np.ndarray | None = None
        if batch_key is not None:
            values = _concat_labels(batches, self.shard_sizes)
            self.batch_categories = sorted({str(v) for v in values})
            self.batch_codes = category_codes(values, self.batch_categories).astype(np.int32)
        try:  # a shard of non-counts fails now, not hours into training
            for i in range(len(self.paths)):
                self.read_rows(i, 0, min(256, int(self.shard_sizes[i])))
        finally:  # also when a shard fails: the error must not keep its file open
            self.close()

    # ------------------------------------------------------------------ scanning
    def _scan(self, path: Path) -> tuple[int, list[str], dict[str, pd.Series | None], pd.Series | None]:
        """Number of cells, gene identifiers, phenotype and batch columns of one shard."""
        try:
            file = h5py.File(path, "r")
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read shard {path}: {err}") from err
        with file:
            check_h5ad_layout(file, path)
            obs, var = file["obs"], file["var"]
            matrix = self._matrix_element(file, path)
            n_obs = int(matrix.attrs["shape"][0] if isinstance(matrix, h5py.Group) else matrix.shape[0])
            if self.gene_key is not None:
                check_gene_column(path, var_columns(var), self.gene_key)
            gene_key = self.gene_key or _index_key(var, path)
            column = _read_element(path, f".var[{gene_key!r}]", _read_column, var, gene_key)
            shard_genes = check_gene_identifiers(path, column, self.gene_key)
            labels = {}
            for key in self.phenotype_keys:
                labels[key] = (
                    _read_element(path, f".obs[{key!r}]", _read_labels, obs, key) if key in obs else None
                )
                if labels[key] is None and n_obs:
                    logger.info("%s has no .obs[%r]; its cells count as unknown for it", path, key)
            batches = None
            if self.batch_key is not None and n_obs:
                if self.batch_key not in obs:
                    raise KeyError(
                        f"{path}: .obs has no batch column {self.batch_key!r}; every shard needs it"
                    )
                batches = _read_element(path, f".obs[{self.batch_key!r}]", _read_labels, obs, self.batch_key)
                if batches.isna().any():
                    raise ValueError(f"{path}: .obs[{self.batch_key!r}] has missing values")
        return n_obs, shard_genes, labels, batches

    def _matrix_element(self, file: h5py.File, path: Path) -> h5py.Group | h5py.Dataset:
        if self.layer is None:
            if "X" not in file:
                raise KeyError(f"{path} has no X; pass the layer that holds counts with layer=...")
            element, where, fix = file["X"], "X", "adata.X = adata.X.tocsr()"
        else:
            check_layer(path, list(file["layers"]) if "layers" in file else [], self.layer)
            element = file["layers"][self.layer]
            where, fix = f"layer {self.layer!r}", "adata.layers[...] = adata.layers[...].tocsr()"
        if isinstance(element, h5py.Group) and element.attrs.get("encoding-type") == "csc_matrix":
            raise ValueError(
                f"{path}: {where} is stored column-major (CSC), which cannot be read by rows "
                f"efficiently; rewrite it as CSR ({fix})"
            )
        return element

    # ------------------------------------------------------------------ reading
    @property
    def n_obs(self) -> int:
        """Number of cells over all shards."""
        return int(self.offsets[-1])

    @property
    def n_vars(self) -> int:
        """Number of genes in the shared vocabulary."""
        return len(self.genes)

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_obs, n_vars)``."""
        return self.n_obs, self.n_vars

    @property
    def setup_args(self) -> dict[str, object]:
        """The settings, as :func:`sctransformer.setup_anndata` records them."""
        return {
            SETUP_ARGS.LAYER: self.layer,
            SETUP_ARGS.BATCH_KEY: self.batch_key,
            SETUP_ARGS.PHENOTYPE_KEYS: list(self.phenotype_keys),
            SETUP_ARGS.GENE_KEY: self.gene_key,
        }

    @property
    def obs_names(self) -> pd.Index:
        """Cell names of every shard, in order (read from disk on each call)."""
        names = []
        for path in self.paths:
            with h5py.File(path, "r") as file:
                names.append(_read_column(file["obs"], _index_key(file["obs"], path)))
        return pd.Index(pd.concat(names, ignore_index=True).astype(str))

    def with_genes(self, genes: Sequence[str]) -> ShardedAnnData:
        """The same shards, read onto ``genes``: each shard's genes outside them add to the last column.

        A shard lacking one of ``genes`` reads 0 there. Inference on another model's vocabulary
        uses this, so that a gene one shard lacks is not dropped from the others (as an inner join
        of the shards does).
        """
        aligned = copy.copy(self)
        aligned._handles = OrderedDict()  # its own open files
        aligned.genes = pd.Index(genes)
        aligned._column_to_gene = [aligned.genes.get_indexer(g).astype(np.int64) for g in self.shard_genes]
        return aligned

    def __repr__(self) -> str:
        return f"ShardedAnnData: {self.n_obs} cells x {self.n_vars} genes in {len(self.paths)} shards"

    def __len__(self) -> int:
        return self.n_obs

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()  # open files stay with their process; workers reopen theirs
        return state

    def _matrix(self, shard: int):
        """The count matrix of a shard, opened once per process; at most ``MAX_OPEN`` stay open."""
        if self._pid != os.getpid():  # a forked worker must not share the parent's file handles
            self._handles, self._pid = OrderedDict(), os.getpid()
        if shard in self._handles:
            self._handles.move_to_end(shard)
        else:
            file = h5py.File(self.paths[shard], "r")
            element = self._matrix_element(file, self.paths[shard])
            matrix = (
                ad.io.sparse_dataset(element, **_SPARSE_OPTIONS)
                if isinstance(element, h5py.Group)
                else element
            )
            self._handles[shard] = (file, matrix)
            while len(self._handles) > self.MAX_OPEN:  # the least recently read shard is closed
                self._handles.popitem(last=False)[1][0].close()
        return self._handles[shard][1]

    def close(self) -> None:
        """Close the shard files this process has open (they reopen when next read)."""
        for file, _ in self._handles.values():
            file.close()
        self._handles = OrderedDict()

    def read_rows(self, shard: int, start: int, stop: int) -> sp.csr_matrix:
        """Counts of rows ``start:stop`` of one shard, in the vocabulary's gene columns (float32 CSR).

        The matrix has ``n_vars + 1`` columns: the last holds each cell's summed counts of the
        shard's genes outside the vocabulary, so that library sizes are those of the whole cell,
        as for an AnnData whose extra genes are outside a model's vocabulary. A block that cannot be
        read (e.g. a damaged compressed chunk) is a ``ValueError`` naming the file and rows.
        """
        where = "X" if self.layer is None else f"layer {self.layer!r}"
        matrix = self._matrix(shard)
        block = _read_element(self.paths[shard], f"{where} (rows {start}:{stop})", lambda: matrix[start:stop])
        if sp.issparse(block):
            block = block.tocsr()
            _check_block(block.data, self.paths[shard], f"{where} (rows {start}:{stop})")
        else:  # checked in the file's dtype (and byte order), then cast
            block = np.asarray(block)
            _check_block(block, self.paths[shard], f"{where} (rows {start}:{stop})")
            block = sp.csr_matrix(block.astype(np.float32))
        genes = self._column_to_gene[shard][block.indices]
        genes = np.where(genes >= 0, genes, self.n_vars)  # genes outside the vocabulary: summed
        rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
        out = sp.csr_matrix(
            (block.data.astype(np.float32), (rows, genes)), shape=(block.shape[0], self.n_vars + 1)
        )
        out.sum_duplicates()
        return out

    def read_segments(self, segments: Sequence[Segment]) -> sp.csr_matrix:
        """Rows of several segments, stacked in order."""
        return sp.vstack([self.read_rows(*s) for s in segments], format="csr")

    def locate(self, positions: np.ndarray) -> list[Segment]:
        """Runs of consecutive cells of one shard covering ``positions`` (global, sorted, unique)."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) == 0:
            return []
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1
        segments = []
        for run in np.split(positions, breaks):
            start, stop = int(run[0]), int(run[-1]) + 1
            while start < stop:
                shard = int(np.searchsorted(self.offsets, start, side="right") - 1)
                end = min(stop, int(self.offsets[shard + 1]))
                segments.append((shard, start - int(self.offsets[shard]), end - int(self.offsets[shard])))
                start = end
        return segments

    def iter_minibatches(
        self, batch_size: int, indices: np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield ``(positions, CSR counts)`` of consecutive cells (of ``indices``, sorted, if given)."""
        positions = np.arange(self.n_obs) if indices is None else np.unique(np.asarray(indices))
        try:
            for start in range(0, len(positions), batch_size):
                chunk = positions[start : start + batch_size]
                yield chunk, to_torch_csr(self.read_segments(self.locate(chunk)))
        finally:
            self.close()

    def sample(self, n_cells: int, seed: int) -> sp.csr_matrix:
        """Counts of up to ``n_cells`` cells drawn at random (read in row blocks)."""
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(self.n_obs, size=min(self.n_obs, n_cells), replace=False))
        try:
            return self.read_segments(self.locate(rows))
        finally:
            self.close()


class ShardBatches(Dataset):
    """Minibatches of a :class:`ShardedAnnData`; an index is the list of segments of one minibatch.

    Each item is the dictionary a training plan reads: sparse CSR counts under ``"X"``, phenotype
    and batch codes as ``(n, 1)`` tensors.
    """

    def __init__(self, data: ShardedAnnData) -> None:
        self.data = data

    def __len__(self) -> int:
        return self.data.n_obs

    def __getitem__(self, segments: Sequence[Segment]) -> dict[str, torch.Tensor]:
        positions = np.concatenate([np.arange(s, e) + self.data.offsets[i] for i, s, e in segments])
        batch = {REGISTRY_KEYS.X_KEY: to_torch_csr(self.data.read_segments(segments))}
        for key, codes in self.data.phenotype_codes.items():
            batch[phenotype_registry_key(key)] = torch.as_tensor(codes[positions], dtype=torch.long)[:, None]
        if self.data.batch_codes is not None:
            batch[REGISTRY_KEYS.BATCH_KEY] = torch.as_tensor(self.data.batch_codes[positions])[:, None]
        return batch


#: The ``datasplitter_kwargs`` that training on shards takes (options of :class:`ShardedDataModule`).
SHARD_SPLITTER_OPTIONS = ("block_size", "shuffle_buffer", "num_workers")


def check_shard_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """``datasplitter_kwargs`` of training on shards, checked before anything runs; a new dict."""
    options = dict(options or {})
    refuse_train_owned_options(options)
    other = sorted(set(options) - set(SHARD_SPLITTER_OPTIONS))
    if other:
        raise ValueError(
            f"datasplitter_kwargs {other} do not apply to data streamed from shards, which takes "
            f"{list(SHARD_SPLITTER_OPTIONS)} (options of scvi-tools' DataSplitter, such as drop_last, "
            "pin_memory or external_indexing, are for in-memory AnnData)"
        )
    return options


def split_blocks(n_cells: Sequence[int], block_size: int) -> np.ndarray:
    """Blocks of up to ``block_size`` consecutive cells of each shard, as rows ``(shard, start, stop)``."""
    blocks = [
        (shard, start, min(start + block_size, n))
        for shard, n in enumerate(n_cells)
        for start in range(0, int(n), block_size)
    ]
    return np.asarray(blocks, dtype=np.int64).reshape(-1, 3)


def _take_cells(blocks: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` cells of a sequence of blocks and the rest; a block across the boundary is cut."""
    ends = np.cumsum(blocks[:, 2] - blocks[:, 1])
    whole = int(np.searchsorted(ends, n, side="right"))  # blocks that end within the first n cells
    extra = n - (int(ends[whole - 1]) if whole else 0)
    if extra == 0:
        return blocks[:whole], blocks[whole:]
    shard, start, stop = (int(v) for v in blocks[whole])
    taken = np.vstack([blocks[:whole], [[shard, start, start + extra]]])
    rest = np.vstack([[[shard, start + extra, stop]], blocks[whole + 1 :]])
    return taken.astype(np.int64), rest.astype(np.int64)


def split_train_validation_test(
    blocks: np.ndarray, train_size: float, validation_size: float | None, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training, validation and test blocks: scvi-tools' rule for the shares, applied to blocks.

    The blocks are shuffled (seeded); the first ones validate, the next ones train, the rest test.
    Where blocks are too few for the rule to give the validation (or test) set a block although it
    gives it cells, as for few cells or a small ``validation_size``, the rule is applied to cells
    instead, so the sets have the sizes of in-memory data (:class:`~scvi.dataloaders.DataSplitter`)
    and a block that spans two sets is cut in two.

    Parameters
    ----------
    blocks
        Rows ``(shard, start, stop)``, see :func:`split_blocks`.
    train_size, validation_size
        Shares for training and validation, as :func:`scvi.dataloaders.DataSplitter` takes them.
    seed
        Seed of the shuffle.

    Returns
    -------
    The training, validation and test blocks, each in the order of the shards' rows.
    """
    n_train, n_val = validate_data_split(len(blocks), train_size, validation_size)
    n_cells = int((blocks[:, 2] - blocks[:, 1]).sum())
    cells_train, cells_val = validate_data_split(n_cells, train_size, validation_size)
    order = np.random.default_rng(seed).permutation(len(blocks))
    if (n_val == 0 and cells_val > 0) or (
        len(blocks) == n_train + n_val and n_cells > cells_train + cells_val
    ):
        logger.info(
            "%d blocks of cells are too few for the shares to give the validation (or test) cells a "
            "block; the shares are counted in cells, as for in-memory data: %d training, %d "
            "validation, %d test cells",
            len(blocks),
            cells_train,
            cells_val,
            n_cells - cells_train - cells_val,
        )
        val, rest = _take_cells(blocks[order], cells_val)
        train, test = _take_cells(rest, cells_train)
        train, val, test = (b[np.lexsort((b[:, 1], b[:, 0]))] for b in (train, val, test))
        return train, val, test
    val = blocks[np.sort(order[:n_val])]
    train = blocks[np.sort(order[n_val : n_val + n_train])]
    test = blocks[np.sort(order[n_val + n_train :])]
    return train, val, test


def _cut(blocks: np.ndarray, sizes: Sequence[int]) -> list[list[Segment]]:
    """Cut a sequence of blocks into consecutive minibatches of ``sizes`` cells."""
    batches, current, need = [], [], list(sizes)
    i, offset = 0, 0  # current block, cells of it already taken
    for size in need:
        current = []
        while size > 0:
            shard, start, stop = (int(v) for v in blocks[i])
            take = min(size, stop - start - offset)
            current.append((shard, start + offset, start + offset + take))
            size -= take
            offset += take
            if start + offset == stop:
                i, offset = i + 1, 0
        batches.append(current)
    return batches


def shard_sequence(blocks: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """``blocks`` shard after shard, the shards in a random order, the blocks of each in row order."""
    if len(blocks) == 0:
        return blocks
    shards = np.unique(blocks[:, 0])
    shard_place = np.zeros(int(shards[-1]) + 1, dtype=np.int64)
    shard_place[shards] = torch.randperm(len(shards), generator=generator).numpy()
    return blocks[np.lexsort((blocks[:, 1], shard_place[blocks[:, 0]]))]


def shuffle_within_buffers(blocks: np.ndarray, buffer_cells: int, generator: torch.Generator) -> np.ndarray:
    """Shuffle a sequence of blocks within windows of ``buffer_cells`` consecutive cells.

    A block belongs to the window of the cell it starts with.
    """
    sizes = blocks[:, 2] - blocks[:, 1]
    window = (np.cumsum(sizes) - sizes) // buffer_cells
    within = torch.randperm(len(blocks), generator=generator).numpy()
    return blocks[np.lexsort((within, window))]


def shard_buffer_order(blocks: np.ndarray, buffer_cells: int, generator: torch.Generator) -> np.ndarray:
    """An epoch's order of ``blocks`` on one process: shard after shard, shuffled within buffers.

    :func:`shard_sequence`, then :func:`shuffle_within_buffers`. Consecutive minibatches so read
    one region of one or two shards at a time, rather than blocks of any shard. With several
    distributed ranks, :class:`ShardBlockSampler` cuts each rank's share out of the shard sequence
    first and shuffles within buffers of that share.
    """
    return shuffle_within_buffers(shard_sequence(blocks, generator), buffer_cells, generator)


class ShardBlockSampler(ResumableBatchSampler):
    """Minibatches of random blocks of consecutive cells, disjoint between distributed ranks.

    Per epoch (a function of ``(seed, epoch)`` alone), the blocks are shuffled and their cells
    shared out between ranks and cut into minibatches as :func:`rank_batch_sizes` says: no cell is
    seen by two ranks, none is skipped, and every rank has the same number of minibatches. A
    minibatch reads about ``batch_size / block_size`` blocks, each a contiguous row range on disk.
    The shuffle is over all blocks, or with ``shuffle_buffer`` by shard and then within buffers:
    each rank takes its share as a run of the epoch's :func:`shard_sequence` and shuffles it within
    buffers (:func:`shuffle_within_buffers`), so ranks read disjoint shards, except that a shard
    at the end of one rank's run may begin the next rank's.

    Parameters
    ----------
    blocks
        Rows ``(shard, start, stop)``, see :func:`split_blocks`.
    batch_size
        Cells per minibatch.
    seed
        Seed of the order.
    shuffle
        Shuffle the blocks (training); else keep them in order (validation).
    shuffle_buffer
        Cells per buffer of the shard-by-shard order; ``None`` shuffles all blocks together.
    rank, world_size
        This process's place among distributed processes.
    """

    def __init__(
        self,
        blocks: np.ndarray,
        batch_size: int,
        seed: int,
        *,
        shuffle: bool = True,
        shuffle_buffer: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = (
            None if shuffle_buffer is None else positive_int(shuffle_buffer, "shuffle_buffer")
        )
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.n_cells = int((blocks[:, 2] - blocks[:, 1]).sum())
        self._start, self._sizes = rank_batch_sizes(self.n_cells, batch_size, rank, world_size)

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from the next iteration on."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._sizes)

    def order_settings(self) -> dict[str, int | bool]:
        """What sets the minibatches of every epoch besides the epoch: a resumed run must match it."""
        return {
            "seed": int(self.seed),
            "cells": self.n_cells,
            "batch_size": int(self.batch_size),
            "world_size": int(self.world_size),
            "batches_per_epoch": len(self),
            "shuffle_buffer": self.shuffle_buffer,
        }

    def batches(self) -> list[list[Segment]]:
        """The minibatches of this rank in the current epoch."""
        blocks = self.blocks
        if self.shuffle:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            if self.shuffle_buffer is not None:  # this rank's run of the shard sequence, then buffers
                _, rest = _take_cells(shard_sequence(blocks, generator), self._start)
                share, _ = _take_cells(rest, sum(self._sizes))
                return _cut(shuffle_within_buffers(share, self.shuffle_buffer, generator), self._sizes)
            blocks = blocks[torch.randperm(len(blocks), generator=generator).numpy()]
        return _cut(blocks, [self._start, *self._sizes])[1:]


class ShardedDataModule(ResumableDataModule):
    """Training and validation minibatches of a :class:`ShardedAnnData`, streamed from disk.

    Cells are split into training, validation and test cells by blocks of ``block_size``
    consecutive cells (scvi-tools' rule for the shares, applied to blocks), with a seeded
    shuffle; data too small for that to give validation cells a block is split by cells, as in
    memory (:func:`split_train_validation_test`). The training loader is
    :class:`ShardBlockSampler`'s: random blocks per epoch, a disjoint share of the cells on each
    distributed rank, and a position that Lightning checkpoints, so an epoch resumed midway
    continues where it stopped; a run resumed from a checkpoint of other cells (by the shards'
    cell names) or genes is refused (:class:`~sctransformer.data._splitting.ResumableDataModule`).
    DataLoader workers (``num_workers``) each open the shards themselves.

    Parameters
    ----------
    data
        The shards.
    batch_size
        Cells per minibatch (per rank).
    train_size, validation_size
        Shares of cells (in blocks, or in cells for small data) for training and validation; the
        rest is a test set.
    seed
        Seed of the split and of the training order.
    block_size
        Consecutive cells read together; smaller blocks mix the cells of a minibatch better,
        larger ones read faster.
    shuffle_buffer
        ``None`` (default): each epoch shuffles all training blocks together, so a minibatch
        mixes cells of any shards. A number of cells (at least two blocks and a minibatch): the
        shards one after another in a random order, their blocks shuffled within buffers of that
        many consecutive cells (:func:`shard_buffer_order`), so that each file is opened once per
        epoch and read region by region: for atlases of many (compressed) shards. A buffer of
        several shards' worth of cells mixes minibatches about as well as the default; one within
        a shard keeps a minibatch to one region of one file (cells stored sorted, e.g. by cell
        type, stay together). ``benchmarks/shard_order.py`` measures both.
    num_workers
        DataLoader worker processes.
    """

    def __init__(
        self,
        data: ShardedAnnData,
        *,
        batch_size: int,
        train_size: float,
        validation_size: float | None,
        seed: int,
        block_size: int = 8,
        shuffle_buffer: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        block_size = positive_int(block_size, "block_size")
        self.shuffle_buffer = (
            None if shuffle_buffer is None else positive_int(shuffle_buffer, "shuffle_buffer")
        )
        if self.shuffle_buffer is not None and self.shuffle_buffer < max(2 * block_size, batch_size):
            raise ValueError(
                f"shuffle_buffer={self.shuffle_buffer} cells would leave minibatches unshuffled: a buffer "
                f"must hold several blocks (block_size={block_size}) and at least a minibatch "
                f"(batch_size={batch_size}); use thousands of cells, e.g. shuffle_buffer=4096"
            )
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        try:
            self.train_blocks, self.val_blocks, self.test_blocks = split_train_validation_test(
                split_blocks(data.shard_sizes, block_size), train_size, validation_size, seed
            )
        except ValueError as err:
            raise ValueError(
                f"train_size={train_size}, validation_size={validation_size} do not split the shards' "
                f"blocks of cells: {err}"
            ) from err
        self.train_idx = self._positions(self.train_blocks)
        self.val_idx = self._positions(self.val_blocks)
        self.test_idx = self._positions(self.test_blocks)
        self.n_train, self.n_val = len(self.train_idx), len(self.val_idx)
        self._samplers: list[ShardBlockSampler] = []

    def _positions(self, blocks: np.ndarray) -> np.ndarray:
        if len(blocks) == 0:
            return np.zeros(0, dtype=np.int64)
        offsets = self.data.offsets[blocks[:, 0]]
        starts, stops = offsets + blocks[:, 1], offsets + blocks[:, 2]
        return np.concatenate([np.arange(a, b) for a, b in zip(starts, stops, strict=True)])

    def _place(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def batches_per_epoch(self, world_size: int = 1) -> int:
        """Training minibatches per epoch on each of ``world_size`` ranks."""
        return len(ShardBlockSampler(self.train_blocks, self.batch_size, self.seed, world_size=world_size))

    def reseed(self, epoch: int) -> None:
        """Use the training order of ``epoch`` from the next iteration of the loader on."""
        for sampler in self._samplers:
            sampler.set_epoch(epoch)

    def _loader(self, sampler: ShardBlockSampler) -> DataLoader:
        return DataLoader(
            ShardBatches(self.data),
            sampler=sampler,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Random blocks, this rank's share, resumable within an epoch."""
        rank, world_size = self._place()
        sampler = ShardBlockSampler(
            self.train_blocks,
            self.batch_size,
            self.seed,
            shuffle_buffer=self.shuffle_buffer,
            rank=rank,
            world_size=world_size,
        )
        trainer = getattr(self, "trainer", None)
        sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed if trainer is not None else 0)
        self._samplers.append(sampler)
        loader = self._loader(sampler)
        make_resumable(
            loader,
            self,
            sampler,
            items=self.train_blocks,
            cell_names=self.data.obs_names[self.train_idx],
            genes=self.data.genes,
        )
        return loader

    def val_dataloader(self) -> DataLoader | list:
        """The validation blocks in order (every rank scores all of them, as for in-memory data)."""
        if len(self.val_blocks) == 0:
            return []
        return self._loader(ShardBlockSampler(self.val_blocks, self.batch_size, self.seed, shuffle=False))
