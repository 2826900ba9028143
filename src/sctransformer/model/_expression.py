"""Expression of any gene from query tokens: imputation, condition swaps, in-silico perturbation, generation."""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from sctransformer._constants import SETUP_ARGS
from sctransformer._settings import settings
from sctransformer.data import ShardedAnnData, category_codes, get_matrix, to_torch_csr
from sctransformer.data._loader import cells_expressing
from sctransformer.data._validation import positive_int
from sctransformer.module import TokenizedCells

if TYPE_CHECKING:
    from sctransformer.module import GeneTransformerModule

logger = logging.getLogger("sctransformer")

PerturbationMode = Literal["delete", "overexpress"]
_QUERY_CHUNK = 512
_MIN_VALUE = 1e-3  # smallest generated log1p value of an expressed gene
_CHUNK_ROWS = 10_000  # cells read at once where a whole (possibly backed) matrix is scanned


@dataclass
class PerturbationResult:
    """What :meth:`ExpressionMixin.perturb` measured.

    Attributes
    ----------
    summary
        One row per perturbed gene (and group): ``perturbed``, ``group``, ``n_cells``,
        ``embedding_shift`` (mean of ``1 - cos`` between the cell embeddings before and after)
        and, where expression was predicted, ``most_changed`` (the genes whose mean predicted
        expression moves most, with signed changes) and ``max_abs_change``.
    expression_change
        Mean predicted change of every vocabulary gene (columns), rows indexed as ``summary``
        by ``(perturbed, group)``; ``None`` without expression prediction.
    cell_shifts
        ``{gene: (n_cells, d_model)}`` each cell's embedding after minus before (zero for cells
        not perturbed), when asked for.
    mode
        ``"delete"`` or ``"overexpress"``.
    """

    summary: pd.DataFrame
    expression_change: pd.DataFrame | None
    cell_shifts: dict[str, np.ndarray]
    mode: str


class ExpressionMixin:
    """Predicted expression of any gene, and what builds on it (for :class:`GeneTransformer`).

    A model created with ``expression_queries > 0`` predicts, for a gene its input does not
    contain, the probability ``p`` that the gene is expressed and the mean ``mu`` of its
    log1p-normalised value where expressed; the expected value is ``p * mu``, in the units of
    ``log1p(count / library * 1e4)``.

    A gene that a cell expresses is in the cell's input, so its query would read its own value.
    Predictions therefore split the vocabulary into ``n_folds`` fixed random folds of genes: the
    genes of each fold are predicted from the cell's other genes (the fold is held out of the
    input and of the ``[PROFILE]`` token, which training teaches the model to do), so each
    prediction uses about ``1 - 1 / n_folds`` of the cell and costs ``n_folds`` passes. The cell's
    library size and the ranks behind its per-cell quantile bins still count the held-out genes
    (as the measured cell does), so the input is not wholly blind to them: changing only a held-out
    gene's count can move another token to a neighbouring bin.
    """

    module: GeneTransformerModule

    # ------------------------------------------------------------------ shared machinery
    def _require_queries(self, what: str) -> None:
        if not self.module.expression_queries:
            raise ValueError(
                f"{what} needs a model trained to predict genes it does not read; create it with "
                "GeneTransformer(adata, expression_queries=32) (or another positive number) and train it"
            )

    @contextmanager
    def _inference(self) -> Iterator[torch.device]:
        """Eval mode, no autograd, bf16 autocast on CUDA; yields the module's device."""
        device = next(self.module.parameters()).device
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if device.type == "cuda" and torch.cuda.is_bf16_supported()
            else nullcontext()
        )
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.inference_mode(), autocast:
                yield device
        finally:
            self.module.train(was_training)

    def _vocabulary_indices(self, genes: Sequence[str] | str, what: str = "genes") -> np.ndarray:
        """Vocabulary rows of ``genes``; an error lists those the model does not know."""
        genes = [genes] if isinstance(genes, str) else list(genes)
        if not genes:
            raise ValueError(f"{what} is empty; name at least one gene")
        rows = self.vocabulary_.index.get_indexer(pd.Index([str(g) for g in genes]))
        unknown = [g for g, r in zip(genes, rows, strict=True) if r < 0]
        if unknown:
            raise ValueError(
                f"{len(unknown)} of {what} are not in the model's vocabulary of {len(self.vocabulary_)} "
                f"genes: {unknown[:20]}{' ...' if len(unknown) > 20 else ''} (identifiers look like "
                f"{self.vocabulary_.genes[:3]})"
            )
        return rows.astype(np.int64)

    def _check_phenotype_values(self, values: dict[str, Any] | None, argument: str) -> dict[str, int]:
        """Codes of the ``{key: category}`` given; errors list the known keys and categories."""
        if values is None:
            return {}
        if not isinstance(values, dict):
            raise TypeError(
                f"{argument} must be a dict of phenotype key to category, got {type(values).__name__}"
            )
        codes = {}
        for key, value in values.items():
            if key not in self.phenotype_categories_:
                raise ValueError(
                    f"{argument} names {key!r}, which is not a phenotype of the model "
                    f"(its phenotypes: {list(self.phenotype_categories_)})"
                )
            categories = self.phenotype_categories_[key]
            # matched as cells' labels are (10.0 is the category "10")
            code = int(category_codes(pd.Series([value]), categories)[0]) if value is not None else -1
            if code < 0:
                raise ValueError(
                    f"{argument}[{key!r}] = {value!r} is a value the model never saw; known values: {categories}"
                )
            codes[key] = code
        return codes

    def _phenotype_inputs(self, adata: AnnData | None, n_cells: int, overrides: dict[str, int]) -> np.ndarray:
        """``(n_cells, n_phenotypes)`` codes fed to the phenotype slots.

        ``overrides`` (key -> code) set a slot in every cell; the other slots get the cell's own
        label from ``adata.obs`` where it has the column and the label is known, else [MASK].
        """
        out = np.full((n_cells, len(self.phenotype_categories_)), -1, dtype=np.int64)
        for slot, (key, categories) in enumerate(self.phenotype_categories_.items()):
            if key in overrides:
                out[:, slot] = overrides[key]
            elif adata is not None and key in adata.obs:
                out[:, slot] = category_codes(adata.obs[key].reset_index(drop=True), categories)
        return out

    def _gene_folds(self, n_folds: int) -> torch.Tensor:
        """Fold of each vocabulary gene: a fixed random partition into ``n_folds`` folds."""
        n_folds = positive_int(n_folds, "n_folds")
        order = torch.randperm(len(self.vocabulary_), generator=torch.Generator().manual_seed(0))
        folds = torch.empty_like(order)
        folds[order] = torch.arange(len(order)) % n_folds
        return folds

    def _decode(
        self,
        tokens: TokenizedCells,
        phenotypes: torch.Tensor,
        batches: torch.Tensor,
        genes: torch.Tensor,
        cell_shift: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(expressed probability, mean, standard deviation)`` ``(n, len(genes))`` from the cells' tokens."""
        hidden, cache, key_mask = self.module.encode_context(tokens, phenotypes, batches)
        cell = self.module.cell_embedding(hidden, tokens)[:, None]
        if cell_shift is not None:
            cell = cell + cell_shift.to(cell.dtype)
        parts = []
        for start in range(0, len(genes), _QUERY_CHUNK):
            chunk = genes[start : start + _QUERY_CHUNK]
            query_hidden = self.module.decode_queries(cache, key_mask, chunk, tokens.held_share)
            parts.append(self.module.query_outputs(query_hidden, chunk, cell))
        logit, mean, log_var = (torch.cat([p[i] for p in parts], 1) for i in range(3))
        return torch.sigmoid(logit), mean.clamp(min=0), (0.5 * log_var).exp()

    def _fold_outputs(
        self,
        x: torch.Tensor,
        column_to_gene: torch.Tensor,
        phenotypes: torch.Tensor,
        batches: torch.Tensor,
        genes: torch.Tensor,
        folds: torch.Tensor,
        *,
        keep: int | None = None,
        edit: Callable[[TokenizedCells], TokenizedCells] | None = None,
        cell_shift: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(expressed probability, mean where expressed)`` ``(n, len(genes))`` of ``genes`` by folds.

        Each fold's genes are predicted from the cells without that fold; the expected log1p value is
        their product. ``keep`` stays in every fold's input (a perturbed gene); ``edit`` changes each fold's
        tokens before the pass (an in-silico perturbation).
        """
        p_out = torch.zeros(x.shape[0], len(genes), device=x.device)
        mean_out = torch.zeros_like(p_out)
        folds = folds.to(x.device)
        for fold in torch.unique(folds[genes]).tolist():
            held = folds == fold
            if keep is not None:
                held[keep] = False
            tokens = self.module.tokenize(x, column_to_gene, held_out=held)
            if edit is not None:
                tokens = edit(tokens)
            columns = torch.nonzero(folds[genes] == fold).squeeze(1)
            p, mean, _ = self._decode(tokens, phenotypes, batches, genes[columns], cell_shift)
            p_out[:, columns], mean_out[:, columns] = p.float(), mean.float()
        return p_out, mean_out

    def _refined(
        self,
        x: torch.Tensor,
        column_to_gene: torch.Tensor,
        phenotypes: torch.Tensor,
        batches: torch.Tensor,
        genes: torch.Tensor,
        folds: torch.Tensor,
        rounds: int,
    ) -> torch.Tensor:
        """Expected log1p values of ``genes`` after ``rounds`` of feeding the prediction back as the input.

        Each round predicts every vocabulary gene by folds (probability ``p``, value ``mu``), then
        gives the cells the genes they expressed plus those predicted more likely expressed than
        not (``p > 0.5``), at their predicted values ``mu``, and predicts again. The input is
        pseudo-counts ``expm1(mu) * library / 1e4`` plus one column outside the vocabulary that
        holds the rest of the cell's library, so that the tokenizer's normalisation gives back
        ``mu`` exactly; where the predicted profile alone exceeds the library, the values fed in
        are scaled down together.
        """
        every = torch.arange(len(self.vocabulary_), device=x.device)
        dense = x.to_dense().float()
        library = dense.sum(1, keepdim=True)
        mapped = column_to_gene >= 0
        expressed = torch.zeros(x.shape[0], len(every), dtype=torch.bool, device=x.device)
        expressed[:, column_to_gene[mapped]] = dense[:, mapped] > 0
        p, mean = self._fold_outputs(x, column_to_gene, phenotypes, batches, every, folds)
        columns = torch.cat([every, every.new_full((1,), -1)])  # the last column: the rest of the library
        for _ in range(rounds):
            values = torch.where(expressed | (p > 0.5), mean, torch.zeros_like(mean))
            counts = torch.expm1(values) * library / 1e4
            rest = (library - counts.sum(1, keepdim=True)).clamp(min=0)
            pseudo = torch.cat([counts, rest], 1).to_sparse_csr()
            p, mean = self._fold_outputs(pseudo, columns, phenotypes, batches, every, folds)
        return (p * mean)[:, genes]

    def _counts_source(self, adata: AnnData | None) -> AnnData:
        adata = self._inference_adata(adata)
        if isinstance(adata, ShardedAnnData):
            raise TypeError(
                "expression prediction reads an AnnData; load the cells (or a subset) into memory"
            )
        return adata

    @staticmethod
    def _check_batch_size(batch_size: int | None) -> int:
        batch_size = settings.batch_size if batch_size is None else batch_size
        return positive_int(batch_size, "batch_size")

    # ------------------------------------------------------------------ imputation and swaps
    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        *,
        genes: Sequence[str] | None = None,
        phenotypes: dict[str, Any] | None = None,
        n_folds: int = 4,
        batch_size: int | None = None,
        cell_shift: np.ndarray | None = None,
    ) -> np.ndarray:
        """Predicted expression of every gene in every cell, expressed or not (imputation, denoising).

        The expected ``log1p(count / library * 1e4)`` of each gene: the predicted probability
        that it is expressed times its predicted value where expressed, each gene predicted from
        the cell's genes outside its fold (see :class:`ExpressionMixin`).

        Parameters
        ----------
        adata
            AnnData with the model's count layer; default the model's own. It is not modified.
        genes
            Vocabulary genes to predict; default every column of ``adata`` (columns whose gene is
            not in the vocabulary get NaN), so that the result fits ``adata.layers``.
        phenotypes
            ``{key: category}`` fed to those phenotype slots of every cell (a condition swap);
            the other slots get each cell's own label from ``adata.obs`` where known, else [MASK].
        n_folds
            Gene folds; each gene is predicted from the cell less ``1 / n_folds`` of its genes.
            ``1`` predicts every gene from the phenotype tokens alone.
        batch_size
            Cells per minibatch; default ``sctransformer.settings.batch_size``.
        cell_shift
            ``(d_model,)`` vector added to every cell's embedding where it enters the query head
            (scGen-style latent arithmetic, e.g. the mean embedding of stimulated minus control
            cells). The query tokens still attend to the cell's own genes, so this moves only the
            part of the prediction that goes through the embedding. Must be finite (NaN or inf
            raise a ValueError).

        Returns
        -------
        ``(n_cells, n_genes)`` float32 array.
        """
        self._require_queries("get_normalized_expression")
        overrides = self._check_phenotype_values(phenotypes, "phenotypes")
        if cell_shift is not None:
            d_model = self.module.gene_embedding.embedding_dim
            if np.shape(cell_shift) != (d_model,):
                raise ValueError(f"cell_shift must be a vector of {d_model} values (the embedding width)")
            if not np.isfinite(np.asarray(cell_shift, dtype=np.float64)).all():
                raise ValueError(
                    "cell_shift holds NaN or infinite values (e.g. the mean embedding of an empty "
                    "selection of cells); pass a finite vector"
                )
        adata = self._counts_source(adata)
        rows = self._column_to_gene(adata) if genes is None else self._vocabulary_indices(genes)
        return self._predicted_expression(adata, rows, overrides, n_folds, batch_size, cell_shift=cell_shift)

    def _predicted_expression(
        self,
        adata: AnnData,
        rows: np.ndarray,
        overrides: dict[str, int],
        n_folds: int,
        batch_size: int | None,
        *,
        cell_shift: np.ndarray | None = None,
        refine_rounds: int = 0,
    ) -> np.ndarray:
        """Expected values ``(n_cells, len(rows))`` of vocabulary rows (``-1``: NaN), minibatch by minibatch."""
        folds = self._gene_folds(n_folds)
        batch_size = self._check_batch_size(batch_size)
        known = rows >= 0
        out = np.full((adata.n_obs, len(rows)), np.nan, dtype=np.float32)
        phenotype_codes = self._phenotype_inputs(adata, adata.n_obs, overrides)
        batch_codes = self._batch_inputs(adata, None)
        matrix = get_matrix(adata, self.setup_args_[SETUP_ARGS.LAYER])
        with self._inference() as device:
            column_to_gene = torch.as_tensor(self._column_to_gene(adata), device=device)
            query = torch.as_tensor(rows[known], device=device)
            shift = None if cell_shift is None else torch.as_tensor(np.asarray(cell_shift), device=device)
            for start in range(0, adata.n_obs, batch_size):
                idx = np.arange(start, min(start + batch_size, adata.n_obs))
                x = to_torch_csr(matrix[idx]).to(device)
                phen = torch.as_tensor(phenotype_codes[idx], device=device)
                batches = torch.as_tensor(batch_codes[idx], device=device)
                if refine_rounds:
                    values = self._refined(x, column_to_gene, phen, batches, query, folds, refine_rounds)
                else:
                    values = torch.mul(
                        *self._fold_outputs(x, column_to_gene, phen, batches, query, folds, cell_shift=shift)
                    )
                out[np.ix_(idx, np.flatnonzero(known))] = values.float().cpu().numpy()
        return out

    def predict_response(
        self,
        adata: AnnData,
        set: dict[str, Any],
        *,
        genes: Sequence[str] | None = None,
        n_folds: int = 4,
        refine_rounds: int = 0,
        batch_size: int | None = None,
    ) -> AnnData:
        """Predicted expression of ``adata``'s cells with phenotype tokens swapped (e.g. control -> stimulated).

        Parameters
        ----------
        adata
            The cells to transform (e.g. the control cells); not modified.
        set
            ``{key: category}`` fed to every cell, e.g. ``{"condition": "stim"}``.
        genes, n_folds, batch_size
            As for :meth:`get_normalized_expression` (``genes`` default: the vocabulary genes
            among ``adata``'s columns).
        refine_rounds
            Counterfactual refinement: after the first prediction, give each cell its predicted
            profile as input (the genes it expressed and those predicted more likely expressed
            than not, at their predicted values) and predict again, this many times, for the
            swapped and the own-phenotype prediction alike, so that the swap's effect on some
            genes can change the prediction of others. The context of a plain swap is the cell's
            own (e.g. unstimulated) profile, which outweighs the swapped token. Each round costs
            ``2 * n_folds`` passes over every vocabulary gene. ``0`` (default): the plain swap. See
            the benchmarks for what it gains and how the number of rounds was chosen.

        Returns
        -------
        AnnData of the same cells (``.obs`` copied) and ``genes``: ``X`` the predicted expression
        after the swap, ``layers["sct_baseline"]`` the prediction with the cells' own phenotypes
        (so ``X - layers["sct_baseline"]`` is the model's response), both in
        ``log1p(count / library * 1e4)`` units. Genes are named by the model's identifiers
        (``adata.var[gene_key]`` for a model set up with ``gene_key``); ``uns["sct_response"]``
        records the swap and the ``gene_key``.
        """
        if not isinstance(set, dict) or not set:
            raise ValueError(
                "set must be a non-empty dict of phenotype key to category, e.g. {'condition': 'stim'}"
            )
        self._require_queries("predict_response")
        overrides = self._check_phenotype_values(set, "set")
        if (
            isinstance(refine_rounds, bool)
            or not isinstance(refine_rounds, int | np.integer)
            or refine_rounds < 0
        ):
            raise ValueError(f"refine_rounds must be an integer >= 0, got {refine_rounds!r}")
        adata = self._counts_source(adata)
        if genes is None:
            rows = self._column_to_gene(adata)
            genes = [self.vocabulary_.genes[r] for r in rows if r >= 0]
        elif isinstance(genes, str):  # one gene, as the other getters take it
            genes = [genes]
        rows = self._vocabulary_indices(genes)
        swapped, baseline = (
            self._predicted_expression(adata, rows, codes, n_folds, batch_size, refine_rounds=refine_rounds)
            for codes in (overrides, {})
        )
        out = AnnData(
            X=swapped,
            obs=adata.obs.copy(),
            var=pd.DataFrame(index=pd.Index([str(g) for g in genes])),
            layers={"sct_baseline": baseline},
        )
        out.uns["sct_response"] = {
            "set": {k: self.phenotype_categories_[k][code] for k, code in overrides.items()},  # as matched
            "n_folds": int(n_folds),
            "refine_rounds": int(refine_rounds),
            "units": "log1p(count / library * 1e4)",
        }
        if self.setup_args_[SETUP_ARGS.GENE_KEY] is not None:  # what names the genes (absent: var_names)
            out.uns["sct_response"]["gene_key"] = self.setup_args_[SETUP_ARGS.GENE_KEY]
        return out

    # ------------------------------------------------------------------ in-silico perturbation
    def perturb(
        self,
        adata: AnnData | None,
        genes: Sequence[str] | str,
        *,
        mode: PerturbationMode = "delete",
        value: float | None = None,
        groupby: str | None = None,
        predict_expression: bool = True,
        n_folds: int = 4,
        n_top: int = 10,
        batch_size: int | None = None,
        return_cell_shifts: bool = False,
    ) -> PerturbationResult:
        """In-silico deletion or over-expression of each gene of ``genes`` (Geneformer-style).

        Each minibatch of cells is tokenized and encoded once; each gene's perturbation edits those
        tokens (a deleted gene's token is masked out of attention and its ``[PROFILE]`` weight set
        to 0; an over-expressed gene's value and bin are set, or a token is appended) and reruns
        the forward pass. Deletion runs on the cells that express the gene; over-expression on
        every cell that expresses at least one vocabulary gene (a cell with none has no value or
        bin to set the gene against). A model without ``[PROFILE]`` (``cell_profile=False``) reads
        only a cell's ``max_length`` tokens, so deleting a gene beyond them changes nothing: those
        expressing cells are left out of the results (not counted in ``n_cells``) with a warning
        that says how many. Predicted expression (``predict_expression``) is computed by gene
        folds, before and after the same edit, with the perturbed gene kept in every fold's input:
        ``n_folds + 1`` more passes per gene. The cells to perturb are found in one pass over the
        count matrix in row chunks, so a backed AnnData is never loaded whole. The cells' own
        phenotype labels are fed, as :meth:`get_normalized_expression` feeds them, so the
        embeddings compared are not those of :meth:`get_latent_representation` (which hides the
        labels): the shifts are within this model's reading of the labelled cells.

        Parameters
        ----------
        adata
            Cells to perturb; default the model's own. Not modified.
        genes
            Vocabulary genes to perturb, one at a time.
        mode
            ``"delete"`` or ``"overexpress"``.
        value
            Over-expression's log1p-normalised value; default each cell's highest value (top bin).
        groupby
            ``.obs`` column: report each group of cells separately.
        predict_expression
            Also predict every vocabulary gene before and after (models with
            ``expression_queries``; ``n_folds + 1`` more passes per gene).
        n_folds
            Gene folds of the expression prediction, see :meth:`get_normalized_expression`.
        n_top
            Genes listed in ``most_changed``.
        batch_size
            Cells per minibatch; default ``sctransformer.settings.batch_size``.
        return_cell_shifts
            Keep each perturbed cell's embedding shift (perturbed minus original embedding).

        Returns
        -------
        :class:`PerturbationResult`: the summary table, the mean predicted change of every gene
        and, when asked for, the per-cell embedding shifts.
        """
        if mode not in ("delete", "overexpress"):
            raise ValueError(f"mode must be 'delete' or 'overexpress', got {mode!r}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise TypeError(
                f"value must be a number (the over-expressed log1p-normalised value), got {value!r}"
            )
        if value is not None and (mode != "overexpress" or not np.isfinite(value) or value <= 0):
            raise ValueError(
                "value is the over-expressed log1p-normalised value: a finite number > 0 with "
                "mode='overexpress'"
            )
        if predict_expression:
            self._require_queries("perturb(predict_expression=True)")
        targets = pd.unique(self._vocabulary_indices(genes, "genes"))  # each gene once
        names = [self.vocabulary_.genes[t] for t in targets]
        folds = self._gene_folds(n_folds)
        batch_size = self._check_batch_size(batch_size)
        n_top = positive_int(n_top, "n_top")
        adata = self._counts_source(adata)
        if groupby is not None and groupby not in adata.obs:
            raise KeyError(
                f"groupby {groupby!r} is not a column of adata.obs (columns: {list(adata.obs.columns)})"
            )
        groups = (
            pd.Series("all", index=adata.obs_names)
            if groupby is None
            else adata.obs[groupby].astype(str).where(adata.obs[groupby].notna(), "nan")
        )
        group_names = list(pd.unique(groups))
        group_codes = pd.Categorical(groups, categories=group_names).codes
        matrix = get_matrix(adata, self.setup_args_[SETUP_ARGS.LAYER])
        column_to_gene = self._column_to_gene(adata)
        phenotype_codes = self._phenotype_inputs(adata, adata.n_obs, {})
        batch_codes = self._batch_inputs(adata, None)
        n_genes = len(self.vocabulary_)

        # which cells each gene is perturbed in: those expressing it (deletion), or those with
        # vocabulary genes to compare it to (over-expression); one pass over the matrix in row chunks
        column_sets = (
            [np.flatnonzero(column_to_gene >= 0)]
            if mode == "overexpress"
            else [np.flatnonzero(column_to_gene == target) for target in targets]
        )
        expressing = cells_expressing(matrix, column_sets, chunk_size=_CHUNK_ROWS)
        perturbed = {}
        for j, name in enumerate(names):
            if mode == "overexpress":
                perturbed[name] = expressing[:, 0].copy()
                continue
            if not expressing[:, j].any():
                why = (
                    "is expressed in no cell"
                    if (column_to_gene == targets[j]).any()
                    else "is not among adata's genes"
                )
                warnings.warn(f"{name} {why}; its deletion is skipped", stacklevel=2)
                continue
            perturbed[name] = expressing[:, j]
        chosen = [(int(t), name) for t, name in zip(targets, names, strict=True) if name in perturbed]
        cells = np.flatnonzero(np.any([perturbed[name] for _, name in chosen], axis=0)) if chosen else []
        d_model = self.module.gene_embedding.embedding_dim
        shift = {name: np.zeros(adata.n_obs) for _, name in chosen}
        shifts_full = (
            {name: np.zeros((adata.n_obs, d_model), np.float32) for _, name in chosen}
            if return_cell_shifts
            else {}
        )
        change_sum = {name: np.zeros((len(group_names), n_genes)) for _, name in chosen}
        beyond = dict.fromkeys(perturbed, 0)  # expressing cells whose gene is not in the input
        with self._inference() as device:
            c2g = torch.as_tensor(column_to_gene, device=device)
            vocabulary = torch.arange(n_genes, device=device)
            gene_folds = folds.to(device)
            # each minibatch is tokenized and encoded once; each gene's perturbation edits its tokens
            for start in range(0, len(cells), batch_size):
                idx = cells[start : start + batch_size]
                x = to_torch_csr(matrix[idx]).to(device)
                phen = torch.as_tensor(phenotype_codes[idx], device=device)
                batches = torch.as_tensor(batch_codes[idx], device=device)
                tokens = self.module.tokenize(x, c2g)
                before = self.module.cell_embedding(
                    self.module.encode(tokens, phen, batch_inputs=batches), tokens
                )
                base_all = (
                    torch.mul(*self._fold_outputs(x, c2g, phen, batches, vocabulary, folds))
                    if predict_expression
                    else None
                )
                for target, name in chosen:
                    rows = np.flatnonzero(perturbed[name][idx])
                    if mode == "delete" and not self.module.cell_profile:
                        # without [PROFILE], a gene cut by max_length is not in the input at all
                        present = (tokens.is_context & (tokens.gene_ids == target)).any(1).cpu().numpy()
                        perturbed[name][idx[rows[~present[rows]]]] = False
                        beyond[name] += int((~present[rows]).sum())
                        rows = rows[present[rows]]
                    if len(rows) == 0:
                        continue
                    at = torch.as_tensor(rows, device=device)
                    selected = tokens.select(at)
                    edit = self._perturbation(
                        target,
                        mode,
                        *(self._overexpression(selected, target, value) if mode == "overexpress" else ()),
                    )
                    edited = edit(selected)
                    after = self.module.cell_embedding(
                        self.module.encode(edited, phen[at], batch_inputs=batches[at]), edited
                    )
                    cos = torch.nn.functional.cosine_similarity(before[at].float(), after.float(), dim=-1)
                    shift[name][idx[rows]] = (1 - cos).cpu().numpy()
                    if return_cell_shifts:
                        shifts_full[name][idx[rows]] = (after - before[at]).float().cpu().numpy()
                    if predict_expression:
                        xs = to_torch_csr(matrix[idx[rows]]).to(device)
                        # the gene stays in the input of its own fold too, before and after the edit
                        same_fold = torch.nonzero(gene_folds == gene_folds[target]).squeeze(1)
                        base = base_all[at].clone()
                        base[:, same_fold] = torch.mul(
                            *self._fold_outputs(xs, c2g, phen[at], batches[at], same_fold, folds, keep=target)
                        )
                        moved = torch.mul(
                            *self._fold_outputs(
                                xs, c2g, phen[at], batches[at], vocabulary, folds, keep=target, edit=edit
                            )
                        )
                        np.add.at(
                            change_sum[name], group_codes[idx[rows]], (moved - base).double().cpu().numpy()
                        )

        for name, n_skipped in beyond.items():
            if n_skipped:
                warnings.warn(
                    f"{n_skipped} of the {n_skipped + int(perturbed[name].sum())} cells expressing {name} "
                    "were skipped: the model has no [PROFILE] token (cell_profile=False) and the gene is "
                    f"not among their max_length={self.module.tokenizer.max_length} tokens, so deleting "
                    "it would change nothing",
                    UserWarning,
                    stacklevel=2,
                )
        rows, changes = [], []
        for target, name in chosen:
            for g, group in enumerate(group_names):
                in_group = np.flatnonzero(perturbed[name] & (group_codes == g))
                if len(in_group) == 0:
                    continue
                row = {
                    "perturbed": name,
                    "group": group,
                    "n_cells": len(in_group),
                    "embedding_shift": float(shift[name][in_group].mean()),
                }
                if predict_expression:
                    mean_change = change_sum[name][g] / len(in_group)
                    changes.append(mean_change)
                    order = [i for i in np.argsort(-np.abs(mean_change)) if i != target][:n_top]
                    row["most_changed"] = ", ".join(
                        f"{self.vocabulary_.genes[i]} {mean_change[i]:+.3f}" for i in order
                    )
                    row["max_abs_change"] = float(np.abs(mean_change[order]).max()) if order else 0.0
                rows.append(row)
        # a gene whose every expressing cell was skipped has no result: no all-zero shifts either
        cell_shifts = {name: s for name, s in shifts_full.items() if perturbed[name].any()}
        columns = ["perturbed", "group", "n_cells", "embedding_shift"]
        columns += ["most_changed", "max_abs_change"] if predict_expression else []
        summary = pd.DataFrame(rows, columns=columns)
        change = None
        if predict_expression:
            change = pd.DataFrame(
                np.asarray(changes).reshape(len(changes), n_genes),
                index=pd.MultiIndex.from_frame(summary[["perturbed", "group"]]),
                columns=self.vocabulary_.genes,
            )
        return PerturbationResult(summary, change, cell_shifts, mode)

    def _overexpression(
        self, tokens: TokenizedCells, gene: int, value: float | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Level and bin of ``gene`` over-expressed in each cell of ``tokens`` (nothing held out).

        ``value=None``: the cell's highest value, in the top bin. A given value: for quantile bins,
        the bin it takes among the cell's other expressed genes (as the tokenizer bins).
        """
        rows = tokens.profile_rows()
        n_cells = len(tokens.n_expressed)
        tokenizer, n_bins = self.module.tokenizer, self.module.n_bins
        if value is None:
            top = torch.zeros(n_cells, device=rows.device).scatter_reduce(
                0, rows, tokens.all_values.float(), "amax"
            )
            return top, torch.full_like(top, n_bins - 1, dtype=torch.long)
        level = torch.full((n_cells,), float(value), device=rows.device)
        if tokenizer.binning == "fixed":
            return level, torch.bucketize(level, tokenizer.bin_edges, right=True)
        others = tokens.all_genes != gene
        below = torch.zeros_like(level).index_add_(
            0, rows, ((tokens.all_values < level[rows]) & others).float()
        )
        n_all = torch.zeros_like(level).index_add_(0, rows, others.float()) + 1
        return level, torch.div(below * n_bins, n_all, rounding_mode="floor").long().clamp(max=n_bins - 1)

    @staticmethod
    def _perturbation(
        gene: int, mode: PerturbationMode, level: torch.Tensor | None = None, bins: torch.Tensor | None = None
    ) -> Callable[[TokenizedCells], TokenizedCells]:
        """The token edit of deleting ``gene``, or of setting it to ``level`` and ``bins`` (per cell)."""
        if mode == "delete":
            return lambda tokens: tokens.without_gene(gene)
        return lambda tokens: tokens.with_gene(gene, level, bins)

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        phenotypes: dict[str, Any],
        n_cells: int,
        *,
        seed: int = 0,
        n_steps: int = 10,
        genes: Sequence[str] | None = None,
        batch_size: int | None = None,
    ) -> AnnData:
        """Generate cells from phenotype tokens alone (e.g. a cell type and a condition).

        Sampling scheme (MaskGIT-style, in a random gene order): every gene starts undecided and
        the cell's input holds only the phenotype tokens. At step ``s`` of ``n_steps`` the model
        predicts every undecided gene from the input; a random share of them is decided so that
        ``1 - cos(pi / 2 * s / n_steps)`` of all genes are decided after step ``s``: each is
        expressed with its predicted probability and then takes a value drawn from its predicted
        normal distribution (at least 0.001). Expressed genes join the input of the next steps
        (with quantile bins among the values generated so far); unexpressed ones stay out.

        Parameters
        ----------
        phenotypes
            ``{key: category}`` fed to every generated cell; other slots get [MASK].
        n_cells
            Number of cells.
        seed
            Seed of the sampling; the same seed and ``batch_size`` give the same cells (on the same
            device).
        n_steps
            Decoding steps.
        genes
            Vocabulary genes to generate; default the whole vocabulary. Genes left out are never
            in the input.
        batch_size
            Cells generated at once.

        Returns
        -------
        AnnData ``n_cells x genes`` whose ``X`` (CSR) holds the generated
        ``log1p(count / library * 1e4)`` values; ``.obs`` the phenotypes; ``uns["sct_generation"]``
        the settings.
        """
        self._require_queries("generate")
        n_cells = positive_int(n_cells, "n_cells")
        n_steps = positive_int(n_steps, "n_steps")
        codes = self._check_phenotype_values(phenotypes, "phenotypes")
        batch_size = self._check_batch_size(batch_size)
        rows = np.arange(len(self.vocabulary_)) if genes is None else self._vocabulary_indices(genes)
        generator = torch.Generator().manual_seed(int(seed))
        blocks = []
        with self._inference() as device:
            gene_ids = torch.as_tensor(rows, device=device)
            phen = torch.as_tensor(self._phenotype_inputs(None, 1, codes), device=device)
            for start in range(0, n_cells, batch_size):
                n = min(batch_size, n_cells - start)
                blocks.append(sp.csr_matrix(self._generate_block(n, gene_ids, phen, n_steps, generator)))
        obs = pd.DataFrame(
            {
                key: pd.Categorical([str(v)] * n_cells, categories=self.phenotype_categories_[key])
                for key, v in (phenotypes or {}).items()
            },
            index=pd.Index([f"generated_{i}" for i in range(n_cells)]),
        )
        out = AnnData(
            X=sp.vstack(blocks).tocsr(),
            obs=obs,
            var=pd.DataFrame(index=[self.vocabulary_.genes[r] for r in rows]),
        )
        out.uns["sct_generation"] = {
            "phenotypes": {k: str(v) for k, v in (phenotypes or {}).items()},
            "seed": int(seed),
            "n_steps": int(n_steps),
            "units": "log1p(count / library * 1e4)",
            "scheme": "random-order iterative decoding, cosine schedule",
        }
        return out

    def _generate_block(
        self, n: int, genes: torch.Tensor, phenotype: torch.Tensor, n_steps: int, generator: torch.Generator
    ) -> np.ndarray:
        """``(n, len(genes))`` generated values (see :meth:`generate`)."""
        device = genes.device
        n_genes = len(genes)
        values = torch.zeros(n, n_genes, device=device)
        # a random order per cell: gene j is decided at the step its rank falls in
        rank = torch.argsort(torch.rand(n, n_genes, generator=generator), 1).argsort(1).to(device)
        decided_by = [
            math.ceil(n_genes * (1 - math.cos(math.pi / 2 * s / n_steps))) for s in range(1, n_steps + 1)
        ]
        phen = phenotype.expand(n, -1)
        batches = torch.full((n,), -1, device=device)
        previous = 0
        for step, upto in enumerate(decided_by):
            now = (rank >= previous) & (rank < upto)
            previous_share = previous / len(self.vocabulary_)  # decided genes join the context
            previous = upto
            if not bool(now.any()):
                continue
            tokens = self.module.tokenizer.from_values(genes, values)
            tokens.held_share = torch.full((n,), 1 - previous_share, device=device)
            columns = torch.nonzero(now.any(0)).squeeze(1)
            p, mean, std = self._decode(tokens, phen, batches, genes[columns])
            draw_p = torch.rand(p.shape, generator=generator).to(device)
            draw_v = torch.randn(p.shape, generator=generator).to(device)
            sampled = torch.where(draw_p < p, (mean + std * draw_v).clamp(min=_MIN_VALUE), 0.0)
            chosen = now[:, columns]
            values[:, columns] = torch.where(chosen, sampled, values[:, columns])
            logger.debug("generation step %d: %d genes decided", step + 1, upto)
        return values.float().cpu().numpy()
