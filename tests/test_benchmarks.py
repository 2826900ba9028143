"""Every benchmark script parses and answers ``--help`` (they are run by hand, so nothing else runs them)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


def test_every_benchmark_script_answers_help():
    assert len(BENCHMARKS) >= 10
    # one interpreter for all of them: the imports (torch, scanpy, sctransformer) load once
    script = textwrap.dedent(
        """
        import contextlib, io, runpy, sys
        failed = []
        for path in sys.argv[1:]:
            sys.argv = [path, "--help"]
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    runpy.run_path(path, run_name="__main__")
                failed.append(f"{path}: did not exit on --help")
            except SystemExit as exit:
                if exit.code not in (0, None) or "usage:" not in out.getvalue():
                    failed.append(f"{path}: exit {exit.code}, printed {out.getvalue()[:200]!r}")
            except Exception as error:
                failed.append(f"{path}: {type(error).__name__}: {error}")
        print("\\n".join(failed))
        sys.exit(1 if failed else 0)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script, *map(str, BENCHMARKS)], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]


def _throughput_module():
    """``benchmarks/throughput.py`` as a module (its helpers are what the published table rests on)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("throughput", BENCHMARKS[0].parent / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_naive_tokenizer_of_the_throughput_table_does_the_tokenizers_work():
    import numpy as np
    import torch

    import sctransformer as sct
    from sctransformer.data import to_torch_csr

    throughput = _throughput_module()
    adata = sct.datasets.pbmc68k()[:64].copy()
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, d_model=16, n_layers=1, n_heads=2, max_length=128)
    counts = adata.layers["counts"].tocsr()
    assert (counts.getnnz(1) > 128).any()  # some cells are cut: the ranking decides which genes stay
    tokens = model.module.tokenize(to_torch_csr(counts), torch.as_tensor(model._column_to_gene(adata)))
    scale = model.module.tokenizer.gene_scale.numpy()
    gene_ids, values, bins, profile_genes, profile_values = throughput.naive_tokenize(counts, 128, 16, scale)
    is_token = tokens.is_token.numpy()
    np.testing.assert_array_equal(np.where(is_token, tokens.gene_ids.numpy(), 0), gene_ids)
    np.testing.assert_array_equal(np.where(is_token, tokens.bins.numpy(), -1), bins)
    np.testing.assert_allclose(np.where(is_token, tokens.values.numpy(), 0), values, rtol=1e-5)
    assert len(profile_genes) == len(tokens.all_genes) == counts.nnz
    np.testing.assert_allclose(np.sort(tokens.all_values.numpy()), np.sort(profile_values), rtol=1e-5)


def test_the_model_flops_of_the_throughput_table_match_a_count_of_the_matmuls():
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    import sctransformer as sct
    from sctransformer.data import to_torch_csr
    from sctransformer.train import mask_tokens

    throughput = _throughput_module()
    adata = sct.datasets.pbmc68k()[:16].copy()
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata, d_model=64, n_layers=2, n_heads=4, max_length=32)
    module = model.module.train()
    tokens = module.tokenize(
        to_torch_csr(adata.layers["counts"].tocsr()), torch.as_tensor(model._column_to_gene(adata))
    )
    assert bool(tokens.is_token.all())  # every cell fills its 32 slots: no padding to leave out
    phenotypes = torch.zeros(16, 1, dtype=torch.long)
    value_mask, pheno_mask = mask_tokens(tokens, phenotypes, gene_mask_prob=0.15, phenotype_mask_prob=0.5)
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        hidden = module.encode(tokens, phenotypes.masked_fill(pheno_mask, -1), value_mask)
        module.loss(hidden, tokens, value_mask, phenotypes, pheno_mask, ["cell_type"]).total.backward()
    estimate = throughput.train_flops(
        tokens.is_token.sum(1),
        d_model=64,
        d_ff=256,
        n_layers=2,
        n_prefix=module.n_prefix,
        head_flops=throughput.expression_head_flops(64, module.n_bins, module.cell_expression_loss),
    )
    # the small heads (phenotypes, the cell query) are left out: a little under the count
    assert 0.97 < estimate / counter.get_total_flops() <= 1.0
