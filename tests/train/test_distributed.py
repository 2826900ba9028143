"""Lightning DDP on CPU (gloo): the step of 2 processes equals one process's step on the same global batch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from sctransformer.data import _sharded, _splitting

from ..conftest import QUIET

SETUP = textwrap.dedent(
    """
    import sctransformer as sct

    def make_model(kind, workdir):
        adata = sct.datasets.synthetic(n_cells=96, n_genes=40, seed=0)
        hyperparameters = dict(d_model=16, n_layers=1, n_heads=2, max_length=32, n_bins=5, dropout=0.1, seed=1)
        if kind == "anndata":
            sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
            return sct.GeneTransformer(adata, **hyperparameters)
        paths = []
        for i, (start, stop) in enumerate([(0, 40), (40, 96)]):
            paths.append(f"{workdir}/shard_{i}.h5ad")
            adata[start:stop].copy().write_h5ad(paths[-1])
        data = sct.data.ShardedAnnData(paths, layer="counts", phenotype_keys=["cell_type"])
        return sct.GeneTransformer.from_shards(data, **hyperparameters)

    TRAIN = dict(max_epochs=1, max_steps=1, batch_size=16, train_size=1.0, seed=2, calibrate=False,
                 enable_progress_bar=False, logger=False)
    """
)

DDP_RUN = SETUP + textwrap.dedent(
    """
    import os, sys, torch

    kind, workdir, out = sys.argv[1:4]
    model = make_model(kind, workdir)
    model.train(**TRAIN | {"logger": None}, accelerator="cpu", devices=2, strategy="ddp")
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        torch.save(model.module.state_dict(), out)
        with open(out + ".loss", "w") as f:  # the epoch's logged loss, over both ranks' cells
            f.write(repr(float(model.history["loss_train"].iloc[-1, 0])))
    """
)


def _namespace() -> dict:
    namespace: dict = {}
    exec(SETUP, namespace)  # the very same model and settings as the distributed run
    return namespace


def _interleaved(sampler_cls):
    """A sampler giving rank 0's first minibatch, then rank 1's, ...: one process sees what 2 ranks see."""

    class Interleaved(sampler_cls):
        def __init__(self, *args, rank: int = 0, world_size: int = 1, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.ranks = [sampler_cls(*args, **kwargs, rank=r, world_size=2) for r in range(2)]

        def set_epoch(self, epoch: int) -> None:
            for sampler in self.ranks:
                sampler.set_epoch(epoch)

        def __len__(self) -> int:
            return sum(len(s) for s in self.ranks)

        def __iter__(self):
            for pair in zip(*self.ranks, strict=True):
                yield from pair

    return Interleaved


@pytest.mark.parametrize("kind", ["anndata", "shards"])
def test_two_gloo_processes_take_the_step_of_one_process_on_the_same_global_batch(
    tmp_path, kind, monkeypatch
):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_RUN)
    out = tmp_path / "ddp_weights.pt"
    run = subprocess.run(
        [sys.executable, str(script), kind, str(tmp_path), str(out)],
        capture_output=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    distributed = torch.load(out)

    namespace = _namespace()
    make_model, settings = namespace["make_model"], namespace["TRAIN"]
    initial = {k: v.clone() for k, v in make_model(kind, tmp_path).module.state_dict().items()}

    # one process, gradients averaged over the two ranks' minibatches (accumulated), one step
    if kind == "anndata":
        monkeypatch.setattr(_splitting, "EpochBatchSampler", _interleaved(_splitting.EpochBatchSampler))
    else:
        monkeypatch.setattr(_sharded, "ShardBlockSampler", _interleaved(_sharded.ShardBlockSampler))
    model = make_model(kind, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(**settings | {"logger": QUIET["logger"]}, accumulate_grad_batches=2)
    single = model.module.state_dict()

    logged = float((tmp_path / "ddp_weights.pt.loss").read_text())
    assert logged == pytest.approx(float(model.history["loss_train"].iloc[-1, 0]), rel=1e-5)

    changed = [k for k in initial if not torch.equal(initial[k], distributed[k])]
    assert len(changed) > 10  # the distributed step moved the weights
    for key in initial:
        torch.testing.assert_close(distributed[key], single[key], rtol=1e-5, atol=1e-6)

    monkeypatch.undo()  # and it is not the step of one rank's minibatch alone
    model = make_model(kind, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(**settings | {"logger": QUIET["logger"]})
    alone = model.module.state_dict()
    assert any(not torch.allclose(distributed[k], alone[k], rtol=1e-5, atol=1e-6) for k in changed)
