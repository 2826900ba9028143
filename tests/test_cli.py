"""The command line: pretrain from a config, embed and predict with a saved model."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import warnings

import anndata as ad
import h5py
import numpy as np
import pytest
import torch
import yaml

import sctransformer as sct
from sctransformer.cli import ConfigError, _load_data, main, read_config

from .conftest import QUIET, TINY


def write_shards(tmp_path) -> list[str]:
    data = sct.datasets.synthetic(n_cells=120, n_genes=60, n_cell_types=3, n_markers=8, seed=0)
    paths = []
    for i, part in enumerate((slice(0, 70), slice(70, None))):
        shard = data[part].copy()
        if i == 1:
            shard = shard[:, 2:].copy()  # the second shard lacks two genes
        path = tmp_path / f"shard_{i}.h5ad"
        shard.write_h5ad(path)
        paths.append(path.name)
    return paths


def write_config(tmp_path, **overrides) -> str:
    config = {
        "data": {"paths": write_shards(tmp_path), "layer": "counts", "phenotype_keys": ["cell_type"]},
        "model": dict(TINY),
        "train": {"max_epochs": 1, "batch_size": 32, "enable_progress_bar": False, "checkpoint_dir": "ckpt"},
        "output": "model",
    }
    config.update(overrides)
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pretrain_embed_predict_round_trip(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["pretrain", "--config", config]) == 0
    model_dir = tmp_path / "model"
    model = sct.GeneTransformer.load(model_dir)
    assert len(model.vocabulary_) == 58  # genes shared by both shards
    assert model.hyperparameters_["d_model"] == TINY["d_model"]
    saved = yaml.safe_load((model_dir / "config.yaml").read_text())
    assert saved["train"]["max_epochs"] == 1 and saved["model"] == TINY
    assert all(p.startswith(str(tmp_path)) for p in saved["data"]["paths"])  # resolved beside the config
    assert (tmp_path / "ckpt" / "last.ckpt").exists()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["output"] == str(model_dir)

    source = tmp_path / "shard_0.h5ad"
    before = digest(source)
    out = tmp_path / "embedded.h5ad"
    assert main(["embed", "--model", str(model_dir), "--input", str(source), "--output", str(out)]) == 0
    embedded, original = ad.read_h5ad(out), ad.read_h5ad(source)
    expected = model.get_latent_representation(original)
    np.testing.assert_allclose(embedded.obsm["X_sct"], expected, atol=1e-6)
    assert (embedded.layers["counts"] != original.layers["counts"]).nnz == 0  # copied as it was
    assert embedded.uns["sct"]["X_sct"]["function"] == "embed"
    assert not list(tmp_path.glob(".*.partial"))
    out = tmp_path / "predicted.h5ad"
    args = ["predict", "--model", str(model_dir), "--input", str(source), "--output", str(out)]
    assert main([*args, "--min-confidence", "0.5"]) == 0
    predicted = ad.read_h5ad(out)
    assert {"sct_cell_type", "sct_cell_type_confidence"} <= set(predicted.obs)
    assert digest(source) == before  # the input file is never changed


def test_console_script_reports_errors_with_status_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sctransformer.cli", "pretrain", "--config", str(tmp_path / "none.yaml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "config file" in result.stderr and "does not exist" in result.stderr


def test_pretrain_names_an_unreadable_file_skips_an_empty_one_and_logs_gene_coverage(
    tmp_path, capsys, caplog
):
    config = write_config(tmp_path)
    (tmp_path / "broken.h5ad").write_bytes(b"not an h5ad file")
    settings = yaml.safe_load(open(config))
    settings["data"]["paths"] = [*settings["data"]["paths"], "broken.h5ad"]
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(settings))
    assert main(["pretrain", "--config", str(tmp_path / "broken.yaml")]) == 2
    err = capsys.readouterr().err
    assert "cannot read data file" in err and "broken.h5ad" in err
    assert not (tmp_path / "model").exists()

    empty = sct.datasets.synthetic(n_cells=10, n_genes=60, n_markers=5)[:0].copy()
    empty.write_h5ad(tmp_path / "empty.h5ad")
    settings["data"]["paths"] = [*settings["data"]["paths"][:2], "empty.h5ad"]
    (tmp_path / "with_empty.yaml").write_text(yaml.safe_dump(settings))
    with (
        caplog.at_level("INFO", logger="sctransformer"),
        pytest.warns(UserWarning, match="no cells; skipped"),
    ):
        assert main(["pretrain", "--config", str(tmp_path / "with_empty.yaml")]) == 0
    assert "shard_1.h5ad: 58 of its 58 genes are in every file" in caplog.text
    assert "shard_0.h5ad: 58 of its 60 genes are in every file" in caplog.text


def test_streaming_pretrain_logs_to_csv_and_finetune_adds_a_head(tmp_path):
    config = write_config(tmp_path)
    settings = yaml.safe_load(open(config))
    settings["data"] |= {"streaming": True, "phenotype_keys": []}
    settings["train"] |= {"checkpoint_every_n_steps": 1}
    settings["log"] = {"loggers": ["csv"]}
    (tmp_path / "stream.yaml").write_text(yaml.safe_dump(settings))
    assert main(["pretrain", "--config", str(tmp_path / "stream.yaml")]) == 0
    pretrained = sct.GeneTransformer.load(tmp_path / "model")
    assert len(pretrained.vocabulary_) == 58 and not pretrained.phenotype_categories_
    assert pretrained.train_settings_["max_epochs"] == 1 and len(pretrained.history["loss_train"]) == 1
    metrics = list((tmp_path / "model-logs" / "csv").rglob("metrics.csv"))
    assert metrics and "loss_train" in metrics[0].read_text().splitlines()[0]  # CSV log, and history kept

    finetune = {
        "data": {"paths": ["shard_0.h5ad"], "layer": "counts", "phenotype_keys": ["cell_type"]},
        "reference": "model",
        "train": {"max_epochs": 1, "batch_size": 32, "freeze": "backbone", "enable_progress_bar": False},
        "log": {"loggers": ["csv"]},
        "output": "finetuned",
    }
    (tmp_path / "finetune.yaml").write_text(yaml.safe_dump(finetune))
    assert main(["finetune", "--config", str(tmp_path / "finetune.yaml")]) == 0
    tuned = sct.GeneTransformer.load(tmp_path / "finetuned")
    assert list(tuned.phenotype_categories_) == ["cell_type"]
    assert tuned.vocabulary_.genes == pretrained.vocabulary_.genes
    frozen = "blocks.0.attention.in_proj.weight"
    weights = {k: v for k, v in tuned.module.state_dict().items() if k.startswith("blocks.")}
    assert weights and all(torch.equal(v, pretrained.module.state_dict()[k]) for k, v in weights.items()), (
        frozen
    )  # the backbone stayed as pre-trained

    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(finetune | {"model": {"d_model": 8}}))
    assert main(["finetune", "--config", str(tmp_path / "bad.yaml")]) == 2


def test_embed_reads_a_layer_from_disk_and_keeps_the_files_other_embeddings(tmp_path):
    assert main(["pretrain", "--config", write_config(tmp_path)]) == 0
    source = tmp_path / "with_pca.h5ad"
    adata = ad.read_h5ad(tmp_path / "shard_0.h5ad")
    adata.obsm["X_pca"] = np.arange(adata.n_obs * 3, dtype=np.float32).reshape(-1, 3)
    adata.uns["note"] = "kept"
    adata.write_h5ad(source)
    out = tmp_path / "embedded.h5ad"
    assert (
        main(["embed", "--model", str(tmp_path / "model"), "--input", str(source), "--output", str(out)]) == 0
    )
    embedded = ad.read_h5ad(out)
    np.testing.assert_array_equal(embedded.obsm["X_pca"], adata.obsm["X_pca"])
    assert embedded.uns["note"] == "kept" and embedded.obsm["X_sct"].shape == (adata.n_obs, TINY["d_model"])
    model = sct.GeneTransformer.load(tmp_path / "model")
    np.testing.assert_allclose(embedded.obsm["X_sct"], model.get_latent_representation(adata), atol=1e-6)
    bad = tmp_path / "bad_key.h5ad"
    args = ["embed", "--model", str(tmp_path / "model"), "--input", str(source), "--output", str(bad)]
    assert main([*args, "--key-added", "X/sct"]) == 2  # "/" would nest .h5ad groups
    assert not bad.exists()


def test_a_wandb_project_without_the_wandb_logger_is_refused(tmp_path, capsys):
    config = write_config(tmp_path, log={"loggers": ["csv"], "wandb_project": "atlas"})
    assert main(["pretrain", "--config", config]) == 2
    assert "wandb_project is set but log.loggers" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def test_in_memory_data_keep_a_label_column_that_only_some_files_have(tmp_path):
    data = sct.datasets.synthetic(n_cells=60, n_genes=30, n_cell_types=3, n_markers=5, seed=0)
    labelled, unlabelled = data[:40].copy(), data[40:, ::-1][:, 2:].copy()  # other gene order, 2 fewer
    del unlabelled.obs["cell_type"]
    labelled.layers["normalised"] = labelled.layers["counts"] * 0.5  # in one file only: not kept
    labelled.write_h5ad(tmp_path / "labelled.h5ad")
    unlabelled.write_h5ad(tmp_path / "unlabelled.h5ad")
    adata = _load_data({"paths": [str(tmp_path / "labelled.h5ad"), str(tmp_path / "unlabelled.h5ad")]})
    assert adata.shape == (60, 28)
    assert set(adata.var_names) == set(unlabelled.var_names)
    assert list(adata.layers) == ["counts"]
    np.testing.assert_array_equal(
        adata.layers["counts"].toarray(), data[:, adata.var_names].layers["counts"].toarray()
    )
    assert list(adata.obs_names) == list(data.obs_names)
    np.testing.assert_array_equal(adata.obs["batch"].astype(str), data.obs["batch"].astype(str))
    assert list(adata.obs["source_file"].unique()) == ["labelled.h5ad", "unlabelled.h5ad"]
    # the labels of the first file are kept; the second file's cells are unknown (NaN)
    labels = adata.obs["cell_type"]
    assert (labels[:40].astype(str) == data.obs["cell_type"][:40].astype(str)).all()
    assert labels[40:].isna().all()
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    codes = adata.obs["_scvi_phenotype_cell_type"].to_numpy()
    assert (codes[:40] >= 0).all() and (codes[40:] == -1).all()


def test_finetune_refuses_data_settings_that_differ_from_the_reference(tmp_path, capsys):
    write_shards(tmp_path)
    reference = ad.read_h5ad(tmp_path / "shard_0.h5ad")
    sct.setup_anndata(reference, layer="counts", batch_key="batch")
    sct.GeneTransformer(reference, **TINY).save(tmp_path / "ref")
    finetune = {
        "data": {"paths": ["shard_0.h5ad"], "phenotype_keys": ["cell_type"]},
        "reference": "ref",
        "train": {"max_epochs": 1, "batch_size": 32, "enable_progress_bar": False},
        "log": {"loggers": ["csv"]},
        "output": "finetuned",
    }
    for key, value in [
        ("layer", "no_such_layer"),
        ("layer", None),  # X, where the reference read the counts layer
        ("gene_key", "gene_symbols"),
        ("batch_key", "no_such_batch"),
        ("batch_key", None),
    ]:
        config = finetune | {"data": finetune["data"] | {key: value}}
        (tmp_path / "finetune.yaml").write_text(yaml.safe_dump(config))
        assert main(["finetune", "--config", str(tmp_path / "finetune.yaml")]) == 2
        err = capsys.readouterr().err
        assert f"data.{key} is {value!r}" in err and "reference" in err, err
        assert not (tmp_path / "finetuned").exists()
    # the reference's own settings are accepted, and the saved config records what was used
    config = finetune | {"data": finetune["data"] | {"batch_key": "batch"}}
    (tmp_path / "finetune.yaml").write_text(yaml.safe_dump(config))
    assert main(["finetune", "--config", str(tmp_path / "finetune.yaml")]) == 0
    saved = yaml.safe_load((tmp_path / "finetuned" / "config.yaml").read_text())["data"]
    assert (saved["layer"], saved["batch_key"], saved["gene_key"]) == ("counts", "batch", None)


def test_predict_writes_probabilities_of_labels_with_slashes(tmp_path):
    data = sct.datasets.synthetic(n_cells=90, n_genes=30, n_cell_types=3, n_markers=6, seed=4)
    categories = [
        "CD4+/CD45RA+/CD25- Naive T",
        "CD8+/CD45RA+ Naive Cytotoxic",
        "CD14+ Monocyte",
    ]  # pbmc68k-like
    data.obs["cell_type"] = data.obs["cell_type"].cat.rename_categories(categories)
    source = tmp_path / "cells.h5ad"
    data.write_h5ad(source)
    sct.setup_anndata(data, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(data, **{**TINY, "max_length": 16})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=1, batch_size=32, **QUIET)
    model.save(tmp_path / "model")
    out = tmp_path / "predicted.h5ad"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert (
            main(
                ["predict", "--model", str(tmp_path / "model"), "--input", str(source), "--output", str(out)]
            )
            == 0
        )
    assert not [str(w.message) for w in caught if "slash" in str(w.message).lower()]
    predicted = ad.read_h5ad(out)
    assert list(predicted.uns["sct"]["sct"]["categories"]["cell_type"]) == categories
    probabilities = model.predict(data, return_probabilities=True)[1]["cell_type"]
    np.testing.assert_allclose(
        predicted.obsm["sct_cell_type_probs"].to_numpy(), probabilities.to_numpy(), atol=1e-6
    )
    correct = data.obs["cell_type"].astype(str).to_numpy() == probabilities.idxmax(axis=1).to_numpy()
    ece = sct.metrics.expected_calibration_error(probabilities.max(axis=1).to_numpy(), correct, n_bins=5)
    ax = sct.pl.calibration(predicted, "cell_type", "sct_cell_type", n_bins=5, show=False)
    assert ax.get_title() == f"ECE = {ece:.3f}"


def test_output_ending_in_a_slash_keeps_its_logs_beside_it_and_the_model_is_saved(tmp_path):
    config = write_config(tmp_path, output=f"{tmp_path}/model/", log={"loggers": ["csv"]})
    settings = read_config(config)
    assert settings["output"] == str(tmp_path / "model")
    assert settings["log"]["dir"] == str(tmp_path / "model-logs")  # not model/-logs, inside the output
    assert main(["pretrain", "--config", config]) == 0
    assert (tmp_path / "model" / "model.json").is_file()
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "config.yaml",
        "model.json",
        "model.safetensors",
    ]


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("train", "checkpoint_dir", "model/ckpt"),
        ("train", "checkpoint_dir", "./model/"),
        ("log", "dir", "model/logs"),
    ],
)
def test_checkpoints_or_logs_inside_the_output_are_refused_before_training(
    tmp_path, capsys, section, key, value
):
    config = write_config(tmp_path, log={"loggers": ["csv"]})
    settings = yaml.safe_load(open(config))
    settings[section] = settings[section] | {key: value, **({"resume": True} if section == "train" else {})}
    (tmp_path / "inside.yaml").write_text(yaml.safe_dump(settings))
    assert main(["pretrain", "--config", str(tmp_path / "inside.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"{section}.{key}" in err and "inside the output directory" in err, err
    assert not (tmp_path / "model").exists()  # refused before anything was trained or written


def test_a_key_or_section_given_twice_is_refused(tmp_path, capsys):
    write_shards(tmp_path)
    (tmp_path / "twice.yaml").write_text(
        "data: {paths: [shard_0.h5ad], layer: counts}\n"
        "train: {max_epochs: 50, checkpoint_dir: ckpt, resume: true}\n"
        "output: model\n"
        "train: {batch_size: 64}\n"
    )
    assert main(["pretrain", "--config", str(tmp_path / "twice.yaml")]) == 2
    assert "found the key 'train' twice" in capsys.readouterr().err
    (tmp_path / "twice.json").write_text(
        '{"data": {"paths": ["shard_0.h5ad"], "layer": "counts", "layer": null}, "output": "model"}'
    )
    with pytest.raises(ConfigError, match="found the key 'layer' twice"):
        read_config(tmp_path / "twice.json")
    (tmp_path / "merge.yaml").write_text(  # a merge key's values may be overridden
        "data: {paths: [shard_0.h5ad], layer: counts}\n"
        "model: {<<: {d_model: 16, n_layers: 2}, n_layers: 1}\n"
        "train: {max_epochs: 1}\n"
        "output: model\n"
    )
    assert read_config(tmp_path / "merge.yaml")["model"] == {"d_model": 16, "n_layers": 1}


@pytest.mark.parametrize("streaming", [False, True])
def test_a_data_file_listed_twice_is_refused(tmp_path, capsys, streaming):
    config = write_config(tmp_path)
    settings = yaml.safe_load(open(config))
    settings["data"] |= {"paths": ["shard_0.h5ad", "shard_1.h5ad", "./shard_0.h5ad"], "streaming": streaming}
    (tmp_path / "twice.yaml").write_text(yaml.safe_dump(settings))
    assert main(["pretrain", "--config", str(tmp_path / "twice.yaml")]) == 2
    assert "'./shard_0.h5ad' twice (also as 'shard_0.h5ad')" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def test_in_memory_files_of_one_name_in_two_folders_are_told_apart_and_a_source_file_column_is_kept(
    tmp_path,
):
    data = sct.datasets.synthetic(n_cells=60, n_genes=30, n_cell_types=3, n_markers=5, seed=0)
    paths = []
    for i, part in enumerate((slice(0, 25), slice(25, None))):  # as cellranger lays them out
        (tmp_path / f"sample_{i}").mkdir()
        sample = data[part].copy()
        sample.obs["source_file"] = f"run_{i}.bam"  # the user's own column
        sample.write_h5ad(tmp_path / f"sample_{i}" / "filtered.h5ad")
        paths.append(str(tmp_path / f"sample_{i}" / "filtered.h5ad"))
    adata = _load_data({"paths": paths})
    assert adata.n_obs == 60
    assert list(adata.obs["source_file"].astype(str).unique()) == ["run_0.bam", "run_1.bam"]  # kept
    assert list(adata.obs["source_file_1"].astype(str).unique()) == [
        "sample_0/filtered.h5ad",
        "sample_1/filtered.h5ad",
    ]
    assert (adata.obs["source_file_1"].astype(str) == "sample_0/filtered.h5ad").sum() == 25


def test_an_obs_column_in_an_unknown_encoding_is_exit_status_2_naming_the_file(tmp_path, capsys):
    config = write_config(tmp_path)
    with h5py.File(tmp_path / "shard_1.h5ad", "r+") as file:  # an encoding this anndata cannot read
        n_obs = len(file["obs/cell_type/codes"])
        del file["obs/cell_type"]
        file["obs/cell_type"] = np.zeros(n_obs, dtype="f4")
        file["obs/cell_type"].attrs.update({"encoding-type": "foo-array", "encoding-version": "0.1.0"})
    settings = yaml.safe_load(open(config))
    settings["data"]["streaming"] = True
    (tmp_path / "stream.yaml").write_text(yaml.safe_dump(settings))
    assert main(["pretrain", "--config", str(tmp_path / "stream.yaml")]) == 2
    err = capsys.readouterr().err
    assert "cannot read .obs['cell_type'] of shard" in err and "shard_1.h5ad" in err, err
    assert not (tmp_path / "model").exists()

    reference = ad.read_h5ad(tmp_path / "shard_0.h5ad")
    sct.setup_anndata(reference, layer="counts")
    sct.GeneTransformer(reference, **TINY).save(tmp_path / "ref")
    out = tmp_path / "embedded.h5ad"
    args = ["--model", str(tmp_path / "ref"), "--input", str(tmp_path / "shard_1.h5ad"), "--output", str(out)]
    assert main(["embed", *args]) == 2
    err = capsys.readouterr().err
    assert "cannot read .obs/.uns of" in err and "shard_1.h5ad" in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    ("output", "extra", "message"),
    [
        ("no_such_dir/out.h5ad", [], "does not exist"),
        ("out_dir.h5ad", [], "is a directory"),
        ("out_dir.h5ad", ["--overwrite"], "is a directory"),
        ("out.h5ad", ["--key-added", "."], "--key-added"),
        ("out.h5ad", ["--key-added", ".."], "--key-added"),
    ],
)
def test_a_bad_output_is_refused_before_the_model_is_loaded(
    tmp_path, capsys, monkeypatch, output, extra, message
):
    source = tmp_path / "cells.h5ad"
    sct.datasets.synthetic(n_cells=20, n_genes=40, seed=0).write_h5ad(source)
    (tmp_path / "out_dir.h5ad").mkdir()

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(sct.GeneTransformer, "load", load)
    args = ["--model", str(tmp_path / "model"), "--input", str(source), "--output", str(tmp_path / output)]
    assert main(["embed", *args, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "--overwrite" not in err, err  # a directory cannot be overwritten
    assert not (tmp_path / "out.h5ad").exists() and not list(tmp_path.rglob(".*.partial"))
