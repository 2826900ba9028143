"""Batch correction: the [BATCH] token, the gradient-reversal discriminator, and their errors."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import sctransformer as sct
from sctransformer.module import reverse_gradient
from sctransformer.train._plan import adversary_scale

from ..conftest import QUIET, TINY


def test_gradient_reversal_is_the_identity_forward_and_flips_and_scales_the_gradient():
    x = torch.randn(5, 3, requires_grad=True)
    weights = torch.randn(5, 3)
    y = reverse_gradient(x, 0.7)
    torch.testing.assert_close(y, x)
    (y * weights).sum().backward()
    torch.testing.assert_close(x.grad, -0.7 * weights)


def test_the_dann_schedule_ramps_from_zero_to_one():
    assert adversary_scale(0.0, "dann") == 0.0
    assert 0.45 < adversary_scale(0.1, "dann") < 0.5  # 2 / (1 + e^-1) - 1 = 0.462
    assert adversary_scale(1.0, "dann") > 0.9999
    assert adversary_scale(0.3, "constant") == 1.0
    with pytest.raises(ValueError, match="adversary_schedule"):
        adversary_scale(0.5, "linear")


def _batched(adata, mode: str, **train):
    sct.setup_anndata(adata, layer="counts", batch_key="batch")
    model = sct.GeneTransformer(adata, **TINY, batch_correction=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=2, batch_size=32, **QUIET, **train)
    return model


def test_the_discriminator_trains_against_the_encoder_and_logs_its_accuracy(adata):
    model = _batched(adata, "adversarial")
    history = model.history
    assert {"batch_adversary_train", "batch_adversary_accuracy_validation"} <= set(history)
    assert model.module.batch_adversary and not model.module.batch_token
    # the encoder's gradient from the discriminator's loss is reversed: one step on that loss
    # alone moves the discriminator to lower it and the encoder to raise it
    module = model.module.train()
    module.adversary_scale = 1.0
    x = sct.data.to_torch_csr(adata.layers["counts"][:64])
    tokens = module.tokenize(x, torch.as_tensor(model._column_to_gene(adata)))
    batches = torch.as_tensor(adata.obs["_scvi_batch"].to_numpy()[:64]).long()
    no_phenotypes = torch.zeros(64, 0, dtype=torch.long)

    def adversary_loss():
        hidden = module.encode(tokens, no_phenotypes, batch_inputs=batches)
        out = module.loss(hidden, tokens, torch.zeros_like(tokens.is_token), no_phenotypes, no_phenotypes.bool(), [],
                          batch_targets=batches)  # fmt: skip
        return out.components["batch_adversary"]

    module.zero_grad()
    adversary_loss().backward()
    encoder = module.profile_embedding.weight
    discriminator = module.batch_discriminator[-1].weight
    with torch.no_grad():
        base = adversary_loss().item()
        step = 1e-2
        discriminator -= step * discriminator.grad / discriminator.grad.norm()
        after_discriminator = adversary_loss().item()
        discriminator += step * discriminator.grad / discriminator.grad.norm()
        encoder -= step * encoder.grad / encoder.grad.norm()
        after_encoder = adversary_loss().item()
    assert after_discriminator < base < after_encoder


def test_the_batch_token_sets_the_embedding_and_can_be_dropped_or_set(adata):
    model = _batched(adata, "token")
    assert model.module.batch_token and model.module.n_prefix == 1 + 0 + 1 + 1
    dropped = model.get_latent_representation()
    own = model.get_latent_representation(batch="own")
    first = model.batch_categories_[0]
    as_first = model.get_latent_representation(batch=first)
    assert not np.allclose(dropped, own)
    in_first = (adata.obs["batch"].astype(str) == first).to_numpy()
    np.testing.assert_allclose(own[in_first], as_first[in_first], rtol=1e-5, atol=1e-5)
    assert not np.allclose(own[~in_first], as_first[~in_first])
    with pytest.raises(ValueError, match="not one of the batches the model was trained on"):
        model.get_latent_representation(batch="nonexistent")


def test_batch_given_as_the_columns_own_value_is_matched_by_name(adata):
    adata.obs["plate"] = adata.obs["batch"].cat.codes.astype(int) + 1  # plates 1 and 2, named "1", "2"
    sct.setup_anndata(adata, layer="counts", batch_key="plate")
    model = sct.GeneTransformer(adata, **TINY, batch_correction="token")
    as_name = model.get_latent_representation(batch="1")
    for value in (1, np.int64(1), 1.0):
        np.testing.assert_array_equal(model.get_latent_representation(batch=value), as_name)
    with pytest.raises(ValueError, match="not one of the batches the model was trained on"):
        model.get_latent_representation(batch=3)


def test_own_batches_of_shards_are_read_from_them_and_asked_for_when_they_were_read_without(adata, tmp_path):
    from sctransformer.data import ShardedAnnData

    model = _batched(adata, "token")
    adata.write_h5ad(tmp_path / "cells.h5ad")
    with_batches = ShardedAnnData([str(tmp_path / "cells.h5ad")], layer="counts", batch_key="batch")
    np.testing.assert_allclose(
        model.get_latent_representation(with_batches, batch="own"),
        model.get_latent_representation(batch="own"),
        rtol=1e-5,
        atol=1e-5,
    )
    without = ShardedAnnData([str(tmp_path / "cells.h5ad")], layer="counts")
    with pytest.raises(ValueError, match=r"read them with ShardedAnnData\(\.\.\., batch_key='batch'\)"):
        model.get_latent_representation(without, batch="own")


def test_a_query_batch_is_refused_as_batch_and_not_offered_in_the_message(adata, tmp_path):
    model = _batched(adata, "token")
    model.save(tmp_path / "m")
    query = adata.copy()
    query.obs["batch"] = "query_batch"
    loaded = sct.GeneTransformer.load_query_data(query, tmp_path / "m")
    assert "query_batch" in loaded.batch_categories_  # known, but the model has no embedding for it
    with pytest.raises(ValueError, match="trained on") as err:
        loaded.get_latent_representation(query, batch="query_batch")
    assert "'query_batch'" not in str(err.value).split("trained on")[1]


def test_both_modes_save_and_load(adata, tmp_path):
    model = _batched(adata, "both", adversary_weight=0.5, adversary_schedule="constant")
    model.save(tmp_path / "m")
    loaded = sct.GeneTransformer.load(tmp_path / "m")
    np.testing.assert_array_equal(
        loaded.get_latent_representation(adata, batch="own"), model.get_latent_representation(batch="own")
    )
    assert model.train_settings_["adversary_schedule"] == "constant"


def test_batch_correction_needs_two_batches_and_valid_settings(adata):
    single = adata.copy()
    sct.setup_anndata(adata, layer="counts")
    with pytest.raises(ValueError, match=r"needs at least 2 batches.*batch_key"):
        sct.GeneTransformer(adata, **TINY, batch_correction="adversarial")
    single.obs["batch"] = "only"
    sct.setup_anndata(single, layer="counts", batch_key="batch")
    with pytest.raises(ValueError, match="needs at least 2 batches"):
        sct.GeneTransformer(single, **TINY, batch_correction="token")
    with pytest.raises(ValueError, match="batch_correction must be one of"):
        sct.GeneTransformer(single, **TINY, batch_correction="harmony")
    model = sct.GeneTransformer(adata, **TINY)
    with pytest.raises(ValueError, match="adversary_weight"):
        model.train(adversary_weight=-1)
    with pytest.raises(ValueError, match="adversary_schedule"):
        model.train(adversary_schedule="linear")
    with pytest.raises(ValueError, match="does not have"):
        model.get_latent_representation(batch="own")


def test_cells_without_a_batch_column_feed_no_batch_instead_of_the_placeholder_batch_0(adata):
    from sctransformer.train import MaskedModelingPlan

    model = _batched(adata, "both")
    batch = {"batch": torch.zeros(4, 1)}  # scvi-tools' placeholder codes of data without batch_key
    with_batches = MaskedModelingPlan(model.module, column_to_gene=np.arange(3), phenotype_keys=[])
    without = MaskedModelingPlan(
        model.module, column_to_gene=np.arange(3), phenotype_keys=[], has_batches=False
    )
    assert with_batches._batches(batch).tolist() == [0, 0, 0, 0]
    assert without._batches(batch) is None


@pytest.mark.parametrize("change", ["edited", "removed"])
def test_a_batch_column_changed_after_setup_is_refused_before_training(adata, change):
    sct.setup_anndata(adata, layer="counts", batch_key="batch")
    model = sct.GeneTransformer(adata, **TINY, batch_correction="token")
    if change == "edited":  # e.g. the batches corrected after setup: the registered codes are stale
        adata.obs["batch"] = pd.Categorical(["batch_1"] * adata.n_obs)
        message = r"obs\['batch'\] \(the batch key\) changed since setup_anndata; call setup_anndata again"
    else:
        del adata.obs["batch"]
        message = r"obs\['batch'\] \(the batch key\) was removed since setup_anndata"
    with pytest.raises(ValueError, match=message):
        model.train(max_epochs=1, **QUIET)
    assert not model.is_trained
    if change == "edited":
        with pytest.raises(ValueError, match="changed since setup_anndata"):
            sct.GeneTransformer(adata, **TINY)  # nor is a new model made on the stale codes
        sct.setup_anndata(adata, layer="counts", batch_key="batch")  # the fix works
        assert sct.GeneTransformer(adata, **TINY).batch_categories_ == ["batch_1"]
