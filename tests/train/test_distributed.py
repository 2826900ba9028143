"""Lightning DDP on CPU (gloo): the step of 2 processes equals one process's step on the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from sctransformer.data import _sharded, _splitting
from sctransformer.module import GeneTransformerModule

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
            shard = adata[start:stop].copy()
            if kind == "unlabelled_shard" and i == 1:
                del shard.obs["cell_type"]  # its cells' phenotype is unknown: nothing to score there
            shard.write_h5ad(paths[-1])
        data = sct.data.ShardedAnnData(paths, layer="counts", phenotype_keys=["cell_type"])
        return sct.GeneTransformer.from_shards(data, **hyperparameters)

    TRAIN = dict(max_epochs=1, max_steps=1, batch_size=16, train_size=1.0, seed=2, calibrate=False,
                 enable_progress_bar=False, logger=False)
    """
)

DDP_RUN = SETUP + textwrap.dedent(
    """
    import json, os, sys, torch

    kind, workdir, out, overrides = sys.argv[1:5]
    model = make_model(kind, workdir)
    settings = TRAIN | json.loads(overrides) | {"logger": None}
    model.train(**settings, accelerator="cpu", devices=2, strategy="ddp")
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        torch.save(model.module.state_dict(), out)
        with open(out + ".loss", "w") as f:  # the epoch's logged loss, over both ranks' cells
            f.write(repr(float(model.history["loss_train"].iloc[-1, 0])))
        with open(out + ".history", "w") as f:  # every logged curve
            json.dump({name: frame.iloc[:, 0].tolist() for name, frame in model.history.items()}, f)
    """
)


def _run_ddp(
    tmp_path, kind: str, overrides: dict | None = None, timeout: float = 600
) -> dict[str, torch.Tensor]:
    """Train ``make_model(kind)`` on 2 gloo processes; rank 0's weights (its curves beside them)."""
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_RUN)
    out = tmp_path / "ddp_weights.pt"
    run = subprocess.run(
        [sys.executable, str(script), kind, str(tmp_path), str(out), json.dumps(overrides or {})],
        capture_output=True,
        timeout=timeout,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    return torch.load(out)


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
            # unshuffled (validation): every rank scores all the cells, as this one process does
            self.whole = kwargs.get("shuffle", True) is False

        def set_epoch(self, epoch: int) -> None:
            for sampler in self.ranks:
                sampler.set_epoch(epoch)

        def __len__(self) -> int:
            return super().__len__() if self.whole else sum(len(s) for s in self.ranks)

        def __iter__(self):
            if self.whole:
                yield from super().__iter__()
                return
            for pair in zip(*self.ranks, strict=True):
                yield from pair

    return Interleaved


@pytest.mark.parametrize("kind", ["anndata", "shards"])
def test_two_gloo_processes_take_the_step_of_one_process_on_the_same_global_batch(
    tmp_path, kind, monkeypatch
):
    distributed = _run_ddp(tmp_path, kind)

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


def test_ranks_whose_minibatches_have_no_label_train_and_log_as_one_process(tmp_path, monkeypatch):
    """A minibatch with no labelled masked cell: its rank's phenotype head still takes part in the step.

    One of the two shards has no phenotype column, so at some steps one rank scores the phenotype
    and the other does not. The 2 ranks train (DDP requires every parameter in every rank's loss)
    to the weights of one process accumulating the same minibatches, and log the same curves: each
    epoch value is the mean over the items of both ranks, not a mean of the ranks' means with a
    missing value counted as 0.
    """
    overrides = {"max_steps": -1, "max_epochs": 2, "batch_size": 8, "train_size": 0.75}
    # where one rank fails, the other waits for its gradients: give up well before 600 s
    distributed = _run_ddp(tmp_path, "unlabelled_shard", overrides, timeout=300)
    curves = json.loads((tmp_path / "ddp_weights.pt.history").read_text())

    namespace = _namespace()
    make_model, settings = namespace["make_model"], namespace["TRAIN"] | overrides
    monkeypatch.setattr(_sharded, "ShardBlockSampler", _interleaved(_sharded.ShardBlockSampler))
    scored = []  # whether each training minibatch scored the phenotype (minibatches of rank 0, 1, 0, ...)
    loss = GeneTransformerModule.loss

    def recording_loss(self, *args, **kwargs):
        out = loss(self, *args, **kwargs)
        if torch.is_grad_enabled():
            scored.append("phenotype_cell_type" in out.components)
        return out

    monkeypatch.setattr(GeneTransformerModule, "loss", recording_loss)
    model = make_model("unlabelled_shard", tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(**settings | {"logger": QUIET["logger"]}, accumulate_grad_batches=2)
    # at some step one rank scored the phenotype and the other did not
    assert any(a != b for a, b in zip(scored[::2], scored[1::2], strict=True)), scored

    history = {name: frame.iloc[:, 0].tolist() for name, frame in model.history.items()}
    assert "phenotype_cell_type_train" in history and "phenotype_cell_type_validation" in history
    assert sorted(curves) == sorted(history)
    for name, values in history.items():
        assert curves[name] == pytest.approx(values, rel=1e-5), name

    single = model.module.state_dict()
    for key in single:
        ddp, one = distributed[key], single[key]
        if key.endswith("attention.qkv.bias"):
            # not the key bias: softmax is invariant to it, so its gradient is rounding noise, which
            # Adam scales up to steps that differ between the two orders of summation
            d = len(one) // 3
            ddp, one = torch.cat([ddp[:d], ddp[2 * d :]]), torch.cat([one[:d], one[2 * d :]])
        torch.testing.assert_close(ddp, one, rtol=1e-5, atol=1e-6)


def test_early_stopping_under_ddp_stops_every_rank_where_one_process_stops(tmp_path, monkeypatch):
    """scvi-tools' Trainer drops early stopping under strategy="ddp"; the model adds it itself."""
    overrides = {
        "max_steps": -1,
        "max_epochs": 6,
        "train_size": 0.75,
        "lr": 0.05,
        "early_stopping": True,
        "early_stopping_patience": 1,
    }
    _run_ddp(tmp_path, "anndata", overrides, timeout=300)
    curves = json.loads((tmp_path / "ddp_weights.pt.history").read_text())
    assert not (tmp_path / "lightning_logs").exists()  # the default logger keeps the history in memory

    namespace = _namespace()
    make_model, settings = namespace["make_model"], namespace["TRAIN"] | overrides
    monkeypatch.setattr(_splitting, "EpochBatchSampler", _interleaved(_splitting.EpochBatchSampler))
    model = make_model("anndata", tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(**settings | {"logger": QUIET["logger"]}, accumulate_grad_batches=2)
    validation = model.history["loss_validation"].iloc[:, 0].tolist()
    assert len(validation) < overrides["max_epochs"]  # it did stop early
    assert curves["loss_validation"] == pytest.approx(validation, rel=1e-5)


CRASH_RUN = SETUP + textwrap.dedent(
    """
    import json, os, sys
    import lightning.pytorch as pl

    kind, workdir, out, phase = sys.argv[1:5]

    class FailMidEpoch(pl.Callback):  # after the checkpoint of step 4, in the middle of the second epoch
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 1:
                raise RuntimeError("stop")

    model = make_model(kind, workdir)
    settings = TRAIN | dict(max_steps=-1, max_epochs=3, train_size=0.75, logger=None)
    settings |= dict(checkpoint_dir=f"{workdir}/ckpt_{phase != 'whole'}", checkpoint_every_n_steps=2)
    try:
        model.train(**settings, accelerator="cpu", devices=2, strategy="ddp",
                    callbacks=[FailMidEpoch()] if phase == "failing" else None, resume=phase == "resumed")
    except RuntimeError:
        if phase != "failing":  # only the run meant to fail may
            raise
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        with open(out, "w") as f:
            json.dump({name: frame.iloc[:, 0].tolist() for name, frame in model.history.items()}, f)
    """
)


def test_a_ddp_run_resumed_mid_epoch_logs_the_epoch_of_an_uninterrupted_run(tmp_path):
    """The checkpoint keeps the running sums of every rank, not only of the rank that writes it."""
    script = tmp_path / "crash_run.py"
    script.write_text(CRASH_RUN)
    curves = {}
    for phase in ("whole", "failing", "resumed"):
        out = tmp_path / f"{phase}.json"
        run = subprocess.run(
            [sys.executable, str(script), "anndata", str(tmp_path), str(out), phase],
            capture_output=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stderr.decode()[-3000:]
        curves[phase] = json.loads(out.read_text())
    assert len(curves["failing"]["loss_train"]) == 1  # it failed in the second epoch
    assert curves["resumed"]["loss_train"] == pytest.approx(curves["whole"]["loss_train"][1:], rel=1e-6)
