"""The command line: pretrain from a config, embed and predict with a saved model."""

from __future__ import annotations

import functools
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
from sctransformer.cli import ConfigError, _ConfigDumper, _load_data, _recorded, main, read_config

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


def save_reference(tmp_path, **setup) -> None:
    """Write the shards and save, as ``ref``, an untrained model of the first one set up with ``setup``."""
    write_shards(tmp_path)
    reference = ad.read_h5ad(tmp_path / "shard_0.h5ad")
    sct.setup_anndata(reference, **setup)
    sct.GeneTransformer(reference, **TINY).save(tmp_path / "ref")


def finetune_config(data: dict, output: str) -> dict:
    """A finetune config of ``data`` against the reference ``ref`` (:func:`save_reference`): one quiet epoch."""
    return {
        "data": data,
        "reference": "ref",
        "train": {"max_epochs": 1, "batch_size": 32, "enable_progress_bar": False},
        "log": {"loggers": ["csv"]},
        "output": output,
    }


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


def test_embed_reads_the_inputs_own_layer_and_gene_column_when_named(tmp_path, capsys):
    assert main(["pretrain", "--config", write_config(tmp_path)]) == 0
    adata = ad.read_h5ad(tmp_path / "shard_0.h5ad")
    model = sct.GeneTransformer.load(tmp_path / "model")
    expected = model.get_latent_representation(adata)
    other = ad.AnnData(adata.layers["counts"].copy(), obs=adata.obs[[]], var=adata.var[[]])  # counts in X
    other.var["symbol"] = other.var_names
    other.var_names = [f"id{i}" for i in range(other.n_vars)]
    other.write_h5ad(tmp_path / "x.h5ad")
    args = ["embed", "--model", str(tmp_path / "model"), "--input", str(tmp_path / "x.h5ad")]
    assert main([*args, "--output", str(tmp_path / "a.h5ad")]) == 2
    err = capsys.readouterr().err
    assert (
        "layer 'counts' not found (available: []); name the input's layer of raw counts with --layer" in err
    )
    assert main([*args, "--output", str(tmp_path / "a.h5ad"), "--layer", "X", "--gene-key", "gene"]) == 2
    assert (
        "no column 'gene' (gene_key; its columns: ['symbol']); name the .var column"
        in capsys.readouterr().err
    )
    # the var names (id0, id1, ...) share no gene with the model: the flag that fixes it, not gene_key=
    assert main([*args, "--output", str(tmp_path / "a.h5ad"), "--layer", "X"]) == 2
    err = capsys.readouterr().err
    assert "shares 0 genes" in err and "with --gene-key" in err and "gene_key=" not in err, err
    assert main([*args, "--output", str(tmp_path / "a.h5ad"), "--layer", "X", "--gene-key", "symbol"]) == 0
    np.testing.assert_allclose(ad.read_h5ad(tmp_path / "a.h5ad").obsm["X_sct"], expected, atol=1e-6)


def test_a_wandb_project_without_the_wandb_logger_is_refused(tmp_path, capsys):
    config = write_config(tmp_path, log={"loggers": ["csv"], "wandb_project": "atlas"})
    assert main(["pretrain", "--config", config]) == 2
    assert "wandb_project is set but log.loggers" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def test_paths_starting_with_a_tilde_are_in_the_home_directory(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    config = write_config(tmp_path, output="~/models/m")
    config_read = read_config(config)
    assert config_read["output"] == str(home / "models" / "m")
    assert config_read["log"]["dir"] == str(home / "models" / "m-logs")


def test_a_diverged_run_is_one_line_with_exit_status_1(tmp_path, capsys):
    config = write_config(
        tmp_path, train={"max_epochs": 1, "enable_progress_bar": False, "lr": 1.0e8, "warmup_fraction": 0.0}
    )
    assert main(["pretrain", "--config", config]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("sctransformer pretrain: error: non-finite training loss") and err.count("\n") == 1
    ), err
    assert not (tmp_path / "model").exists()


def test_a_saved_config_reads_back_strings_that_look_like_floats_as_strings(tmp_path):
    config = yaml.safe_load(open(write_config(tmp_path)))
    config["data"]["layer"] = "1e3"  # a layer so named: quoted in the config, and in the saved one
    config["train"]["lr"] = 1e-4
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config).replace("layer: 1e3", "layer: '1e3'"))
    read = read_config(tmp_path / "c.yaml")
    assert read["data"]["layer"] == "1e3" and read["train"]["lr"] == 1e-4
    (tmp_path / "saved.yaml").write_text(yaml.dump(_recorded(read), Dumper=_ConfigDumper, sort_keys=False))
    again = read_config(tmp_path / "saved.yaml")
    assert again["data"]["layer"] == "1e3" and again["train"]["lr"] == 1e-4


def test_a_logger_named_twice_is_refused(tmp_path, capsys):
    config = write_config(tmp_path, log={"loggers": ["csv", "csv"]})
    assert main(["pretrain", "--config", config]) == 2
    assert "log.loggers names ['csv'] more than once" in capsys.readouterr().err
    assert not (tmp_path / "model").exists() and not (tmp_path / "model-logs").exists()


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
    save_reference(tmp_path, layer="counts", batch_key="batch")
    finetune = finetune_config(
        {"paths": ["shard_0.h5ad"], "phenotype_keys": ["cell_type"]}, output="finetuned"
    )
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


def test_finetune_takes_min_gene_overlap_for_a_query_sharing_few_genes(tmp_path, capsys):
    save_reference(tmp_path, layer="counts")
    query = ad.read_h5ad(tmp_path / "shard_0.h5ad")
    kept = query.n_vars // 5  # the others renamed: genes the reference does not know
    query.var_names = [*query.var_names[:kept], *(f"novel_{i}" for i in range(query.n_vars - kept))]
    query.write_h5ad(tmp_path / "few_genes.h5ad")
    finetune = finetune_config(
        {"paths": ["few_genes.h5ad"], "phenotype_keys": ["cell_type"]}, output="finetuned"
    )
    for overlap, status, message in (
        (None, 2, "min_gene_overlap=0.5"),
        (1.5, 2, "must be a number in (0, 1]"),
    ):
        data = finetune["data"] | ({} if overlap is None else {"min_gene_overlap": overlap})
        (tmp_path / "f.yaml").write_text(yaml.safe_dump(finetune | {"data": data}))
        assert main(["finetune", "--config", str(tmp_path / "f.yaml")]) == status
        assert message in capsys.readouterr().err
    (tmp_path / "f.yaml").write_text(
        yaml.safe_dump(finetune | {"data": finetune["data"] | {"min_gene_overlap": 0.1}})
    )
    assert main(["finetune", "--config", str(tmp_path / "f.yaml")]) == 0
    config = write_config(
        tmp_path, data={"paths": ["shard_0.h5ad"], "layer": "counts", "min_gene_overlap": 0.1}
    )
    assert main(["pretrain", "--config", config]) == 2
    assert "data.min_gene_overlap is finetune's" in capsys.readouterr().err


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
    err = capsys.readouterr().err
    assert (
        "found the key 'train' twice; keep one (else the last would be used silently) at line 4, column 1"
        in err
    )
    assert err.count("\n") == 1, err  # one line, as every error of the command
    (tmp_path / "broken.yaml").write_text("data: {paths: [shard_0.h5ad]\noutput: model\n")
    assert main(["pretrain", "--config", str(tmp_path / "broken.yaml")]) == 2
    err = capsys.readouterr().err
    assert "is not valid YAML/JSON: " in err and "at line 2" in err and err.count("\n") == 1, err
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


@pytest.mark.parametrize(
    ("streaming", "options", "message"),
    [
        (False, {"num_worker": 1}, r"train\.datasplitter_kwargs \['num_worker'\] are options of neither"),
        (False, {"block_size": 4}, r"\['block_size'\] apply to data streamed from shards"),
        (True, {"drop_last": True}, r"\['drop_last'\] do not apply to data streamed from shards"),
        (False, [1], "must be a mapping"),
    ],
)
def test_misspelt_or_misplaced_data_splitter_options_are_refused_when_the_config_is_read(
    tmp_path, streaming, options, message
):
    config = write_config(tmp_path, train={"max_epochs": 1, "datasplitter_kwargs": options})
    text = yaml.safe_load(open(config))
    text["data"]["streaming"] = streaming
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(text))
    with pytest.raises(ConfigError, match=message):
        read_config(config)


def test_a_yaml_number_in_e_notation_without_a_dot_is_a_float(tmp_path):
    write_shards(tmp_path)
    (tmp_path / "e.yaml").write_text(
        "data: {paths: [shard_0.h5ad], layer: counts}\ntrain: {max_epochs: 1, lr: 1e-4}\noutput: m\n"
    )
    assert read_config(tmp_path / "e.yaml")["train"]["lr"] == pytest.approx(1e-4)


def test_embed_matches_genes_by_a_column_that_also_names_the_index(tmp_path):
    data = sct.datasets.synthetic(n_cells=40, n_genes=30, seed=0)
    data.var["gene_ids"] = [f"ENS{name}" for name in data.var_names]
    data.var_names = data.var["gene_ids"]
    data.write_h5ad(tmp_path / "in.h5ad")
    sct.setup_anndata(data, layer="counts", gene_key="gene_ids")
    sct.GeneTransformer(data, **TINY).save(tmp_path / "m")
    args = ["embed", "--model", str(tmp_path / "m"), "--input", str(tmp_path / "in.h5ad")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained model
        assert main([*args, "--output", str(tmp_path / "out.h5ad")]) == 0


def test_a_json_config_indented_with_tabs_is_read(tmp_path):
    write_shards(tmp_path)
    config = {
        "data": {"paths": ["shard_0.h5ad"], "layer": "counts"},
        "train": {"max_epochs": 1},
        "output": "m",
    }
    (tmp_path / "tabs.json").write_text(json.dumps(config, indent="\t"))
    assert read_config(tmp_path / "tabs.json")["train"] == {"max_epochs": 1}
    (tmp_path / "broken.json").write_text('{"data": ')
    with pytest.raises(ConfigError, match="is not valid JSON"):
        read_config(tmp_path / "broken.json")


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


def _train_must_not_run(monkeypatch) -> None:
    """Make training fail loudly: a check said to come before it must have refused the run."""

    @functools.wraps(sct.GeneTransformer.train)  # its signature: read_config checks the options by it
    def train(*args, **kwargs):
        raise AssertionError("training ran before the config was refused")

    monkeypatch.setattr(sct.GeneTransformer, "train", train)


@pytest.mark.parametrize("streaming", [False, True])
def test_resuming_a_checkpoint_of_other_cells_of_the_same_number_is_refused_before_anything_is_saved(
    tmp_path, capsys, streaming
):
    data = sct.datasets.synthetic(n_cells=60, n_genes=30, n_cell_types=3, n_markers=5, seed=0)
    data.write_h5ad(tmp_path / "a.h5ad")
    other = data.copy()
    other.obs_names = [f"other_{name}" for name in other.obs_names]  # other cells, as many
    other.write_h5ad(tmp_path / "b.h5ad")
    for name in ("a", "b"):
        config = {
            "data": {"paths": [f"{name}.h5ad"], "layer": "counts", "streaming": streaming},
            "model": dict(TINY),
            "train": {"max_epochs": 1, "batch_size": 32, "enable_progress_bar": False}
            | {"checkpoint_dir": "ckpt", "resume": True},
            "log": {"loggers": ["csv"]},
            "output": f"model_{name}",
        }
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    assert main(["pretrain", "--config", str(tmp_path / "a.yaml")]) == 0
    # the checkpoint's run has finished: nothing is left to train, yet the data are checked
    assert main(["pretrain", "--config", str(tmp_path / "b.yaml")]) == 2
    err = capsys.readouterr().err
    assert "cannot resume from this checkpoint" in err and "training cells' names" in err, err
    assert not (tmp_path / "model_b").exists()  # not model_a's weights saved as a model of b.h5ad
    assert not (tmp_path / "model_b-logs").exists()  # nor empty log folders of the refused run
    assert (tmp_path / "ckpt" / "last.ckpt").exists() and (tmp_path / "model_a-logs").exists()
    # folders that existed before a refused run stay, empty or not
    (tmp_path / "project" / "figures").mkdir(parents=True)
    config = yaml.safe_load((tmp_path / "b.yaml").read_text()) | {
        "log": {"loggers": ["csv"], "dir": "project"}
    }
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(config))
    assert main(["pretrain", "--config", str(tmp_path / "b.yaml")]) == 2
    assert sorted(p.name for p in (tmp_path / "project").iterdir()) == ["figures"]


def test_only_global_rank_0_saves_and_prints(tmp_path, capsys, monkeypatch):
    import torch.distributed as dist

    config = write_config(tmp_path, log={"loggers": ["csv"]})
    train, barriers = sct.GeneTransformer.train, []

    @functools.wraps(train)
    def train_as_rank_1(model, *args, **kwargs):
        train(model, *args, **kwargs)
        # as Lightning's ddp leaves the second of two processes: in the process group, rank 1
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_rank", lambda *args: 1)
        monkeypatch.setattr(dist, "barrier", lambda *args, **kwargs: barriers.append(1))

    monkeypatch.setattr(sct.GeneTransformer, "train", train_as_rank_1)
    assert main(["pretrain", "--config", config]) == 0
    assert not (tmp_path / "model").exists()  # rank 0 saves; two saves would race for the directory
    assert capsys.readouterr().out.strip() == ""  # one success line per run, printed by rank 0
    assert barriers == [1]  # waited for rank 0's save


def test_a_model_saved_into_the_output_during_training_names_the_overwrite_option(
    tmp_path, capsys, monkeypatch
):
    config = write_config(tmp_path, log={"loggers": ["csv"]})
    train = sct.GeneTransformer.train

    @functools.wraps(train)
    def train_then_save_elsewhere(model, *args, **kwargs):  # e.g. another run saved there meanwhile
        train(model, *args, **kwargs)
        model.save(tmp_path / "model")

    monkeypatch.setattr(sct.GeneTransformer, "train", train_then_save_elsewhere)
    assert main(["pretrain", "--config", config]) == 2
    err = capsys.readouterr().err
    assert "holds a saved model; pass --overwrite" in err and "overwrite=True" not in err, err


@pytest.mark.parametrize(("section", "key"), [("output", None), ("log", "dir")])
def test_an_output_or_log_dir_below_a_file_is_refused_before_training(
    tmp_path, capsys, monkeypatch, section, key
):
    (tmp_path / "runs").write_text("a leftover file where the run folder was meant to be")
    if section == "output":
        config = write_config(tmp_path, output="runs/model", log={"loggers": ["csv"]})
    else:
        config = write_config(tmp_path, log={"loggers": ["csv"], "dir": "runs/logs"})
    _train_must_not_run(monkeypatch)
    assert main(["pretrain", "--config", config]) == 2
    err = capsys.readouterr().err
    name = "output" if section == "output" else "log.dir"
    assert (
        f"{name}: cannot create or write the directory" in err and f"{tmp_path / 'runs'}' is a file" in err
    ), err


def test_the_config_saved_beside_a_pretrained_model_runs_again_without_tensorboard(tmp_path, monkeypatch):
    config = write_config(tmp_path)  # no log section: the loggers are this machine's default
    assert main(["pretrain", "--config", config]) == 0
    saved = (tmp_path / "model" / "config.yaml").read_text()
    (tmp_path / "again.yaml").write_text(saved.replace(f"{tmp_path}/model", f"{tmp_path}/again"))
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as on a machine without tensorboard
    assert main(["pretrain", "--config", str(tmp_path / "again.yaml")]) == 0
    assert (tmp_path / "again" / "model.json").is_file()


def test_a_saved_config_run_with_another_output_logs_beside_that_output(tmp_path):
    config = write_config(tmp_path)  # no log.dir: the default, <output>-logs
    assert main(["pretrain", "--config", config]) == 0
    saved = yaml.safe_load((tmp_path / "model" / "config.yaml").read_text())
    assert "dir" not in saved["log"]  # the default follows the output; it is not recorded
    saved["output"] = str(tmp_path / "again")
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(saved))
    assert main(["pretrain", "--config", str(tmp_path / "again.yaml")]) == 0
    assert (tmp_path / "again-logs").is_dir()
    assert len(list((tmp_path / "model-logs").rglob("metrics.csv"))) == 1  # the first run's logs alone


def test_the_config_saved_beside_a_finetuned_model_runs_again(tmp_path):
    save_reference(tmp_path, layer="counts")
    finetune = finetune_config({"paths": ["shard_0.h5ad"], "phenotype_keys": ["cell_type"]}, output="tuned")
    (tmp_path / "finetune.yaml").write_text(yaml.safe_dump(finetune))
    assert main(["finetune", "--config", str(tmp_path / "finetune.yaml")]) == 0
    saved = (tmp_path / "tuned" / "config.yaml").read_text()
    assert "model" not in yaml.safe_load(saved)  # a section finetune refuses is not recorded
    (tmp_path / "again.yaml").write_text(saved.replace(f"{tmp_path}/tuned", f"{tmp_path}/again"))
    assert main(["finetune", "--config", str(tmp_path / "again.yaml")]) == 0
    assert (tmp_path / "again" / "model.json").is_file()


def test_finetune_of_a_labelled_reference_trains_on_its_labels_without_a_leak_warning(tmp_path, caplog):
    """Fine-tuning is meant to train on the data's labels: no warning that they are training targets."""
    save_reference(tmp_path, layer="counts", phenotype_keys=["cell_type"])
    # no phenotype_keys: the reference's
    finetune = finetune_config({"paths": ["shard_1.h5ad"]}, output="tuned")
    (tmp_path / "finetune.yaml").write_text(yaml.safe_dump(finetune))
    with caplog.at_level("INFO", logger="sctransformer"):
        assert main(["finetune", "--config", str(tmp_path / "finetune.yaml")]) == 0
    targets = [r for r in caplog.records if "are training targets" in r.getMessage()]
    assert [r.levelname for r in targets] == ["INFO"]  # said, as asked for, not warned
    tuned = sct.GeneTransformer.load(tmp_path / "tuned")
    assert "phenotype_cell_type_train" in tuned.history


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_steps", -5),
        ("limit_train_batches", 2.5),
        ("limit_val_batches", -1),
        ("accumulate_grad_batches", 0),
        ("log_every_n_steps", 1.5),
        ("num_nodes", True),
        ("gradient_clip_val", -1.0),
        ("enable_progress_bar", "no"),
        ("strategy", 4),
        ("early_stopping_patience", 0),
        ("early_stopping_mode", "up"),
        ("limit_train_batches", 0),  # no training step: the initial weights saved as a trained model
        ("max_steps", 0),
        ("val_check_interval", 0),  # a division by zero after the first step
        ("check_val_every_n_epoch", 0),
        ("num_sanity_val_steps", "abc"),
        ("overfit_batches", 2),  # Lightning's loader for it cannot batch sparse counts
    ],
)
def test_a_trainer_option_lightning_would_refuse_is_refused_when_the_config_is_read(
    tmp_path, capsys, monkeypatch, option, value
):
    config = write_config(tmp_path)
    settings = yaml.safe_load(open(config))
    settings["train"][option] = value
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(settings))
    with pytest.raises(ConfigError, match=rf"^train\.{option} must be .*, got {value!r}$"):
        read_config(tmp_path / "bad.yaml")
    for fine in (None, 1, 0.5, 1.0) if option.startswith("limit_") else ():
        settings["train"][option] = fine
        (tmp_path / "fine.yaml").write_text(yaml.safe_dump(settings))
        read_config(tmp_path / "fine.yaml")


def test_early_stopping_and_other_trainer_options_are_taken_and_misspelt_ones_refused(tmp_path):
    config = write_config(tmp_path)
    settings = yaml.safe_load(open(config))
    settings["train"] |= {
        "early_stopping": True,
        "early_stopping_patience": 2,
        "early_stopping_monitor": "loss_validation",
        "check_val_every_n_epoch": 1,
        "max_time": "00:00:10:00",
    }
    (tmp_path / "fine.yaml").write_text(yaml.safe_dump(settings))
    assert read_config(tmp_path / "fine.yaml")["train"]["early_stopping_patience"] == 2
    settings["train"]["early_stoping_patience"] = 2
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(settings))
    with pytest.raises(ConfigError, match=r"unknown train options \['early_stoping_patience'\]"):
        read_config(tmp_path / "bad.yaml")
    for managed in ("callbacks", "logger"):  # the command sets them itself
        settings["train"] = {"max_epochs": 1, managed: None}
        (tmp_path / "managed.yaml").write_text(yaml.safe_dump(settings))
        with pytest.raises(ConfigError, match=f"unknown train options \\['{managed}'\\]"):
            read_config(tmp_path / "managed.yaml")


def test_a_trainer_setting_lightning_refuses_is_one_line_with_status_2(tmp_path, capsys):
    config = write_config(tmp_path, log={"loggers": ["csv"]})
    settings = yaml.safe_load(open(config))
    settings["train"] |= {"accelerator": "cpu", "devices": 0}  # Lightning's MisconfigurationException
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(settings))
    assert main(["pretrain", "--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sctransformer pretrain: error: ") and "devices" in err[-1], err
    assert not (tmp_path / "model").exists()


def test_embed_names_a_file_of_the_layout_before_anndata_0_7_and_the_rewrite_that_fixes_it(tmp_path, capsys):
    data = sct.datasets.synthetic(n_cells=20, n_genes=30, n_markers=5, seed=0)
    data.X = data.layers["counts"]  # a model of X, as the legacy file holds its counts there
    sct.setup_anndata(data)
    sct.GeneTransformer(data, **TINY).save(tmp_path / "model")
    legacy = tmp_path / "legacy.h5ad"
    with h5py.File(legacy, "w") as file:  # as anndata < 0.7 wrote it (scanpy's 10x_pbmc68k_reduced.h5ad)
        file["X"] = data.layers["counts"].toarray().astype(np.float32)
        file["obs"] = np.array([(name.encode(),) for name in data.obs_names], dtype=[("index", "S16")])
        file["var"] = np.array([(name.encode(),) for name in data.var_names], dtype=[("index", "S16")])
    out = tmp_path / "out.h5ad"
    assert (
        main(["embed", "--model", str(tmp_path / "model"), "--input", str(legacy), "--output", str(out)]) == 2
    )
    err = capsys.readouterr().err
    assert str(legacy) in err and "before 0.7" in err and f"anndata.read_h5ad({str(legacy)!r})" in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    ("problem", "data", "error", "message"),
    [
        (
            "gene_key column missing",
            {"gene_key": "symbol"},
            KeyError,
            r"shard_0\.h5ad: \.var has no column 'symbol'",
        ),
        ("a gene twice", {}, ValueError, r"twice\.h5ad: the gene identifiers in \.var_names are not unique"),
        (
            "layer missing in the 2nd file",
            {"layer": "counts"},
            KeyError,
            r"in_x\.h5ad: layer 'counts' not found",
        ),
    ],
)
def test_in_memory_files_are_each_checked_before_they_are_joined(tmp_path, problem, data, error, message):
    paths = [str(tmp_path / name) for name in write_shards(tmp_path)]
    if problem == "a gene twice":
        twice = ad.read_h5ad(paths[1])
        twice.var_names = [*twice.var_names[:-1], twice.var_names[-2]]
        twice.write_h5ad(tmp_path / "twice.h5ad")
        paths[1] = str(tmp_path / "twice.h5ad")
    elif problem == "layer missing in the 2nd file":
        in_x = ad.read_h5ad(paths[1])
        in_x.X = in_x.layers.pop("counts")
        in_x.write_h5ad(tmp_path / "in_x.h5ad")
        paths[1] = str(tmp_path / "in_x.h5ad")
    with pytest.raises(error, match=message):
        _load_data({"paths": paths, **data})


def test_each_run_finishes_its_weights_and_biases_run(tmp_path, monkeypatch):
    import importlib.machinery
    import types

    import lightning.pytorch.loggers.wandb as lightning_wandb

    runs = []

    class Run:  # what WandbLogger uses of a wandb run
        def __init__(self, **init) -> None:
            self.init, self.finished, self.logged = init, False, []
            self.id = self.name = f"run-{len(runs)}"
            self.config = types.SimpleNamespace(update=lambda *args, **kwargs: None)

        def define_metric(self, *args, **kwargs) -> None:
            pass

        def log(self, metrics, *args, **kwargs) -> None:
            self.logged.append(metrics)

        def finish(self) -> None:  # as wandb's: the process has no open run any more
            self.finished, wandb.run = True, None

    def init(**kwargs) -> Run:
        runs.append(Run(**kwargs))
        wandb.run = runs[-1]
        return wandb.run

    wandb = types.ModuleType("wandb")  # a stand-in for wandb, with its one open run per process
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    wandb.run, wandb.init = None, init
    sdk, lib, wandb_run = (types.ModuleType(f"wandb.{n}") for n in ("sdk", "sdk.lib", "wandb_run"))
    lib.RunDisabled, wandb_run.Run = type("RunDisabled", (), {}), Run
    for name, module in [
        ("wandb", wandb),
        ("wandb.sdk", sdk),
        ("wandb.sdk.lib", lib),
        ("wandb.wandb_run", wandb_run),
    ]:
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(lightning_wandb, "_WANDB_AVAILABLE", True)

    for name in ("first", "second"):
        config = write_config(tmp_path, output=name, log={"loggers": ["wandb"], "wandb_project": name})
        assert main(["pretrain", "--config", config]) == 0
    assert [run.init["project"] for run in runs] == ["first", "second"]  # not the first run reused
    assert all(run.finished and run.logged for run in runs)
    assert wandb.run is None
