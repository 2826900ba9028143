"""Checks of user input that run before anything heavy, with errors that say how to fix it."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

_CHUNK_ROWS = 10_000


def positive_int(value: object, name: str) -> int:
    """``value`` as an ``int`` if it is a positive integer (NumPy integers too, not bools), else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_choice(value: object, name: str, choices: tuple) -> None:
    """Raise a ValueError naming ``name`` and its ``choices`` unless ``value`` is one of them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def cell_positions(indices, n_cells: int, name: str) -> np.ndarray:
    """Integer positions of cells given as positions or as a boolean mask; raise if out of range or empty."""
    indices = np.asarray(indices)
    if indices.dtype == bool:
        if indices.shape != (n_cells,):
            raise ValueError(f"{name} as a boolean mask must have one entry per cell ({n_cells})")
        indices = np.flatnonzero(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D array of integer cell indices (or a boolean mask)")
    if len(indices) == 0:
        raise ValueError(f"{name} is empty; pass at least one cell")
    if indices.min() < 0 or indices.max() >= n_cells:
        raise ValueError(f"{name} must lie in [0, {n_cells}) (the cells of the data)")
    return indices


def get_matrix(adata: AnnData, layer: str | None):
    """The count matrix: ``adata.layers[layer]`` or ``adata.X``."""
    if layer is None:
        if adata.X is None:
            raise ValueError("adata.X is empty; pass the layer that holds counts with layer=...")
        return adata.X
    if layer not in adata.layers:
        raise KeyError(
            f"layer {layer!r} not found in adata.layers (available: {list(adata.layers)}); "
            "pass one of these, or layer=None to use adata.X"
        )
    return adata.layers[layer]


def _looks_like_counts(matrix: object, n_values: int = 100_000) -> bool:
    """Whether the first ``n_values`` stored values of an in-memory ``matrix`` are counts (for advice only)."""
    if sp.issparse(matrix):
        values = matrix.data[:n_values]
    elif isinstance(matrix, np.ndarray) and matrix.ndim == 2:
        values = matrix[: max(1, n_values // max(1, matrix.shape[1]))]
    else:  # backed or of another kind: not read for advice
        return False
    values = np.asarray(values)
    return values.size > 0 and np.issubdtype(values.dtype, np.number) and count_values_problem(values) is None


def _counts_fix(adata: AnnData, layer: str | None) -> str:
    """How to put counts where a model reads them: ``", e.g. adata.X = adata.layers['counts']"``.

    The source is another layer (one whose name mentions counts first) or ``adata.X``, whichever
    first holds what looks like counts; empty where none does.
    """
    target = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    source = _count_source(adata, layer)
    return "" if source is None else f", e.g. {target} = {source}"


def _count_source(adata: AnnData, layer: str | None) -> str | None:
    """Another matrix of ``adata`` than ``layer`` that looks like counts, as code (``"adata.X"``)."""
    others = sorted((k for k in adata.layers if k != layer), key=lambda k: "count" not in str(k).lower())
    sources = {f"adata.layers[{k!r}]": adata.layers[k] for k in others}
    if layer is not None and adata.X is not None:
        sources["adata.X"] = adata.X
    return next((name for name, matrix in sources.items() if _looks_like_counts(matrix)), None)


def _setup_counts_fix(adata: AnnData, layer: str | None) -> str:
    """How to point ``setup_anndata`` at counts when ``layer`` holds something else."""
    source = _count_source(adata, layer)
    if source == "adata.X":
        return "pass layer=None, adata.X looks like counts"
    if source is not None:
        return f"pass the layer that holds them (e.g. layer={source.split('[', 1)[1][:-1]})"
    return "pass the layer that holds them with layer= (no other matrix of adata looks like counts)"


def check_model_layer(adata: AnnData, layer: str | None) -> None:
    """Raise if ``adata`` lacks the count matrix a saved model reads, saying how to put the counts there.

    :func:`get_matrix` asks for another ``layer=``, which loading a model does not take.

    Parameters
    ----------
    adata
        Cells to register with the model's settings.
    layer
        The model's layer (``None``: ``adata.X``).
    """
    if layer is None:
        if adata.X is None:
            raise ValueError(
                f"the model reads counts from adata.X, which is empty; put the counts there"
                f"{_counts_fix(adata, layer)}"
            )
    elif layer not in adata.layers:
        raise KeyError(
            f"the model reads counts from adata.layers[{layer!r}], which adata lacks (its layers: "
            f"{list(adata.layers)}); put the counts there{_counts_fix(adata, layer)}"
        )


def check_counts(adata: AnnData, layer: str | None, *, model: bool = False) -> np.ndarray:
    """Raise if the count matrix is empty, not numeric, or holds NaN/inf, negative or fractional values.

    Every stored value is checked, chunk by chunk (backed matrices are never loaded whole).

    Parameters
    ----------
    adata
        The cells.
    layer
        Layer of the counts (``None``: ``adata.X``).
    model
        ``layer`` is a model's, which the caller cannot change (inference, loading, training a
        model): the errors say how to put the counts there instead of to pass ``layer=``.

    Returns
    -------
    The total count of each cell (from the same single pass over the matrix).
    """
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"

    def fix() -> str:  # only when raising: it looks at the other matrices
        if model:  # the layer is fixed: say how to fill it
            return (
                f"the model reads raw integer counts from {where}: put them there{_counts_fix(adata, layer)}"
            )
        return _setup_counts_fix(adata, layer)

    if adata.n_obs == 0:
        raise ValueError("adata has zero cells; there is nothing to train on or embed")
    if adata.n_vars == 0:
        raise ValueError("adata has zero genes; pass an AnnData whose var holds genes")
    matrix = get_matrix(adata, layer)
    dtype = getattr(matrix, "dtype", None)
    if dtype is None or not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        raise TypeError(f"{where} has dtype {dtype}; it must hold numeric counts")
    if np.issubdtype(dtype, np.complexfloating):
        raise TypeError(f"{where} holds complex numbers ({dtype}); counts are real integers: {fix()}")
    if adata.isbacked and not sp.issparse(matrix) and getattr(matrix, "format", None) == "csc":
        raise ValueError(
            f"{where} is stored column-major (CSC) in the backed file, so every block of cells would read "
            f"the whole matrix; rewrite the file as CSR ({where} = {where}.tocsr() in memory, then "
            "write_h5ad) or load it with adata = adata.to_memory()"
        )
    if dtype == np.bool_:
        raise TypeError(
            f"{where} holds booleans; " + (fix() if model else "pass integer counts (e.g. layer='counts')")
        )
    if dtype == np.float16:
        raise TypeError(
            f"{where} is float16, which cannot hold counts above 2048 exactly; convert it, e.g. "
            "adata.X = adata.X.astype(np.float32)"
        )
    totals = np.zeros(adata.n_obs)
    for start in range(0, adata.n_obs, _CHUNK_ROWS):
        chunk = matrix[start : start + _CHUNK_ROWS]
        values = chunk.data if sp.issparse(chunk) else np.asarray(chunk)
        problem = count_values_problem(values)
        if problem is not None:
            kind, what = problem
            remedy = {
                "fractional": ("" if model else "sctransformer reads raw integer counts: ")
                + f"{fix()}, not normalised or log-transformed data. Fractional counts (EM quantification, "
                "ambient-RNA correction) can be rounded first: np.round(...)",
                "non-finite": "remove or fix them before setup_anndata",
                "negative": "pass raw, non-negative counts",
            }.get(kind, "these are not counts")
            raise ValueError(f"{where} holds {what}; {remedy}")
        totals[start : start + chunk.shape[0]] = np.asarray(chunk.sum(axis=1)).ravel()
    return totals


def count_values_problem(values: np.ndarray) -> tuple[str, str] | None:
    """Why stored counts are not finite, non-negative integers that float32 holds, or ``None``.

    Returns the kind of problem (``"complex"``, ``"non-finite"``, ``"too large"``, ``"fractional"``
    or ``"negative"``) and a description of it; for the checks of in-memory, backed and sharded data.
    """
    if values.size == 0:
        return None
    if np.iscomplexobj(values):
        return "complex", f"complex numbers ({values.dtype})"
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all():
            return "non-finite", "NaN or infinite values"
        largest = max(values.max(), -values.min())
        if values.dtype.itemsize > 4 and largest > np.finfo(np.float32).max:
            return (
                "too large",
                f"values too large for float32 (up to {largest:.3g}), in which the model computes",
            )
        fractional = values != np.round(values)
        if fractional.any():
            return "fractional", f"non-integer values (e.g. {float(values[fractional][0])!r})"
    if (values < 0).any():
        return "negative", "negative values"
    return None


def _is_text(column: pd.Series) -> bool:
    """Whether a ``.var`` column holds text (identifiers could be read from it)."""
    dtype = column.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        dtype = dtype.categories.dtype
    return pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype)


def model_gene_fix(adata: AnnData, gene_key: str | None, vocabulary: pd.Index) -> str:
    """How to give ``adata`` the vocabulary's kind of gene identifiers where a model reads them.

    A model's ``gene_key`` is fixed, so the fix is to put the identifiers there, not to pass
    ``gene_key=``.

    Parameters
    ----------
    adata
        The cells.
    gene_key
        The model's ``.var`` column of identifiers (``None``: ``adata.var_names``).
    vocabulary
        The model's identifiers: the ``.var`` column sharing most of them is named in the example.

    Returns
    -------
    A clause such as ``"the model reads its genes from adata.var_names: put identifiers of the
    vocabulary's kind there, e.g. adata.var_names = adata.var['feature_name'].astype(str)"``.
    """
    where = "adata.var_names" if gene_key is None else f"adata.var[{gene_key!r}]"
    candidates = {"adata.var_names": adata.var_names} if gene_key is not None else {}
    candidates |= {
        f"adata.var[{c!r}].astype(str)": adata.var[c]
        for c in adata.var.columns.unique()
        if c != gene_key and isinstance(adata.var[c], pd.Series) and _is_text(adata.var[c])
    }
    shared = {name: int(vocabulary.isin(values.astype(str)).sum()) for name, values in candidates.items()}
    best = max(shared, key=shared.get, default=None)
    example = f", e.g. {where} = {best}" if best is not None and shared[best] > 0 else ""
    return (
        f"the model reads its genes from {where}: put identifiers of the vocabulary's kind (symbols or "
        f"Ensembl ids) there{example}"
    )


def gene_identifiers(adata: AnnData, gene_key: str | None, *, model: bool = False) -> pd.Index:
    """Gene identifiers: ``adata.var[gene_key]`` or ``adata.var_names``, checked to be unique.

    Parameters
    ----------
    adata
        The cells.
    gene_key
        ``.var`` column of identifiers (``None``: ``adata.var_names``).
    model
        ``gene_key`` is a model's, which the caller cannot change (inference, loading): the errors
        say how to put identifiers there instead of to pass ``gene_key=``.
    """
    if gene_key is None:
        ids = pd.Index(adata.var_names.astype(str))
        where = "adata.var_names"
    else:
        if gene_key not in adata.var:
            if model:
                raise KeyError(
                    f"the model reads its genes from adata.var[{gene_key!r}], which adata lacks (its .var "
                    f"columns: {list(adata.var.columns)}); add it, e.g. adata.var[{gene_key!r}] = "
                    "adata.var_names"
                )
            raise KeyError(
                f"gene_key {gene_key!r} not found in adata.var (available: {list(adata.var.columns)})"
            )
        column = adata.var[gene_key]
        if column.isna().any():
            raise ValueError(f"adata.var[{gene_key!r}] has missing gene identifiers; fill or drop them")
        ids = pd.Index(column.astype(str))
        where = f"adata.var[{gene_key!r}]"
    if not ids.is_unique:
        dup = ids[ids.duplicated()].unique()[:5].tolist()
        reads = ", and the model reads its genes from there" if model else ""
        raise ValueError(
            f"{where} has duplicate gene identifiers (e.g. {dup}){reads}; make them unique, e.g. "
            f"{duplicate_genes_fix(gene_key, can_pass_gene_key=not model)}"
        )
    return ids


def duplicate_genes_fix(gene_key: str | None, *, can_pass_gene_key: bool) -> str:
    """How to make the gene identifiers read from ``gene_key`` (``None``: the var names) unique."""
    if gene_key is None:
        fix = "adata.var_names_make_unique()"
        return f"{fix}, or pass gene_key= a column of unique identifiers" if can_pass_gene_key else fix
    fix = f"drop the duplicated genes: adata = adata[:, ~adata.var[{gene_key!r}].duplicated()].copy()"
    return f"{fix}, or pass another gene_key (or none, for adata.var_names)" if can_pass_gene_key else fix


def check_key_names(
    *, phenotype_keys: list[object], batch_key: object = None, gene_key: object = None, layer: object = None
) -> None:
    """Raise if a column or layer is named by something other than a string.

    A saved model records these names as JSON text, so another type (e.g. an integer column name)
    would be saved as a name that no column has, and the model could not be loaded.
    """
    for role, names, where in (
        ("phenotype_keys", phenotype_keys, "obs"),
        ("batch_key", [batch_key], "obs"),
        ("gene_key", [gene_key], "var"),
        ("layer", [layer], "layers"),
    ):
        bad = [name for name in names if name is not None and not isinstance(name, str)]
        if bad:
            fix = (
                "rename the layer with a string key"
                if where == "layers"
                else f"name the columns with strings, e.g. adata.{where}.columns = adata.{where}.columns.astype(str) "
                "(in a config file, quote the name)"
            )
            raise TypeError(
                f"{role} must name by strings (a saved model records the names as text), got {bad!r}; {fix}"
            )


def check_obs_key(adata: AnnData, key: str, role: str) -> None:
    """Raise if ``key`` is not a column of ``adata.obs``, or one of labels that cannot be compared (e.g. lists)."""
    if key not in adata.obs:
        raise KeyError(f"{role} {key!r} not found in adata.obs (available: {list(adata.obs.columns)})")
    column = adata.obs[key]
    if column.dtype == object:
        try:
            column.nunique()
        except TypeError as err:  # unhashable values: lists, dicts, arrays
            raise TypeError(
                f"adata.obs[{key!r}] ({role}) holds values that are not labels ({err}); give each cell one "
                f"label, e.g. adata.obs[{key!r}] = adata.obs[{key!r}].astype(str)"
            ) from err


def check_label_values(column: pd.Series, key: str) -> None:
    """Raise if a phenotype column holds numbers rather than labels: a value per cell, or nearly."""
    known = column.dropna()
    n_values = known.nunique()
    # integers that a missing value made float are integers still (NaN: an unknown label)
    integers = pd.api.types.is_integer_dtype(column.dtype) or (
        pd.api.types.is_float_dtype(column.dtype)
        and len(known) > 0
        and bool(np.isfinite(known).all())
        and bool((known == np.round(known)).all())
    )
    if not integers and pd.api.types.is_float_dtype(column.dtype) and n_values > 0.5 * len(column):
        raise ValueError(
            f"phenotype column {key!r} looks continuous ({n_values} distinct "
            "float values); phenotypes must be categorical labels"
        )
    if integers and n_values > max(0.5 * len(column), 20):
        raise ValueError(
            f"phenotype column {key!r} looks like a count or an index ({n_values} distinct integers "
            f"over {len(column)} cells), not labels; phenotypes must be categorical labels (to use "
            f"integer codes as labels anyway, store the column as categorical: "
            f"adata.obs[{key!r}] = adata.obs[{key!r}].astype('category'))"
        )


#: Labels that :meth:`pandas.Series.astype` ``(str)`` and file readers make of missing values
MISSING_LIKE_LABELS = frozenset({"nan", "NaN", "None", "<NA>", "NA", "N/A", "", "null"})


def check_phenotype_column(adata: AnnData, key: str) -> None:
    """Raise if a new phenotype key holds ``/`` or its column has no known value; warn if it has one category.

    ``/`` is refused because the results named after the key (``.obs`` columns, ``.obsm`` and
    ``.uns`` entries) could not be read back from .h5ad or .zarr.
    """
    if "/" in str(key):
        raise ValueError(
            f"phenotype key {key!r} contains '/': the results named after it (.obs, .obsm, .uns) could not "
            "be read back from .h5ad or .zarr; rename the column, e.g. "
            f"adata.obs = adata.obs.rename(columns={{{key!r}: {str(key).replace('/', '_')!r}}})"
        )
    check_obs_key(adata, key, "phenotype key")
    column = adata.obs[key]
    if column.notna().sum() == 0:
        raise ValueError(
            f"phenotype column {key!r} has no known value (all NaN); drop it from phenotype_keys"
        )
    check_label_values(column, key)
    warn_label_problems(column, key, stacklevel=4)


def warn_label_problems(column: pd.Series, key: str, *, shards: bool = False, stacklevel: int = 3) -> None:
    """Warn if a phenotype column has labels that look like missing values, or a single category.

    ``shards``: the column is that of several files' ``.obs`` (:class:`~sctransformer.data.ShardedAnnData`),
    so the fix is to rewrite the files.
    """
    missing_like = sorted({str(v) for v in column.dropna().unique()} & MISSING_LIKE_LABELS)
    if missing_like:
        replace = f"obs[{key!r}] = obs[{key!r}].replace({missing_like!r}, np.nan)"
        fix = (
            f"rewrite the shards that have them with {replace} on each file's obs"
            if shards
            else f"adata.{replace}"
        )
        warnings.warn(
            f"phenotype column {key!r} has labels {missing_like} that look like missing values (e.g. from "
            f".astype(str) on NaN); they are trained as a class of their own. To mark those cells unknown: {fix}",
            UserWarning,
            stacklevel=stacklevel,
        )
    if column.dropna().nunique() == 1:
        warnings.warn(
            f"phenotype column {key!r} has a single category; its head learns nothing useful",
            UserWarning,
            stacklevel=stacklevel,
        )
