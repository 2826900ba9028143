"""Attention backends: the packed layout and its varlen kernels against padded SDPA."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

import sctransformer as sct
from sctransformer.data import to_torch_csr
from sctransformer.module import PackedTokens, _attention, _module, sdpa_varlen_reference, select_attention

from ..conftest import TINY
from .test_queries import N_GENES, counts
from .test_queries import make_module as query_module

CUDA = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def masks(seed: int = 0, n: int = 5, length: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Random present tokens, and keys among them (queries and keys interleaved on purpose)."""
    gen = torch.Generator().manual_seed(seed)
    present = torch.rand(n, length, generator=gen) < 0.7
    present[1] = False  # a cell with no token at all
    key_mask = present & (torch.rand(n, length, generator=gen) < 0.6)
    return key_mask, present


def test_packing_keeps_each_cells_keys_first_then_its_queries_in_order():
    key_mask, present = masks()
    packed = PackedTokens.from_masks(key_mask, present)
    n, length = present.shape
    expected, keys, cu_q, cu_k = [], [], [0], [0]
    for c in range(n):  # naive loops
        cell_keys = [c * length + i for i in range(length) if key_mask[c, i]]
        cell_rest = [c * length + i for i in range(length) if present[c, i] and not key_mask[c, i]]
        keys += list(range(len(expected), len(expected) + len(cell_keys)))
        expected += cell_keys + cell_rest
        cu_q.append(cu_q[-1] + len(cell_keys) + len(cell_rest))
        cu_k.append(cu_k[-1] + len(cell_keys))
    assert packed.index.tolist() == expected
    assert packed.key_rows.tolist() == keys
    assert packed.cu_seq_q.tolist() == cu_q and packed.cu_seq_q.dtype == torch.int32
    assert packed.cu_seq_k.tolist() == cu_k and packed.cu_seq_k.dtype == torch.int32
    assert packed.max_q == int(present.sum(1).max()) and packed.max_k == int(key_mask.sum(1).max())

    x = torch.randn(n, length, 3)
    roundtrip = packed.unpack(packed.pack(x))
    assert torch.equal(roundtrip[present], x[present])
    assert torch.equal(roundtrip[~present], torch.zeros_like(x[~present]))


def test_packing_refuses_keys_that_are_not_present():
    key_mask, present = masks()
    with pytest.raises(ValueError, match="every key must be a present token"):
        PackedTokens.from_masks(key_mask | ~present, present)


def test_reference_kernel_equals_masked_sdpa():
    key_mask, present = masks(seed=3)
    packed = PackedTokens.from_masks(key_mask, present)
    n, length = present.shape
    q, k, v = torch.randn(3, n, 2, length, 4).unbind(0)  # (n, heads, length, d_head)
    padded = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])

    def flat(t: torch.Tensor) -> torch.Tensor:
        return packed.pack(t.transpose(1, 2).reshape(n, length, -1)).view(-1, 2, 4)

    out = sdpa_varlen_reference(flat(q), flat(k)[packed.key_rows], flat(v)[packed.key_rows], packed)
    rows = present & key_mask.any(1, keepdim=True)  # a cell without keys attends to nothing
    expected = padded.transpose(1, 2).reshape(n, length, -1)[rows]
    got = packed.unpack(out.reshape(len(out), -1))[rows]
    torch.testing.assert_close(got, expected)


@pytest.fixture
def packed_reference(monkeypatch):
    """Run the module's packed path on CPU: 'varlen' is selected and is the SDPA reference."""
    monkeypatch.setitem(_attention.VARLEN_KERNELS, "varlen", sdpa_varlen_reference)
    monkeypatch.setattr(
        _module,
        "select_attention",
        lambda requested, x, head_dim: "sdpa" if requested == "sdpa" else "varlen",
    )


def test_packed_encoder_matches_padded_outputs_and_gradients(packed_reference):
    module = query_module(dropout=0.0).train()
    gen = torch.Generator().manual_seed(2)
    x = to_torch_csr(sp.csr_matrix(counts()))
    tokens = module.tokenize(x, torch.arange(N_GENES), n_queries=3, generator=gen)
    tokens = tokens.without_gene(int(tokens.gene_ids[2, 1]))  # a hole inside a cell's context
    assert bool(tokens.is_query.any())
    value_mask = tokens.is_context & (torch.rand(tokens.is_context.shape, generator=gen) < 0.3)
    targets = torch.tensor([[0], [1], [2], [0], [1], [2], [-1]])
    scored = torch.ones_like(targets, dtype=torch.bool)

    results = {}
    for backend in ("sdpa", "varlen"):
        module.zero_grad()
        module.attention = backend
        hidden = module.encode(tokens, torch.full_like(targets, -1), value_mask)
        out = module.loss(hidden, tokens, value_mask, targets, scored, ["a"])
        out.total.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        results[backend] = (hidden.detach(), out.total.detach(), grads)

    present = torch.cat([torch.ones(len(targets), module.n_prefix, dtype=torch.bool), tokens.is_token], 1)
    (h_pad, loss_pad, g_pad), (h_pack, loss_pack, g_pack) = results["sdpa"], results["varlen"]
    torch.testing.assert_close(h_pack[present], h_pad[present], atol=1e-5, rtol=1e-5)
    assert torch.equal(h_pack[~present], torch.zeros_like(h_pack[~present]))
    torch.testing.assert_close(loss_pack, loss_pad, atol=1e-5, rtol=1e-5)
    assert g_pack.keys() == g_pad.keys() and len(g_pad) > 10
    for name, grad in g_pad.items():
        torch.testing.assert_close(g_pack[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_sdpa_minibatches_padded_further_give_the_same_outputs_and_gradients(monkeypatch):
    """On CUDA, SDPA minibatches are padded to a multiple of 64 tokens; here forced on CPU."""
    module = query_module(dropout=0.0).train()
    module.attention = "sdpa"
    tokens = module.tokenize(to_torch_csr(sp.csr_matrix(counts())), torch.arange(N_GENES))
    value_mask = tokens.is_context & (
        torch.rand(tokens.is_context.shape, generator=torch.Generator().manual_seed(1)) < 0.3
    )
    targets = torch.tensor([[0], [1], [2], [0], [1], [2], [-1]])
    results = []
    for pad in (0, 5):
        monkeypatch.setattr(_module, "sdpa_length_padding", lambda x, pad=pad: pad)
        module.zero_grad()
        hidden = module.encode(tokens, torch.full_like(targets, -1), value_mask)
        module.loss(
            hidden, tokens, value_mask, targets, torch.ones_like(targets, dtype=bool), ["a"]
        ).total.backward()
        results.append(
            (hidden.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
        )
    (h0, g0), (h1, g1) = results
    assert h1.shape == h0.shape
    torch.testing.assert_close(h1, h0, atol=1e-6, rtol=1e-5)
    assert g1.keys() == g0.keys()
    for name, grad in g0.items():
        torch.testing.assert_close(g1[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert _attention.sdpa_length_padding(torch.zeros(2, 70, 4)) == 0  # none on CPU


def test_padding_leaves_query_decoding_and_attention_maps_unchanged(monkeypatch):
    module = query_module(dropout=0.0).eval()
    tokens = module.tokenize(to_torch_csr(sp.csr_matrix(counts())), torch.arange(N_GENES))
    phenotypes = torch.full((len(tokens.gene_ids), 1), -1)
    genes = torch.arange(N_GENES)
    results = []
    with torch.no_grad():
        for pad in (0, 5):
            monkeypatch.setattr(_module, "sdpa_length_padding", lambda x, pad=pad: pad)
            hidden, cache, key_mask = module.encode_context(tokens, phenotypes)
            decoded = module.decode_queries(cache, key_mask, genes, tokens.held_share)
            _, maps = module.encode_with_attention(tokens, phenotypes, layers=[0])
            results.append((hidden, decoded, maps[0]))
    for before, after in zip(*results, strict=True):
        assert after.shape == before.shape
        torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-5)


def test_model_trained_on_the_packed_path_embeds_as_on_the_padded_path(packed_reference):
    data = sct.datasets.synthetic(n_cells=60, n_genes=40, n_cell_types=3, n_markers=6, seed=4)
    sct.setup_anndata(data, layer="counts", phenotype_keys=["cell_type"])
    runs = {}
    for backend in ("sdpa", "varlen"):
        model = sct.GeneTransformer(data, **TINY, attention=backend, seed=0)
        model.train(max_epochs=1, batch_size=16, enable_progress_bar=False, accelerator="cpu")
        model.attention = "sdpa"
        runs[backend] = model.get_latent_representation()
    np.testing.assert_allclose(runs["varlen"], runs["sdpa"], atol=1e-4)


def test_auto_runs_sdpa_on_cpu_and_explicit_kernels_say_why_they_cannot_run():
    x = torch.zeros(2, 3, 16)
    assert select_attention("auto", x, 8) == "sdpa"
    assert select_attention("sdpa", x, 8) == "sdpa"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert select_attention("auto", x, 8) == "sdpa"  # half precision, but no CUDA
    with pytest.raises(RuntimeError, match=r"CUDA GPUs only.*attention='auto'"):
        select_attention("varlen", x, 8)
    with pytest.raises(RuntimeError, match="CUDA GPUs only"):
        select_attention("flash", x, 8)
    assert not _attention._importable("no_such_attention_kernel_module")
    assert _attention._importable("torch.nn.functional")
    with pytest.raises(ValueError, match="attention must be one of"):
        select_attention("xformers", x, 8)


def test_attention_is_a_checked_setting_that_is_saved(adata, tmp_path):
    sct.setup_anndata(adata, layer="counts")
    with pytest.raises(ValueError, match="attention must be one of"):
        sct.GeneTransformer(adata, **TINY, attention="fast")
    model = sct.GeneTransformer(adata, **TINY, attention="sdpa")
    assert model.attention == "sdpa" and model.module.attention == "sdpa"
    with pytest.raises(ValueError, match="attention must be one of"):
        model.attention = "xformers"
    model.attention = "varlen"
    with pytest.raises(RuntimeError, match="CUDA GPUs only"):
        model.get_latent_representation()
    model.save(tmp_path / "m")
    loaded = sct.GeneTransformer.load(tmp_path / "m", adata=adata)
    assert loaded.attention == "varlen"
    loaded.attention = "auto"
    assert loaded.get_latent_representation().shape == (adata.n_obs, TINY["d_model"])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU of compute capability 8.0+ and SCT_TEST_CUDA=1")
@pytest.mark.parametrize("backend", ["varlen", "flash"])
def test_cuda_kernels_match_sdpa_within_bf16_tolerance(backend):
    if backend == "flash" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    module = query_module(d_model=64, n_heads=4, d_ff=128, dropout=0.0).cuda().train()
    gen = torch.Generator().manual_seed(5)
    x = to_torch_csr(sp.csr_matrix(counts(n_cells=32)))
    tokens = module.tokenize(x.cuda(), torch.arange(N_GENES, device="cuda"), n_queries=3, generator=None)
    targets = torch.zeros(32, 1, dtype=torch.long, device="cuda")
    value_mask = tokens.is_context & (torch.rand(tokens.is_context.shape, generator=gen).cuda() < 0.3)
    results = {}
    for name in ("sdpa", backend):
        module.zero_grad()
        module.attention = name
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert select_attention(name, tokens.values, 16) == name
            hidden = module.encode(tokens, torch.full_like(targets, -1), value_mask)
            out = module.loss(
                hidden, tokens, value_mask, targets, torch.ones_like(targets, dtype=bool), ["a"]
            )
        out.total.backward()
        results[name] = hidden.float(), out.total.float(), module.gene_embedding.weight.grad.clone()
    present = torch.cat(
        [torch.ones(32, module.n_prefix, dtype=torch.bool, device="cuda"), tokens.is_token], 1
    )
    (h0, l0, g0), (h1, l1, g1) = results["sdpa"], results[backend]
    torch.testing.assert_close(h1[present], h0[present], atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(l1, l0, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(g1, g0, atol=5e-3, rtol=1e-1)
