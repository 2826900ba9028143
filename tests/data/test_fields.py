"""Category names of phenotype and batch columns (sctransformer.data._fields)."""

from __future__ import annotations

import re
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import sctransformer as sct
from sctransformer.data import BatchObsField, category_codes, observed_categories
from sctransformer.datasets import synthetic

TINY = {"d_model": 16, "n_layers": 1, "n_heads": 2, "max_length": 16}

# Names of the values of the dtypes that already worked: saved models store these, so they must
# not change. Each case: column, its categories, the codes of its values.
UNCHANGED = {
    "int": (pd.Series([3, 1, 10, 1]), ["1", "10", "3"], [2, 0, 1, 0]),
    "Int64 with NA": (pd.Series(pd.array([3, None, 10, 1], dtype="Int64")), ["1", "10", "3"], [2, -1, 1, 0]),
    "float64": (
        pd.Series([0.1, np.nan, 1.0, 1e16, 1e-5, 2.5]),
        ["0.1", "1.0", "1e+16", "1e-05", "2.5"],
        [0, -1, 1, 2, 3, 4],
    ),
    "bool": (pd.Series([True, False, True]), ["False", "True"], [1, 0, 1]),
    "str": (pd.Series(["b", None, "a", np.nan], dtype=object), ["a", "b"], [1, -1, 0, -1]),
    "string dtype": (pd.Series(pd.array(["b", None, "a"], dtype="string")), ["a", "b"], [1, -1, 0]),
    "categorical of str, unused and NaN": (
        pd.Series(pd.Categorical(["b", "a", None, "b"], categories=["z", "b", "a", "unused"])),
        ["b", "a"],  # the column's order, unused categories dropped
        [0, 1, -1, 0],
    ),
    "categorical of int": (pd.Series(pd.Categorical([10, 2, None, 1])), ["1", "2", "10"], [2, 1, -1, 0]),
    "categorical of float64": (pd.Series(pd.Categorical([0.5, 2.0, None])), ["0.5", "2.0"], [0, 1, -1]),
    "mixed object": (pd.Series(["a", 1, 2.5, None], dtype=object), ["1", "2.5", "a"], [2, 0, 1, -1]),
}


@pytest.mark.parametrize("case", UNCHANGED)
def test_names_of_values_that_worked_stay_as_they_were(case):
    column, categories, codes = UNCHANGED[case]
    assert observed_categories(column) == categories
    np.testing.assert_array_equal(category_codes(column, categories), codes)


_DAYS = pd.to_datetime(["2020-01-01", None, "2021-06-01", "2020-01-01"])
_DURATIONS = pd.to_timedelta(["1D", None, "2D", "1D"])
_DOSES = np.array([0.1, np.nan, 0.3, 0.1], dtype=np.float32)
# Columns whose labelled cells were coded as unknown (-1): each present value must get a code.
NEWLY_CODED = {
    "datetime": (pd.Series(_DAYS), ["2020-01-01T00:00:00.000000000", "2021-06-01T00:00:00.000000000"]),
    "timedelta": (pd.Series(_DURATIONS), ["172800000000000 nanoseconds", "86400000000000 nanoseconds"]),
    "float32": (pd.Series(_DOSES), ["0.1", "0.3"]),
    "float16": (pd.Series(_DOSES.astype(np.float16)), ["0.1", "0.3"]),
}


@pytest.mark.parametrize("case", NEWLY_CODED)
def test_every_labelled_value_of_float32_and_datetime_columns_gets_a_code(case):
    column, categories = NEWLY_CODED[case]
    assert sorted(observed_categories(column)) == sorted(categories)
    codes = category_codes(column, observed_categories(column))
    assert (codes >= 0).tolist() == column.notna().tolist()
    assert codes[0] == codes[3] != codes[2]  # equal values, one code


@pytest.mark.parametrize("values", [_DOSES, _DAYS, _DURATIONS], ids=["float32", "datetime", "timedelta"])
def test_a_categorical_column_names_its_values_as_a_plain_one(values):
    # so that a reference and a query (or a batch and a phenotype) of the same values match
    # whether they are categorical or not
    plain, categorical = pd.Series(values), pd.Series(pd.Categorical(values))
    assert sorted(observed_categories(categorical)) == observed_categories(plain)  # in its own order
    np.testing.assert_array_equal(category_codes(plain, observed_categories(categorical)), [0, -1, 1, 0])


def test_tz_aware_datetimes_are_coded():
    column = pd.Series(
        pd.to_datetime(["2020-01-01", None, "2021-06-01 12:00"], format="mixed")
    ).dt.tz_localize("UTC")
    categories = observed_categories(column)
    assert categories == ["2020-01-01 00:00:00+00:00", "2021-06-01 12:00:00+00:00"]
    np.testing.assert_array_equal(category_codes(column, categories), [0, -1, 1])


def test_a_date_is_named_alike_whatever_the_other_dates_of_its_column():
    reference = pd.Series(pd.to_datetime(["2020-01-01", "2020-01-02"]))  # all at midnight
    query = pd.Series(pd.to_datetime(["2020-01-02", "2020-01-02 12:00"], format="mixed"))
    np.testing.assert_array_equal(category_codes(query, observed_categories(reference)), [1, -1])


def test_older_names_of_float32_and_datetime_values_still_match():
    # a categorical float32 or datetime column was named by str of Python floats and Timestamps,
    # and sharded data sets name such values so: models saved with these names keep their codes
    doses = pd.Series(pd.Categorical(_DOSES))
    older = ["0.10000000149011612", "0.30000001192092896"]
    np.testing.assert_array_equal(category_codes(doses, older), [0, -1, 1, 0])
    np.testing.assert_array_equal(category_codes(pd.Series(_DOSES), older), [0, -1, 1, 0])
    days = ["2020-01-01 00:00:00", "2021-06-01 00:00:00"]
    np.testing.assert_array_equal(category_codes(pd.Series(_DAYS), days), [0, -1, 1, 0])


def test_a_string_and_an_integer_with_one_name_are_one_category():
    column = pd.Series(["1", 1, "2", None, 2], dtype=object)  # e.g. after pd.concat of two sources
    assert observed_categories(column) == ["1", "2"]
    np.testing.assert_array_equal(category_codes(column, ["1", "2"]), [0, 0, 1, -1, 1])


def test_integers_made_float_by_a_missing_value_match_the_integer_names():
    # pandas holds integers with a missing value as float64: a query labelled 0, 1, NaN matches a
    # model trained on the integers ("0", "1"); the float names still come first where present
    column = pd.Series([1, 0, None, 2, 1], dtype=float)
    assert observed_categories(column) == ["0.0", "1.0", "2.0"]  # names unchanged
    np.testing.assert_array_equal(category_codes(column, ["0", "1"]), [1, 0, -1, -1, 1])
    np.testing.assert_array_equal(category_codes(column, ["1", "1.0"]), [1, -1, -1, -1, 1])
    for whole in (pd.Series([1.0, 2.0], dtype=np.float32), pd.Series(pd.Categorical([1.0, 2.0]))):
        np.testing.assert_array_equal(category_codes(whole, ["2", "1"]), [1, 0])
    not_whole = pd.Series([1.5, np.inf, -np.inf])
    np.testing.assert_array_equal(category_codes(not_whole, ["1", "2", "inf"]), [-1, 2, -1])


def test_integers_match_the_names_of_the_same_labels_made_float():
    # a model trained on labels with a missing value (float: "0.0", "1.0") and a query labelled
    # completely (integers again): the integers match the float names, the integer names first
    floats = ["0.0", "1.0", "2.0"]
    for column in (
        pd.Series([1, 0, 2, 1]),
        pd.Series(np.array([1, 0, 2, 1], dtype=np.uint8)),
        pd.Series(pd.array([1, 0, 2, 1], dtype="Int64")),
        pd.Series(pd.Categorical([1, 0, 2, 1])),
    ):
        assert observed_categories(column) == ["0", "1", "2"]  # names unchanged
        np.testing.assert_array_equal(category_codes(column, floats), [1, 0, 2, 1])
        np.testing.assert_array_equal(category_codes(column, ["1", "1.0"]), [0, -1, -1, 0])
    with_na = pd.Series(pd.array([1, None, 2], dtype="Int64"))
    np.testing.assert_array_equal(category_codes(with_na, floats), [1, -1, 2])
    # an integer that no float holds exactly is not named by the float it rounds to
    np.testing.assert_array_equal(category_codes(pd.Series([2**53 + 1]), [str(float(2**53))]), [-1])


@pytest.mark.parametrize("dtype", ["int64", "Int64"])
def test_a_query_with_integer_labels_matches_a_reference_whose_labels_were_float(adata, tmp_path, dtype):
    labels = (np.arange(adata.n_obs) % 3).astype(float)
    labels[:5] = np.nan  # some unlabelled cells: pandas holds the integer labels as float
    adata.obs["label"] = labels
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["label"])
    model = sct.GeneTransformer(adata, **TINY)
    assert model.phenotype_categories_["label"] == ["0.0", "1.0", "2.0"]
    model.save(tmp_path / "m")
    query = adata[:30].copy()
    query.obs["label"] = pd.array(np.arange(30) % 3, dtype=dtype)  # labelled completely: integers
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "categories the reference does not know"
        sct.GeneTransformer.load_query_data(query, tmp_path / "m")
    np.testing.assert_array_equal(query.obs["_scvi_phenotype_label"], np.arange(30) % 3)


def test_a_query_with_integer_labels_made_float_keeps_its_labels(adata, tmp_path):
    adata.obs["label"] = np.arange(adata.n_obs) % 3
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["label"])
    sct.GeneTransformer(adata, **TINY).save(tmp_path / "m")
    query = adata[:30].copy()
    query.obs["label"] = query.obs["label"].astype(float)
    query.obs.loc[query.obs_names[:5], "label"] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "categories the reference does not know"
        sct.GeneTransformer.load_query_data(query, tmp_path / "m")
    np.testing.assert_array_equal(query.obs["_scvi_phenotype_label"], [-1] * 5 + list(np.arange(5, 30) % 3))


def test_float32_and_datetime_phenotypes_are_registered_with_codes(adata):
    adata.obs["dose"] = np.array([0.1, 0.5, 1.0, np.nan] * 30, dtype=np.float32)
    adata.obs["day"] = pd.to_datetime(["2020-01-01", "2021-06-01"] * 60)
    adata.obs["donor"] = pd.Series(["1", 1, "2", 2] * 30, dtype=object).to_numpy()
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["dose", "day", "donor"])
    model = sct.GeneTransformer(adata, **TINY)
    assert model.phenotype_categories_["dose"] == ["0.1", "0.5", "1.0"]
    assert model.phenotype_categories_["donor"] == ["1", "2"]
    np.testing.assert_array_equal(adata.obs["_scvi_phenotype_dose"], [0, 1, 2, -1] * 30)
    np.testing.assert_array_equal(adata.obs["_scvi_phenotype_day"], [0, 1] * 60)
    np.testing.assert_array_equal(adata.obs["_scvi_phenotype_donor"], [0, 0, 1, 1] * 30)


# ------------------------------------------------------------------------------------- batches
def _cells(values) -> ad.AnnData:
    obs = pd.DataFrame({"b": pd.Series(values)})  # keeps the dtype (to_numpy() would make objects)
    obs.index = [f"c{i}" for i in range(len(obs))]
    return ad.AnnData(np.zeros((len(obs), 2), dtype=np.float32), obs=obs)


def _reference_names(values) -> list[str]:
    """The batch names a model trained on ``values`` stores."""
    registered = BatchObsField("batch", "b").register_field(_cells(values))
    return [str(c) for c in registered[BatchObsField.CATEGORICAL_MAPPING_KEY]]


BATCHES = {
    "int": np.array([1, 2] * 3),
    "Int64": pd.array([1, 2] * 3, dtype="Int64"),
    "float": np.array([1.0, 2.0] * 3),
    "float32": np.array([0.1, 0.3] * 3, dtype=np.float32),
    "string": pd.array(["x", "y"] * 3, dtype="string"),
    "categorical int": pd.Categorical([1, 2] * 3),
    "bool": np.array([False, True] * 3),
    "boolean": pd.array([False, True] * 3, dtype="boolean"),
    "categorical bool": pd.Categorical([False, True] * 3),
    "datetime": pd.to_datetime(["2020-01-01", "2021-06-01"] * 3),
    "datetime tz": pd.to_datetime(["2020-01-01", "2021-06-01"] * 3).tz_localize("UTC"),
}


@pytest.mark.parametrize("case", BATCHES)
def test_query_batches_of_the_reference_dtype_match_the_reference(case):
    names = _reference_names(BATCHES[case])
    query = _cells(BATCHES[case][::-1])  # [True, False, ...]: the reference's batches in another order
    assert query.obs["b"].dtype == pd.Series(BATCHES[case]).dtype
    registered = BatchObsField("batch", "b", names).register_field(query)
    assert [str(c) for c in registered[BatchObsField.CATEGORICAL_MAPPING_KEY]] == names  # nothing new
    np.testing.assert_array_equal(query.obs["_scvi_batch"], [1, 0] * 3)


def test_new_query_batches_are_appended_in_value_order():
    query = _cells(np.array([10, 2, 9] * 3))
    registered = BatchObsField("batch", "b", ["1", "2"]).register_field(query)
    assert [str(c) for c in registered[BatchObsField.CATEGORICAL_MAPPING_KEY]] == ["1", "2", "9", "10"]
    np.testing.assert_array_equal(query.obs["_scvi_batch"], [3, 1, 2] * 3)


@pytest.mark.parametrize(
    ("names", "values"),
    [
        (["0.0", "1.0"], np.array([1, 0] * 3)),
        (["0.0", "1.0"], pd.array([1, 0] * 3, dtype="Int64")),
        (["0.0", "1.0"], pd.Categorical([1, 0] * 3)),
        (["0.0", "1"], np.array([1, 0] * 3)),
        (["0.0", "1.0"], np.array([1, 0.0] * 3, dtype=object)),  # Python ints and floats, mixed
    ],
)
def test_integer_query_batches_match_a_reference_whose_batches_were_float(names, values):
    # e.g. plates read as 0.0, 1.0 for the reference and as 0, 1 for the query: the same batches
    query = _cells(values)
    registered = BatchObsField("batch", "b", names).register_field(query)
    assert [str(c) for c in registered[BatchObsField.CATEGORICAL_MAPPING_KEY]] == names  # nothing new
    np.testing.assert_array_equal(query.obs["_scvi_batch"], [1, 0] * 3)


@pytest.mark.parametrize(
    ("names", "values", "advice"),
    [
        # as strings the query's batches would still not be the reference's: no astype(str) advice
        (["batch_0", "batch_1"], np.array([0, 1] * 3), "recode"),
        (["0.5", "1.5"], np.array([1, 2] * 3), "recode"),
        (["0", "1"], np.array([False, True] * 3), "recode"),
        # as strings some are: astype(str) gives the reference's names
        (["0", "1", "batch_x"], np.array([0, 1] * 3), r"astype\(str\)"),
    ],
)
def test_query_batches_of_a_type_that_cannot_bear_the_reference_names_are_refused(names, values, advice):
    with pytest.raises(ValueError, match="the reference names its batches") as error:
        BatchObsField("batch", "b", names).register_field(_cells(values))
    assert re.search(advice, str(error.value)), str(error.value)
    if advice == "recode":
        assert "give the query's batches as strings" not in str(error.value)


def test_unused_categories_of_a_batch_column_are_no_batches():
    values = pd.Categorical(["y", "x"] * 3, categories=["y", "unused", "x"])
    cells = _cells(values)
    registered = BatchObsField("batch", "b").register_field(cells)
    assert [str(c) for c in registered[BatchObsField.CATEGORICAL_MAPPING_KEY]] == ["y", "x"]  # column's order
    np.testing.assert_array_equal(cells.obs["_scvi_batch"], [0, 1] * 3)
    assert list(cells.obs["b"].cat.categories) == ["y", "unused", "x"]  # the column is not changed


def test_a_model_has_no_batch_for_an_unused_category(adata):
    adata.obs["batch"] = adata.obs["batch"].cat.add_categories(["batch_unused"])  # left after subsetting
    sct.setup_anndata(adata, layer="counts", batch_key="batch")
    model = sct.GeneTransformer(adata, **TINY, batch_correction="token")
    assert model.batch_categories_ == ["batch_0", "batch_1"]
    assert model.module.n_batches == 2
    assert "batch_unused" in adata.obs["batch"].cat.categories
    with pytest.raises(ValueError, match="not one of the batches"):
        model.get_latent_representation(batch="batch_unused")


def test_a_registration_transfers_to_new_cells_by_name():
    field = BatchObsField("batch", "b")
    registered = field.register_field(_cells(np.array([False, True] * 3)))
    target = _cells(np.array([True, True, False] * 3))
    field.transfer_field(registered, target)
    np.testing.assert_array_equal(target.obs["_scvi_batch"], [1, 1, 0] * 3)
    with pytest.raises(ValueError, match="not found in source registry"):
        field.transfer_field(registered, _cells(np.array([False, 2, 2], dtype=object)))


@pytest.mark.parametrize("case", ["bool", "datetime"])
def test_a_model_loads_with_its_own_training_data_and_takes_queries_of_its_batch_dtype(case, tmp_path):
    torch.manual_seed(0)
    adata = synthetic(n_cells=40, n_genes=30, n_markers=5)
    adata.obs["b"] = (
        np.array([False, True] * 20) if case == "bool" else pd.to_datetime(["2020-01-01", "2021-06-01"] * 20)
    )
    fresh = adata.copy()  # the same cells, as read again in a new session
    sct.setup_anndata(adata, layer="counts", batch_key="b")
    model = sct.GeneTransformer(adata, **TINY, batch_correction="token")
    model.save(tmp_path / "model")
    loaded = sct.GeneTransformer.load(tmp_path / "model", adata=fresh)
    assert loaded.batch_categories_ == model.batch_categories_
    np.testing.assert_array_equal(fresh.obs["_scvi_batch"], adata.obs["_scvi_batch"])
    query = synthetic(n_cells=40, n_genes=30, n_markers=5, seed=3)
    query.obs["b"] = fresh.obs["b"].to_numpy()[::-1]
    queried = sct.GeneTransformer.load_query_data(query, tmp_path / "model")
    assert queried.batch_categories_ == model.batch_categories_
    np.testing.assert_array_equal(query.obs["_scvi_batch"], [1, 0] * 20)


def test_an_object_batch_column_of_ints_and_floats_sets_up_a_model():
    # scvi-tools registers it as floats ("1.0", "2.5"); the model names the int 1 "1" and also "1.0"
    cells = sct.datasets.synthetic(n_cells=40, n_genes=20, n_cell_types=2, n_markers=4, seed=0)
    cells.obs["batch"] = np.array([1, 2.5] * 20, dtype=object)
    sct.setup_anndata(cells, layer="counts", batch_key="batch")
    model = sct.GeneTransformer(cells, d_model=16, n_layers=1, n_heads=2, max_length=32)
    assert model.batch_categories_ == ["1.0", "2.5"]
