"""Lightning training plan for masked modelling of expression values and phenotypes."""

from __future__ import annotations

import math
from collections.abc import Mapping

import lightning.pytorch as pl
import numpy as np
import torch

from sctransformer._constants import REGISTRY_KEYS, phenotype_registry_key
from sctransformer.data._splitting import settings_differences
from sctransformer.module import GeneTransformerModule, LossOutput, TokenizedCells


def mask_tokens(
    tokens: TokenizedCells,
    phenotypes: torch.Tensor,
    *,
    gene_mask_prob: float,
    phenotype_mask_prob: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the masks of one minibatch.

    Returns
    -------
    value_mask
        ``(n, length)``: each context token's value is hidden with ``gene_mask_prob``.
    phenotype_mask
        ``(n, n_phenotypes)``: each phenotype token is replaced by [MASK] with
        ``phenotype_mask_prob``; unknown phenotypes (code ``-1``) are always masked.
    """
    device = tokens.gene_ids.device
    draw = torch.rand(tokens.gene_ids.shape, generator=generator, device=device)
    value_mask = (draw < gene_mask_prob) & tokens.is_context
    draw = torch.rand(phenotypes.shape, generator=generator, device=device)
    phenotype_mask = (draw < phenotype_mask_prob) | (phenotypes < 0)
    return value_mask, phenotype_mask


def mask_genes(
    tokens: TokenizedCells,
    value_mask: torch.Tensor,
    gene_prediction_prob: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(n, length)`` context tokens whose gene identity is hidden, with ``gene_prediction_prob``.

    Drawn among the tokens whose value is shown (``~value_mask``), so that no token loses both.
    """
    draw = torch.rand(tokens.gene_ids.shape, generator=generator, device=tokens.gene_ids.device)
    return (draw < gene_prediction_prob) & tokens.is_context & ~value_mask


def batch_seed(seed: int, epoch: int, number: int) -> int:
    """Seed of what is drawn for training minibatch ``number`` of ``epoch`` (well mixed, 32 bits)."""
    return int(np.random.SeedSequence([seed, epoch, number]).generate_state(1)[0])


def adversary_scale(progress: float, schedule: str) -> float:
    """Gradient-reversal strength after ``progress`` (0 to 1) of training, see :class:`MaskedModelingPlan`."""
    if schedule == "constant":
        return 1.0
    if schedule == "dann":
        return 2 / (1 + math.exp(-10 * min(max(progress, 0.0), 1.0))) - 1
    raise ValueError(f"adversary_schedule must be 'dann' or 'constant', got {schedule!r}")


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_factor: float = 0.0) -> float:
    """Learning-rate factor: linear warm-up to 1 over ``warmup_steps``, then cosine decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


#: Checkpoint entry of the training sums of an epoch checkpointed midway (``on_save_checkpoint``)
EPOCH_SUMS_KEY = "sctransformer_train_epoch_sums"
#: Checkpoint entry of the optimisation settings of the run that wrote it (``on_save_checkpoint``)
OPTIMISATION_SETTINGS_KEY = "sctransformer_optimisation_settings"
#: Settings a checkpoint records besides the optimizer's and schedule's states, as error messages
#: name them: a run resumed with other values would mix them with the checkpoint's (AdamW's
#: learning rates and weight decay come from the checkpoint, the schedule's shape from this run).
#: With the minibatches (checked with the training loader's state) they set the schedule's length.
OPTIMISATION_SETTINGS = {
    "lr": "lr",
    "weight_decay": "weight_decay",
    "warmup_fraction": "warmup_fraction",
    "max_epochs": "max_epochs (-1: as many as max_steps take)",
    "max_steps": "max_steps (-1: as many as max_epochs take)",
    "accumulate_grad_batches": "accumulate_grad_batches",
    "limit_train_batches": "limit_train_batches",
    "limit_train_batches_is_share": "limit_train_batches as a share (a float: 1.0 is every minibatch, the int 1 one)",
    "adversary_lr_factor": "adversary_lr_factor",
    "trained_parameters": "number of trained parameters (set by freeze)",
}
#: Checkpoint entry of the hyper-parameters of the model that wrote it (those that shape the model)
MODEL_SETTINGS_KEY = "sctransformer_model_settings"


def check_model_settings(recorded: Mapping[str, object], current: Mapping[str, object]) -> None:
    """Raise if a checkpoint was written by a model of other hyper-parameters than ``current``.

    Only the hyper-parameters both record are compared (a checkpoint of an older version records
    none). Weights of the same shapes would otherwise load into a model that uses them otherwise
    (e.g. ``n_heads``), and weights of other shapes fail inside Lightning.
    """
    names = {key: key for key in recorded if key in current}
    details = settings_differences(recorded, current, names)
    if details:
        raise ValueError(
            f"cannot resume from this checkpoint: it was written by a model of other hyper-parameters "
            f"({details}); create the model with the checkpoint's hyper-parameters, or start a new run: "
            "another checkpoint_dir, or resume=False (its checkpoints then replace this one)"
        )


def check_optimisation_settings(recorded: Mapping[str, object], current: Mapping[str, object]) -> None:
    """Raise if a checkpoint was written by a run optimised with other settings than ``current``.

    Only the settings of ``OPTIMISATION_SETTINGS`` that both record are compared: a checkpoint of
    an older version, which records none, is not checked. The optimizer's counterpart of the
    check of the training minibatches (``check_order_settings`` of ``sctransformer.data``).

    Parameters
    ----------
    recorded
        The settings in the checkpoint (:meth:`MaskedModelingPlan.optimisation_settings`).
    current
        This run's settings.

    Raises
    ------
    ValueError
        Naming each differing setting with its value in the checkpoint and now.
    """
    details = settings_differences(recorded, current, OPTIMISATION_SETTINGS)
    if not details:
        return
    raise ValueError(
        "cannot resume from this checkpoint: the run that wrote it was optimised with other settings "
        f"than this run ({details}); a resumed run takes the optimizer's learning rates, weight decay "
        "and step count from the checkpoint, so these would be ignored or mixed with the checkpoint's. "
        "Resume with the same arguments as the run that wrote it (lr, weight_decay, warmup_fraction, "
        "max_epochs, max_steps, accumulate_grad_batches, limit_train_batches, adversary_lr_factor, "
        "freeze), or start a new run: another checkpoint_dir, or resume=False (its checkpoints then "
        "replace this one)"
    )


class MaskedModelingPlan(pl.LightningModule):
    """Trains a :class:`~sctransformer.module.GeneTransformerModule` by masked modelling.

    Each step hides ``gene_mask_prob`` of the gene values and ``phenotype_mask_prob`` of the
    phenotype tokens and scores their prediction. Validation hides every phenotype (as at
    inference) and uses a fixed seed per minibatch so that its curves are comparable across epochs.
    Metrics are logged per epoch as ``<name>_train`` and ``<name>_validation``.

    Parameters
    ----------
    module
        The module to train.
    column_to_gene
        Vocabulary index of each column of the training AnnData (``-1``: not in vocabulary). Not
        part of a checkpoint: a resumed run reads its own AnnData's columns.
    phenotype_keys
        Phenotype column names, in the module's slot order.
    lr, weight_decay
        AdamW settings.
    warmup_fraction
        Share of all steps spent in linear warm-up before cosine decay.
    gene_mask_prob, phenotype_mask_prob
        Masking rates.
    expression_queries
        Query tokens per cell and kind: up to this many held-out expressed genes and this many
        unexpressed genes (``0`` for none), see :class:`~sctransformer.module.Tokenizer`.
    class_weights
        Optional per-class loss weights of each phenotype slot.
    focal_gamma
        Focal-loss exponent of the phenotype losses (``0``: cross-entropy).
    seed
        Seed of the validation masks and, per minibatch, of the training masks and dropout.
    batch_mask_prob
        With a ``[BATCH]`` token: share of training cells fed "no batch" instead of their batch,
        so that the model also embeds cells without it (as inference does by default).
    adversary_weight
        Weight of the batch discriminator's loss (models with one).
    adversary_schedule
        Strength of the reversed gradient over training: ``"dann"`` ramps it from 0 to 1 as
        ``2 / (1 + exp(-10 p)) - 1`` of the share ``p`` of steps done (Ganin et al., 2016), so the
        encoder first learns the cells and then to hide the batch; ``"constant"`` keeps it 1.
    adversary_lr_factor
        The batch discriminator's learning rate as a multiple of ``lr``. At 1 the encoder outran
        it on cellbench (its accuracy fell to 0 while a kNN on the embedding told the batches
        apart perfectly: the embedding had swapped batches rather than mixed them); at 10 it
        kept up (``benchmarks/integration_trials.py``).
    align_weight
        Weight of the CLIP alignment loss (models aligned with a second modality).
    has_batches
        Whether the training data has a batch column (else its registered batch codes are
        placeholders and are not used).
    total_steps
        Optimisation steps of the whole run, for the learning-rate schedule; default counted from
        the data module and the trainer's settings when training starts.
    model_settings
        The hyper-parameters that shape the module (``GeneTransformer``'s), recorded in each
        checkpoint: a run resumed with other values is refused before the weights load.
    """

    def __init__(
        self,
        module: GeneTransformerModule,
        *,
        column_to_gene: np.ndarray,
        phenotype_keys: list[str],
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_fraction: float = 0.1,
        gene_mask_prob: float = 0.15,
        phenotype_mask_prob: float = 0.5,
        expression_queries: int = 0,
        class_weights: list[torch.Tensor | None] | None = None,
        focal_gamma: float = 0.0,
        seed: int = 0,
        total_steps: int | None = None,
        batch_mask_prob: float = 0.25,
        adversary_weight: float = 1.0,
        adversary_schedule: str = "dann",
        adversary_lr_factor: float = 10.0,
        align_weight: float = 1.0,
        has_batches: bool = True,
        gene_prediction_prob: float = 0.0,
        model_settings: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.model_settings = dict(model_settings or {})
        # a property of the AnnData trained on, not of the run: not checkpointed
        self.register_buffer(
            "column_to_gene", torch.as_tensor(column_to_gene, dtype=torch.long), persistent=False
        )
        self.phenotype_keys = list(phenotype_keys)
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_fraction = warmup_fraction
        self.gene_mask_prob = gene_mask_prob
        self.phenotype_mask_prob = phenotype_mask_prob
        self.expression_queries = expression_queries
        self.class_weights = class_weights
        self.focal_gamma = focal_gamma
        self.seed = seed
        self.total_steps = total_steps
        self.batch_mask_prob = batch_mask_prob
        self.adversary_weight = adversary_weight
        self.adversary_schedule = adversary_schedule
        self.adversary_lr_factor = adversary_lr_factor
        self.align_weight = align_weight
        self.has_batches = has_batches
        self.gene_prediction_prob = gene_prediction_prob
        # per stage, the epoch's sums of each logged value times its count, and the counts
        self._epoch_sums: dict[str, tuple[dict[str, torch.Tensor], dict[str, int]]] = {}
        self._resumed_sums: tuple[dict[str, torch.Tensor], dict[str, int]] | None = None
        #: The optimisation step of the checkpoint the run resumed from (``None``: not resumed)
        self.resumed_step: int | None = None

    def _phenotypes(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        n = batch[REGISTRY_KEYS.X_KEY].shape[0]
        unknown = torch.full((n,), -1, dtype=torch.long, device=self.device)
        # a key the AnnData has no column for (a query without labels) is unknown in every cell
        columns = [
            batch[phenotype_registry_key(k)].view(n).long() if phenotype_registry_key(k) in batch else unknown
            for k in self.phenotype_keys
        ]
        if not columns:
            return torch.empty(n, 0, dtype=torch.long, device=self.device)
        return torch.stack(columns, 1)

    def _batches(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Batch codes ``(n,)`` of the minibatch, where the module has a batch token or discriminator.

        ``None`` (every cell "no batch", no discriminator target) where the training data has no
        batch column: scvi-tools then registers every cell as batch 0.
        """
        if not self.has_batches or not (self.module.batch_token or self.module.batch_adversary):
            return None
        if REGISTRY_KEYS.BATCH_KEY not in batch:
            return None
        return batch[REGISTRY_KEYS.BATCH_KEY].view(-1).long()

    def _step(
        self, batch: dict[str, torch.Tensor], *, stage: str, generator: torch.Generator | None
    ) -> LossOutput:
        phenotypes = self._phenotypes(batch)
        tokens = self.module.tokenize(
            batch[REGISTRY_KEYS.X_KEY],
            self.column_to_gene,
            n_queries=self.expression_queries,
            generator=generator,
        )
        phenotype_rate = 1.0 if stage == "validation" else self.phenotype_mask_prob
        value_mask, phenotype_mask = mask_tokens(
            tokens,
            phenotypes,
            gene_mask_prob=self.gene_mask_prob,
            phenotype_mask_prob=phenotype_rate,
            generator=generator,
        )
        gene_mask = None
        if self.module.gene_prediction and self.gene_prediction_prob > 0:
            gene_mask = mask_genes(tokens, value_mask, self.gene_prediction_prob, generator)
        batches = self._batches(batch)
        batch_inputs = batches
        if batches is not None and stage == "train" and self.batch_mask_prob > 0:
            dropped = (
                torch.rand(batches.shape, generator=generator, device=batches.device) < self.batch_mask_prob
            )
            batch_inputs = batches.masked_fill(dropped, -1)
        hidden = self.module.encode(
            tokens,
            phenotypes.masked_fill(phenotype_mask, -1),
            value_mask,
            batch_inputs=batch_inputs,
            gene_mask=gene_mask,
        )
        weights = None
        if self.class_weights is not None:
            weights = [None if w is None else w.to(hidden.device) for w in self.class_weights]
        out = self.module.loss(
            hidden,
            tokens,
            value_mask,
            phenotypes,
            phenotype_mask,
            self.phenotype_keys,
            weights,
            focal_gamma=self.focal_gamma,
            batch_targets=batches,
            adversary_weight=self.adversary_weight,
            other=batch.get(REGISTRY_KEYS.ALIGN_KEY) if self.module.align_dims is not None else None,
            align_weight=self.align_weight,
            gene_mask=gene_mask,
        )
        self._record(stage, out, phenotypes.shape[0])
        return out

    def _record(self, stage: str, out: LossOutput, n_cells: int) -> None:
        """Add a minibatch's loss (per cell) and components and metrics (per scored item) to the epoch's sums."""
        sums, counts = self._epoch_sums.setdefault(stage, ({}, {}))
        values = {"loss": (out.total, n_cells)}
        values.update((name, (value, out.counts[name])) for name, value in out.components.items())
        values.update((name, (value, out.counts[name])) for name, value in out.metrics.items())
        for name, (value, count) in values.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float() * count
            counts[name] = counts.get(name, 0) + count

    def _sums_over_ranks(
        self, sums: dict[str, torch.Tensor], counts: dict[str, int]
    ) -> tuple[list[str], torch.Tensor]:
        """Every name the module may log, and the sums then the counts of each over all ranks (one all-reduce)."""
        names = ["loss", *self.module.loss_names(self.phenotype_keys)]
        unknown = sorted(set(sums) - set(names))
        if unknown:
            raise RuntimeError(f"the module's loss returned {unknown}, which its loss_names() leaves out")
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        totals = torch.cat(
            [
                torch.stack([sums[name].double() if name in sums else zero for name in names]),
                torch.tensor(
                    [counts.get(name, 0) for name in names], dtype=torch.float64, device=self.device
                ),
            ]
        )
        return names, self.trainer.strategy.reduce(totals, reduce_op="sum")

    def _log_epoch(self, stage: str) -> None:
        """Log the epoch means of ``stage`` as ``<name>_<stage>``, over the items of every distributed rank.

        Each rank sums each value times its count and the counts; one all-reduce adds up the ranks'
        sums of every name the module may log (0 where a rank scored none), so every rank logs the
        same names, a mean over the very items a single process would average, and nothing for a
        name that no rank scored in the epoch.
        """
        names, totals = self._sums_over_ranks(*self._epoch_sums.pop(stage, ({}, {})))
        means, scored = (totals[: len(names)] / totals[len(names) :]).float(), totals[len(names) :] > 0
        for name, mean, is_scored in zip(names, means, scored.tolist(), strict=True):
            if is_scored:
                # the same value on every rank already: their maximum keeps it exactly
                self.log(
                    f"{name}_{stage}",
                    mean,
                    on_step=False,
                    on_epoch=True,
                    batch_size=1,
                    prog_bar=name == "loss",
                    sync_dist=True,
                    reduce_fx="max",
                )

    def optimisation_settings(self) -> dict[str, float | int]:
        """What sets the optimizer's and learning-rate schedule's states: a resumed run must match it.

        The trainer's loop limits are Lightning's, once it has parsed them (``max_epochs`` ``-1``
        where only ``max_steps`` ends the run).
        """
        trainer = self.trainer
        settings = {
            "lr": float(self.lr),
            "weight_decay": float(self.weight_decay),
            "warmup_fraction": float(self.warmup_fraction),
            "max_epochs": trainer.max_epochs,
            "max_steps": trainer.max_steps,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "limit_train_batches": trainer.limit_train_batches,
            # 1 and 1.0 compare equal but are one minibatch and all of them to Lightning
            "limit_train_batches_is_share": isinstance(trainer.limit_train_batches, float),
            "trained_parameters": sum(p.numel() for p in self.module.parameters() if p.requires_grad),
        }
        if self.module.batch_adversary:
            settings["adversary_lr_factor"] = float(self.adversary_lr_factor)
        return settings

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the optimisation settings and keep the sums of an epoch checkpointed midway.

        The sums make a resumed run's epoch means cover all of the epoch. They are those of every
        rank (every rank takes the checkpoint at once; one writes it), and a resumed run gives them
        to its first rank only.
        """
        checkpoint[OPTIMISATION_SETTINGS_KEY] = self.optimisation_settings()
        checkpoint[MODEL_SETTINGS_KEY] = dict(self.model_settings)
        if "train" in self._epoch_sums:
            names, totals = self._sums_over_ranks(*self._epoch_sums["train"])
            kept = [i for i in range(len(names)) if totals[len(names) + i] > 0]
            checkpoint[EPOCH_SUMS_KEY] = (  # float32, as summed: a single process resumes exactly
                {names[i]: totals[i].float().cpu() for i in kept},
                {names[i]: int(totals[len(names) + i]) for i in kept},
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Check the checkpoint's optimisation settings; take the sums of the epoch it was written in.

        Called before Lightning restores the weights and the optimizer: a run resumed with other
        settings (:func:`check_optimisation_settings`) raises before it trains. The checkpoints of
        older versions hold ``column_to_gene``, which is this run's AnnData's: it is dropped.
        """
        check_model_settings(checkpoint.get(MODEL_SETTINGS_KEY, {}), self.model_settings)
        check_optimisation_settings(
            checkpoint.get(OPTIMISATION_SETTINGS_KEY, {}), self.optimisation_settings()
        )
        checkpoint.get("state_dict", {}).pop("column_to_gene", None)
        self._resumed_sums = checkpoint.get(EPOCH_SUMS_KEY)
        self.resumed_step = int(checkpoint.get("global_step", 0))

    def on_train_start(self) -> None:
        """Go on from the checkpoint's sums where the run resumes midway through an epoch.

        Lightning calls :meth:`on_train_epoch_start` for the next epoch, not for the one resumed.
        """
        resumed, self._resumed_sums = self._resumed_sums, None
        if resumed is not None and self.trainer.is_global_zero:  # the sums of every rank
            sums, counts = resumed
            self._epoch_sums["train"] = ({k: v.to(self.device) for k, v in sums.items()}, dict(counts))

    def on_train_epoch_start(self) -> None:
        """Set the training order of this epoch (a function of ``(seed, epoch)`` alone)."""
        self._epoch_sums.pop("train", None)
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "reseed"):
            datamodule.reseed(self.current_epoch)

    def on_train_batch_end(
        self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], batch_idx: int
    ) -> None:
        """After the epoch's last training minibatch (or the run's last step), log the epoch's means.

        Then the callbacks' ``on_train_epoch_end``, which Lightning calls before this module's,
        read them.
        """
        trainer = self.trainer
        last_step = 0 <= trainer.max_steps <= trainer.global_step
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or last_step:
            self._log_epoch("train")

    def on_train_epoch_end(self) -> None:
        """Log the means of an epoch that ended before its last minibatch (stopped by a callback)."""
        if "train" in self._epoch_sums:
            self._log_epoch("train")

    def on_validation_epoch_start(self) -> None:
        """Start the validation sums afresh."""
        self._epoch_sums.pop("validation", None)

    def on_validation_batch_end(
        self, outputs: None, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """After the last validation minibatch, log the means (read by the callbacks' epoch end)."""
        trainer = self.trainer
        n_batches = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        if dataloader_idx == len(n_batches) - 1 and batch_idx + 1 == n_batches[dataloader_idx]:
            self._log_epoch("validation")

    def on_validation_epoch_end(self) -> None:
        """Log the validation means, where the last minibatch has not."""
        if "validation" in self._epoch_sums:
            self._log_epoch("validation")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the gradients of the heads that scored nothing in this step.

        A head with nothing to score takes part in the loss with weight 0
        (:meth:`~sctransformer.module.GeneTransformerModule.loss_heads`); its gradient is then
        exactly 0, on every distributed rank alike once they are averaged. Without a gradient, AdamW
        leaves the head as it is (no momentum, no weight decay), as for a head not in the loss.
        """
        heads = [[p for p in params if p.grad is not None] for params in self.module.loss_heads().values()]
        heads = [params for params in heads if params]
        if not heads:
            return
        scored = torch.stack([torch.stack([p.grad.ne(0).any() for p in params]).any() for params in heads])
        for params, is_scored in zip(heads, scored.tolist(), strict=True):
            if not is_scored:
                for param in params:
                    param.grad = None

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Seed the global RNG (masks, dropout) from ``(seed, epoch, minibatch number)``.

        The number counts the minibatches of all distributed ranks (``batch_idx * world_size +
        rank``), so what is drawn for a minibatch depends on its place in the run only: a run
        resumed at any minibatch continues exactly as an uninterrupted one, and 2 ranks draw what
        one process accumulating gradients over the same 2 minibatches draws.
        """
        number = batch_idx * self.trainer.world_size + self.trainer.global_rank
        torch.manual_seed(batch_seed(self.seed, self.current_epoch, number))
        if self.module.batch_adversary:
            total = self._run_steps()
            self.module.adversary_scale = adversary_scale(self.global_step / total, self.adversary_schedule)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One optimisation step; stops with an error on a non-finite loss."""
        out = self._step(batch, stage="train", generator=None)
        if not torch.isfinite(out.total):
            bad = [k for k, v in out.components.items() if not torch.isfinite(v)]
            raise FloatingPointError(
                f"non-finite training loss at step {self.global_step} (components {bad}); "
                "lower the learning rate (lr=...) or check the input counts (GeneTransformer.train "
                "puts back the weights it started from)"
            )
        return out.total

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Score the validation cells with seeded masks."""
        generator = torch.Generator(device=self.device).manual_seed(self.seed + batch_idx)
        self._step(batch, stage="validation", generator=generator)

    def _run_steps(self) -> int:
        """Optimisation steps of the whole run: ``total_steps``, else counted from the data module.

        Counted from the minibatches each rank gets per epoch (the data module's
        ``batches_per_epoch``), Lightning's ``limit_train_batches``, ``accumulate_grad_batches``,
        ``max_epochs`` and ``max_steps``, whichever ends the run first (``max_epochs`` ``None`` or
        ``-1``: no limit of epochs; ``max_steps`` ``-1``: no limit of steps). Not Lightning's
        ``estimated_stepping_batches``: it builds the training loader before a checkpoint is
        restored, which loses the loader's position.

        Raises
        ------
        ValueError
            Where neither ``max_epochs`` nor ``max_steps`` ends the run: the schedule has no length.
        """
        if self.total_steps is None:
            trainer = self.trainer
            limits = []
            if trainer.max_epochs is not None and trainer.max_epochs >= 0:
                per_epoch = trainer.datamodule.batches_per_epoch(trainer.world_size)
                limit = trainer.limit_train_batches
                per_epoch = min(per_epoch, int(limit)) if isinstance(limit, int) else int(per_epoch * limit)
                limits.append(math.ceil(per_epoch / trainer.accumulate_grad_batches) * trainer.max_epochs)
            if trainer.max_steps is not None and trainer.max_steps >= 0:
                limits.append(trainer.max_steps)
            if not limits:
                raise ValueError(
                    f"max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps} train without end, so "
                    "the learning-rate schedule has no length; set max_epochs or max_steps (or total_steps)"
                )
            self.total_steps = max(1, min(limits))
        return self.total_steps

    def configure_optimizers(self):
        """AdamW with linear warm-up and cosine decay, stepped every batch."""
        decay, no_decay, discriminator = [], [], []
        for name, param in self.module.named_parameters():
            if not param.requires_grad:
                continue
            top = name.split(".")[0]
            # per-gene intercepts of the query head are set from the data: no decay towards 0
            is_norm_or_bias = param.ndim < 2 or "embedding" in top or top == "query_bias"
            if top == "batch_discriminator":
                discriminator.append(param)
            else:
                (no_decay if is_norm_or_bias else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": self.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if discriminator:  # a faster discriminator keeps up with the encoder it is trained against
            groups.append(
                {"params": discriminator, "weight_decay": 0.0, "lr": self.lr * self.adversary_lr_factor}
            )
        optimizer = torch.optim.AdamW(groups, lr=self.lr)
        total = self._run_steps()
        warmup = max(1, int(self.warmup_fraction * total))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup_steps=warmup, total_steps=total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
