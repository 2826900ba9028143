"""Saved models are safe to load and never half-written."""

from __future__ import annotations

import json
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import sctransformer as sct

from ..conftest import fingerprint


class _CreatesAFileWhenUnpickled:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def saved(trained, tmp_path):
    model, data = trained
    path = tmp_path / "model"
    model.save(path)
    return path, model, data


def test_a_malicious_pickle_in_the_model_directory_is_never_unpickled(saved, tmp_path):
    path, model, data = saved
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_CreatesAFileWhenUnpickled(str(marker)))
    for name in ("model.pt", "model.pkl", "attr.pkl"):
        (path / name).write_bytes(payload)
    loaded = sct.GeneTransformer.load(path)
    assert not marker.exists()
    np.testing.assert_array_equal(
        loaded.get_latent_representation(data), model.get_latent_representation(data)
    )
    # a directory holding only a pickle is not a model
    only_pickle = tmp_path / "only_pickle"
    only_pickle.mkdir()
    (only_pickle / "model.pt").write_bytes(payload)
    with pytest.raises(FileNotFoundError, match="not a saved sctransformer model"):
        sct.GeneTransformer.load(only_pickle)
    assert not marker.exists()


def test_truncated_weights_are_refused(saved):
    path, _, _ = saved
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="checksum"):
        sct.GeneTransformer.load(path)


def test_a_flipped_bit_in_the_weights_is_refused(saved):
    path, _, _ = saved
    weights = path / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        sct.GeneTransformer.load(path)


def test_hyperparameters_that_do_not_fit_the_weights_are_refused(saved):
    path, _, _ = saved
    state = json.loads((path / "model.json").read_text())
    state["hyperparameters"]["d_model"] *= 2
    (path / "model.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="do not fit"):
        sct.GeneTransformer.load(path)


def test_a_newer_format_version_names_the_version(saved):
    path, _, _ = saved
    state = json.loads((path / "model.json").read_text())
    state["format_version"] = 999
    (path / "model.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"format 999.*upgrade sctransformer"):
        sct.GeneTransformer.load(path)


@pytest.mark.parametrize("version", ["1", 1.0, None, True, 0, [1]], ids=repr)
def test_a_format_version_that_is_no_integer_says_the_file_is_damaged(saved, version):
    path, _, _ = saved
    state = json.loads((path / "model.json").read_text())
    state["format_version"] = version
    if version is None:
        del state["format_version"]
    (path / "model.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="damaged or was not written by sctransformer") as error:
        sct.GeneTransformer.load(path)
    assert "upgrade" not in str(error.value)


def test_overwrite_never_deletes_other_files_beside_a_saved_model(saved):
    path, model, _ = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    (path / "adata.h5ad").write_bytes(b"the user's data")
    (path / "figures").mkdir()
    (path / "figures" / "umap.png").write_bytes(b"png")
    with pytest.raises(ValueError, match=r"other files \(adata\.h5ad, figures/\)"):
        model.save(path, overwrite=True)
    assert (path / "adata.h5ad").read_bytes() == b"the user's data"
    assert (path / "figures" / "umap.png").read_bytes() == b"png"
    assert {name: (path / name).read_bytes() for name in before} == before  # the model is kept too
    with pytest.raises(ValueError, match="other files"):  # not "pass overwrite=True"
        model.save(path)
    # the model's own files, and the config the command line saves beside them, are replaced
    (path / "adata.h5ad").unlink()
    (path / "figures" / "umap.png").unlink()
    (path / "figures").rmdir()
    (path / "config.yaml").write_text("output: model\n")
    model.save(path, overwrite=True)
    assert sorted(p.name for p in path.iterdir()) == ["model.json", "model.safetensors"]


@pytest.mark.parametrize("damage", ["missing json", "missing weights", "invalid json"])
def test_missing_or_unreadable_files_give_a_clear_error(saved, damage):
    path, _, _ = saved
    if damage == "missing json":
        (path / "model.json").unlink()
        error, message = FileNotFoundError, "model.json missing"
    elif damage == "missing weights":
        (path / "model.safetensors").unlink()
        error, message = FileNotFoundError, "model.safetensors missing"
    else:
        (path / "model.json").write_text("{not json")
        error, message = ValueError, "not valid JSON"
    with pytest.raises(error, match=message):
        sct.GeneTransformer.load(path)


_KILLED_SAVE = textwrap.dedent(
    """
    import sys, time
    import sctransformer as sct
    from sctransformer.model import _save_load

    def slow_save_file(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"half a file")
            f.flush()
        print("writing", flush=True)
        time.sleep(120)

    _save_load.save_file = slow_save_file
    model = sct.GeneTransformer.load(sys.argv[1])
    model.save(sys.argv[1], overwrite=True)
    """
)


def test_a_save_killed_while_writing_leaves_the_previous_model_intact(saved, tmp_path):
    path, model, data = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    script = tmp_path / "killed_save.py"
    script.write_text(_KILLED_SAVE)
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    loaded = sct.GeneTransformer.load(path)
    np.testing.assert_array_equal(
        loaded.get_latent_representation(data), model.get_latent_representation(data)
    )
    # the killed save's staging directory is beside the target, never inside it
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".model.saving-")]
    assert leftovers
    shutil.rmtree(leftovers[0])


def test_a_model_saved_with_the_old_is_zero_head_loads_without_it(saved, tmp_path):
    import torch

    from sctransformer.model._save_load import write_model_dir

    _, model, data = saved
    state = model._state()
    hyperparameters = dict(state["hyperparameters"])
    hyperparameters.pop("expression_queries")
    hyperparameters["n_unexpressed"] = 4
    weights = dict(model.module.state_dict())
    weights["is_zero_head.weight"] = torch.zeros(1, model.module.gene_embedding.embedding_dim)
    weights["is_zero_head.bias"] = torch.zeros(1)
    old = tmp_path / "old"
    write_model_dir(old, state | {"hyperparameters": hyperparameters}, weights, overwrite=False)
    with pytest.warns(UserWarning, match="is-zero head"):
        loaded = sct.GeneTransformer.load(old)
    assert (
        loaded.hyperparameters_["expression_queries"] == 0 and "n_unexpressed" not in loaded.hyperparameters_
    )
    np.testing.assert_allclose(
        loaded.get_latent_representation(data), model.get_latent_representation(data), rtol=1e-5, atol=1e-6
    )


def test_the_split_is_restored_only_onto_the_cells_it_indexes(saved):
    path, model, data = saved
    same = sct.GeneTransformer.load(path, adata=data)
    np.testing.assert_array_equal(same.validation_indices, model.validation_indices)
    assert sct.GeneTransformer.load(path).train_indices is not None  # no cells attached: kept
    # other cells (a query, here the same number of cells in another order): the positions mean nothing
    query = data[::-1].copy()
    for other in (
        sct.GeneTransformer.load(path, adata=query),
        sct.GeneTransformer.load_query_data(query, path),
    ):
        assert other.train_indices is None and other.validation_indices is None
        with pytest.raises(ValueError, match="indices"):
            other.calibrate()  # it asks which cells to fit on instead of using the reference's split


def test_a_model_loaded_without_cells_and_saved_again_keeps_the_cells_its_split_indexes(saved, tmp_path):
    path, model, data = saved
    again = tmp_path / "again"
    sct.GeneTransformer.load(path).save(again)  # e.g. a copy or conversion, with no cells attached
    recorded = json.loads((path / "model.json").read_text())["indexed_cells"]
    assert recorded is not None
    assert json.loads((again / "model.json").read_text())["indexed_cells"] == recorded
    # the same cells in another order: the saved positions would point at other cells
    shuffled = data[np.random.default_rng(0).permutation(data.n_obs)].copy()
    moved = sct.GeneTransformer.load(again, adata=shuffled)
    assert moved.train_indices is None and moved.validation_indices is None
    same = sct.GeneTransformer.load(again, adata=data)
    np.testing.assert_array_equal(same.validation_indices, model.validation_indices)
    # saved once more from an in-memory copy, still without cells
    sct.GeneTransformer.load(again).save(again, overwrite=True)
    assert json.loads((again / "model.json").read_text())["indexed_cells"] == recorded


def test_cells_filtered_in_place_after_training_keep_their_split_out_of_calibrate_and_save(tmp_path):
    import scanpy as sc

    from ..conftest import QUIET, TINY

    data = sct.datasets.synthetic(n_cells=150, n_genes=60, n_cell_types=3, n_markers=8, seed=1)
    sct.setup_anndata(data, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(data, **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=2, **QUIET)
    model.save(tmp_path / "before")
    original = data.copy()
    model.calibrate()  # the cells it was split on
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.filter_cells(data, min_counts=np.median(data.layers["counts"].sum(1)))  # in place
    assert 0 < data.n_obs < original.n_obs
    with pytest.raises(ValueError, match="cells changed since they were split"):
        model.calibrate()
    model.save(tmp_path / "after")  # the split still names the cells it was drawn on
    assert sct.GeneTransformer.load(tmp_path / "after", adata=data).validation_indices is None
    restored = sct.GeneTransformer.load(tmp_path / "after", adata=original)
    np.testing.assert_array_equal(restored.validation_indices, model.validation_indices)


def test_numpy_settings_save_and_saving_follows_a_symlink(tmp_path, monkeypatch):
    data = sct.datasets.synthetic(n_cells=60, n_genes=20, n_cell_types=2, n_markers=4, seed=2)
    sct.setup_anndata(data, layer="counts")
    model = sct.GeneTransformer(data, d_model=np.int64(16), n_layers=1, n_heads=2, max_length=np.int64(16))
    model.train(max_epochs=np.int64(1), lr=np.float32(1e-3), enable_progress_bar=False, logger=None)
    real = tmp_path / "real"
    model.save(real)  # the hyper-parameters and train settings are NumPy scalars
    assert json.loads((real / "model.json").read_text())["hyperparameters"]["d_model"] == 16
    link = tmp_path / "link"
    link.symlink_to(real)
    model.save(link, overwrite=True)
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    monkeypatch.chdir(real)
    with pytest.raises(ValueError, match="current working directory"):
        model.save(".", overwrite=True)
    assert sct.GeneTransformer.load(link).hyperparameters_["max_length"] == 16


def test_loading_onto_an_anndata_set_up_otherwise_sets_it_up_again_with_the_models_settings(tmp_path):
    data = sct.datasets.synthetic(n_cells=80, n_genes=20, n_cell_types=2, n_markers=4, seed=3)
    sct.setup_anndata(data, layer="counts", batch_key="batch")
    model = sct.GeneTransformer(data, d_model=16, n_layers=1, n_heads=2, max_length=16)
    model.save(tmp_path / "model")
    other = data.copy()
    other.obs["batch"] = other.obs["batch"].cat.reorder_categories(
        list(other.obs["batch"].cat.categories)[::-1]
    )
    sct.setup_anndata(other, layer=None, batch_key="batch")  # X, and the batches coded the other way round
    with pytest.warns(UserWarning, match=r"layer=None, the model's 'counts'.*batch codes"):
        loaded = sct.GeneTransformer.load(tmp_path / "model", adata=other)
    registered = loaded.adata_manager.registry["setup_args"]
    assert registered["layer"] == "counts"
    expected = [model.batch_categories_.index(b) for b in other.obs["batch"]]
    np.testing.assert_array_equal(other.obs["_scvi_batch"].to_numpy(), expected)
    same = data.copy()
    sct.setup_anndata(same, layer="counts", batch_key="batch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # set up as the model was: nothing to say
        sct.GeneTransformer.load(tmp_path / "model", adata=same)


_CURVE = {"epoch": [0, 1], "value": [1.0, 0.5]}


@pytest.mark.parametrize(
    ("where", "value", "message"),
    [
        (["history"], None, r"history must be a mapping of curve name .* got NoneType"),
        (["history", "loss"], [1.0, 0.5], r"history\['loss'\] must be a mapping, got list"),
        (["history", "loss"], {"epoch": [0, 1]}, r"missing key 'value' in history\['loss'\]"),
        (
            ["history", "loss"],
            _CURVE | {"epoch": ["0", 1]},
            r"\['epoch'\] must be a list of integers; entry 0",
        ),
        (
            ["history", "loss"],
            _CURVE | {"value": [1.0, "x"]},
            r"\['value'\] must be a list of numbers; entry 1",
        ),
        (["history", "loss"], _CURVE | {"value": [1.0]}, r"history\['loss'\] has 2 epochs but 1 values"),
        (["calibration"], [1.0], "calibration must be a mapping"),
        (["calibration"], {"cell_type": 3}, r"calibration\['cell_type'\] must be a mapping"),
        (["indices"], [0, 1], "indices must be a mapping"),
        (["indices", "test"], ..., "missing key 'test' in indices"),
        (["indices", "everything"], [0], r"unknown splits \['everything'\]"),
        (["indices", "train"], ["0", "1"], r"indices\['train'\] must be a list of cell positions"),
        (["indices", "train"], [0, 1.0], r"indices\['train'\] .*; entry 1 is 1\.0"),
        (["indices", "validation"], 5, r"indices\['validation'\] must be a list .* or null, got int"),
        (["indices", "validation"], [3, -1], r"indices\['validation'\] must hold cell positions >= 0"),
    ],
    ids=[
        "history null",
        "curve a list",
        "curve without values",
        "epoch a string",
        "value a string",
        "epochs and values unpaired",
        "calibration a list",
        "calibration entry a number",
        "indices a list",
        "split missing",
        "unknown split",
        "positions strings",
        "position a float",
        "split a number",
        "negative position",
    ],
)
def test_a_damaged_history_calibration_or_split_is_refused_before_adata_is_set_up(
    saved, where, value, message
):
    # were an AttributeError / TypeError raised after adata was set up, or a split of strings loaded
    path, _, data = saved
    state = json.loads((path / "model.json").read_text())
    *parents, last = where
    target = state
    for key in parents:
        target = target[key]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    (path / "model.json").write_text(json.dumps(state))
    adata = data.copy()
    adata.obs = adata.obs[[c for c in adata.obs if not c.startswith("_scvi")]]
    adata.uns.clear()
    before = fingerprint(adata)
    for load in (
        lambda: sct.GeneTransformer.load(path),
        lambda: sct.GeneTransformer.load(path, adata=adata),
        lambda: sct.GeneTransformer.load_query_data(adata, path),
    ):
        with pytest.raises(ValueError, match=f"damaged model.json in .*{message}"):
            load()
    assert fingerprint(adata) == before  # no _scvi_* columns in .obs, no keys in .uns


def test_an_overwriting_save_swaps_the_directories_in_one_step_where_the_system_can(
    saved, tmp_path, monkeypatch
):
    from pathlib import Path

    from sctransformer.model import _save_load

    path, model, data = saved
    probe_a, probe_b = tmp_path / "probe_a", tmp_path / "probe_b"
    probe_a.mkdir(), probe_b.mkdir()
    (probe_a / "a").touch()
    if not _save_load._exchange(probe_a, probe_b):
        pytest.skip("this system or file system cannot exchange two paths in one step")
    assert (probe_b / "a").exists() and not (probe_a / "a").exists()

    def no_rename(self, target):  # the two-rename fallback must not be needed
        raise AssertionError(f"renamed {self} -> {target}")

    monkeypatch.setattr(Path, "rename", no_rename)
    model.save(path, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".model")) == []
    np.testing.assert_array_equal(
        sct.GeneTransformer.load(path).get_latent_representation(data), model.get_latent_representation(data)
    )


def test_without_an_exchange_a_save_renames_twice_and_load_points_to_a_model_left_between(
    saved, tmp_path, monkeypatch
):
    import os

    from sctransformer.model import _save_load

    path, model, _ = saved
    monkeypatch.setattr(_save_load, "_exchange", lambda a, b: False)
    model.save(path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model")] == []
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir makes a directory, not private
    path.rename(tmp_path / ".model.old-12345")  # as a save killed between its two renames leaves it
    with pytest.raises(
        FileNotFoundError, match=r"interrupted, and the model it replaced is at .*\.model\.old-12345"
    ):
        sct.GeneTransformer.load(path)


def test_the_cells_fingerprint_hashed_in_chunks_is_the_digest_older_models_saved():
    import hashlib
    from types import SimpleNamespace

    import pandas as pd

    from sctransformer.model._gene_transformer import _cells_fingerprint

    for n in (0, 1, 7, 8, 20):
        names = pd.Index([f"cell_{i}" for i in range(n)])
        joined = hashlib.sha256("\x1f".join(names).encode()).hexdigest()  # as saved before chunking
        cells = SimpleNamespace(obs_names=names, n_obs=n)
        assert _cells_fingerprint(cells, chunk_size=7) == {"n_obs": n, "obs_names_sha256": joined}
