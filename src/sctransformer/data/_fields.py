"""AnnData field for phenotype columns where a missing value means "unknown"."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from anndata import AnnData
from scvi import settings as scvi_settings
from scvi.data.fields import BaseAnnDataField, CategoricalObsField


def _distinct_values(values: pd.Series) -> tuple[np.ndarray, pd.Index, list[str], list[str]]:
    """The distinct present values of a column and their names: the one rule for category strings.

    Returns
    -------
    The code of each value among the distinct values (``-1`` for a missing value); the distinct
    values (a categorical column's categories, unused ones included); the name of each, ``str`` of
    the value as the column holds it (a NumPy scalar for a NumPy column, as ``pd.unique`` and
    scvi-tools' batch registration give it: ``"0.1"`` for a float32 0.1); and its other name, also
    matched: for a float that is a whole number, ``str`` of it as an integer (``"1"`` for ``1.0``:
    pandas makes a column of integers with a missing value float, and a model trained on the
    integers names them so); for an integer that a float holds exactly, ``str`` of it as a float
    (``"1.0"`` for ``1``: the same labels, once complete, are integers again, and a model trained on
    them made float names them so); else ``str`` of the value as a Python object
    (``.astype(object)``: ``"0.10000000149011612"``, ``"2020-01-01 00:00:00"`` for a
    ``datetime64``), which models saved before and sharded data sets use. The two differ only for
    integer, float and NumPy datetime and timedelta values, and neither is the name of another
    value of the column's type. A value's name does not depend on the column's other values
    (unlike ``Series.astype(str)``, which writes dates without a time where every value of the
    column is at midnight), so a reference and a query name the same value alike.
    """
    values = values if isinstance(values, pd.Series) else pd.Series(values)
    if isinstance(values.dtype, pd.CategoricalDtype):
        codes, distinct = values.cat.codes.to_numpy(), values.cat.categories
    elif pd.api.types.is_object_dtype(values.dtype):
        # each object named by its own str: factorize takes 1, 1.0 and True for one value
        codes, named = pd.factorize(values.map(str, na_action="ignore"), use_na_sentinel=True)
        present, first = np.unique(codes, return_index=True)
        distinct = pd.Index(values.to_numpy()[first[present >= 0]], dtype=object)
        return codes, distinct, list(named), [_other_name(v, n) for v, n in zip(distinct, named, strict=True)]
    else:
        codes, distinct = pd.factorize(values, use_na_sentinel=True)
    held = distinct.to_numpy()
    if isinstance(values.dtype, np.dtype):
        held = held.astype(values.dtype)  # factorize holds float16 values as float32
    names = [str(v) for v in held]
    other = [str(v) for v in pd.Series(distinct).astype(object)]
    if held.dtype.kind == "f":  # integers that a missing value made float: 1.0 is also "1"
        whole = [bool(np.isfinite(v)) and float(v).is_integer() for v in held]
        other = [str(int(v)) if w else o for v, w, o in zip(held, whole, other, strict=True)]
    elif held.dtype.kind in "iu":  # and the integers complete again: 1 is also "1.0"
        exact = [int(float(v)) == int(v) for v in held]  # not 2**53 + 1, which a float rounds
        other = [str(float(v)) if e else o for v, e, o in zip(held, exact, other, strict=True)]
    return codes, distinct, names, other


def _other_name(value: object, name: str) -> str:
    """The other name of one value of an object column, as :func:`category_codes` gives it.

    As for NumPy columns: an integer that a float holds exactly is also ``"1.0"`` (scvi-tools
    registers a column of Python ints and floats as floats), a float that is a whole number also
    ``"1"``; any other value (booleans included) has only its own name.
    """
    if isinstance(value, bool | np.bool_):
        return name
    if isinstance(value, int | np.integer):
        return str(float(value)) if int(float(value)) == int(value) else name
    if isinstance(value, float | np.floating) and np.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return name


def _codes_among(
    codes: np.ndarray, names: list[str], other: list[str], categories: list[str] | np.ndarray
) -> np.ndarray:
    """Codes of values (their codes among distinct values named ``names``/``other``) among ``categories``."""
    index = pd.Index(np.asarray(categories, dtype=object))
    if not index.is_unique:
        raise ValueError(f"categories must be unique, got {list(categories)}")
    found = index.get_indexer(pd.Index(names, dtype=object))
    other_found = index.get_indexer(pd.Index(other, dtype=object))
    lookup = np.where(found >= 0, found, other_found)
    return np.append(lookup, -1).astype(np.int64)[codes]  # code -1 (missing): the appended -1


def _as_integer(name: str) -> int:
    """The integer named ``name``, as an integer (``"1"``) or as a whole-number float (``"1.0"``)."""
    try:
        return int(name)
    except ValueError:
        value = float(name)
        if not value.is_integer():
            raise ValueError(f"{name!r} names no integer") from None
        return int(value)


def category_codes(values: pd.Series, categories: list[str]) -> np.ndarray:
    """Codes of ``values`` among ``categories``; ``-1`` for missing values and unseen categories.

    A value matches the category named as :func:`observed_categories` names it, else its other
    name: a whole-number float matches the integer's name (``1.0`` matches ``"1"``) and an integer
    the float's (``1`` matches ``"1.0"``), a float32 or datetime value ``str`` of it as a Python
    object (as models saved before used).
    """
    codes, _, names, other = _distinct_values(values)
    return _codes_among(codes, names, other, categories)


def observed_categories(values: pd.Series) -> list[str]:
    """Categories of a column as strings, missing values left out.

    A value is named ``str`` of it as the column holds it (a NumPy scalar for a NumPy column), so
    every present value has a code (:func:`category_codes`). A categorical column keeps its own
    category order (unused categories dropped), so predicted labels line up with the column's
    colours; other columns are sorted. Values of different types with one name (``"1"`` and ``1``
    after a ``pd.concat``) are one category.
    """
    if isinstance(values.dtype, pd.CategoricalDtype):
        values = values.cat.remove_unused_categories()
        return list(dict.fromkeys(_distinct_values(values)[2]))
    return sorted(set(_distinct_values(values)[2]))


class PhenotypeObsField(BaseAnnDataField):
    """Categorical ``.obs`` column whose missing values (NaN) mean "unknown".

    Unlike :class:`scvi.data.fields.CategoricalObsField`, missing values are allowed: they get code
    ``-1``, are fed to the model as the slot's [MASK] token and are never used as training targets.
    Category codes are written to ``adata.obs[f"_scvi_phenotype_{key}"]``.

    Parameters
    ----------
    registry_key
        Key in the data registry.
    obs_key
        Column of ``adata.obs`` holding the phenotype.
    categories
        Fixed category list (from a trained model); by default the sorted observed categories.
        Values outside it become ``-1`` (unknown).
    """

    CATEGORIES_KEY = "categorical_mapping"
    ORIGINAL_ATTR_KEY = "original_key"

    def __init__(self, registry_key: str, obs_key: str, categories: list[str] | None = None) -> None:
        super().__init__()
        self._registry_key = registry_key
        self._obs_key = obs_key
        self._categories = categories

    @property
    def registry_key(self) -> str:
        """Key in the data registry."""
        return self._registry_key

    @property
    def attr_name(self) -> str:
        """AnnData attribute holding the codes."""
        return "obs"

    @property
    def attr_key(self) -> str:
        """Column holding the codes."""
        return f"_scvi_phenotype_{self._obs_key}"

    @property
    def is_empty(self) -> bool:
        """Never empty."""
        return False

    def validate_field(self, adata: AnnData) -> None:
        """Check that the phenotype column exists."""
        if self._obs_key not in adata.obs:
            raise KeyError(f"phenotype column {self._obs_key!r} not found in adata.obs")

    def register_field(self, adata: AnnData) -> dict:
        """Write the category codes and return the category list."""
        self.validate_field(adata)
        column = adata.obs[self._obs_key]
        categories = self._categories if self._categories is not None else observed_categories(column)
        adata.obs[self.attr_key] = category_codes(column, categories)
        super().register_field(adata)
        return {
            self.CATEGORIES_KEY: np.asarray(categories, dtype=object),
            self.ORIGINAL_ATTR_KEY: self._obs_key,
        }

    def transfer_field(self, state_registry: dict, adata_target: AnnData, **kwargs) -> dict:
        """Register on a new AnnData with the source's categories."""
        self._categories = [str(c) for c in state_registry[self.CATEGORIES_KEY]]
        return self.register_field(adata_target)

    def get_summary_stats(self, state_registry: dict) -> dict:
        """Number of categories."""
        return {f"n_{self.registry_key}": len(state_registry[self.CATEGORIES_KEY])}

    def view_state_registry(self, state_registry: dict) -> None:
        """No rich view."""
        return None


class BatchObsField(CategoricalObsField):
    """Batch column whose categories start with a reference's and are extended by new ones.

    Parameters
    ----------
    registry_key
        Key in the data registry.
    obs_key
        Column of ``adata.obs`` holding the batch; ``None`` for a single batch.
    categories
        A reference model's batch categories: they keep their codes, batches seen only here are
        appended (scArches-style). ``None`` registers the observed categories.
    """

    def __init__(self, registry_key: str, obs_key: str | None, categories: list[str] | None = None) -> None:
        super().__init__(registry_key, obs_key)
        self._categories = categories

    def _check_reference_names(self, column: pd.Series) -> None:
        """Raise if values of the type ``column`` holds cannot bear the reference's batch names.

        Batches match by name (:func:`category_codes`): a query whose batches are integers 0, 1
        matches the reference's "0", "1" (or "0.0", "1.0", a float batch), booleans match "False",
        "True". Integers can never be named "batch_0": such a query is most likely encoded
        differently from the reference, not made of new batches only.
        """
        categories = [str(c) for c in self._categories]
        kind = column.cat.categories.dtype if isinstance(column.dtype, pd.CategoricalDtype) else column.dtype
        if pd.api.types.is_string_dtype(kind) or pd.api.types.is_object_dtype(kind):
            return
        try:
            if pd.api.types.is_bool_dtype(kind):  # astype(bool) makes every non-empty string True
                flags = {"False": False, "True": True}
                converted = pd.Series([flags[c] for c in categories], dtype=kind)
            elif pd.api.types.is_integer_dtype(kind):  # "1.0" names the integer 1 too
                converted = pd.Series([_as_integer(c) for c in categories], dtype=object).astype(kind)
            else:
                converted = pd.Series(categories, dtype=object).astype(kind)
            if not np.array_equal(category_codes(converted, categories), np.arange(len(categories))):
                raise ValueError("not a round trip")
        except (ValueError, TypeError, OverflowError, KeyError):
            key = self._original_attr_key
            shown = f"{categories[:3]}{' ...' if len(categories) > 3 else ''}"
            as_strings = sorted(set(column.dropna().astype(str)))
            if set(as_strings) & set(categories):  # as strings, (some of) the query's batches match
                advice = (
                    f"give the query's batches as strings, e.g. "
                    f"adata.obs[{key!r}] = adata.obs[{key!r}].astype(str)"
                )
            else:
                advice = (
                    f"as strings (.astype(str)) they would be {as_strings[:3]}"
                    f"{' ...' if len(as_strings) > 3 else ''}, none of the reference's batches either, so "
                    "the query looks encoded differently from the reference: recode "
                    f"adata.obs[{key!r}] with the reference's batch names (batches the reference lacks, "
                    "given as strings, are added as new batches)"
                )
            raise ValueError(
                f"adata.obs[{key!r}] holds {kind} batches, but the reference names its batches "
                f"{shown}; {advice}"
            ) from None

    def register_field(self, adata: AnnData) -> dict:
        """Register the codes; with reference categories, extend them by the new batches.

        Without them, the batches are the values present: unused categories of a categorical
        column (left over after subsetting) are no batches, as they have no cells to train on.
        The column itself is not changed.
        """
        if self.is_default:
            return super().register_field(adata)
        self.validate_field(adata)
        column = adata.obs[self._original_attr_key]
        if self._categories is None:
            if not isinstance(column.dtype, pd.CategoricalDtype):
                return super().register_field(adata)
            observed = {
                self.CATEGORICAL_MAPPING_KEY: np.asarray(observed_categories(column), dtype=object),
                self.ORIGINAL_ATTR_KEY: self._original_attr_key,
            }
            return self.transfer_field(observed, adata)
        self._check_reference_names(column)
        reference = {
            self.CATEGORICAL_MAPPING_KEY: np.asarray([str(c) for c in self._categories], dtype=object),
            self.ORIGINAL_ATTR_KEY: self._original_attr_key,
        }
        return self.transfer_field(reference, adata, extend_categories=True)

    def transfer_field(
        self, state_registry: dict, adata_target: AnnData, extend_categories: bool = False, **kwargs
    ) -> dict:
        """Code the batches of ``adata_target`` by the registry's batches, matched by name.

        Values are named as :func:`category_codes` names them, not converted back from the
        registry's names (``"False"`` is no ``False`` to ``astype(bool)``). With
        ``extend_categories``, batches the registry lacks are appended in the order of their values.
        """
        if self.is_default:
            self._setup_default_attr(adata_target)
        self.validate_field(adata_target)
        key = self._original_attr_key
        known = [str(c) for c in state_registry[self.CATEGORICAL_MAPPING_KEY]]
        codes, distinct, names, other = _distinct_values(adata_target.obs[key])
        present = np.unique(codes[codes >= 0])
        try:
            present = present[distinct.take(present).argsort()]
        except TypeError:  # values that do not compare, e.g. "a" and 1
            present = np.asarray(sorted(present, key=lambda i: names[i]), dtype=present.dtype)
        known_set = set(known)
        new = list(
            dict.fromkeys(
                names[i] for i in present if names[i] not in known_set and other[i] not in known_set
            )
        )
        if new and not extend_categories:
            raise ValueError(
                f"Category {new[0]} not found in source registry. "
                "Cannot transfer setup without `extend_categories = True`."
            )
        mapping = known + new
        batch_codes = _codes_among(codes, names, other, mapping)
        if (batch_codes < 0).any():
            raise ValueError(f"adata.obs[{key!r}] has missing values; every cell needs a batch")
        counts = np.bincount(batch_codes, minlength=len(mapping))
        if counts[counts > 0].min(initial=3) < 3:
            warnings.warn(  # as scvi-tools warns when it registers
                f"Category {int(np.argmin(np.where(counts > 0, counts, np.inf)))} in "
                f"adata.obs['{self.attr_key}'] has fewer than 3 cells. Models may not train properly.",
                UserWarning,
                stacklevel=scvi_settings.warnings_stacklevel,
            )
        categorical = pd.Categorical.from_codes(batch_codes, categories=pd.Index(mapping, dtype=object))
        adata_target.obs[self.attr_key] = categorical.codes  # the small integer type scvi-tools writes
        return {
            self.CATEGORICAL_MAPPING_KEY: np.asarray(mapping, dtype=object),
            self.ORIGINAL_ATTR_KEY: key,
        }
