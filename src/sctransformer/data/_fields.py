"""AnnData field for phenotype columns where a missing value means "unknown"."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from scvi.data.fields import BaseAnnDataField, CategoricalObsField


def category_codes(values: pd.Series, categories: list[str]) -> np.ndarray:
    """Codes of ``values`` among ``categories``; ``-1`` for missing values and unseen categories."""
    as_str = values.astype(object).where(values.notna(), None)
    as_str = as_str.map(lambda v: None if v is None else str(v))
    return pd.Categorical(as_str, categories=categories).codes.astype(np.int64)


def observed_categories(values: pd.Series) -> list[str]:
    """Categories of a column as strings, missing values left out.

    A categorical column keeps its own category order (unused categories dropped), so predicted
    labels line up with the column's colours; other columns are sorted.
    """
    if isinstance(values.dtype, pd.CategoricalDtype):
        return [str(v) for v in values.cat.remove_unused_categories().cat.categories]
    return sorted(str(v) for v in pd.unique(values.dropna()))


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

    def _reference_categories_as(self, column: pd.Series) -> list:
        """The reference's categories (saved as strings) as values of the type ``column`` holds.

        A query whose batches are e.g. integers 0, 1 must match the reference's "0", "1", not
        append them as new batches.
        """
        categories = list(self._categories)
        kind = column.cat.categories.dtype if isinstance(column.dtype, pd.CategoricalDtype) else column.dtype
        if pd.api.types.is_string_dtype(kind) or pd.api.types.is_object_dtype(kind):
            return categories
        try:
            converted = pd.Series(categories, dtype=object).astype(kind)
            if list(converted.astype(str)) != categories:
                raise ValueError("not a round trip")
        except (ValueError, TypeError):
            raise ValueError(
                f"adata.obs[{self._original_attr_key!r}] holds {kind} batches, but the reference names its "
                f"batches {categories[:3]}{' ...' if len(categories) > 3 else ''}; give the query's batches "
                f"as strings, e.g. adata.obs[{self._original_attr_key!r}] = "
                f"adata.obs[{self._original_attr_key!r}].astype(str)"
            ) from None
        return converted.tolist()

    def register_field(self, adata: AnnData) -> dict:
        """Register the codes; with reference categories, extend them by the new batches."""
        if self._categories is None or self.is_default:
            return super().register_field(adata)
        categories = self._reference_categories_as(adata.obs[self._original_attr_key])
        reference = {
            self.CATEGORICAL_MAPPING_KEY: np.asarray(categories, dtype=object),
            self.ORIGINAL_ATTR_KEY: self._original_attr_key,
        }
        return self.transfer_field(reference, adata, extend_categories=True)
