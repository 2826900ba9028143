"""The user-facing GeneTransformer model."""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import importlib.util
import inspect
import logging
import math
import os
import random
import warnings
from collections.abc import Iterable, Iterator
from importlib.metadata import PackageNotFoundError, version
from numbers import Real
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import scipy.sparse as sp
import scvi
import torch
from anndata import AnnData
from scvi.data import AnnDataManager
from scvi.data._constants import _SCVI_UUID_KEY
from scvi.data._utils import _assign_adata_uuid
from scvi.data.fields import LayerField, ObsmField
from scvi.model.base import BaseModelClass
from scvi.train._callbacks import LoudEarlyStopping
from scvi.train._logger import SimpleLogger  # the logger scvi-tools reads the history from

from sctransformer._compat import quiet_sparse_tensors
from sctransformer._constants import REGISTRY_KEYS, SETUP_ARGS, TARGET_SUM, phenotype_registry_key
from sctransformer._keys import KEYS
from sctransformer._settings import check_seed, settings
from sctransformer.data import (
    BatchObsField,
    EpochSeededDataSplitter,
    GeneVocabulary,
    PhenotypeObsField,
    ShardedAnnData,
    ShardedDataModule,
    category_codes,
    check_counts,
    expressed_per_cell,
    gene_identifiers,
    get_matrix,
    iter_minibatches,
    observed_categories,
)
from sctransformer.data._sharded import check_shard_options
from sctransformer.data._splitting import check_splitter_options
from sctransformer.data._validation import (
    cell_positions,
    check_key_names,
    check_model_layer,
    check_obs_key,
    check_phenotype_column,
    model_gene_fix,
    positive_int,
)
from sctransformer.metrics import expected_calibration_error, log1p_normalise
from sctransformer.metrics._classification import N_CALIBRATION_BINS
from sctransformer.module import (
    AttentionBackend,
    GeneTransformerModule,
    Pooling,
    TokenizedCells,
    check_attention,
)
from sctransformer.train import HistoryTrainRunner, MaskedModelingPlan, PeriodicCheckpoint

from ._expression import ExpressionMixin
from ._save_load import read_model_dir, write_model_dir

logger = logging.getLogger("sctransformer")

try:
    __version__ = version("sctransformer")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

_SAMPLE_CELLS = 10_000
Freeze = Literal["none", "backbone", "embeddings", "transcriptome", "other"]
FREEZE = ("none", "backbone", "embeddings", "transcriptome", "other")
BatchCorrection = Literal["none", "token", "adversarial", "both"]
BATCH_CORRECTIONS = ("none", "token", "adversarial", "both")
_HEADS = (
    "expression_head",
    "cell_query",
    "cell_expression_head",
    "query_head",
    "query_bias",
    "query_cell",
    "query_interaction",
    "held_embedding",
    "phenotype_heads",
    "batch_discriminator",
    "gene_head",
    "gene_bias",
)


#: Range searched for a calibration temperature (see ``GeneTransformer.calibrate``)
TEMPERATURE_RANGE = (0.05, 20.0)

#: Lightning precisions that train() accepts; ``"16-true"`` is not one (see ``_check_precision``)
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true")
_PRECISION_ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}


def _check_precision(precision: Any) -> str | None:
    """The Lightning name of a precision ``train`` supports (``None`` stays ``None``); else raise."""
    if precision is None:
        return None
    is_int = isinstance(precision, int | np.integer) and not isinstance(precision, bool)
    name = str(precision) if is_int else precision
    name = _PRECISION_ALIASES.get(name, name) if isinstance(name, str) else name
    if name not in PRECISIONS:
        hint = (
            "; in float16 weights AdamW's epsilon (1e-8) is 0 and the loss turns non-finite within steps: "
            "use '16-mixed' or 'bf16-mixed'"
            if name == "16-true"
            else ""
        )
        raise ValueError(f"precision must be one of {list(PRECISIONS)} or None, got {precision!r}{hint}")
    return name


def _check_finite(name: str, value: Any) -> None:
    """Refuse a training option that is not a finite real number (NaN and inf would poison the weights)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _extra_phenotype_keys(manager: AnnDataManager, state: dict[str, Any]) -> list[str]:
    """The phenotype keys ``manager`` registered that a saved model (``state``) has no slots for."""
    registered = manager.registry["setup_args"].get(SETUP_ARGS.PHENOTYPE_KEYS) or []
    return [key for key in registered if key not in state["phenotype_categories"]]


def _check_early_stopping(
    options: dict[str, Any], early_stopping: bool, metrics: list[str], *, others: bool = False
) -> None:
    """Check ``train``'s ``early_stopping_*`` options before training (else they fail epochs in).

    ``options``: the options given, by name without the prefix; ``metrics``: the names the run
    logs, which ``monitor`` must be one of unless ``others`` (the user's callbacks may log more).
    Options without ``early_stopping=True`` warn: they would be ignored.
    """
    if options and not early_stopping:
        warnings.warn(
            f"{sorted('early_stopping_' + name for name in options)} are ignored without early_stopping=True",
            UserWarning,
            stacklevel=3,
        )
        return
    for name, least in (("patience", 1), ("warmup_epochs", 0)):  # as the command line checks them
        value = options.get(name, least)
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
            raise ValueError(f"early_stopping_{name} must be an integer >= {least} (epochs), got {value!r}")
    min_delta = options.get("min_delta", 0.0)
    if isinstance(min_delta, bool) or not isinstance(min_delta, Real) or not 0 <= min_delta < np.inf:
        raise ValueError(f"early_stopping_min_delta must be a finite number >= 0, got {min_delta!r}")
    if options.get("mode", "min") not in ("min", "max"):
        raise ValueError(f"early_stopping_mode must be 'min' or 'max', got {options['mode']!r}")
    monitor = options.get("monitor", "loss_validation")
    if monitor not in metrics and not others:
        close = difflib.get_close_matches(str(monitor), metrics, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"early_stopping_monitor {monitor!r} is not a metric this run logs; {hint}its metrics: {metrics}"
        )


def _check_gene_prediction(value: Any) -> None:
    """Refuse a ``gene_prediction`` share outside ``[0, 1)``."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value < 1:
        raise ValueError(f"gene_prediction must be a share in [0, 1), got {value!r}")


def _check_hyperparameters(
    *,
    d_model: int,
    n_layers: int,
    n_heads: int,
    d_ff: int | None,
    dropout: float,
    max_length: int,
    value_encoding: str,
    n_bins: int,
    binning: str,
    expression_queries: int,
    label_smoothing: float,
    gene_ranking: str,
    batch_correction: str = "none",
    attention: str = "auto",
    gene_prediction: float = 0.0,
    phenotype_input: str = "token+mean",
    cell_expression_loss: bool = True,
    cell_profile: bool = True,
    seed: int | None = None,
    **others: Any,
) -> None:
    def positive_int(name: str, value: Any, minimum: int = 1) -> None:
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")

    positive_int("d_model", d_model)
    positive_int("n_layers", n_layers)
    positive_int("n_heads", n_heads)
    positive_int("max_length", max_length)
    positive_int("n_bins", n_bins, 2)
    positive_int("expression_queries", expression_queries, 0)
    if d_ff is not None:
        positive_int("d_ff", d_ff)
    if d_model % n_heads:
        raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}; e.g. n_heads=4 with d_model=128")
    for name, value in (("dropout", dropout), ("label_smoothing", label_smoothing)):
        if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value < 1:
            raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    _check_gene_prediction(gene_prediction)
    if value_encoding not in ("binned", "continuous"):
        raise ValueError(f"value_encoding must be 'binned' or 'continuous', got {value_encoding!r}")
    if binning not in ("quantile", "fixed"):
        raise ValueError(f"binning must be 'quantile' or 'fixed', got {binning!r}")
    if gene_ranking not in ("expression", "relative"):
        raise ValueError(f"gene_ranking must be 'expression' or 'relative', got {gene_ranking!r}")
    if batch_correction not in BATCH_CORRECTIONS:
        raise ValueError(
            f"batch_correction must be one of {list(BATCH_CORRECTIONS)}, got {batch_correction!r}"
        )
    check_attention(attention)
    if phenotype_input not in ("token", "token+mean"):
        raise ValueError(f"phenotype_input must be 'token' or 'token+mean', got {phenotype_input!r}")
    for name, value in (("cell_expression_loss", cell_expression_loss), ("cell_profile", cell_profile)):
        if not isinstance(value, bool | np.bool_):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if seed is not None:
        check_seed(seed)


def _global_rng_state() -> tuple[Any, ...]:
    """The global RNG states (random, NumPy, torch, CUDA where in use), for :func:`_set_global_rng_state`."""
    cuda = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    numpy_state = np.random.get_state()  # noqa: NPY002 (the global state is what is kept)
    return random.getstate(), numpy_state, torch.get_rng_state(), cuda


def _set_global_rng_state(state: tuple[Any, ...]) -> None:
    """Give back global RNG states taken by :func:`_global_rng_state`."""
    random.setstate(state[0])
    np.random.set_state(state[1])  # noqa: NPY002
    torch.set_rng_state(state[2])
    if state[3] is not None:
        torch.cuda.set_rng_state_all(state[3])


def _check_accelerator(accelerator: str) -> None:
    """Refuse an accelerator a model cannot be loaded onto here."""
    if accelerator not in ("cpu", "cuda", "gpu", "auto"):
        raise ValueError(f"accelerator must be 'cpu', 'cuda', 'gpu' or 'auto', got {accelerator!r}")
    if accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ValueError(f"accelerator={accelerator!r}, but torch finds no CUDA device; use 'cpu' or 'auto'")


def _default_logger(save_dir: str | os.PathLike) -> Any:
    """Lightning's ``logger=True``: TensorBoard where installed, else CSV files, in ``save_dir``."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        return TensorBoardLogger(save_dir=save_dir)
    return CSVLogger(save_dir=save_dir)


def _sample_counts(adata: AnnData, layer: str | None, seed: int) -> sp.csr_matrix:
    """Counts of up to 10,000 cells drawn at random (the sample that gene scales and bin edges use)."""
    matrix = get_matrix(adata, layer)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(adata.n_obs, size=min(adata.n_obs, _SAMPLE_CELLS), replace=False))
    return sp.csr_matrix(matrix[rows])


def _gene_scale(sample: sp.csr_matrix, column_to_gene: np.ndarray, n_genes: int) -> torch.Tensor:
    """Mean normalised expression (counts per 10k) of each gene over the sampled cells expressing it.

    Genes never seen expressed get the median scale.
    """
    x = sp.csr_matrix(sample, dtype=np.float64)
    library = np.asarray(x.sum(axis=1)).ravel()
    x = sp.diags(np.divide(TARGET_SUM, library, out=np.zeros_like(library), where=library > 0)) @ x
    x = sp.csr_matrix(x)
    total = np.asarray(x.sum(axis=0)).ravel()
    n_expressing = np.diff(sp.csc_matrix(x > 0).indptr)
    column_scale = np.divide(total, n_expressing, out=np.zeros_like(total), where=n_expressing > 0)
    scale = np.zeros(n_genes)
    found = column_to_gene >= 0
    scale[column_to_gene[found]] = column_scale[found]
    seen = scale > 0
    scale[~seen] = np.median(scale[seen]) if seen.any() else 1.0
    return torch.as_tensor(scale, dtype=torch.float32)


def _query_statistics(
    sample: sp.csr_matrix, column_to_gene: np.ndarray, n_genes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per vocabulary gene: share of sampled cells expressing it, mean and variance of its log1p value there."""
    library = np.asarray(sample.sum(1)).ravel()
    coo = sample.tocoo()
    keep = (coo.data > 0) & (column_to_gene[coo.col] >= 0)
    gene = column_to_gene[coo.col[keep]]
    value = np.log1p(coo.data[keep] / np.maximum(library[coo.row[keep]], 1) * TARGET_SUM)
    n = np.bincount(gene, minlength=n_genes).astype(np.float64)
    total = np.bincount(gene, value, minlength=n_genes)
    squares = np.bincount(gene, value**2, minlength=n_genes)
    mean = np.divide(total, n, out=np.zeros(n_genes), where=n > 0)
    variance = np.divide(squares, n, out=np.ones(n_genes), where=n > 0) - mean**2
    variance = np.where(n > 1, variance, 1.0)
    share = (n + 0.5) / (sample.shape[0] + 1)
    return torch.as_tensor(share), torch.as_tensor(mean), torch.as_tensor(variance)


def _check_align_obsm(adata: AnnData, key: str) -> None:
    """Raise unless ``adata.obsm[key]`` is a finite numeric matrix with one row per cell."""
    if not isinstance(key, str) or key not in adata.obsm:
        raise KeyError(
            f"align_obsm {key!r} not found in adata.obsm (available: {list(adata.obsm)}); put the second "
            "modality's vectors there (cells x features)"
        )
    values = adata.obsm[key]
    values = values.to_numpy() if isinstance(values, pd.DataFrame) else values
    if sp.issparse(values):
        raise TypeError(f"adata.obsm[{key!r}] is sparse; pass a dense matrix, e.g. its PCA")
    values = np.asarray(values)
    if (
        values.ndim != 2
        or values.shape[0] != adata.n_obs
        or values.shape[1] == 0
        or not np.issubdtype(values.dtype, np.number)
    ):
        raise ValueError(
            f"adata.obsm[{key!r}] must be a numeric cells x features matrix with {adata.n_obs} rows "
            f"and at least one feature, got shape {values.shape} of {values.dtype}"
        )
    if not np.isfinite(values).all():
        raise ValueError(f"adata.obsm[{key!r}] holds NaN or infinite values; fill or remove those cells")


def _check_fits_data(hyperparameters: dict[str, Any], n_genes: int, n_batches_present: int) -> None:
    """Refuse hyper-parameters the data cannot serve: batch correction without batches, more queries than genes."""
    correction = hyperparameters["batch_correction"]
    if correction != "none" and n_batches_present < 2:
        raise ValueError(
            f"batch_correction={correction!r} needs at least 2 batches, and the data have "
            f"{n_batches_present or 'no batch key'}{'' if n_batches_present != 1 else ' batch'}; pass "
            "setup_anndata(batch_key=...) with a column of several batches, or batch_correction='none'"
        )
    queries = hyperparameters["expression_queries"]
    if queries > n_genes:  # every query beyond the genes would be padding
        raise ValueError(
            f"expression_queries={queries} exceeds the {n_genes} genes of the vocabulary, which are all a "
            f"cell can query; pass at most {n_genes} (e.g. 32)"
        )


def _batches_present(manager: AnnDataManager) -> int:
    """Batches with cells in a registration (a categorical column may have unused categories)."""
    if manager.registry["setup_args"][SETUP_ARGS.BATCH_KEY] is None:
        return 0
    return len(np.unique(manager.get_from_registry(REGISTRY_KEYS.BATCH_KEY)))


def _present_obsm(adata: AnnData | None, key: str | None) -> str | None:
    """``key`` if ``adata.obsm`` has it (a query may come without the second modality, a model no cells)."""
    return key if key is not None and adata is not None and key in adata.obsm else None


def _warn_unseen_categories(adata: AnnData, categories: dict[str, list[str]], keys: Iterable[str]) -> None:
    """Warn for each label column of ``keys`` holding categories the model does not know."""
    for key in keys:
        if key not in categories or key not in adata.obs:
            continue
        column = adata.obs[key]  # matched as registration matches them (older spellings too)
        lost = column.notna().to_numpy() & (category_codes(column, categories[key]) < 0)
        unseen = observed_categories(column[lost]) if lost.any() else []
        if unseen:
            warnings.warn(
                f"adata.obs[{key!r}] has categories the reference does not know: {unseen[:10]}; "
                "those cells count as unknown, and predictions use the reference's categories",
                UserWarning,
                stacklevel=3,
            )


def _batch_categories(manager: AnnDataManager) -> list[str] | None:
    """The batch categories an AnnData was registered with; ``None`` without a ``batch_key``."""
    if manager.registry["setup_args"][SETUP_ARGS.BATCH_KEY] is None:
        return None
    mapping = manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY)[BatchObsField.CATEGORICAL_MAPPING_KEY]
    return [str(c) for c in mapping]


def _fixed_bin_edges(sample: sp.csr_matrix, n_bins: int, column_to_gene: np.ndarray) -> torch.Tensor:
    """Quantiles of the non-zero log1p-normalised values of the sampled cells' vocabulary genes as bin edges.

    Library sizes count every column; only columns of vocabulary genes give values.
    """
    normalised = log1p_normalise(sp.csr_matrix(sample))[:, np.flatnonzero(column_to_gene >= 0)]
    values = normalised.data[normalised.data > 0]
    if values.size == 0:
        raise ValueError("the counts have no non-zero value to place fixed bin edges on")
    edges = np.quantile(values, np.linspace(0, 1, n_bins + 1)[1:-1])
    return torch.as_tensor(edges, dtype=torch.float32)


def _check_align_width(adata: AnnData, state: dict[str, Any]) -> None:
    """Raise if ``adata``'s second modality (if it has one) is not as wide as the saved model's.

    The key is the model's own ``align_obsm`` (``None`` for a model without alignment), not that of
    the AnnData's registration, which another, aligned model may have set up.
    """
    key, width = state["hyperparameters"].get("align_obsm"), state["hyperparameters"].get("align_in_dim")
    if key is not None and isinstance(adata, AnnData) and key in adata.obsm:
        _check_align_features(adata, key, width)


def _check_align_features(adata: AnnData, key: str, width: int) -> None:
    """Raise unless ``adata.obsm[key]`` has ``width`` features (the model's)."""
    if np.shape(adata.obsm[key])[1] != width:
        raise ValueError(
            f"adata.obsm[{key!r}] has {np.shape(adata.obsm[key])[1]} features; the model was trained "
            f"on {width} (the same features, in the same order)"
        )


def _registered_codes_differ(adata: AnnData, key: str, categories: list[str]) -> bool:
    """Whether the registered codes of phenotype ``key`` differ from its values coded by ``categories``.

    ``False`` where the codes were never registered; ``True`` where the column was removed after
    labelled cells were registered (without the column, every cell is unlabelled).
    """
    column = PhenotypeObsField(phenotype_registry_key(key), key, categories).attr_key
    if column not in adata.obs:
        return False
    if key not in adata.obs:
        return bool((adata.obs[column].to_numpy() >= 0).any())
    return not np.array_equal(category_codes(adata.obs[key], categories), adata.obs[column].to_numpy())


def _labelled_since_setup(manager: AnnDataManager, adata: AnnData, key: str) -> np.ndarray:
    """Cells with a label of phenotype ``key`` now that was missing when ``manager`` set ``adata`` up.

    Only for a setup that took the categories from the column (``setup_anndata``): there every
    label present got a code, so a registered ``-1`` was a missing label. With a model's categories
    (``load``, ``load_query_data``), ``-1`` also codes labels the model does not know, which stay
    unknown however often the setup is repeated.
    """
    none = np.zeros(adata.n_obs, dtype=bool)
    field = next((f for f in manager.fields if f.registry_key == phenotype_registry_key(key)), None)
    if not isinstance(field, PhenotypeObsField) or field._categories is not None:  # a model's categories
        return none
    if key not in adata.obs or field.attr_key not in adata.obs:
        return none
    return adata.obs[key].notna().to_numpy() & (adata.obs[field.attr_key].to_numpy() < 0)


def _batch_codes_differ(manager: AnnDataManager, adata: AnnData) -> bool:
    """Whether the batch codes ``manager`` registered differ from the batch column coded now.

    ``False`` without a batch key; ``True`` where the column or its codes were removed.
    """
    batch_key = manager.registry["setup_args"][SETUP_ARGS.BATCH_KEY]
    if batch_key is None:
        return False
    column = manager.data_registry[REGISTRY_KEYS.BATCH_KEY].attr_key
    if batch_key not in adata.obs or column not in adata.obs:
        return True
    now = category_codes(adata.obs[batch_key], _batch_categories(manager))
    return not np.array_equal(now, adata.obs[column].to_numpy())


def _check_align_input(adata: AnnData, key: str, width: int) -> None:
    """Raise unless ``adata.obsm[key]`` is a finite matrix with ``width`` features (the model's)."""
    _check_align_obsm(adata, key)
    _check_align_features(adata, key, width)


#: What :meth:`GeneTransformer.load` reads from model.json without a default
_STATE_KEYS = (
    "hyperparameters",
    "setup_args",
    "vocabulary",
    "phenotype_categories",
    "is_trained",
    "history",
    "indices",
)
_SAVED_HYPERPARAMETERS = (
    "d_model",
    "n_layers",
    "n_heads",
    "d_ff",
    "dropout",
    "max_length",
    "value_encoding",
    "n_bins",
    "binning",
    "label_smoothing",
    "cell_expression_loss",
    "seed",
)
_SAVED_SETUP_ARGS = (SETUP_ARGS.LAYER, SETUP_ARGS.GENE_KEY, SETUP_ARGS.BATCH_KEY)
#: The splits whose cell positions model.json saves under "indices"
_SAVED_SPLITS = ("train", "validation", "test")


def _check_state(state: Any, source: str) -> None:
    """Raise a :class:`ValueError` naming what is wrong if a saved model's state cannot be loaded as is.

    model.json may have been edited by hand: every key the loader needs, hyper-parameters in range,
    category lists of unique names, temperatures that are positive numbers, a calibration table per
    phenotype, training curves of integer epochs and numbers, and splits of cell positions. Every
    value :meth:`GeneTransformer._from_state` reads is checked here, so that a damaged file is
    refused before anything (``adata`` included) is touched.
    """

    def damaged(problem: str) -> ValueError:
        return ValueError(f"damaged model.json in {source}: {problem}")

    def require(mapping: Any, keys: tuple[str, ...], where: str) -> None:
        if not isinstance(mapping, dict):
            raise damaged(f"{where} must be a mapping, got {type(mapping).__name__}")
        for key in keys:
            if key not in mapping:
                raise damaged(f"missing key {key!r}{'' if where == 'the state' else ' in ' + where}")

    def names(value: Any, what: str) -> None:
        if (
            not isinstance(value, list)
            or not all(isinstance(v, str) for v in value)
            or len(set(value)) != len(value)
        ):
            raise damaged(f"{what} must be a list of distinct strings, got {value!r}")

    def numbers(value: Any, what: str, kind: type, expected: str) -> None:
        """Raise unless ``value`` is a list of ``kind`` (booleans excluded), naming the first that is not."""
        if not isinstance(value, list):
            raise damaged(f"{what} must be a list of {expected}, got {type(value).__name__}")
        for i, v in enumerate(value):
            if isinstance(v, bool) or not isinstance(v, kind):
                raise damaged(f"{what} must be a list of {expected}; entry {i} is {v!r}")

    require(state, _STATE_KEYS, "the state")
    hp = state["hyperparameters"]
    require(hp, _SAVED_HYPERPARAMETERS, "hyperparameters")
    require(state["setup_args"], _SAVED_SETUP_ARGS, "setup_args")
    aligned = hp.get("align_obsm") is not None
    if aligned:
        require(hp, ("align_in_dim", "align_dim"), "hyperparameters")
    try:  # models saved before these hyper-parameters existed lack them
        _check_hyperparameters(**({"expression_queries": 0, "gene_ranking": "expression"} | hp))
        check_seed(hp["seed"])
        if aligned:
            positive_int(hp["align_in_dim"], "align_in_dim")
            positive_int(hp["align_dim"], "align_dim")
        n_batches = hp.get("n_batches", 0)
        if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 0:
            raise ValueError(f"n_batches must be an integer >= 0, got {n_batches!r}")
    except (ValueError, TypeError) as err:
        raise damaged(f"hyperparameters: {err}") from err
    if not isinstance(state["is_trained"], bool):
        raise damaged(f"is_trained must be true or false, got {state['is_trained']!r}")
    names(state["vocabulary"], "vocabulary")
    categories = state["phenotype_categories"]
    if not isinstance(categories, dict):
        raise damaged(f"phenotype_categories must be a mapping, got {type(categories).__name__}")
    for key, value in categories.items():
        names(value, f"phenotype_categories[{key!r}]")
    if state.get("batch_categories") is not None:
        names(state["batch_categories"], "batch_categories")
    if state.get("label_keys") is not None:  # saved since labels could be left out of training
        names(state["label_keys"], "label_keys")
        unknown = [key for key in state["label_keys"] if key not in categories]
        if unknown:
            raise damaged(f"label_keys {unknown} are not phenotypes of the model ({list(categories)})")
    temperatures = state.get("temperatures") or {}
    if not isinstance(temperatures, dict):
        raise damaged(f"temperatures must be a mapping, got {type(temperatures).__name__}")
    for key, value in temperatures.items():
        if isinstance(value, bool) or not isinstance(value, Real) or not (math.isfinite(value) and value > 0):
            raise damaged(f"temperatures[{key!r}] must be a finite number > 0, got {value!r}")
    calibration = state.get("calibration") or {}
    if not isinstance(calibration, dict):
        raise damaged(
            f"calibration must be a mapping (phenotype -> its fit), got {type(calibration).__name__}"
        )
    for key, fit in calibration.items():
        if not isinstance(fit, dict):
            raise damaged(
                f"calibration[{key!r}] must be a mapping (temperature, n_cells, ...), got {type(fit).__name__}"
            )
    history = state["history"]
    if not isinstance(history, dict):
        raise damaged(
            "history must be a mapping of curve name to {'epoch': [...], 'value': [...]}, "
            f"got {type(history).__name__}"
        )
    for name, curve in history.items():
        where = f"history[{name!r}]"
        require(curve, ("epoch", "value"), where)
        numbers(curve["epoch"], f"{where}['epoch']", int, "integers")
        numbers(curve["value"], f"{where}['value']", Real, "numbers")
        if len(curve["epoch"]) != len(curve["value"]):
            raise damaged(
                f"{where} has {len(curve['epoch'])} epochs but {len(curve['value'])} values; "
                "they must pair up"
            )
    indices = state["indices"]
    require(indices, _SAVED_SPLITS, "indices")
    unknown = [key for key in indices if key not in _SAVED_SPLITS]
    if unknown:
        raise damaged(f"indices has unknown splits {unknown}; only {list(_SAVED_SPLITS)} are saved")
    for split in _SAVED_SPLITS:
        positions = indices[split]
        if positions is not None:  # null: no such split
            numbers(positions, f"indices[{split!r}]", int, "cell positions (integers >= 0) or null")
            if any(i < 0 for i in positions):
                raise damaged(f"indices[{split!r}] must hold cell positions >= 0, got {min(positions)}")


def _log_query_labels(model: GeneTransformer, keys: list[str], by_name: list[str]) -> None:
    """Log the query columns whose labels :meth:`GeneTransformer.train` will fit the model to.

    Predictions evaluated against labels the model was trained on are optimistic, so this says how
    to keep them out: as a warning where a column was taken for its name alone (``by_name``: a
    reference key the query has a column of), as information where it was asked for.
    """
    counts = {key: int((model._registered_codes(key) >= 0).sum()) for key in keys}
    counts = {key: n for key, n in counts.items() if n > 0}
    if not counts:
        return
    logger.log(
        logging.WARNING if set(by_name) & set(counts) else logging.INFO,
        "the query's labels in %s are training targets: train() fits the phenotype heads and the "
        "calibration to them, so predictions evaluated against these labels after training are "
        "optimistic (the labels leak into the model); to annotate the query without using its labels, "
        "pass phenotype_keys=[] to load_query_data (or remove the column%s first)",
        ", ".join(f"adata.obs[{key!r}] ({n} labelled cells)" for key, n in counts.items()),
        "s" if len(counts) > 1 else "",
    )


def _cells_fingerprint(adata: AnnData | ShardedAnnData, chunk_size: int = 65_536) -> dict[str, int | str]:
    """Number of cells and a SHA-256 of their names: recognises the cells a model's split indexes.

    The digest is that of the names joined by the unit separator (U+001F), hashed in chunks (never
    one string of millions of names).
    """
    names = adata.obs_names
    digest = hashlib.sha256()
    for start in range(0, len(names), chunk_size):
        digest.update(
            (("\x1f" if start else "") + "\x1f".join(map(str, names[start : start + chunk_size]))).encode()
        )
    return {"n_obs": int(adata.n_obs), "obs_names_sha256": digest.hexdigest()}


class GeneTransformer(ExpressionMixin, BaseModelClass):
    """Transformer over cells as sentences of their expressed genes.

    Pre-trained by masked modelling of expression values and (optionally) phenotypes; gives cell
    embeddings, phenotype predictions and gene embeddings.

    Parameters
    ----------
    adata
        AnnData registered with :func:`sctransformer.setup_anndata`.
    d_model
        Token width.
    n_layers
        Number of transformer blocks.
    n_heads
        Attention heads per block; must divide ``d_model``.
    d_ff
        Hidden width of the feed-forward layers; default ``4 * d_model``.
    dropout
        Dropout rate (default none: on the small data sets of the benchmarks it did not help and
        costs time).
    max_length
        Maximum number of gene tokens per cell (the ``[CLS]`` and phenotype tokens come on top).
        Cells with more expressed genes keep those ranked first by ``gene_ranking``.
    value_encoding
        ``"binned"``: expression bins with a cross-entropy loss; ``"continuous"``: an MLP on the
        log1p-normalised value with a mean-squared-error loss.
    n_bins
        Number of expression bins (``value_encoding="binned"``).
    binning
        ``"quantile"``: per-cell quantile bins; ``"fixed"``: fixed edges on log1p-normalised
        values, placed at quantiles of this AnnData's values and saved with the model.
    expression_queries
        Train the model to predict the expression of genes a cell's input does not contain,
        which :meth:`get_normalized_expression`, :meth:`predict_response`, :meth:`perturb` and
        :meth:`generate` need: each training cell holds a random share of the vocabulary out of
        its input (uniform in ``[0, 1.1)``, capped at 1: about 9% of the cells keep only their
        phenotype tokens), and up to this many of the held-out genes it expresses, and this many
        of those it does not, become *query tokens*: tokens that attend to the cell but that no
        token attends to, whose outputs feed a head of the probability that the gene is
        expressed and of the mean and variance of its log1p-normalised value. ``0`` (default)
        trains no such head; 32 is a good start. It costs training time, and the cells seen
        with part of their genes hidden change what the embedding learns (see the benchmarks).
    label_smoothing
        Label smoothing of the expression-bin cross-entropy.
    cell_expression_loss
        Also predict masked values from the ``[CLS]`` output, which trains the ``[CLS]``
        embedding to summarise the cell.
    gene_ranking
        Which genes a cell keeps when it expresses more than ``max_length``, and their order:
        ``"expression"``, the highest counts; ``"relative"``, the highest counts relative to
        each gene's mean expression in this AnnData (where expressed; Geneformer's rank-value
        encoding), so that cell-specific genes are kept before ubiquitous ones. The scales are
        saved with the model. Expression bins do not depend on it.
    phenotype_input
        What a phenotype head reads: ``"token"``, its slot's output only; ``"token+mean"``, also
        the mean of the expressed-gene outputs, a direct path from every gene to the prediction
        that made cell-type prediction more accurate on held-out cells (see the benchmarks).
    cell_profile
        Add a ``[PROFILE]`` token: a learnt linear projection of the cell's log1p-normalised
        expression of every vocabulary gene (also those beyond ``max_length``), less the values
        hidden for masked modelling; phenotype heads read its output too. It gives the model the
        whole profile that a logistic regression sees, and raised validation macro-F1 from 0.59
        to 0.68 (pbmc68k) and from 0.35 to 0.73 (paul15), see the benchmarks.
    batch_correction
        How the cell embedding is freed of batch effects (needs ``setup_anndata(batch_key=...)``
        with at least 2 batches): ``"token"``, a ``[BATCH]`` input token (never masked or
        predicted) that lets the model explain batch effects by it, dropped at inference unless
        asked for (:meth:`get_latent_representation`); ``"adversarial"``, a batch discriminator on
        the cell embedding trained through gradient reversal (``train(adversary_weight=...,
        adversary_schedule=...)``); ``"both"``; ``"none"`` (default).
    align_obsm
        ``.obsm`` key of a second modality's vectors of the same cells (proteins, a chromatin
        embedding, ...): adds CLIP-style alignment, a projection of the cell embedding and a small
        MLP of those vectors into a shared space of ``align_dim`` dimensions, trained with a
        symmetric InfoNCE loss and a learnt temperature alongside masked modelling
        (``train(align_weight=..., freeze="transcriptome" | "other")``);
        ``get_latent_representation(space="aligned" | "aligned_other")`` gives both sides.
        Creating the model sets ``adata`` up again, with the settings it was set up with and this
        key registered beside the counts (so that training reads both); the key is the model's own
        (``model.setup_args_``): a later model on ``adata`` without ``align_obsm`` has none.
    align_dim
        Width of the shared space.
    attention
        How attention runs (it does not change the weights; change it on a loaded model with
        :attr:`attention`): ``"sdpa"``, torch's fused ``scaled_dot_product_attention`` on padded
        minibatches (every device); ``"varlen"``, torch's variable-length flash kernel on packed
        cells with no padding at all (CUDA GPUs of compute capability 8.0+, bf16/fp16); ``"flash"``,
        flash-attn's ``flash_attn_varlen_func`` on packed cells (``pip install
        'sctransformer[flash]'``); ``"auto"`` (default), flash-attn if installed, else torch's
        varlen kernel, when the model runs in half precision on such a GPU, else SDPA. Attention
        maps for gene graphs and the key/value cache of expression queries always use padded
        attention.
    gene_prediction
        Chance that a gene token whose value is shown has its gene identity hidden instead (its
        value kept) and predicted from the rest of the cell over the whole vocabulary
        (Geneformer's masked gene objective); with ``train(gene_mask_prob=0.15)`` that is
        ``0.85 * gene_prediction`` of the tokens. ``0`` (default) trains no such head. Masked
        values alone do not ask the model which genes a cell expresses together (a token's
        presence gives that away); this does, and it teaches the gene embeddings which genes go
        together (see the benchmarks). Its logits take a few float32 (hidden tokens x
        vocabulary) matrices per minibatch, a few hundred MB at 32 cells of 256 tokens with
        20,000 genes.
    seed
        Seed of the weight initialisation; default ``sctransformer.settings.seed``.

    Examples
    --------
    >>> adata = sct.datasets.pbmc68k()
    >>> sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    >>> model = sct.GeneTransformer(adata)
    >>> model.train()
    >>> adata.obsm["X_sct"] = model.get_latent_representation()
    """

    _module_cls = GeneTransformerModule
    _training_plan_cls = MaskedModelingPlan
    _data_splitter_cls = EpochSeededDataSplitter
    _train_runner_cls = HistoryTrainRunner

    def __init__(
        self,
        adata: AnnData,
        *,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        d_ff: int | None = None,
        dropout: float = 0.0,
        max_length: int = 256,
        value_encoding: Literal["binned", "continuous"] = "binned",
        n_bins: int = 16,
        binning: Literal["quantile", "fixed"] = "quantile",
        expression_queries: int = 0,
        label_smoothing: float = 0.1,
        cell_expression_loss: bool = True,
        phenotype_input: Literal["token", "token+mean"] = "token+mean",
        gene_ranking: Literal["expression", "relative"] = "relative",
        cell_profile: bool = True,
        batch_correction: BatchCorrection = "none",
        align_obsm: str | None = None,
        align_dim: int = 64,
        attention: AttentionBackend = "auto",
        gene_prediction: float = 0.0,
        seed: int | None = None,
    ) -> None:
        hyperparameters = {k: v for k, v in locals().items() if k not in ("self", "adata", "__class__")}
        _check_hyperparameters(**hyperparameters)
        if not isinstance(adata, AnnData):
            raise TypeError(f"adata must be an AnnData, got {type(adata).__name__}")
        manager = self._registered_manager(adata)
        if manager is None:
            if _SCVI_UUID_KEY in adata.uns:  # the ids of a setup without the setup
                raise ValueError(
                    "adata is not set up for sctransformer in this session, though it carries the ids of "
                    "a setup: a subset or copy made after setup_anndata (e.g. adata = adata[mask].copy()), "
                    "a file read back, or a setup for another scvi-tools model, none of which carries the "
                    "setup over; call sctransformer.setup_anndata(adata, ...) on it before creating the model"
                )
            raise ValueError(
                "adata is not set up; call sctransformer.setup_anndata(adata, ...) before creating the model"
            )
        registered = manager.registry["setup_args"]
        # before registering anything: a refused model leaves adata as it was
        _check_fits_data(hyperparameters, adata.n_vars, _batches_present(manager))
        if align_obsm is not None or registered.get(SETUP_ARGS.ALIGN_OBSM) is not None:
            # the second modality registered with the counts, or an earlier aligned model's dropped
            if align_obsm is not None:
                align_dim = positive_int(align_dim, "align_dim")
            self._register(
                adata,
                layer=registered[SETUP_ARGS.LAYER],
                batch_key=registered[SETUP_ARGS.BATCH_KEY],
                phenotype_keys=registered[SETUP_ARGS.PHENOTYPE_KEYS],
                gene_key=registered[SETUP_ARGS.GENE_KEY],
                align_obsm=align_obsm,
            )
        super().__init__(adata)
        setup_args = self.adata_manager.registry["setup_args"]
        gene_ids = gene_identifiers(adata, setup_args[SETUP_ARGS.GENE_KEY])
        vocabulary = GeneVocabulary(gene_ids)
        categories = {
            key: [
                str(c)
                for c in self.adata_manager.get_state_registry(phenotype_registry_key(key))[
                    PhenotypeObsField.CATEGORIES_KEY
                ]
            ]
            for key in setup_args[SETUP_ARGS.PHENOTYPE_KEYS] or []
        }
        seed = settings.seed if seed is None else seed
        batch_categories = _batch_categories(self.adata_manager)
        check_counts(adata, setup_args[SETUP_ARGS.LAYER])  # still counts: gene scales are read from them
        self._initialise(
            hyperparameters | {"seed": seed},
            vocabulary,
            categories,
            setup_args,
            batch_categories,
            sample=_sample_counts(adata, setup_args[SETUP_ARGS.LAYER], seed),
            column_to_gene=vocabulary.column_to_gene(gene_ids),
        )
        self._check_unchanged_since_setup(adata)
        self.init_params_ = self._get_init_params(locals())
        self.init_params_["non_kwargs"]["seed"] = seed

    @classmethod
    def from_shards(cls, data: ShardedAnnData, **hyperparameters: Any) -> GeneTransformer:
        """A model of the cells of many ``.h5ad`` shards, streamed from disk.

        The gene vocabulary, phenotype and batch categories come from ``data`` (built from the
        shards' ``.obs`` and ``.var`` alone); gene scales and fixed bin edges, where the
        hyper-parameters ask for them, from up to 10,000 cells read at random. :meth:`train` then
        streams minibatches from the shards (:class:`~sctransformer.data.ShardedDataModule`), and
        :meth:`get_latent_representation` and :meth:`predict` take ``data`` (or other shards)
        in place of an AnnData.

        Parameters
        ----------
        data
            The shards, see :class:`~sctransformer.data.ShardedAnnData`.
        **hyperparameters
            As for :class:`GeneTransformer` (``d_model``, ``n_layers``, ...).
        """
        if not isinstance(data, ShardedAnnData):
            raise TypeError(f"data must be a sctransformer.data.ShardedAnnData, got {type(data).__name__}")
        defaults = {
            name: parameter.default
            for name, parameter in inspect.signature(cls.__init__).parameters.items()
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY
        }
        unknown = sorted(set(hyperparameters) - set(defaults))
        if unknown:
            raise TypeError(f"unknown hyper-parameters {unknown}; GeneTransformer takes {sorted(defaults)}")
        hp = defaults | hyperparameters
        _check_hyperparameters(**hp)
        hp["seed"] = settings.seed if hp["seed"] is None else hp["seed"]
        _check_fits_data(hp, len(data.genes), len(data.batch_categories or []))  # before reading cells
        model = cls.__new__(cls)
        BaseModelClass.__init__(model, registry={"setup_args": data.setup_args, "field_registries": {}})
        vocabulary = GeneVocabulary(data.genes)
        needs_sample = (
            hp["gene_ranking"] == "relative" or hp["binning"] == "fixed" or hp["expression_queries"] > 0
        )
        model._initialise(
            hp,
            vocabulary,
            data.phenotype_categories,
            data.setup_args,
            data.batch_categories,
            sample=data.sample(_SAMPLE_CELLS, hp["seed"]) if needs_sample else None,
            column_to_gene=np.append(np.arange(len(vocabulary)), -1),
        )
        model.shards_ = data
        model.init_params_ = {"kwargs": {}, "non_kwargs": dict(model.hyperparameters_)}
        return model

    def _initialise(
        self,
        hyperparameters: dict[str, Any],
        vocabulary: GeneVocabulary,
        categories: dict[str, list[str]],
        setup_args: dict[str, Any],
        batch_categories: list[str] | None,
        *,
        sample: sp.csr_matrix | None,
        column_to_gene: np.ndarray,
    ) -> None:
        """Gene scales and bin edges from the sampled counts, then the module."""
        n_batches = len(batch_categories or [])  # the data's fit was checked by __init__ / from_shards
        hp = hyperparameters | {"n_batches": n_batches}
        if hp.get("align_obsm") is not None:
            if self.adata is None:
                raise ValueError("align_obsm needs an AnnData; sharded data cannot be aligned yet")
            hp["align_in_dim"] = int(np.asarray(self.adata.obsm[hp["align_obsm"]]).shape[1])
        relative = hp["gene_ranking"] == "relative"
        gene_scale = _gene_scale(sample, column_to_gene, len(vocabulary)) if relative else None
        bin_edges = (
            _fixed_bin_edges(sample, hp["n_bins"], column_to_gene) if hp["binning"] == "fixed" else None
        )
        self._build(hp, vocabulary, categories, setup_args, bin_edges, batch_categories, gene_scale)
        if hp["expression_queries"] > 0:
            self.module.init_query_bias(*_query_statistics(sample, column_to_gene, len(vocabulary)))

    # ------------------------------------------------------------------ construction
    def _build(
        self,
        hyperparameters: dict[str, Any],
        vocabulary: GeneVocabulary,
        phenotype_categories: dict[str, list[str]],
        setup_args: dict[str, Any],
        bin_edges: torch.Tensor | None,
        batch_categories: list[str] | None = None,
        gene_scale: torch.Tensor | None = None,
    ) -> None:
        self.vocabulary_ = vocabulary
        self.shards_: ShardedAnnData | None = None
        self.phenotype_categories_ = phenotype_categories
        self.batch_categories_ = batch_categories
        self.temperatures_: dict[str, float] = {}
        self.calibration_: dict[str, dict[str, float]] = {}
        self.setup_args_ = {k: setup_args.get(k) for k in SETUP_ARGS}
        # the model's own second modality, not whichever the AnnData was last registered with
        self.setup_args_[SETUP_ARGS.ALIGN_OBSM] = hyperparameters.get("align_obsm")
        self.hyperparameters_ = dict(hyperparameters)
        hp = self.hyperparameters_
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hp["seed"])
            self.module = GeneTransformerModule(
                len(vocabulary),
                [len(c) for c in phenotype_categories.values()],
                d_model=hp["d_model"],
                n_layers=hp["n_layers"],
                n_heads=hp["n_heads"],
                d_ff=hp["d_ff"] or 4 * hp["d_model"],
                dropout=hp["dropout"],
                max_length=hp["max_length"],
                value_encoding=hp["value_encoding"],
                n_bins=hp["n_bins"],
                binning=hp["binning"],
                bin_edges=bin_edges
                if bin_edges is not None
                else (torch.zeros(hp["n_bins"] - 1) if hp["binning"] == "fixed" else None),
                label_smoothing=hp["label_smoothing"],
                expression_queries=hp.get("expression_queries", 0) > 0,
                cell_expression_loss=hp["cell_expression_loss"],
                phenotype_input=hp.get("phenotype_input", "token"),
                gene_scale=gene_scale,
                cell_profile=hp.get("cell_profile", False),
                n_batches=hp.get("n_batches", 0),
                batch_token=hp.get("batch_correction", "none") in ("token", "both"),
                batch_adversary=hp.get("batch_correction", "none") in ("adversarial", "both"),
                align_dims=(hp["align_in_dim"], hp["align_dim"]) if hp.get("align_obsm") else None,
                attention=hp.get("attention", "auto"),
                gene_prediction=hp.get("gene_prediction", 0.0) > 0,
            )
        n_params = sum(p.numel() for p in self.module.parameters())
        self._model_summary_string = (
            f"GeneTransformer: {hp['n_layers']} layers, d_model={hp['d_model']}, "
            f"{hp['n_heads']} heads, {len(vocabulary)} genes, max_length={hp['max_length']}, "
            f"{hp['value_encoding']} values, phenotypes {list(phenotype_categories) or 'none'}, "
            f"{n_params / 1e6:.2f}M parameters"
        )

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        *,
        layer: str | None = None,
        batch_key: str | None = None,
        phenotype_keys: list[str] | None = None,
        gene_key: str | None = None,
    ) -> None:
        """Register an AnnData for sctransformer.

        Validates the input, then registers the count matrix, the batch column and the phenotype
        columns with scvi-tools' :class:`~scvi.data.AnnDataManager`. Nothing heavy happens here.

        Parameters
        ----------
        adata
            Cells x genes AnnData; ``X`` or ``layer`` holds raw counts (sparse CSR preferred).
        layer
            Layer holding the counts; ``None`` for ``adata.X``.
        batch_key
            ``.obs`` column of batch labels.
        phenotype_keys
            Categorical ``.obs`` columns to model as phenotype tokens (cell type, tissue, ...);
            missing values (NaN) mean "unknown": such cells are not used as targets for that key.
        gene_key
            ``.var`` column holding gene identifiers; default ``adata.var_names``.

        Returns
        -------
        Nothing; adds ``adata.obs["_scvi_batch"]``, ``adata.obs["_scvi_phenotype_<key>"]`` (category
        codes) and ``adata.uns["_scvi_uuid"]``, ``adata.uns["_scvi_manager_uuid"]`` (a copy of a set-up
        AnnData, which inherits the original's ``_scvi_uuid``, gets a new one: both stay set up).

        Notes
        -----
        Cells without any counts are kept with a warning: they are embedded from the ``[CLS]`` and
        phenotype tokens alone.
        """
        cls._register(
            adata, layer=layer, batch_key=batch_key, phenotype_keys=phenotype_keys, gene_key=gene_key
        )

    @classmethod
    def _register(
        cls,
        adata: AnnData,
        *,
        layer: str | None,
        batch_key: str | None,
        phenotype_keys: list[str] | str | None,
        gene_key: str | None,
        phenotype_categories: dict[str, list[str]] | None = None,
        batch_categories: list[str] | None = None,
        align_obsm: str | None = None,
    ) -> None:
        """Validate and register.

        ``phenotype_categories`` fixes the categories of the keys it names (a saved model's);
        ``batch_categories`` are a reference's batches, extended by the new ones. With
        ``phenotype_categories`` given (also empty), these are a saved model's settings: a missing
        or non-count matrix is reported as the model's layer to fill, and unusable gene
        identifiers as the model's gene key to fill, not as a ``layer=`` or ``gene_key=`` to pass.
        """
        if not isinstance(adata, AnnData):
            raise TypeError(f"adata must be an AnnData, got {type(adata).__name__}")
        if adata.is_view:
            raise ValueError(
                "adata is a view (a subset of another AnnData); call adata = adata.copy() first "
                "so that setup_anndata does not write into the parent object"
            )
        if isinstance(phenotype_keys, str):
            phenotype_keys = [phenotype_keys]
        phenotype_keys = [] if phenotype_keys is None else list(phenotype_keys)  # also a pd.Index
        if len(set(phenotype_keys)) != len(phenotype_keys):
            raise ValueError(f"phenotype_keys has duplicates: {phenotype_keys}")
        check_key_names(phenotype_keys=phenotype_keys, batch_key=batch_key, gene_key=gene_key, layer=layer)
        if batch_key is not None:
            check_obs_key(adata, batch_key, "batch_key")
            if adata.obs[batch_key].isna().any():
                raise ValueError(f"adata.obs[{batch_key!r}] has missing values; every cell needs a batch")
            column = adata.obs[batch_key]
            values = column.cat.categories if isinstance(column.dtype, pd.CategoricalDtype) else column
            text = [isinstance(v, str) for v in values.dropna()] if values.dtype == object else []
            if any(text) and not all(text):  # e.g. "a" and 1 after a pd.concat: scvi-tools cannot sort them
                raise ValueError(
                    f"adata.obs[{batch_key!r}] mixes strings and other values; give it one type, e.g. "
                    f"adata.obs[{batch_key!r}] = adata.obs[{batch_key!r}].astype(str)"
                )
            if batch_key in phenotype_keys:
                raise ValueError(f"{batch_key!r} is both batch_key and a phenotype key; choose one role")
        for key in phenotype_keys:
            if phenotype_categories is None or key not in phenotype_categories:
                check_phenotype_column(adata, key)
            else:
                check_obs_key(adata, key, "phenotype key")
        model_settings = phenotype_categories is not None  # load() etc. take no layer= or gene_key=
        gene_identifiers(adata, gene_key, model=model_settings)
        if model_settings:
            check_model_layer(adata, layer)
        matrix = adata.X if layer is None else adata.layers.get(layer)
        if isinstance(
            matrix, getattr(sp, "sparray", ())
        ):  # scvi-tools' registration and loaders need spmatrix
            where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
            raise TypeError(
                f"{where} is a scipy sparse array ({type(matrix).__name__}); setup_anndata needs a sparse "
                f"matrix: {where} = scipy.sparse.csr_matrix({where})"
            )
        n_empty = int((check_counts(adata, layer, model=model_settings) == 0).sum())
        if n_empty:
            warnings.warn(
                f"{n_empty} cells have no counts; they are embedded from the [CLS] and phenotype "
                "tokens only. Filter them out (sc.pp.filter_cells(adata, min_counts=1)) if unwanted",
                UserWarning,
                stacklevel=2,
            )
        setup_method_args = cls._get_setup_method_args(
            cls=cls,
            adata=adata,
            layer=layer,
            batch_key=batch_key,
            phenotype_keys=phenotype_keys,
            gene_key=gene_key,
            align_obsm=align_obsm,
        )
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
            BatchObsField(REGISTRY_KEYS.BATCH_KEY, batch_key, batch_categories),
        ]
        if align_obsm is not None:
            _check_align_obsm(adata, align_obsm)
            fields.append(ObsmField(REGISTRY_KEYS.ALIGN_KEY, align_obsm))
        categories = phenotype_categories or {}
        fields += [
            PhenotypeObsField(phenotype_registry_key(key), key, categories.get(key)) for key in phenotype_keys
        ]
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        previous = cls._setup_adata_manager_store.get(adata.uns.get(_SCVI_UUID_KEY))
        uuid = adata.uns.get(_SCVI_UUID_KEY)
        if previous is not None and previous.adata is not adata:  # a copy: its id is the original's
            _assign_adata_uuid(adata, overwrite=True)  # else the copy would take the original's setup over
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*does not contain unnormalized count data.*")
                manager.register_fields(adata)
        except Exception:  # e.g. batches that do not match the reference's: adata as it was
            if uuid is not None:
                adata.uns[_SCVI_UUID_KEY] = uuid
            raise
        cls.register_manager(manager)

    @classmethod
    def _registered_manager(cls, adata: AnnData) -> AnnDataManager | None:
        """The manager ``adata`` was set up with, or ``None`` (also for a copy of a set-up AnnData)."""
        try:
            return cls._get_most_recent_anndata_manager(adata)
        except ValueError:  # a copy carries the original's registration ids, not its registration
            return None

    def _check_unchanged_since_setup(self, adata: AnnData) -> None:
        """Raise if the shape, the batch column or a phenotype column of ``adata`` changed since setup."""
        stats = self.adata_manager.summary_stats
        if (adata.n_obs, adata.n_vars) != (stats["n_cells"], stats["n_vars"]):
            raise ValueError(
                f"adata changed shape since setup_anndata ({stats['n_cells']} x {stats['n_vars']} "
                f"then, {adata.n_obs} x {adata.n_vars} now); call setup_anndata again"
            )
        if _batch_codes_differ(self.adata_manager, adata):
            batch_key = self.adata_manager.registry["setup_args"][SETUP_ARGS.BATCH_KEY]
            change = "changed" if batch_key in adata.obs else "was removed"
            raise ValueError(
                f"adata.obs[{batch_key!r}] (the batch key) {change} since setup_anndata; call "
                "setup_anndata again (and create a new model if it has new batches)"
            )
        for key, categories in self.phenotype_categories_.items():
            if not self._labels_registered(key):  # not read (load_query_data(phenotype_keys=[])): no matter
                continue
            if _registered_codes_differ(adata, key, categories):
                change = "changed" if key in adata.obs else "was removed"
                raise ValueError(
                    f"adata.obs[{key!r}] {change} since setup_anndata; call setup_anndata again "
                    "(and create a new model if it has new categories)"
                )
            labelled = _labelled_since_setup(self.adata_manager, adata, key)
            if labelled.any():
                raise ValueError(
                    f"adata.obs[{key!r}] changed since setup_anndata: {int(labelled.sum())} cells without "
                    f"a label then have one now (e.g. {adata.obs[key][labelled].iloc[0]!r}); call "
                    "setup_anndata again (and create a new model if it has new categories)"
                )

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        *,
        batch_size: int = 32,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_fraction: float = 0.1,
        gene_mask_prob: float = 0.15,
        phenotype_mask_prob: float = 0.8,
        gene_prediction: float | None = None,
        class_weight: Literal["balanced"] | None = "balanced",
        focal_gamma: float = 0.0,
        adversary_weight: float = 1.0,
        adversary_schedule: Literal["dann", "constant"] = "dann",
        adversary_lr_factor: float = 10.0,
        align_weight: float = 1.0,
        freeze: Freeze | None = None,
        calibrate: bool = True,
        train_size: float = 0.9,
        validation_size: float | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        precision: str | None = None,
        early_stopping: bool = False,
        seed: int | None = None,
        deterministic: bool | None = None,
        length_bucketing: bool = False,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every_n_steps: int | None = None,
        resume: bool = False,
        datasplitter_kwargs: dict[str, Any] | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        """Pre-train (and, with phenotypes, fine-tune) by masked modelling, with Lightning.

        Parameters
        ----------
        max_epochs
            Passes over the training cells; default scales with the number of cells
            (``clip(20_000 // n_cells, 5, 50)``), or, given Lightning's ``max_steps`` alone, as
            many as its steps take. The learning-rate schedule spans the steps of the run.
        batch_size
            Cells per minibatch.
        lr, weight_decay
            AdamW learning rate and weight decay.
        warmup_fraction
            Share of steps in linear learning-rate warm-up, followed by cosine decay.
        gene_mask_prob
            Share of gene values hidden and predicted.
        phenotype_mask_prob
            Share of phenotype tokens hidden and predicted, in ``[0, 1]`` (``1``: always hidden,
            as at inference; ``0`` trains no phenotype head and warns).
        gene_prediction
            For a model created with ``gene_prediction > 0``: the share used in this run (``0``
            switches masked gene prediction off, e.g. to fine-tune on labels only); default the
            model's.
        class_weight
            ``"balanced"`` (default) weighs each phenotype class by ``n / (n_classes * n_class)``
            over the training cells, so that rare cell types count as much as common ones; ``None``
            weighs every cell equally. With the ``[PROFILE]`` token, balanced weights raised
            validation macro-F1 on pbmc68k (0.68 -> 0.71) and paul15 (0.73 -> 0.76).
        focal_gamma
            Focal-loss exponent of the phenotype losses, which down-weighs cells already classified
            with confidence; ``0`` (default) is the plain cross-entropy.
        adversary_weight, adversary_schedule, adversary_lr_factor
            With ``batch_correction="adversarial"`` or ``"both"``: weight of the batch
            discriminator's loss; how the reversed gradient's strength grows over training
            (``"dann"``: from 0 to 1, as ``2 / (1 + exp(-10 p)) - 1`` of the share ``p`` of steps
            done; ``"constant"``: 1 throughout); the discriminator's learning rate as a multiple of
            ``lr`` (it must keep up with the encoder, see
            :class:`~sctransformer.train.MaskedModelingPlan`).
        align_weight
            With ``align_obsm``: weight of the CLIP alignment loss added to masked modelling.
        freeze
            Parameters kept fixed (fine-tuning): ``"embeddings"`` freezes the gene, value, profile
            (with its layer norm) and batch embeddings; ``"backbone"`` also freezes ``[CLS]`` and
            the transformer blocks, training only the output heads (with ``align_obsm``, both
            projections and the alignment's temperature) and the phenotype token tables; with
            ``align_obsm``, ``"transcriptome"`` keeps the transcriptome side of the alignment
            (encoder and its projection) fixed and trains the other modality's MLP and the
            alignment's temperature (phenotype predictions, and their calibration, stay as they
            were), ``"other"`` the reverse; ``"none"``/``None`` trains all.
        calibrate
            After training, fit a temperature per phenotype on the validation cells
            (:meth:`calibrate`) so that prediction confidences are calibrated. Temperatures fitted
            before (e.g. the reference's, kept by :meth:`load_query_data`) belong to the weights
            this run changes: where they cannot be fitted again (``calibrate=False``, or no
            labelled validation cells, as for an unlabelled query) they are dropped with a
            warning, and confidences are uncalibrated until :meth:`calibrate` is called on
            labelled cells.
        train_size, validation_size
            Shares of cells for training and validation (scvi-tools' ``DataSplitter``); cells in
            neither are a test set, listed in ``model.test_indices``. Not used with
            ``datasplitter_kwargs={"external_indexing": [train, validation, test]}``, whose
            validation cells are validated on.
        accelerator, devices
            Lightning device selection; ``"auto"`` takes a GPU when there is one.
        precision
            Lightning precision: ``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``, ``"bf16-true"`` or
            ``"64-true"`` (or Lightning's aliases ``32``, ``64``, ``16``, ``"bf16"``); default
            ``"bf16-mixed"`` on GPUs that support it, else 32-bit. A ``"-true"`` precision trains the
            weights in its dtype; they return to float32 after training. ``"16-true"`` is refused:
            in float16 weights AdamW's epsilon is 0 and the loss turns non-finite within steps.
            ``"bf16-mixed"`` also runs on CPUs (matrix products in bf16, weights in float32). On a
            CPU with bf16 matrix units (Intel AMX) it trained models of ``d_model >= 128``
            1.1-2.1x faster and the default ``d_model=64`` slower, with the same accuracy there
            (measured at ``d_model=64`` only; ``benchmarks/cpu_precision.py``).
        early_stopping
            Stop when ``loss_validation`` stops improving (scvi-tools' ``LoudEarlyStopping``, options
            ``early_stopping_patience``, ``_min_delta``, ``_warmup_epochs``, ``_monitor``, ``_mode`` in
            ``trainer_kwargs``), also under ``strategy="ddp"``, where every rank stops at the same epoch.
        seed
            Seed of the data split and masking; default ``sctransformer.settings.seed``. A further
            ``train()`` of the same model with the same seed draws the same minibatch order and
            masks, epoch by epoch, as the first did. Another seed draws new ones and also splits the
            cells anew (cells validated on before may then be trained on); to keep the split, pass
            it: ``datasplitter_kwargs={"external_indexing": [model.train_indices,
            model.validation_indices, model.test_indices]}``.
        checkpoint_dir
            Write a Lightning checkpoint (weights, optimizer, scheduler, loop and data position;
            the RNG is seeded per minibatch) to ``checkpoint_dir/last.ckpt`` after every epoch.
        checkpoint_every_n_steps
            Also write it every this many optimisation steps (for long epochs).
        resume
            Continue from ``checkpoint_dir/last.ckpt`` if it exists (else start fresh, logged). On
            CPU, a run killed at any point and resumed with the same arguments ends with exactly
            the weights of an uninterrupted run (an epoch interrupted midway goes on from the
            minibatch after the checkpoint). ``history`` then holds the resumed epochs only.
            Arguments that change the training minibatches (the data, ``batch_size``, ``seed``,
            ``train_size``/``validation_size``, ``devices``, ``length_bucketing``, ``block_size``,
            ``shuffle_buffer`` or ``drop_last`` in ``datasplitter_kwargs``) raise a
            :class:`ValueError` naming them before training, as do those of the optimisation, whose
            state the checkpoint holds (``lr``, ``weight_decay``, ``warmup_fraction``, ``max_epochs``,
            ``adversary_lr_factor``, ``freeze``, and the Trainer's ``max_steps``,
            ``accumulate_grad_batches`` and ``limit_train_batches``), and so does a model of other
            hyper-parameters (those of ``GeneTransformer`` but ``attention`` and ``seed``). The current AnnData's genes are
            used, matched to the model's by identifier as in any run.
            Checkpoints are Lightning's format, which Lightning reads by unpickling: resume only
            from checkpoints you wrote (saved models, by contrast, are safetensors + JSON).
        deterministic
            ``True`` makes torch use only deterministic kernels and raise on an operation that has
            none (Lightning's ``deterministic=True``; on CUDA it also sets
            ``CUBLAS_WORKSPACE_CONFIG``), at some cost in speed; ``False`` allows any kernel.
            Default: deterministic kernels with a warning for those without on CPU, any kernel on a
            GPU. On CPU the same seed gives bitwise-identical weights either way (also with
            DataLoader workers, ``datasplitter_kwargs={"num_workers": n}``). On a GPU, atomic-add
            kernels make weights differ in the last bits between runs unless
            ``deterministic=True``; results still differ between GPU models, between precisions
            (bf16 mixed by default) and from CPU results. On a GPU the test suite runs only its
            CUDA tests (bf16 kernels against SDPA, ``SCT_TEST_CUDA=1``).
        length_bucketing
            Put training cells with similar numbers of tokens (expressed genes, up to
            ``max_length``) in the same minibatch (:class:`~sctransformer.data.LengthBucketedSampler`):
            minibatches are padded to their longest cell, so this wastes less compute on padding.
            The order stays random between batches and is set by the seed and epoch.
        datasplitter_kwargs
            More options of :class:`scvi.dataloaders.DataSplitter`, e.g. ``num_workers``,
            ``shuffle_set_split`` or ``external_indexing`` (``[train, validation, test]``: cell
            positions or boolean masks, disjoint and together every cell; validation and test may
            be empty or left out), not those ``train`` sets from its own arguments (``batch_size``,
            ``train_size``, ``validation_size``, ``seed``); for sharded data, of
            :class:`~sctransformer.data.ShardedDataModule` (``num_workers``, ``block_size``,
            ``shuffle_buffer``).
        **trainer_kwargs
            More options of :class:`scvi.train.Trainer` (a Lightning ``Trainer``).
        """
        max_epochs = None if max_epochs is None else positive_int(max_epochs, "max_epochs")
        batch_size = positive_int(batch_size, "batch_size")
        for name, value in (
            ("lr", lr),
            ("weight_decay", weight_decay),
            ("adversary_weight", adversary_weight),
            ("adversary_lr_factor", adversary_lr_factor),
            ("align_weight", align_weight),
            ("warmup_fraction", warmup_fraction),
            ("gene_mask_prob", gene_mask_prob),
            ("phenotype_mask_prob", phenotype_mask_prob),
            ("focal_gamma", focal_gamma),
            ("train_size", train_size),
            *([("validation_size", validation_size)] if validation_size is not None else []),
        ):
            _check_finite(name, value)
        accumulate = trainer_kwargs.get("accumulate_grad_batches", 1)  # the plan divides by it
        if isinstance(accumulate, bool) or not isinstance(accumulate, int | np.integer) or accumulate < 1:
            raise ValueError(f"accumulate_grad_batches must be a positive integer, got {accumulate!r}")
        # no optimisation step at all would mark the initial weights as a trained model
        if trainer_kwargs.get("max_steps", -1) == 0 or trainer_kwargs.get("limit_train_batches") in (0, 0.0):
            raise ValueError(
                "max_steps=0 or limit_train_batches=0 leaves no training step; pass a positive number "
                "(max_steps=-1 or limit_train_batches=None for no limit)"
            )
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if not 0 <= warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction!r}")
        if not 0 <= gene_mask_prob < 1:
            raise ValueError(f"gene_mask_prob must be in [0, 1), got {gene_mask_prob!r}")
        if not 0 <= phenotype_mask_prob <= 1:  # 1: always predicted, as at inference
            raise ValueError(f"phenotype_mask_prob must be in [0, 1], got {phenotype_mask_prob!r}")
        if phenotype_mask_prob == 0 and self.phenotype_categories_:
            warnings.warn(
                "phenotype_mask_prob=0: the phenotype tokens are never hidden, so the phenotype heads "
                "are not trained and predict() will not be meaningful",
                UserWarning,
                stacklevel=2,
            )
        if class_weight not in (None, "balanced"):
            raise ValueError(f"class_weight must be None or 'balanced', got {class_weight!r}")
        if not (isinstance(focal_gamma, Real) and 0 <= focal_gamma <= 10):
            raise ValueError(f"focal_gamma must be a number in [0, 10] (2 is usual), got {focal_gamma!r}")
        if not (isinstance(adversary_weight, Real) and adversary_weight >= 0):
            raise ValueError(f"adversary_weight must be a number >= 0, got {adversary_weight!r}")
        if not (isinstance(adversary_lr_factor, Real) and adversary_lr_factor > 0):
            raise ValueError(f"adversary_lr_factor must be a positive number, got {adversary_lr_factor!r}")
        if not (isinstance(align_weight, Real) and align_weight >= 0):
            raise ValueError(f"align_weight must be a number >= 0, got {align_weight!r}")
        if adversary_schedule not in ("dann", "constant"):
            raise ValueError(f"adversary_schedule must be 'dann' or 'constant', got {adversary_schedule!r}")
        if freeze is not None and freeze not in FREEZE:
            raise ValueError(f"freeze must be one of {list(FREEZE)} or None, got {freeze!r}")
        if freeze in ("transcriptome", "other") and (
            self.module.align_dims is None
            or self.adata is None
            or REGISTRY_KEYS.ALIGN_KEY not in self.adata_manager.data_registry
        ):
            raise ValueError(
                f"freeze={freeze!r} keeps one side of an alignment fixed; the model has no align_obsm, or "
                "its AnnData lacks the second modality in .obsm, so nothing would be trained"
            )
        if gene_prediction is None:
            gene_prediction = float(self.hyperparameters_.get("gene_prediction", 0.0))
        _check_gene_prediction(gene_prediction)
        if gene_prediction > 0 and not self.module.gene_prediction:
            raise ValueError(
                "this model has no gene-prediction head; create it with GeneTransformer(adata, gene_prediction=0.15)"
            )
        learns_phenotypes = bool(self.phenotype_categories_) and phenotype_mask_prob > 0
        learns_alignment = self.module.align_dims is not None and align_weight > 0
        learns_queries = bool(self.module.expression_queries)  # held-out genes, whatever gene_mask_prob
        if (
            gene_mask_prob == 0
            and gene_prediction == 0
            and not (learns_phenotypes or learns_alignment or learns_queries)
        ):
            phenotypes = "phenotype_mask_prob=0" if self.phenotype_categories_ else "no phenotype keys"
            raise ValueError(
                f"gene_mask_prob=0 with {phenotypes}, no gene prediction, no expression queries and no "
                "alignment leaves nothing to learn: no loss term would be scored; set gene_mask_prob (e.g. "
                "0.15) or phenotype_mask_prob"
            )
        if not 0 < train_size <= 1:
            raise ValueError(f"train_size must be in (0, 1], got {train_size!r}")
        if validation_size is not None and not (
            0 <= validation_size < 1 and train_size + validation_size <= 1
        ):
            raise ValueError(
                f"validation_size must be in [0, 1) with train_size + validation_size <= 1, got "
                f"validation_size={validation_size!r} and train_size={train_size!r}"
            )
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir= the directory of the checkpoints")
        if checkpoint_every_n_steps is not None and checkpoint_dir is None:
            raise ValueError("checkpoint_every_n_steps needs checkpoint_dir= a directory for the checkpoints")
        if not isinstance(length_bucketing, bool):
            raise TypeError(f"length_bucketing must be True or False, got {length_bucketing!r}")
        if deterministic not in (None, True, False):
            raise ValueError(f"deterministic must be None, True or False, got {deterministic!r}")
        precision = _check_precision(precision)
        source = self.shards_ if self.shards_ is not None else self.adata
        if source is None:
            raise ValueError("the model has no AnnData to train on; load it with adata=...")
        if self.shards_ is None:
            if (
                self.module.align_dims is not None
                and REGISTRY_KEYS.ALIGN_KEY in self.adata_manager.data_registry
            ):
                # the second modality may have changed since the model was made, as the counts may
                _check_align_input(self.adata, self.hyperparameters_["align_obsm"], self.module.align_dims[0])
            self._validate_anndata(self.adata)
            self._check_unchanged_since_setup(self.adata)
            datasplitter_kwargs = check_splitter_options(datasplitter_kwargs, source.n_obs)
            # e.g. normalised in place since
            check_counts(self.adata, self.setup_args_[SETUP_ARGS.LAYER], model=True)
        elif length_bucketing:
            raise ValueError(
                "length_bucketing is not available for sharded data; pass length_bucketing=False"
            )
        else:
            datasplitter_kwargs = check_shard_options(datasplitter_kwargs)
        seed = check_seed(settings.seed if seed is None else seed)
        external = (datasplitter_kwargs or {}).get("external_indexing") is not None
        if self.shards_ is not None:
            datamodule = ShardedDataModule(
                self.shards_,
                batch_size=batch_size,
                train_size=train_size,
                validation_size=validation_size,
                seed=seed,
                **(datasplitter_kwargs or {}),
            )
        else:
            lengths = None
            if length_bucketing:  # the cells' tokens: expressed genes of the vocabulary
                in_vocabulary = np.flatnonzero(self._column_to_gene(self.adata) >= 0)
                columns = None if len(in_vocabulary) == self.adata.n_vars else in_vocabulary
                layer = self.setup_args_[SETUP_ARGS.LAYER]
                expressed = expressed_per_cell(self.adata, layer=layer, columns=columns)
                lengths = np.minimum(expressed, self.hyperparameters_["max_length"])
            try:  # scvi-tools' DataSplitter checks the split it will make (its seeded draw is in setup)
                datamodule = self._data_splitter_cls(
                    self.adata_manager,
                    train_size=train_size,
                    validation_size=validation_size,
                    batch_size=batch_size,
                    load_sparse_tensor=True,
                    seed=seed,
                    lengths=lengths,
                    **({"shuffle_set_split": True} | datasplitter_kwargs),
                )
            except ValueError as err:
                split = (
                    "the indices of datasplitter_kwargs['external_indexing']"
                    if external
                    else f"train_size={train_size}, validation_size={validation_size}"
                )
                raise ValueError(f"{split} do not split {source.n_obs} cells: {err}") from err
        n_validation = datamodule.n_val  # the validation cells the data module will use
        if early_stopping and n_validation == 0:
            cause, fix = (
                ("datasplitter_kwargs['external_indexing'] gives none", "give validation indices")
                if external
                else (f"train_size={train_size} leaves none of {source.n_obs}", "lower train_size")
            )
            raise ValueError(
                f"early_stopping needs validation cells, and {cause}; {fix} or pass early_stopping=False"
            )
        max_steps = trainer_kwargs.get("max_steps")
        if max_epochs is None and not (max_steps is not None and max_steps >= 0):
            max_epochs = int(np.clip(20_000 // max(1, source.n_obs), 5, 50))
        # else max_epochs None with max_steps: Lightning trains until max_steps, however many epochs
        accelerator_is_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        if precision is None and accelerator_is_gpu and torch.cuda.is_bf16_supported():
            precision = "bf16-mixed"
        if precision is not None:
            trainer_kwargs["precision"] = precision
        # no validation cells (e.g. a single cell): no validation loop at all
        trainer_kwargs.setdefault("check_val_every_n_epoch", 1 if n_validation > 0 else None)
        if n_validation == 0:
            trainer_kwargs.setdefault("limit_val_batches", 0)
        trainer_kwargs.setdefault("gradient_clip_val", 1.0)
        # made here, not by scvi-tools' Trainer, which drops it under strategy="ddp" (the plan
        # reduces the validation loss over the ranks, so that every rank stops at the same epoch)
        stopping = {
            name: trainer_kwargs.pop(f"early_stopping_{name}")
            for name in ("monitor", "min_delta", "patience", "warmup_epochs", "mode")
            if f"early_stopping_{name}" in trainer_kwargs
        }
        metrics = [
            f"{name}_{stage}"
            for stage in ("validation", "train")
            for name in ("loss", *self.module.loss_names(list(self.phenotype_categories_)))
        ]
        _check_early_stopping(stopping, early_stopping, metrics, others=bool(trainer_kwargs.get("callbacks")))
        if early_stopping and trainer_kwargs.get("check_val_every_n_epoch") is None:
            trainer_kwargs["check_val_every_n_epoch"] = 1  # as scvi-tools' Trainer sets it for its own
        early_stopper = (
            LoudEarlyStopping(
                **{
                    "monitor": "loss_validation",
                    "min_delta": 0.0,
                    "patience": 45,
                    "warmup_epochs": 0,
                    "mode": "min",
                }
                | stopping
            )
            if early_stopping
            else None
        )
        trainer_kwargs.setdefault("log_every_n_steps", 1)
        loggers = trainer_kwargs.get("logger")
        if loggers is True:  # Lightning's default logger, as Lightning would make it
            loggers = _default_logger(trainer_kwargs.get("default_root_dir") or os.getcwd())
        if loggers is None:  # scvi-tools' default pickles it to ./lightning_logs under DDP: only where asked
            save_dir = trainer_kwargs.get("log_save_dir")
            trainer_kwargs["logger"] = SimpleLogger(save_dir=save_dir, save_log_on_disk=save_dir is not None)
        elif loggers is not False:  # scvi-tools' logger first: it records model.history
            loggers = loggers if isinstance(loggers, list | tuple) else [loggers]
            trainer_kwargs["logger"] = [SimpleLogger(), *loggers]
        # the training samplers share cells out between distributed ranks themselves
        trainer_kwargs.setdefault("use_distributed_sampler", False)
        if deterministic is None:
            deterministic = "warn" if not accelerator_is_gpu else False
        trainer_kwargs["deterministic"] = deterministic
        trainer_kwargs.setdefault("benchmark", accelerator_is_gpu)

        callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
        if early_stopper is not None:
            callbacks.append(early_stopper)
        if checkpoint_dir is not None:
            checkpointer = PeriodicCheckpoint(checkpoint_dir, checkpoint_every_n_steps)
            callbacks.append(checkpointer)
            if resume and checkpointer.last.exists():
                logger.info("resuming training from %s", checkpointer.last)
                trainer_kwargs["ckpt_path"] = str(checkpointer.last)
            elif resume:
                logger.info("no checkpoint in %s; starting training from the beginning", checkpoint_dir)
        trainer_kwargs["callbacks"] = callbacks

        previous_seed, previous_rng = scvi.settings.seed, _global_rng_state()
        scvi.settings.seed = seed  # seeds the DataSplitter's shuffle and the global RNGs
        frozen = self._frozen_parameters(freeze)
        for param in frozen:
            param.requires_grad_(False)
        # a "-true" precision casts the weights; a run that fails before its first optimizer step
        # keeps the previous calibration (after one, the weights it was fitted to have changed)
        dtype = next(self.module.parameters()).dtype
        # ... and rounds what it does not train: the frozen weights and the buffers come back as they were
        untrained: dict[str, torch.Tensor] = {}
        if precision is not None and precision.endswith("-true") and precision != "32-true":
            untrained = {
                n: p.detach().clone() for n, p in self.module.named_parameters() if not p.requires_grad
            }
            untrained |= {
                n: b.detach().clone() for n, b in self.module.named_buffers() if b.is_floating_point()
            }
        calibration, finished, plan = (self.temperatures_, self.calibration_), False, None
        self.temperatures_, self.calibration_ = {}, {}
        # the weights to go back to if the loss diverges: every retry would start from the wreck
        before = {
            name: tensor.detach().to("cpu", copy=True) for name, tensor in self.module.state_dict().items()
        }
        history = (copy.copy(self.history_), self.is_trained_)  # scvi-tools appends a failed run's epochs
        diverged = False
        try:
            pl.seed_everything(seed, workers=True, verbose=False)
            if self.shards_ is None:
                datamodule.setup()  # the split (seeded): its training cells set the class weights
            plan = self._training_plan_cls(
                self.module,
                column_to_gene=self._column_to_gene(source),
                phenotype_keys=list(self.phenotype_categories_),
                lr=lr,
                weight_decay=weight_decay,
                warmup_fraction=warmup_fraction,
                gene_mask_prob=gene_mask_prob,
                phenotype_mask_prob=phenotype_mask_prob,
                expression_queries=self.hyperparameters_["expression_queries"],
                gene_prediction_prob=float(gene_prediction),
                seed=seed,
                has_batches=(
                    self.shards_.batch_key is not None
                    if self.shards_ is not None
                    else self.adata_manager.registry["setup_args"][SETUP_ARGS.BATCH_KEY] is not None
                ),
                class_weights=self._class_weights(datamodule.train_idx) if class_weight else None,
                focal_gamma=float(focal_gamma),
                adversary_weight=float(adversary_weight),
                adversary_schedule=adversary_schedule,
                adversary_lr_factor=float(adversary_lr_factor),
                align_weight=float(align_weight),
                # a kernel choice and the initial weights' seed do not shape a checkpoint's model
                model_settings={  # as Python values: a checkpoint is read with weights_only=True
                    k: v.item() if isinstance(v, np.generic) else v
                    for k, v in self.hyperparameters_.items()
                    if k not in ("attention", "seed")
                },
            )
            with warnings.catch_warnings():  # scvi-tools' early stopping, not this run's
                warnings.filterwarnings("ignore", message="early_stopping was automatically disabled")
                runner = self._train_runner_cls(
                    self,
                    training_plan=plan,
                    data_splitter=datamodule,
                    max_epochs=max_epochs,
                    accelerator=accelerator,
                    devices=devices,
                    early_stopping=False,  # in the callbacks already, see early_stopper
                    **trainer_kwargs,
                )
            # a loaded model is in eval mode, which Lightning keeps: dropout must be on while training
            self.module.train()
            with quiet_sparse_tensors(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*does not have many workers.*")
                runner()
            finished = True
            if plan.resumed_step is not None and plan.global_step == plan.resumed_step:
                warnings.warn(
                    f"the checkpoint in {checkpoint_dir} was written at the end of a finished run "
                    f"(step {plan.resumed_step}), so resume=True trained nothing; to train again, pass "
                    "resume=False or another checkpoint_dir",
                    UserWarning,
                    stacklevel=2,
                )
        except FloatingPointError as error:  # a non-finite loss (the training plan's)
            diverged = True
            # a hint only where the last checkpoint is this run's (written, or resumed from)
            if checkpoint_dir is None or not (checkpointer.wrote or plan.resumed_step is not None):
                raise
            raise FloatingPointError(
                f"{error}. The last checkpoint in {checkpoint_dir} was written before the loss diverged: "
                "resume=True would go on from it with the same settings (lr included), so to try again "
                "with others pass resume=False or another checkpoint_dir"
            ) from error
        finally:
            scvi.settings.seed = previous_seed
            _set_global_rng_state(previous_rng)  # the user's random draws go on as if untouched
            for param in frozen:
                param.requires_grad_(True)
            self.module.to(dtype)
            if untrained:
                current = {**dict(self.module.named_parameters()), **dict(self.module.named_buffers())}
                with torch.no_grad():
                    for name, tensor in untrained.items():
                        current[name].copy_(tensor)
            if diverged:
                self.module.load_state_dict(before)
                self.history_, self.is_trained_ = history
            if not finished and (plan is None or plan.global_step == 0 or diverged):
                self.temperatures_, self.calibration_ = calibration
            self.module.eval()
            if self.shards_ is not None:
                self.shards_.close()
        self._indexed_cells = _cells_fingerprint(source)  # the cells the split's positions point into
        self.train_settings_ = {
            "max_epochs": max_epochs,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "warmup_fraction": warmup_fraction,
            "gene_mask_prob": gene_mask_prob,
            "phenotype_mask_prob": phenotype_mask_prob,
            "class_weight": class_weight,
            "focal_gamma": focal_gamma,
            "adversary_weight": adversary_weight,
            "adversary_schedule": adversary_schedule,
            "adversary_lr_factor": adversary_lr_factor,
            "align_weight": align_weight,
            "length_bucketing": length_bucketing,
            "freeze": freeze,
            "train_size": train_size,
            "validation_size": validation_size,
            "seed": seed,
        }
        if calibrate and self.phenotype_categories_ and self._labelled_validation_cells():
            self.calibrate()
        if freeze == "transcriptome":  # the phenotype logits did not change: neither does their calibration
            for key in [key for key in calibration[0] if key not in self.temperatures_]:
                self.temperatures_[key] = calibration[0][key]
                if key in calibration[1]:
                    self.calibration_[key] = calibration[1][key]
        dropped = [key for key in calibration[0] if key not in self.temperatures_]
        if dropped:  # fitted to the weights before this run: not refitted, so not kept
            if not calibrate:
                reason = "calibrate=False"
            elif n_validation == 0:
                reason = "no validation cells were held out to fit new ones on"
            else:
                reason = "the validation cells have no labels of them to fit new ones on (e.g. an unlabelled query)"
            warnings.warn(
                f"training changed the weights that the calibration temperatures of {dropped} were fitted "
                f"to, and {reason}, so they were dropped: predict() and sct.tl.predict now give "
                "uncalibrated confidences (temperature 1), which min_confidence thresholds differently. "
                "Recalibrate on labelled cells, ideally ones the model was not trained on: "
                f"model.calibrate(labelled_adata), with labels in labelled_adata.obs[{dropped[0]!r}]",
                UserWarning,
                stacklevel=2,
            )

    def _frozen_parameters(self, freeze: Freeze | None) -> list[torch.nn.Parameter]:
        """Parameters that ``freeze`` keeps fixed (only those that are trainable now)."""
        if freeze in (None, "none"):
            return []
        embeddings = (
            "gene_embedding",
            "bin_embedding",
            "value_mlp",
            "value_mask",
            "gene_mask",
            "profile_embedding",
            "profile_norm",
            "batch_embedding",
        )
        frozen = []
        for name, param in self.module.named_parameters():
            top = name.split(".")[0]
            if freeze == "embeddings":
                is_frozen = top in embeddings
            elif freeze == "transcriptome":  # only the other modality's side of the alignment trains
                is_frozen = top not in ("align_other", "align_logit_scale")
            elif freeze == "other":
                is_frozen = top == "align_other"
            else:  # backbone: everything but the heads and the phenotype token tables
                is_frozen = top not in (
                    *_HEADS,
                    "phenotype_embeddings",
                    "align_transcriptome",
                    "align_other",
                    "align_logit_scale",
                )
            if is_frozen and param.requires_grad:
                frozen.append(param)
        return frozen

    def _class_weights(self, train_idx: np.ndarray) -> list[torch.Tensor]:
        """Balanced class weights ``n / (n_classes * n_class)`` of each phenotype, on training cells.

        Classes without training cells get weight 0 (they are never a target anyway).
        """
        weights = []
        for key, categories in self.phenotype_categories_.items():
            codes = self._registered_codes(key)[train_idx]
            codes = codes[codes >= 0]
            counts = np.bincount(codes, minlength=len(categories)).astype(np.float64)
            present = counts > 0
            w = np.zeros(len(categories))
            w[present] = counts.sum() / (present.sum() * counts[present])
            weights.append(torch.as_tensor(w, dtype=torch.float32))
        return weights

    def _labels_registered(self, key: str) -> bool:
        """Whether the model's AnnData has labels of phenotype ``key`` registered (training targets)."""
        return phenotype_registry_key(key) in self.adata_manager.data_registry

    def _registered_codes(self, key: str) -> np.ndarray:
        """Category codes of phenotype ``key`` of the model's cells (``-1``: unknown / absent).

        A column of the AnnData that was not registered (e.g. a query's labels left out of
        ``load_query_data(phenotype_keys=...)``) gives no labels.
        """
        if self.shards_ is not None:
            return self.shards_.phenotype_codes[key].astype(np.int64)
        if key not in self.adata.obs or not self._labels_registered(key):
            return np.full(self.adata.n_obs, -1, dtype=np.int64)
        return category_codes(self.adata.obs[key], self.phenotype_categories_[key])

    def _labelled_validation_cells(self) -> bool:
        idx = self.validation_indices
        if idx is None or len(idx) == 0:
            return False
        return any((self._registered_codes(k)[idx] >= 0).any() for k in self.phenotype_categories_)

    # ------------------------------------------------------------------ inference
    def _column_to_gene(self, adata: AnnData | ShardedAnnData) -> np.ndarray:
        if isinstance(adata, ShardedAnnData):  # its last column sums the genes outside its vocabulary
            return np.append(self.vocabulary_.column_to_gene(adata.genes), -1)
        gene_key = self.setup_args_[SETUP_ARGS.GENE_KEY]
        ids = gene_identifiers(adata, gene_key, model=True)
        fix = functools.partial(model_gene_fix, adata, gene_key, self.vocabulary_.index)  # only if needed
        return self.vocabulary_.column_to_gene(ids, fix=fix)

    def _inference_adata(self, adata: AnnData | ShardedAnnData | None) -> AnnData | ShardedAnnData:
        """The cells to run on: ``adata``, else the model's own (AnnData or shards)."""
        if not self.is_trained_:  # scvi-tools raises here; an untrained model is a useful control
            warnings.warn(
                "the model has not been trained: its outputs come from its initial random weights; "
                "call model.train() first, or load a trained model",
                UserWarning,
                stacklevel=3,
            )
        if adata is None:
            if self.adata is None and self.shards_ is None:
                raise ValueError("the model has no AnnData attached; pass adata=...")
            if self.adata is None:
                return self.shards_
            adata = self.adata  # checked as a passed AnnData is: it may have changed since training
        if isinstance(adata, ShardedAnnData):
            if adata.layer != self.setup_args_[SETUP_ARGS.LAYER]:
                logger.info(
                    "reading layer %r of the shards (the model was trained on %r)",
                    adata.layer,
                    self.setup_args_[SETUP_ARGS.LAYER],
                )
            # each shard onto the model's genes it has: an inner join of the shards drops, from
            # every shard, genes that one shard lacks
            every_gene = pd.Index(dict.fromkeys(g for genes in adata.shard_genes for g in genes))
            known = every_gene[self.vocabulary_.index.get_indexer(every_gene.astype(str)) >= 0]
            return adata if known.isin(adata.genes).all() else adata.with_genes(known)  # rows checked as read
        elif not isinstance(adata, AnnData):
            raise TypeError(f"adata must be an AnnData or a ShardedAnnData, got {type(adata).__name__}")
        check_model_layer(adata, self.setup_args_[SETUP_ARGS.LAYER])
        check_counts(adata, self.setup_args_[SETUP_ARGS.LAYER], model=True)
        return adata

    def _forward(
        self,
        adata: AnnData | ShardedAnnData,
        batch_size: int | None,
        indices: np.ndarray | None = None,
        batch: str | None = None,
    ) -> Iterator[tuple[np.ndarray, TokenizedCells, torch.Tensor]]:
        """Yield ``(cell indices, tokens, hidden states)`` with every phenotype token masked."""
        for idx, tokens, hidden, _ in self._passes(adata, batch_size, [], indices, batch):
            yield idx, tokens, hidden

    def _attention_layers(self, layers: Literal["first", "last", "all"] | int | list[int]) -> list[int]:
        """Block indices named by ``layers`` (negative integers count from the last block)."""
        n_layers = len(self.module.blocks)
        if layers == "first":
            return [0]
        if layers == "last":
            return [n_layers - 1]
        if layers == "all":
            return list(range(n_layers))
        chosen = [layers] if isinstance(layers, int | np.integer) else layers
        if (
            isinstance(layers, str | bool)
            or not isinstance(chosen, list | tuple)
            or not chosen
            or any(isinstance(x, bool) or not isinstance(x, int | np.integer) for x in chosen)
            or any(not -n_layers <= x < n_layers for x in chosen)
        ):
            raise ValueError(
                f"layers must be 'first', 'last', 'all', or block indices in [{-n_layers}, {n_layers}), "
                f"got {layers!r}"
            )
        return sorted({int(x) % n_layers for x in chosen})

    def _gene_attention(
        self,
        adata: AnnData,
        *,
        layers: Literal["first", "last", "all"] | int | list[int] = "last",
        heads: Literal["mean", "max"] = "mean",
        batch_size: int | None = None,
        rows: Literal["genes", "cls"] = "genes",
    ) -> Iterator[tuple[np.ndarray, TokenizedCells, torch.Tensor]]:
        """Yield ``(cell indices, tokens, attention)`` of attention to the gene tokens, float32.

        With ``rows="genes"``, ``attention`` is ``(n, length, length)``: ``attention[c, i, j]`` is
        gene token ``i``'s attention probability to gene token ``j`` in cell ``c``; with
        ``rows="cls"``, ``(n, length)``: the ``[CLS]`` token's attention to gene token ``j``. The
        softmax runs over all tokens, prefix tokens included; heads are combined by ``heads`` and
        the ``layers`` averaged. Phenotype tokens are masked.
        """
        if heads not in ("mean", "max"):
            raise ValueError(f"heads must be 'mean' or 'max', got {heads!r}")
        chosen = self._attention_layers(layers)
        n_prefix = self.module.n_prefix
        query_rows = slice(n_prefix, None) if rows == "genes" else 0  # [CLS] is the first token
        for idx, tokens, _, maps in self._passes(adata, batch_size, chosen):
            rows_read = [m[:, :, query_rows, n_prefix:] for m in maps]  # before reducing: less work
            combined = [m.amax(1) if heads == "max" else m.mean(1) for m in rows_read]
            attention = torch.stack(combined).float().mean(0)
            yield idx, tokens, attention

    def _batch_inputs(self, adata: AnnData | ShardedAnnData, batch: str | None) -> np.ndarray:
        """Codes fed to the ``[BATCH]`` token of every cell (``-1``: "no batch")."""
        codes = np.full(adata.n_obs, -1, dtype=np.int64)
        if batch is None:
            return codes
        if not self.module.batch_token:
            raise ValueError(
                "batch= sets the [BATCH] token, which this model does not have "
                "(batch_correction='token' or 'both' adds it)"
            )
        categories = self.batch_categories_ or []
        if not (isinstance(batch, str) and batch == "own"):
            trained = categories[: self.module.n_batches]  # later ones: a query's, with no embedding
            # matched by name as the batch column is: the integer 1 is the batch "1" (or "1.0")
            code = (
                (trained.index(batch) if batch in trained else -1)
                if isinstance(batch, str)
                else int(category_codes(pd.Series([batch]), trained)[0])
            )
            if code < 0:
                raise ValueError(
                    f"batch {batch!r} is not one of the batches the model was trained on {trained}"
                    " (or pass batch='own')"
                )
            return np.full(adata.n_obs, code, dtype=np.int64)
        key = self.setup_args_[SETUP_ARGS.BATCH_KEY]
        if isinstance(adata, ShardedAnnData):
            if adata.batch_codes is None:
                raise ValueError(
                    "batch='own' reads each cell's batch from the shards, which were read without one: "
                    f"read them with ShardedAnnData(..., batch_key={key!r})"
                )
            labels = pd.Series(adata.batch_categories, dtype=object).reindex(adata.batch_codes)
        else:
            check_obs_key(adata, key, "batch_key")
            labels = adata.obs[key]
        codes = category_codes(labels.reset_index(drop=True), categories)
        return np.where(codes < self.module.n_batches, codes, -1)  # batches the model never saw: none

    def _passes(
        self,
        adata: AnnData | ShardedAnnData,
        batch_size: int | None,
        attention_layers: list[int],
        indices: np.ndarray | None = None,
        batch: str | None = None,
    ) -> Iterator[tuple[np.ndarray, TokenizedCells, torch.Tensor, list[torch.Tensor]]]:
        """Yield ``(cell indices, tokens, hidden states, attention maps of attention_layers)``.

        ``indices`` (shards only) restricts the pass to those cells; ``batch`` sets the
        ``[BATCH]`` token (see :meth:`get_latent_representation`).
        """
        batch_codes = self._batch_inputs(adata, batch)
        batch_size = self._check_batch_size(batch_size)
        column_to_gene = torch.as_tensor(self._column_to_gene(adata))
        with self._inference() as device:
            column_to_gene = column_to_gene.to(device)
            minibatches = (
                adata.iter_minibatches(batch_size, indices)
                if isinstance(adata, ShardedAnnData)
                else iter_minibatches(adata, layer=self.setup_args_[SETUP_ARGS.LAYER], batch_size=batch_size)
            )
            for idx, x in minibatches:
                tokens = self.module.tokenize(x.to(device), column_to_gene)
                masked = torch.full((len(idx), self.module.n_phenotypes), -1, dtype=torch.long, device=device)
                batches = torch.as_tensor(batch_codes[idx], device=device)
                if attention_layers:
                    hidden, maps = self.module.encode_with_attention(
                        tokens, masked, attention_layers, batch_inputs=batches
                    )
                else:
                    hidden, maps = self.module.encode(tokens, masked, batch_inputs=batches), []
                yield idx, tokens, hidden, maps

    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        *,
        pooling: Pooling | None = None,
        batch_size: int | None = None,
        batch: str | None = None,
        space: Literal["cell", "aligned", "aligned_other"] = "cell",
    ) -> np.ndarray:
        """Cell embeddings ``(n_cells, d_model)``, or either side of an alignment.

        Phenotype tokens are masked, so the embedding does not depend on the labels. A cell gets
        the same embedding whatever the minibatch it is in.

        Parameters
        ----------
        adata
            AnnData with the model's count layer; default the AnnData the model was built on.
            It need not be set up and is not modified.
        pooling
            ``"profile"``: the ``[PROFILE]`` token's output (default for models with it); ``"cls"``:
            the ``[CLS]`` token's output (default without it); ``"mean"``: mean over expressed-gene
            tokens. On pbmc68k the ``[PROFILE]`` output carries far more cell-type information
            (kNN probe 0.84-0.88, as 50 principal components: 0.84) than ``[CLS]`` (0.33-0.36).
        batch_size
            Cells per minibatch; default ``sctransformer.settings.batch_size``.
        batch
            For models with a ``[BATCH]`` token (``batch_correction="token"`` or ``"both"``):
            ``None`` (default) feeds "no batch", which the model was also trained with; a batch
            name feeds that batch to every cell (a reference batch; a value of the batch column,
            such as the integer ``1``, is matched by its name, ``"1"``); ``"own"`` feeds each cell's
            own batch from the batch column (batches the model never saw: "no batch").
        space
            ``"cell"``: the cell embedding; for models with ``align_obsm``, ``"aligned"``: the
            cell embedding projected into the shared space (L2-normalised, ``align_dim`` wide);
            ``"aligned_other"``: the second modality's vectors (``adata.obsm[align_obsm]``)
            mapped into that space, no counts needed.
        """
        if space not in ("cell", "aligned", "aligned_other"):
            raise ValueError(f"space must be 'cell', 'aligned' or 'aligned_other', got {space!r}")
        if space != "cell":
            return self._aligned(adata, space, pooling, batch_size, batch)
        pooling = self.default_pooling if pooling is None else pooling
        if pooling not in ("cls", "mean", "profile"):
            raise ValueError(f"pooling must be 'profile', 'cls' or 'mean', got {pooling!r}")
        if pooling == "profile" and not self.module.cell_profile:
            raise ValueError("pooling='profile' needs a model with the [PROFILE] token (cell_profile=True)")
        adata = self._inference_adata(adata)
        out = np.zeros((adata.n_obs, self.hyperparameters_["d_model"]), dtype=np.float32)
        for idx, tokens, hidden in self._forward(adata, batch_size, batch=batch):
            out[idx] = self.module.pool(hidden, tokens, pooling).float().cpu().numpy()
        return out

    def _aligned(
        self,
        adata: AnnData | None,
        space: str,
        pooling: Pooling | None,
        batch_size: int | None,
        batch: str | None,
    ) -> np.ndarray:
        """Either side of the alignment in the shared space, see :meth:`get_latent_representation`."""
        if self.module.align_dims is None:
            raise ValueError(f"space={space!r} needs a model aligned with a second modality (align_obsm=...)")
        if pooling is not None and pooling != self.default_pooling:
            raise ValueError("the aligned spaces project the default cell embedding; leave pooling=None")
        if space == "aligned":
            adata = self._inference_adata(adata)
            out = np.zeros((adata.n_obs, self.module.align_dims[1]), dtype=np.float32)
            for idx, tokens, hidden in self._forward(adata, batch_size, batch=batch):
                out[idx] = self.module.aligned(hidden, tokens).cpu().numpy()
            return out
        batch_size = self._check_batch_size(batch_size)
        if batch is not None:
            raise ValueError(
                "space='aligned_other' maps the second modality, which has no [BATCH] token; leave batch=None"
            )
        adata = self.adata if adata is None else adata
        key = self.hyperparameters_["align_obsm"]
        if adata is None or not isinstance(adata, AnnData):
            raise ValueError("space='aligned_other' reads adata.obsm; pass an AnnData")
        _check_align_input(adata, key, self.module.align_dims[0])
        values = adata.obsm[key]
        values = np.asarray(
            values.to_numpy() if isinstance(values, pd.DataFrame) else values, dtype=np.float32
        )
        device = next(self.module.parameters()).device
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.inference_mode():
                blocks = [
                    self.module.aligned_other(
                        torch.as_tensor(values[start : start + batch_size], device=device)
                    )
                    for start in range(0, max(len(values), 1), batch_size)
                ]
                return torch.cat(blocks).cpu().numpy()
        finally:
            self.module.train(was_training)

    @property
    def attention(self) -> AttentionBackend:
        """The attention backend (see the ``attention`` parameter); settable, e.g. after :meth:`load`.

        Examples
        --------
        >>> model.attention = "sdpa"  # padded attention, on any device
        """
        return self.module.attention

    @attention.setter
    def attention(self, backend: AttentionBackend) -> None:
        check_attention(backend)
        self.module.attention = backend
        self.hyperparameters_["attention"] = backend

    @property
    def default_pooling(self) -> Pooling:
        """``"profile"`` for models with the ``[PROFILE]`` token, else ``"cls"``."""
        return "profile" if self.module.cell_profile else "cls"

    def _phenotype_logits(
        self,
        adata: AnnData | ShardedAnnData,
        keys: list[str],
        batch_size: int | None,
        indices: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Uncalibrated logits ``(n_cells, n_categories)`` of each phenotype in ``keys``.

        With ``indices`` (shards only), only those rows are computed (the others stay zero). Warns
        of cells without a count in the model's genes, whose predictions say nothing about them.
        """
        slots = {key: list(self.phenotype_categories_).index(key) for key in keys}
        logits = {
            key: np.zeros((adata.n_obs, len(self.phenotype_categories_[key])), np.float32) for key in keys
        }
        n_empty = 0
        for idx, tokens, hidden in self._forward(adata, batch_size, indices):
            out = self.module.phenotype_logits(hidden, tokens)
            for key, slot in slots.items():
                logits[key][idx] = out[slot].float().cpu().numpy()
            n_empty += int((~tokens.is_token.any(1)).sum())
        if n_empty:
            warnings.warn(
                f"{n_empty} cells have no counts in the model's genes: their predicted phenotypes and "
                "confidences come from the model's prior alone and say nothing about those cells",
                UserWarning,
                stacklevel=3,
            )
        return logits

    def predict(
        self,
        adata: AnnData | None = None,
        *,
        phenotype: str | list[str] | None = None,
        min_confidence: float | None = None,
        calibrated: bool = True,
        batch_size: int | None = None,
        return_probabilities: bool = False,
    ) -> pd.DataFrame | tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
        """Predict phenotypes from the masked phenotype tokens.

        Parameters
        ----------
        adata
            AnnData with the model's count layer; default the model's own. Not modified.
        phenotype
            Phenotype key(s) to predict; default all of the model's.
        min_confidence
            Cells whose top probability is below this get the label ``"unknown"`` (a category
            added after the model's); must be in (0, 1).
        calibrated
            Divide the logits by the temperature fitted by :meth:`calibrate` (after training, on
            the validation cells), so that confidences are calibrated; the labels do not change.
        batch_size
            Cells per minibatch.
        return_probabilities
            Also return, per phenotype, a cells x categories DataFrame of probabilities.

        Returns
        -------
        DataFrame indexed like ``adata.obs`` with a categorical column ``<key>`` (predicted label)
        and ``<key>_confidence`` (its probability) per phenotype; with ``return_probabilities``,
        also a dict of probability DataFrames (the model's categories, without ``"unknown"``).
        """
        if min_confidence is not None and not (isinstance(min_confidence, Real) and 0 < min_confidence < 1):
            raise ValueError(
                f"min_confidence must be a probability in (0, 1), e.g. 0.5, got {min_confidence!r}"
            )
        keys = self._phenotype_selection(phenotype)
        clashing = [
            k for k in keys if min_confidence is not None and KEYS.UNKNOWN in self.phenotype_categories_[k]
        ]
        if clashing:
            raise ValueError(
                f"phenotypes {clashing} have a class named {KEYS.UNKNOWN!r}, the label min_confidence gives "
                "cells below it, so abstentions would count as that class; predict without min_confidence "
                "or rename the class and train again"
            )
        uncalibrated = [key for key in keys if key not in self.temperatures_]
        if calibrated and min_confidence is not None and uncalibrated:
            warnings.warn(
                f"no calibration temperature for {uncalibrated} (trained with calibrate=False, without "
                "labelled validation cells, or dropped by a later train()): their confidences are "
                "uncalibrated (temperature 1), which min_confidence cuts at another point; fit one with "
                "model.calibrate(adata=..., indices=...) on labelled cells the model was not trained on",
                UserWarning,
                stacklevel=2,
            )
        adata = self._inference_adata(adata)
        logits = self._phenotype_logits(adata, keys, batch_size)
        table = pd.DataFrame(index=adata.obs_names.copy())
        frames = {}
        for key in keys:
            temperature = self.temperatures_.get(key, 1.0) if calibrated else 1.0
            p = torch.as_tensor(logits[key] / temperature).softmax(-1).numpy()
            cats = list(self.phenotype_categories_[key])
            codes = p.argmax(1)
            confidence = p.max(1)
            if min_confidence is not None:
                cats = [*cats, KEYS.UNKNOWN]
                codes = np.where(confidence < min_confidence, cats.index(KEYS.UNKNOWN), codes)
            table[key] = pd.Categorical.from_codes(codes, categories=cats)
            table[f"{key}_confidence"] = confidence
            frames[key] = pd.DataFrame(p, index=table.index, columns=self.phenotype_categories_[key])
        return (table, frames) if return_probabilities else table

    def calibrate(
        self,
        adata: AnnData | None = None,
        *,
        indices: np.ndarray | None = None,
        phenotype: str | list[str] | None = None,
        n_bins: int = N_CALIBRATION_BINS,
        batch_size: int | None = None,
    ) -> pd.DataFrame:
        """Fit a softmax temperature per phenotype on labelled cells (temperature scaling).

        The temperature ``T`` minimises the negative log-likelihood of the true labels under
        ``softmax(logits / T)`` within ``TEMPERATURE_RANGE`` (0.05 to 20; a warning is logged when
        it ends on either limit); it changes confidences, never the predicted labels. Where every
        cell is predicted correctly no temperature minimises it (the likelihood rises as ``T``
        falls to 0): ``T`` stays 1, and a warning is logged. :meth:`train` calls this on the validation cells;
        :meth:`predict` then uses the fitted temperatures.

        Parameters
        ----------
        adata
            Labelled AnnData; default the model's own, restricted to its validation cells.
        indices
            Cells of ``adata`` to fit on; default all (or the validation cells of the model's own).
        phenotype
            Phenotype key(s); default all of the model's that ``adata`` has labels for.
        n_bins
            Confidence bins of the expected calibration error (ECE) that is reported.
        batch_size
            Cells per minibatch.

        Returns
        -------
        One row per phenotype: ``temperature``, ``n_cells`` and, before and after scaling, the
        negative log-likelihood (``nll_*``) and the ECE (``ece_*``) on the fitting cells (an
        optimistic estimate: judge calibration on held-out cells). Also stored in
        ``model.calibration_`` and saved with the model.

        Raises
        ------
        ValueError
            Where no cell of ``adata`` has a label of the model's phenotypes in a category it knows
            (e.g. the labels are under another column name); checked before the forward pass. On
            the model's own cells without labels, an empty table is returned.
        """
        from scipy.optimize import minimize_scalar

        n_bins = positive_int(n_bins, "n_bins")  # before the forward pass
        keys = self._phenotype_selection(phenotype)
        own = adata is None  # the model's cells: labels only as registered, not any column of the name
        if adata is None:
            if self.adata is None and self.shards_ is None:
                raise ValueError("the model has no AnnData attached; pass a labelled adata=...")
            adata = self.adata if self.adata is not None else self.shards_
            if indices is None:
                indices = self.validation_indices
                if indices is None or len(indices) == 0:
                    raise ValueError(
                        "the model has no validation cells to calibrate on; pass a labelled adata= "
                        "(and indices=) or train with train_size < 1"
                    )
                # an AnnData may have been filtered in place since the split (shards cannot be)
                indexed = getattr(self, "_indexed_cells", None)
                if (
                    indexed is not None
                    and isinstance(adata, AnnData)
                    and _cells_fingerprint(adata) != indexed
                ):
                    raise ValueError(
                        "the model's cells changed since they were split (e.g. filtered in place), so its "
                        "validation_indices no longer point at its validation cells; calibrate on labelled "
                        "cells the model was not trained on: model.calibrate(adata=..., indices=...)"
                    )
        adata = self._inference_adata(adata)
        if indices is not None:
            indices = np.sort(cell_positions(indices, adata.n_obs, "indices"))
        # the labels first: cells without usable ones are refused before the forward pass
        if isinstance(adata, ShardedAnnData):
            labelled = [key for key in keys if key in adata.phenotype_codes]
            rows_of = np.arange(adata.n_obs) if indices is None else indices
            all_codes = {
                key: category_codes(
                    pd.Series(adata.phenotype_categories[key], dtype=object)
                    .reindex(adata.phenotype_codes[key][rows_of])
                    .reset_index(drop=True),
                    self.phenotype_categories_[key],
                )
                for key in labelled
            }
            columns = list(adata.phenotype_codes)
        else:
            if indices is not None:
                adata = adata[indices]
            labelled = [key for key in keys if key in adata.obs and (not own or self._labels_registered(key))]
            if not own:  # the model's own cells were registered with its categories (and warned about)
                _warn_unseen_categories(adata, self.phenotype_categories_, labelled)  # left out of the fit
            all_codes = {
                key: category_codes(adata.obs[key], self.phenotype_categories_[key]) for key in labelled
            }
            columns = [c for c in adata.obs.columns if not str(c).startswith("_scvi_")]  # the user's own
        if phenotype is not None and len(labelled) < len(keys):
            missing = sorted(set(keys) - set(labelled))
            raise KeyError(f"the cells have no labels of {missing} to calibrate against")
        for key in [key for key in labelled if not (all_codes[key] >= 0).any()]:
            if phenotype is not None:  # asked for by name: not silently left as it was
                raise ValueError(
                    f"no cell has a label of {key!r} that the model knows (its categories: "
                    f"{self.phenotype_categories_[key][:10]}); nothing to calibrate its temperature on"
                )
            logger.info(
                "no labelled cells of %r to calibrate on; its temperature is left as it was (%s)",
                key,
                self.temperatures_.get(key, "none: 1"),
            )
            labelled.remove(key)
        if not labelled and own:  # the model's cells, registered without labels: nothing to fit, as before
            return pd.DataFrame()
        if not labelled:  # cells given for their labels: a wrong column name, say
            raise ValueError(
                f"no cell has a label the model knows of its phenotypes {keys} (the cells' columns: "
                f"{columns[:20]}), so there is nothing to calibrate on; give the labels the model's column "
                "names and categories, e.g. adata.obs[<model's key>] = adata.obs[<your column>]"
            )
        if isinstance(adata, ShardedAnnData):
            logits = self._phenotype_logits(adata, labelled, batch_size, rows_of)
            logits = {key: value[rows_of] for key, value in logits.items()}
        else:
            logits = self._phenotype_logits(adata, labelled, batch_size)
        rows = {}
        for key in labelled:
            codes = all_codes[key]
            known = codes >= 0
            z = torch.as_tensor(logits[key][known], dtype=torch.float64)
            target = torch.as_tensor(codes[known])

            def nll(log_t: float, z: torch.Tensor = z, target: torch.Tensor = target) -> float:
                return float(torch.nn.functional.cross_entropy(z / np.exp(log_t), target))

            if bool((z.argmax(-1) == target).all()):
                # every cell right: the likelihood keeps rising as the temperature falls to 0, so the
                # data say nothing about calibration but that the cells are easy
                logger.warning(
                    "all %d calibration cells of %r are predicted correctly, so no temperature can be fitted "
                    "to them (the fit would run to its lower bound and make every prediction near-certain); "
                    "its temperature stays 1. Calibrate on more, or harder, labelled cells: "
                    "model.calibrate(adata=..., indices=...)",
                    int(known.sum()),
                    key,
                )
                temperature, fitted_nll = 1.0, nll(0.0)
            else:
                bounds = (np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1]))
                fit = minimize_scalar(nll, bounds=bounds, method="bounded")
                temperature, fitted_nll = float(np.exp(fit.x)), float(fit.fun)
                if min(abs(fit.x - bound) for bound in bounds) < 1e-3:
                    logger.warning(
                        "the temperature of %r reached the end of its range %s (%.3g, fitted on %d cells); "
                        "its predictions may still be over- or under-confident",
                        key,
                        TEMPERATURE_RANGE,
                        temperature,
                        int(known.sum()),
                    )

            def ece(t: float, z: torch.Tensor = z, target: torch.Tensor = target) -> float:
                p = (z / t).softmax(-1)
                confidence, predicted = p.max(-1)
                return expected_calibration_error(
                    confidence.numpy(), (predicted == target).numpy(), n_bins=n_bins
                )

            rows[key] = {
                "temperature": temperature,
                "n_cells": int(known.sum()),
                "nll_before": nll(0.0),
                "nll_after": fitted_nll,
                "ece_before": ece(1.0),
                "ece_after": ece(temperature),
            }
            self.temperatures_[key] = temperature
            logger.info(
                "temperature of %r: %.2f (ECE %.3f -> %.3f on %d cells)",
                key,
                temperature,
                rows[key]["ece_before"],
                rows[key]["ece_after"],
                rows[key]["n_cells"],
            )
        self.calibration_.update(rows)
        return pd.DataFrame.from_dict(rows, orient="index")

    def _phenotype_selection(self, phenotype: str | list[str] | None) -> list[str]:
        if not self.phenotype_categories_:
            raise ValueError(
                "the model has no phenotype keys to predict; set up the AnnData with "
                "phenotype_keys=[...] and train a model on it"
            )
        keys = (
            list(self.phenotype_categories_)
            if phenotype is None
            else ([phenotype] if isinstance(phenotype, str) else list(phenotype))
        )
        if not keys:
            raise ValueError(
                f"phenotype is empty; name at least one of {list(self.phenotype_categories_)}, or pass "
                "None for all of them"
            )
        unknown = [k for k in keys if k not in self.phenotype_categories_]
        if unknown:
            raise KeyError(
                f"phenotype {unknown} not modelled; the model predicts {list(self.phenotype_categories_)}"
            )
        return keys

    def get_gene_embedding(self) -> pd.DataFrame:
        """The gene-identity embedding table, genes x ``d_model``, indexed by gene identifier."""
        weights = self.module.gene_embedding.weight.detach().float().cpu().numpy()
        return pd.DataFrame(weights, index=self.vocabulary_.index.copy())

    # ------------------------------------------------------------------ persistence
    @property
    def history(self) -> dict[str, pd.DataFrame]:
        """Per-epoch training curves, one DataFrame indexed by epoch per ``<metric>_<train|validation>``."""
        return {name: frame.astype(float) for name, frame in (self.history_ or {}).items()}

    def _state(self) -> dict[str, Any]:
        """Everything but the weights, as JSON-serialisable values."""
        history = {
            name: {"epoch": [int(i) for i in frame.index], "value": [float(v) for v in frame.iloc[:, 0]]}
            for name, frame in self.history.items()
        }
        return {
            "model_class": type(self).__name__,
            "sctransformer_version": __version__,
            "torch_version": torch.__version__,
            "hyperparameters": self.hyperparameters_,
            "setup_args": self.setup_args_,
            "vocabulary": self.vocabulary_.genes,
            "phenotype_categories": self.phenotype_categories_,
            # the phenotypes whose labels of the attached cells are training targets (a query's may
            # be none: load_query_data(phenotype_keys=[])); loading onto cells registers only these
            # (with no cells attached, those of the model loaded: kept as they were saved)
            "label_keys": getattr(self, "_label_keys", None)
            if self.adata is None
            else [key for key in self.phenotype_categories_ if self._labels_registered(key)],
            "batch_categories": self.batch_categories_,
            "temperatures": self.temperatures_,
            "calibration": self.calibration_,
            "is_trained": bool(self.is_trained_),
            "train_settings": getattr(self, "train_settings_", None),
            "history": history,
            "indices": {
                name: None
                if getattr(self, f"{name}_indices_", None) is None
                else [int(i) for i in getattr(self, f"{name}_indices_")]
                for name in ("train", "validation", "test")
            },
            # which cells the indices point into (as split, not as the AnnData may be now): restored
            # only onto those cells (see _from_state)
            "indexed_cells": getattr(self, "_indexed_cells", None),
        }

    def save(self, dir_path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Save weights (safetensors) and everything else (JSON) into ``dir_path``.

        The directory is written beside the target and renamed into place, so an interrupted save
        leaves any previous model there intact. Nothing is pickled.

        Parameters
        ----------
        dir_path
            Directory to write ``model.safetensors`` and ``model.json`` into; created if missing.
        overwrite
            Replace the model already saved in ``dir_path``. A non-empty directory that does not
            hold a saved model is always refused (the save replaces the whole directory).
        """
        write_model_dir(dir_path, self._state(), self.module.state_dict(), overwrite=overwrite)

    @classmethod
    def _read(cls, source: str | os.PathLike | GeneTransformer) -> tuple[dict, dict[str, torch.Tensor]]:
        """State and weights of a saved model directory or of an in-memory model."""
        if isinstance(source, GeneTransformer):
            weights = {k: v.detach().cpu().clone() for k, v in source.module.state_dict().items()}
            return source._state(), weights
        if not isinstance(source, str | os.PathLike):
            raise TypeError(
                f"the reference must be a model directory or a GeneTransformer, got {type(source).__name__}"
            )
        state, weights = read_model_dir(source)
        if state.get("model_class") != cls.__name__:
            raise ValueError(f"{source} holds a {state.get('model_class')!r}, not a {cls.__name__}")
        _check_state(state, str(source))  # a hand-edited model.json: refused before it is used
        return state, weights

    @classmethod
    def _from_state(
        cls,
        state: dict[str, Any],
        weights: dict[str, torch.Tensor],
        *,
        adata: AnnData | None,
        accelerator: str,
        source: str,
        phenotype_categories: dict[str, list[str]] | None = None,
        batch_categories: list[str] | None = None,
        setup_again: bool = False,
        extend_batches: bool = False,
        label_keys: list[str] | None = None,
    ) -> GeneTransformer:
        """Rebuild a model; phenotype keys beyond the saved ones get new, freshly initialised slots.

        ``adata`` is set up with the saved settings if it is not set up, or if ``setup_again``;
        only once the weights have loaded, so that a model that fails to load leaves it untouched.
        With ``extend_batches`` (a query), the model's batches are those of that setup: the
        reference's, extended by the new ones. ``label_keys`` are the phenotype columns of
        ``adata`` registered as labels (training targets); default every phenotype key of the
        model that ``adata.obs`` has.
        """
        _check_accelerator(accelerator)
        vocabulary = GeneVocabulary(state["vocabulary"])
        saved_categories = {k: list(v) for k, v in state["phenotype_categories"].items()}
        categories = phenotype_categories or saved_categories
        batch_categories = batch_categories or state.get("batch_categories")
        setup_args = state["setup_args"]
        if adata is not None:
            if not isinstance(adata, AnnData):
                raise TypeError(f"adata must be an AnnData, got {type(adata).__name__}")
            gene_key = setup_args[SETUP_ARGS.GENE_KEY]
            vocabulary.column_to_gene(
                gene_identifiers(adata, gene_key, model=True),
                fix=functools.partial(model_gene_fix, adata, gene_key, vocabulary.index),
            )
            _check_align_width(adata, state)
        hyperparameters = dict(state["hyperparameters"])
        if "n_unexpressed" in hyperparameters:  # saved before query tokens replaced the is-zero head
            if hyperparameters.pop("n_unexpressed") > 0:
                warnings.warn(
                    f"{source} was saved with an is-zero head, which query tokens have replaced; its "
                    "weights are dropped (create a model with expression_queries=... to predict "
                    "unexpressed genes)",
                    stacklevel=3,
                )
                weights = {k: v for k, v in weights.items() if not k.startswith("is_zero_head.")}
            hyperparameters.setdefault("expression_queries", 0)
        state = state | {"hyperparameters": hyperparameters}
        model = cls.__new__(cls)
        model._build(hyperparameters, vocabulary, categories, setup_args, None, batch_categories)
        new_slots = [i for i, key in enumerate(categories) if key not in saved_categories]
        if list(categories)[: len(saved_categories)] != list(saved_categories):
            raise ValueError("internal error: new phenotype slots must come after the saved ones")
        try:
            missing, unexpected = model.module.load_state_dict(weights, strict=False)
        except RuntimeError as err:  # shape mismatch
            raise ValueError(f"the weights in {source} do not fit the saved hyper-parameters: {err}") from err
        fresh = tuple(f"phenotype_{part}.{i}." for i in new_slots for part in ("embeddings", "heads"))
        # models saved before gene scales existed order tokens by count: scales of one
        bad_missing = [k for k in missing if not k.startswith(fresh) and k != "tokenizer.gene_scale"]
        if unexpected or bad_missing:
            raise ValueError(
                f"the weights in {source} do not fit the saved hyper-parameters (missing "
                f"{bad_missing[:5]}, unexpected {list(unexpected)[:5]}); the model files are inconsistent"
            )
        summary = model._model_summary_string  # BaseModelClass.__init__ blanks it
        # the saved attributes, read before adata is set up (a failure then leaves it untouched) and
        # set after BaseModelClass.__init__, which resets them
        temperatures = {k: float(v) for k, v in (state.get("temperatures") or {}).items()}
        calibration = {k: dict(v) for k, v in (state.get("calibration") or {}).items()}
        history = {
            name: pd.DataFrame({name: h["value"]}, index=pd.Index(h["epoch"], name="epoch"))
            for name, h in state["history"].items()
        }
        # the split's cell positions mean something only for the cells trained on: not for a query
        recorded = state.get("indexed_cells")
        same_cells = adata is None or (
            _cells_fingerprint(adata) == recorded
            if recorded is not None
            else all(idx is None or max(idx, default=-1) < adata.n_obs for idx in state["indices"].values())
        )
        indices = {
            name: None if idx is None or not same_cells else np.asarray(idx)
            for name, idx in state["indices"].items()
        }
        if adata is not None:  # the model loads: now adata may be set up
            if setup_again or cls._registered_manager(adata) is None:
                batch_key = setup_args[SETUP_ARGS.BATCH_KEY]
                cls._register(
                    adata,
                    layer=setup_args[SETUP_ARGS.LAYER],
                    batch_key=batch_key if batch_key in adata.obs else None,
                    phenotype_keys=[
                        k for k in categories if k in adata.obs and (label_keys is None or k in label_keys)
                    ],
                    gene_key=setup_args[SETUP_ARGS.GENE_KEY],
                    phenotype_categories=categories,
                    batch_categories=batch_categories,
                    align_obsm=_present_obsm(adata, hyperparameters.get("align_obsm")),
                )
            BaseModelClass.__init__(model, adata)
            if extend_batches:
                model.batch_categories_ = _batch_categories(model.adata_manager) or batch_categories
        else:
            BaseModelClass.__init__(model, registry={"setup_args": setup_args, "field_registries": {}})
        model._model_summary_string = summary
        model.init_params_ = {"kwargs": {}, "non_kwargs": dict(state["hyperparameters"])}
        model.is_trained_ = state["is_trained"]
        model.train_settings_ = state.get("train_settings")
        model.temperatures_ = temperatures
        model.calibration_ = calibration
        model.history_ = history
        for name, idx in indices.items():
            setattr(model, f"{name}_indices_", idx)
        # saved again with the indices: the cells they point into
        model._indexed_cells = (
            recorded if adata is None else (_cells_fingerprint(adata) if same_cells else None)
        )
        model._label_keys = state.get("label_keys") if adata is None else None  # and with the labels
        model.module.eval()
        model.to_device(
            "cuda"
            if accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())
            else "cpu"
        )
        return model

    @classmethod
    def load(
        cls, dir_path: str | os.PathLike, *, adata: AnnData | None = None, accelerator: str = "cpu"
    ) -> GeneTransformer:
        """Load a model saved with :meth:`save`.

        Parameters
        ----------
        dir_path
            Directory written by :meth:`save`.
        adata
            AnnData to attach (for further training or as the default of the getters). Its genes
            are aligned to the saved vocabulary by identifier; genes outside it get no token but
            still count towards each cell's library size (the total counts of the whole cell, by
            which its values are normalised). If it is not set up, it is set up with the saved
            settings (phenotype columns it lacks are treated as unknown, and so are, with a warning, cells
            in categories the model does not know). The training split (``train_indices`` etc.) is restored only if
            these are the cells the model was saved with (same names, same order).
        accelerator
            ``"cpu"``, ``"cuda"`` or ``"auto"``.
        """
        if not isinstance(dir_path, str | os.PathLike):
            raise TypeError(f"dir_path must be a directory path, got {type(dir_path).__name__}")
        state, weights = cls._read(dir_path)
        manager = cls._registered_manager(adata) if isinstance(adata, AnnData) else None
        differences = [] if manager is None else cls._setup_differences(adata, manager, state)
        if differences:
            warnings.warn(
                f"adata was set up with other settings than the saved model ({'; '.join(differences)}); "
                "it is set up again with the model's",
                UserWarning,
                stacklevel=2,
            )
        extra = [] if manager is None else _extra_phenotype_keys(manager, state)
        if extra:  # kept registered (a new model of adata takes them), but this one cannot use them
            warnings.warn(
                f"adata was set up with phenotype_keys {extra}, which the model has no tokens or heads for: "
                "their labels are ignored by train() and predict(); to train the model on them, use "
                "GeneTransformer.load_query_data(adata, dir_path), which adds them",
                UserWarning,
                stacklevel=2,
            )
        # an aligned model registers its second modality with the counts, as creating it does (where
        # the cells have it), and no other model's
        align_obsm = _present_obsm(adata, state["hyperparameters"].get("align_obsm"))
        if isinstance(adata, AnnData):
            label_keys = state.get("label_keys")
            _warn_unseen_categories(
                adata,
                state["phenotype_categories"],
                state["phenotype_categories"] if label_keys is None else label_keys,
            )
        unaligned = (
            manager is not None and manager.registry["setup_args"].get(SETUP_ARGS.ALIGN_OBSM) != align_obsm
        )
        return cls._from_state(
            state,
            weights,
            adata=adata,
            accelerator=accelerator,
            source=str(dir_path),
            setup_again=bool(differences) or unaligned,
            label_keys=state.get("label_keys"),
        )

    @staticmethod
    def _setup_differences(adata: AnnData, manager: AnnDataManager, state: dict[str, Any]) -> list[str]:
        """How the registration of ``adata`` differs from a saved model's settings (empty if it does not)."""
        saved, registered = state["setup_args"], manager.registry["setup_args"]
        differences = [
            f"{key}={registered.get(key)!r}, the model's {saved.get(key)!r}"
            for key in (SETUP_ARGS.LAYER, SETUP_ARGS.GENE_KEY, SETUP_ARGS.BATCH_KEY)  # setup_anndata's
            if registered.get(key) != saved.get(key)
        ]
        batches = state.get("batch_categories")
        mapping = _batch_categories(manager)
        if batches and mapping is not None:
            if mapping[: len(batches)] != list(batches):
                differences.append(f"batch codes {mapping[: len(batches)]}, the model's {list(batches)}")
        label_keys = state.get("label_keys")  # None: every phenotype with a column is a label
        for key, categories in state["phenotype_categories"].items():
            is_label = label_keys is None or key in label_keys
            if is_label and key in adata.obs and phenotype_registry_key(key) not in manager.data_registry:
                differences.append(f"phenotype {key!r} in .obs but not registered")
            elif not is_label and phenotype_registry_key(key) in manager.data_registry:
                differences.append(
                    f"phenotype {key!r} registered, but the model trains on none of its labels"
                )
            elif _registered_codes_differ(adata, key, categories):
                differences.append(f"codes of {key!r}")
        return differences

    @classmethod
    def load_query_data(
        cls,
        adata: AnnData,
        reference: str | os.PathLike | GeneTransformer,
        *,
        phenotype_keys: list[str] | None = None,
        min_gene_overlap: float = 0.5,
        accelerator: str = "cpu",
    ) -> GeneTransformer:
        """A reference model attached to new cells, ready for prediction or fine-tuning (scArches-style).

        The query keeps the reference's gene vocabulary, bin definitions, phenotype categories,
        weights and calibration (until :meth:`train` changes the weights, see its ``calibrate``);
        its genes are aligned to the vocabulary by identifier and its batches are appended to the
        reference's. Phenotype keys the reference does not have
        (e.g. ``cell_type`` on a model pre-trained without labels) get new token slots and heads,
        to be trained with :meth:`train` (e.g. ``freeze="backbone"``). A new slot's token (its
        ``[MASK]`` until trained, and ``freeze="backbone"`` trains the phenotype tables) is read by
        every cell, so embeddings of the query model move a little from the reference's: embed the
        reference cells again with the query model before comparing them with the query's.

        Parameters
        ----------
        adata
            Query cells with counts in the reference's layer (not a view). It is set up again
            with the reference's settings; labels of a reference phenotype (see
            ``phenotype_keys``) in categories the reference does not know are treated as unknown
            (a warning lists them), so predictions always use the reference's categories.
        reference
            Directory of a saved model, or a model.
        phenotype_keys
            The query's ``.obs`` columns used as labels: :meth:`train` fits the phenotype heads and
            the calibration to them. Keys the reference lacks get new slots; reference keys left
            out are still predicted, and every query cell is unlabelled for them (also where
            ``adata.obs`` has a column of that name). Each key given must be a column of
            ``adata.obs`` (a :class:`ValueError` names those that are not). ``[]`` uses none of
            the query's labels: a query to annotate that keeps its labels to evaluate the
            predictions against. Default: the phenotype keys ``adata`` was set up with, if it was
            set up, plus every reference key that ``adata.obs`` has a column of (such a column
            found by its name alone is logged as a warning where it labels cells: predictions
            evaluated against labels the model was trained on are optimistic); a reference key
            without a column is unknown for every query cell (a query to annotate).
        min_gene_overlap
            Refuse the query if the genes it shares with the vocabulary are fewer than this share
            of the smaller of the two gene sets (query genes, vocabulary).
        accelerator
            ``"cpu"``, ``"cuda"`` or ``"auto"``.

        Returns
        -------
        The model; ``model.gene_coverage_`` records the alignment.
        """
        if not isinstance(adata, AnnData):
            raise TypeError(f"adata must be an AnnData, got {type(adata).__name__}")
        _check_accelerator(accelerator)  # before adata is registered
        if not (isinstance(min_gene_overlap, Real) and 0 < min_gene_overlap <= 1):
            raise ValueError(f"min_gene_overlap must be in (0, 1], got {min_gene_overlap!r}")
        if adata.is_view:
            raise ValueError("adata is a view; call adata = adata.copy() first")
        state, weights = cls._read(reference)
        source = "the reference model" if isinstance(reference, GeneTransformer) else str(reference)
        setup_args = state["setup_args"]
        _check_align_width(adata, state)
        vocabulary = GeneVocabulary(state["vocabulary"])
        gene_key = setup_args[SETUP_ARGS.GENE_KEY]
        ids = gene_identifiers(adata, gene_key, model=True)
        fix = functools.partial(model_gene_fix, adata, gene_key, vocabulary.index)
        n_shared = int((vocabulary.column_to_gene(ids, fix=fix) >= 0).sum())
        coverage = {
            "n_shared": n_shared,
            "n_query_genes": len(ids),
            "n_vocabulary": len(vocabulary),
            "share_of_query": n_shared / len(ids),
            "share_of_vocabulary": n_shared / len(vocabulary),
        }
        if n_shared < min_gene_overlap * min(len(ids), len(vocabulary)):
            raise ValueError(
                f"the query shares {n_shared} genes with the reference's vocabulary of "
                f"{len(vocabulary)} genes ({coverage['share_of_query']:.0%} of its {len(ids)} genes; "
                f"query ids look like {list(ids[:3])}, the vocabulary's like {vocabulary.genes[:3]}); "
                f"at least min_gene_overlap={min_gene_overlap} of the smaller gene set is needed. "
                "The reference read its genes from "
                f"{'adata.var_names' if setup_args[SETUP_ARGS.GENE_KEY] is None else repr(setup_args[SETUP_ARGS.GENE_KEY]) + ' in adata.var'}"
                "; give the query the same kind of identifier there (symbols or Ensembl ids) "
                "or lower min_gene_overlap"
            )
        logger.info(
            "query shares %d genes with the reference (%.0f%% of the query's, %.0f%% of the vocabulary)",
            n_shared,
            100 * coverage["share_of_query"],
            100 * coverage["share_of_vocabulary"],
        )
        saved = {k: list(v) for k, v in state["phenotype_categories"].items()}
        by_name: list[str] = []  # reference keys taken as labels because the query has such a column
        if phenotype_keys is None:
            manager = cls._registered_manager(adata)
            phenotype_keys = (
                list(manager.registry["setup_args"][SETUP_ARGS.PHENOTYPE_KEYS] or []) if manager else []
            )
            by_name = [k for k in saved if k in adata.obs and k not in phenotype_keys]
            phenotype_keys = [*phenotype_keys, *by_name]
        else:
            if isinstance(phenotype_keys, str):
                phenotype_keys = [phenotype_keys]
            missing = [k for k in phenotype_keys if k not in adata.obs]
            if missing:  # asked for: not silently left unknown for every cell
                available = [c for c in adata.obs.columns if not str(c).startswith("_scvi_")]
                raise ValueError(
                    f"phenotype_keys {missing} not in adata.obs (available: {available}); "
                    "add the column(s), with NaN for cells of unknown label, or leave the key(s) out "
                    "of phenotype_keys (a reference key left out is unknown for the query's cells)"
                )
        reference_batch_key = setup_args[SETUP_ARGS.BATCH_KEY]
        if reference_batch_key is not None and reference_batch_key in phenotype_keys:
            raise ValueError(
                f"{reference_batch_key!r} is the reference's batch key, so it cannot also be a phenotype "
                f"key; to use it as labels too, copy it to another column (adata.obs["
                f"'{reference_batch_key}_label'] = adata.obs[{reference_batch_key!r}]) and pass that name"
            )
        new_keys = [k for k in phenotype_keys if k not in saved]
        for key in new_keys:
            check_phenotype_column(adata, key)
        categories = saved | {k: observed_categories(adata.obs[k]) for k in new_keys}
        _warn_unseen_categories(adata, saved, phenotype_keys)
        model = cls._from_state(  # sets adata up with the reference's settings once the weights load
            state,
            weights,
            adata=adata,
            accelerator=accelerator,
            source=source,
            phenotype_categories=categories,
            setup_again=True,
            extend_batches=True,
            label_keys=phenotype_keys,
        )
        for key in new_keys:
            model.temperatures_.pop(key, None)
        model.gene_coverage_ = coverage
        _log_query_labels(model, phenotype_keys, by_name)
        return model

    def get_var_names(self, legacy_mudata_format: bool = False) -> np.ndarray:
        """Gene names: the attached AnnData's (as scvi-tools), else the model's vocabulary."""
        if self.adata is not None:
            return super().get_var_names(legacy_mudata_format=legacy_mudata_format)
        return np.asarray(self.vocabulary_.genes)

    @staticmethod
    def view_setup_args(dir_path: str | os.PathLike, prefix: str | None = None) -> None:
        """Print the ``setup_anndata`` arguments of a model saved with :meth:`save`."""
        state, _ = read_model_dir(dir_path)
        for key, value in state["setup_args"].items():
            print(f"{key}: {value!r}")

    @staticmethod
    def load_registry(dir_path: str | os.PathLike, prefix: str | None = None) -> dict:
        """Not saved: a model keeps its settings in ``model.json`` instead of a scvi-tools registry."""
        raise NotImplementedError(
            "GeneTransformer saves no scvi-tools registry; its setup arguments are printed by "
            "GeneTransformer.view_setup_args(dir), and GeneTransformer.load(dir) restores the model"
        )

    @classmethod
    def convert_legacy_save(cls, *args: Any, **kwargs: Any) -> None:
        """Not needed: models are saved as ``model.json`` and ``model.safetensors``, in one format."""
        raise NotImplementedError(
            "GeneTransformer models are saved as model.json and model.safetensors and need no "
            "conversion; load them with GeneTransformer.load(dir)"
        )

    @property
    def device(self) -> str:
        """The device the model's weights are on (``"cpu"``, ``"cuda:0"``, ...)."""
        return str(next(self.module.parameters()).device)

    @property
    def adata(self) -> AnnData | None:
        """The AnnData attached to the model (``None`` for a model loaded without cells, or of shards)."""
        return self._adata

    @adata.setter
    def adata(self, adata: AnnData) -> None:
        if self._adata is None:  # scvi-tools would set it up from a registry such a model does not have
            raise ValueError(
                "this model has no AnnData to take the setup from (it was loaded without cells, or "
                "made from shards); attach cells with GeneTransformer.load(dir, adata=...), or "
                "GeneTransformer.load_query_data(adata, dir) for new cells"
            )
        BaseModelClass.adata.fset(self, adata)

    def __repr__(self) -> str:
        trained = "trained" if self.is_trained_ else "not trained"
        return f"{self._model_summary_string} ({trained})"


setup_anndata = GeneTransformer.setup_anndata
