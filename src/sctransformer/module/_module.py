"""The gene transformer as a plain torch module: embeddings, encoder, heads, losses."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from sctransformer.data._validation import check_choice, positive_int

from ._attention import (
    VARLEN_KERNELS,
    AttentionBackend,
    EncoderBlock,
    PackedTokens,
    check_attention,
    sdpa_length_padding,
    select_attention,
)
from ._tokenizer import Binning, TokenizedCells, Tokenizer, ValueEncoding

Pooling = Literal["cls", "mean", "profile"]


def _pad_for_sdpa(x: torch.Tensor, key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``x`` ``(n, length, d)`` and key mask padded as :func:`sdpa_length_padding` says (keys masked).

    Callers cut the outputs back to ``length``; the padded query rows attend like any token and are dropped.
    """
    pad = sdpa_length_padding(x)
    if not pad:
        return x, key_mask
    return F.pad(x, (0, 0, 0, pad)), F.pad(key_mask, (0, pad))


PhenotypeInput = Literal["token", "token+mean"]


@dataclass
class LossOutput:
    """Losses of one minibatch: the weighted ``total`` and each component separately.

    Attributes
    ----------
    total
        Sum of the components (the quantity that is minimised).
    components
        Each loss term by name: ``expression``, ``expression_from_cell``, ``query_expressed``,
        ``query_value``, ``phenotype_<key>``, ... Terms with nothing to score in this minibatch are absent.
    metrics
        Accuracies of the masked predictions, by name (not differentiated).
    counts
        Number of scored items behind each component and metric (for weighted averaging).
    """

    total: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def phenotype_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    focal_gamma: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy, or focal loss ``-(1 - p_t)^gamma log p_t`` when ``focal_gamma > 0``.

    With class weights ``w``, the mean is weighted: ``sum_i w_{y_i} l_i / sum_i w_{y_i}`` (as in
    :func:`torch.nn.functional.cross_entropy`), and 0 when every cell's class has weight 0.
    """
    log_p = F.log_softmax(logits.float(), -1).gather(1, target.unsqueeze(1)).squeeze(1)
    per_cell = -log_p
    if focal_gamma > 0:
        # 1 - p_t clamped above 0: for gamma < 1 the derivative of x^gamma at 0 is infinite (NaN gradients)
        per_cell = per_cell * (-torch.expm1(log_p)).clamp(min=torch.finfo(torch.float32).tiny) ** focal_gamma
    if weight is None:
        return per_cell.mean()
    w = weight[target]
    # 0, not 0/0, for a minibatch whose cells all belong to classes of weight 0 (none in training)
    return (per_cell * w).sum() / w.sum().clamp(min=torch.finfo(w.dtype).tiny)


class GradientReversal(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``-scale`` backward (Ganin & Lempitsky, 2015)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` unchanged, with its gradient multiplied by ``-scale`` on the way back."""
    return GradientReversal.apply(x, scale)


def symmetric_info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's loss: cross-entropy of matching row ``i`` of ``a`` to row ``i`` of ``b``, both ways.

    Rows are L2-normalised; the logits are their cosine similarities times ``exp(logit_scale)``
    (a learnt inverse temperature); the result is the mean of the ``a -> b`` and ``b -> a`` losses.
    """
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    logits = logit_scale.exp() * a @ b.T
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_in), nn.GELU(), nn.LayerNorm(d_in), nn.Linear(d_in, d_out))


class GeneTransformerModule(nn.Module):
    """Encoder of cells as ``[CLS] [phenotype tokens ...] gene tokens ...`` sentences.

    Each gene token is the sum of a gene-identity embedding and an expression-value embedding
    (a bin embedding or an MLP of the continuous value). There is no positional embedding: a cell
    is a set of genes. Each phenotype key has its own token slot and its own table of categories
    plus a mask/unknown entry.

    Parameters
    ----------
    n_genes
        Vocabulary size.
    phenotype_sizes
        Number of categories of each phenotype key, in slot order.
    d_model, n_layers, n_heads, d_ff, dropout
        Transformer size.
    max_length, value_encoding, n_bins, binning, bin_edges, gene_scale
        Tokenizer settings, see :class:`~sctransformer.module.Tokenizer`.
    label_smoothing
        Label smoothing of the cross-entropy over expression bins.
    phenotype_input
        What a phenotype head reads: its slot's output, or also the mean of the gene outputs.
    expression_queries
        Add the query head: from a query token's output (a gene the cell's context does not
        contain), the logit that the gene is expressed and the mean and log-variance of its
        log1p-normalised value where expressed (:meth:`query_outputs`).
    cell_expression_loss
        Also predict masked values from the ``[CLS]`` output and the gene embedding, which makes
        the ``[CLS]`` embedding summarise the cell.
    cell_profile
        Add a ``[PROFILE]`` token after the phenotype slots: a learnt linear projection (then layer
        norm) of the cell's log1p-normalised expression of every vocabulary gene, including those
        truncated away by ``max_length``, less the values hidden for masked modelling. Phenotype
        heads also read its output.
    n_batches
        Number of batches, for the batch token and the batch discriminator.
    batch_token
        Add a ``[BATCH]`` token last in the prefix: the cell's batch (an extra row stands for "no
        batch"), never a prediction target, so that the model can explain batch effects by it.
    batch_adversary
        Add a batch discriminator on the cell embedding (:meth:`cell_embedding`), trained through
        a gradient-reversal layer, so that the encoder learns an embedding it cannot tell the
        batch from (as in scGPT's domain-adversarial training).
    gene_prediction
        Add masked gene prediction (Geneformer's objective): context tokens fed the ``[GENE]``
        mask in place of their gene identity (their value kept), whose outputs score every
        vocabulary gene through the gene-identity embedding table (tied weights), the genes
        visible in the same cell excluded. It makes the model learn which genes a cell
        expresses together, which masked values alone do not ask for.
    align_dims
        ``(width of the other modality's vectors, width of the shared space)``: add CLIP-style
        alignment, a linear projection of the cell embedding and a small MLP of the other
        modality into the shared space, and a learnt temperature (:func:`symmetric_info_nce`).
    attention
        How :meth:`encode` runs attention (:func:`~sctransformer.module.select_attention`):
        ``"sdpa"`` on padded minibatches; ``"varlen"`` / ``"flash"`` on packed tokens with no
        padding (CUDA, half precision); ``"auto"`` picks. It does not change the weights and may
        be changed at any time (:attr:`attention`).
    """

    def __init__(
        self,
        n_genes: int,
        phenotype_sizes: list[int],
        *,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_ff: int,
        dropout: float,
        max_length: int,
        value_encoding: ValueEncoding,
        n_bins: int,
        binning: Binning,
        bin_edges: torch.Tensor | None,
        label_smoothing: float,
        cell_expression_loss: bool,
        expression_queries: bool = False,
        phenotype_input: PhenotypeInput = "token",
        gene_scale: torch.Tensor | None = None,
        cell_profile: bool = False,
        n_batches: int = 0,
        batch_token: bool = False,
        batch_adversary: bool = False,
        align_dims: tuple[int, int] | None = None,
        attention: AttentionBackend = "auto",
        gene_prediction: bool = False,
    ) -> None:
        super().__init__()
        check_attention(attention)
        check_choice(phenotype_input, "phenotype_input", get_args(PhenotypeInput))
        if isinstance(label_smoothing, bool) or not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
        if positive_int(d_model, "d_model") % positive_int(n_heads, "n_heads"):
            raise ValueError(f"n_heads must divide d_model, got d_model={d_model}, n_heads={n_heads}")
        #: The attention backend asked for (``"auto"``, ``"sdpa"``, ``"varlen"`` or ``"flash"``).
        self.attention = attention
        self.head_dim = d_model // n_heads
        self.tokenizer = Tokenizer(
            n_genes,
            max_length=max_length,
            value_encoding=value_encoding,
            n_bins=n_bins,
            binning=binning,
            bin_edges=bin_edges,
            gene_scale=gene_scale,
        )
        self.value_encoding = value_encoding
        self.n_bins = n_bins
        self.phenotype_sizes = list(phenotype_sizes)
        self.label_smoothing = label_smoothing
        self.expression_queries = expression_queries
        self.cell_expression_loss = cell_expression_loss
        self.phenotype_input = phenotype_input
        self.cell_profile = cell_profile
        self.gene_prediction = gene_prediction
        if (batch_token or batch_adversary) and n_batches < 2:
            raise ValueError(f"a batch token or discriminator needs at least 2 batches, got {n_batches}")
        self.n_batches = n_batches
        self.batch_token = batch_token
        self.batch_adversary = batch_adversary
        #: Gradient-reversal strength of the batch discriminator; the training plan schedules it.
        self.adversary_scale = 1.0

        self.gene_embedding = nn.Embedding(n_genes, d_model)
        if gene_prediction:
            # the [GENE] mask fed in place of a hidden identity, and the head whose output is
            # scored against every row of gene_embedding (tied weights) plus a per-gene bias
            self.gene_mask = nn.Parameter(torch.zeros(d_model))
            nn.init.normal_(self.gene_mask, std=0.02)
            self.gene_head = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.LayerNorm(d_model))
            self.gene_bias = nn.Parameter(torch.zeros(n_genes))
        if value_encoding == "binned":
            self.bin_embedding = nn.Embedding(n_bins + 1, d_model)  # last row: [MASK]
        else:
            self.value_mlp = nn.Sequential(nn.Linear(1, d_model), nn.GELU(), nn.Linear(d_model, d_model))
            self.value_mask = nn.Parameter(torch.zeros(d_model))
        self.cls = nn.Parameter(torch.zeros(d_model))
        # each table's last row is [MASK] / unknown
        self.phenotype_embeddings = nn.ModuleList(nn.Embedding(n + 1, d_model) for n in phenotype_sizes)
        self.blocks = nn.ModuleList(EncoderBlock(d_model, n_heads, d_ff, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        if cell_profile:
            self.profile_embedding = nn.EmbeddingBag(n_genes, d_model, mode="sum")
            nn.init.normal_(self.profile_embedding.weight, std=0.02)
            self.profile_norm = nn.LayerNorm(d_model)
        if batch_token:
            self.batch_embedding = nn.Embedding(n_batches + 1, d_model)  # last row: no batch
        if batch_adversary:
            self.batch_discriminator = _mlp(d_model, n_batches)
        self.align_dims = None if align_dims is None else (int(align_dims[0]), int(align_dims[1]))
        if self.align_dims is not None:
            d_other, d_shared = self.align_dims
            self.align_transcriptome = nn.Linear(d_model, d_shared)
            self.align_other = nn.Sequential(
                nn.Linear(d_other, d_model), nn.GELU(), nn.LayerNorm(d_model), nn.Linear(d_model, d_shared)
            )
            self.align_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's start

        n_out = n_bins if value_encoding == "binned" else 1
        self.expression_head = _mlp(d_model, n_out)
        if cell_expression_loss:
            self.cell_query = nn.Linear(d_model, d_model)
            self.cell_expression_head = nn.Linear(d_model, n_out)
        if expression_queries:
            self.query_head = _mlp(d_model, 3)  # expressed logit, mean, log-variance
            # per-gene intercepts of the three outputs (set from the data by init_query_bias)
            self.query_bias = nn.Embedding(n_genes, 3)
            nn.init.zeros_(self.query_bias.weight)
            # the share of the vocabulary held out of the context, told to each query token
            self.held_embedding = nn.Linear(1, d_model, bias=False)
            # a direct path from the cell embedding to every query's outputs: added to the query's
            # output, and a factorised cell x gene term (a linear decoder of the embedding)
            self.query_cell = nn.Linear(d_model, d_model)
            self.query_interaction = nn.Linear(d_model, 3, bias=False)
        d_head = (2 if phenotype_input == "token+mean" else 1) * d_model + cell_profile * d_model
        self.phenotype_heads = nn.ModuleList(
            nn.Sequential(nn.Linear(d_head, d_model), nn.GELU(), nn.LayerNorm(d_model), nn.Linear(d_model, n))
            for n in phenotype_sizes
        )
        nn.init.normal_(self.cls, std=0.02)

    @property
    def n_phenotypes(self) -> int:
        """Number of phenotype token slots."""
        return len(self.phenotype_sizes)

    @property
    def n_prefix(self) -> int:
        """Number of tokens before the gene tokens (``[CLS]``, phenotype slots, ``[PROFILE]``, ``[BATCH]``)."""
        return 1 + self.n_phenotypes + int(self.cell_profile) + int(self.batch_token)

    @property
    def profile_index(self) -> int:
        """Position of the ``[PROFILE]`` token."""
        return 1 + self.n_phenotypes

    def profile(self, tokens: TokenizedCells, value_mask: torch.Tensor | None) -> torch.Tensor:
        """``[PROFILE]`` input ``(n, d)``: projection of the context's whole profile, less the hidden values.

        The hidden genes' entries get weight 0 in the sum (rather than being subtracted after it,
        which leaves a trace of them in reduced precision).
        """
        if tokens.all_genes is None or tokens.all_values is None:
            raise ValueError("the tokens carry no whole profile; tokenize with this module's tokenizer")
        offsets = torch.cumsum(tokens.n_expressed, 0) - tokens.n_expressed
        weights = tokens.all_values.to(self.profile_embedding.weight)
        if value_mask is not None:
            n_genes = self.profile_embedding.num_embeddings
            cells = torch.arange(len(tokens.gene_ids), device=tokens.gene_ids.device)[:, None]
            hidden = value_mask & tokens.is_context
            hidden_keys = torch.where(hidden, cells * n_genes + tokens.gene_ids, -1)  # -1 matches nothing
            keys = tokens.profile_rows() * n_genes + tokens.all_genes
            weights = weights.masked_fill(torch.isin(keys, hidden_keys.flatten()), 0)
        total = self.profile_embedding(tokens.all_genes, offsets, per_sample_weights=weights)
        return self.profile_norm(total)

    def tokenize(
        self,
        x: torch.Tensor,
        column_to_gene: torch.Tensor,
        *,
        n_queries: int = 0,
        held_out: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> TokenizedCells:
        """Tokenize a minibatch of counts, see :class:`~sctransformer.module.Tokenizer`."""
        return self.tokenizer(
            x,
            column_to_gene,
            n_queries=n_queries,
            held_out=held_out,
            generator=generator,
        )

    def embed_tokens(
        self,
        tokens: TokenizedCells,
        phenotype_inputs: torch.Tensor,
        value_mask: torch.Tensor | None = None,
        batch_inputs: torch.Tensor | None = None,
        gene_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings ``(n, n_prefix + length, d)`` and the key mask.

        ``phenotype_inputs`` is ``(n, n_phenotypes)``; ``-1`` feeds the slot's [MASK] token.
        ``value_mask`` marks context tokens whose value is hidden (query tokens' values are
        always hidden, and no token attends to them). ``batch_inputs`` ``(n,)`` are the batch codes of the ``[BATCH]`` token;
        ``-1`` (or ``None`` for all) feeds "no batch". ``gene_mask`` marks context tokens fed
        the ``[GENE]`` mask in place of their identity (models with ``gene_prediction``); the
        ``[PROFILE]`` token leaves out their values as well as the hidden ones.
        """
        hidden_values = tokens.is_query if value_mask is None else value_mask | tokens.is_query
        genes = self.gene_embedding(tokens.gene_ids)
        if gene_mask is not None:
            if not self.gene_prediction:
                raise ValueError("gene_mask needs a module with gene_prediction=True")
            gene_mask = gene_mask & tokens.is_context
            genes = torch.where(gene_mask.unsqueeze(-1), self.gene_mask.to(genes.dtype), genes)
            value_mask = gene_mask if value_mask is None else value_mask | gene_mask
        if self.value_encoding == "binned":
            bins = tokens.bins.masked_fill(hidden_values | (tokens.bins < 0), self.n_bins)
            values = self.bin_embedding(bins)
        else:
            values = self.value_mlp(tokens.values.unsqueeze(-1).to(genes.dtype))
            values = torch.where(hidden_values.unsqueeze(-1), self.value_mask, values)
        gene_tokens = genes + values
        if self.expression_queries:
            held = self.held_embedding(tokens.held_share[:, None].to(gene_tokens.dtype))
            gene_tokens = gene_tokens + tokens.is_query.unsqueeze(-1).to(gene_tokens.dtype) * held[:, None]

        n = gene_tokens.shape[0]
        prefix = [self.cls.expand(n, 1, -1)]
        for slot, table in enumerate(self.phenotype_embeddings):
            codes = phenotype_inputs[:, slot]
            codes = torch.where(codes < 0, table.num_embeddings - 1, codes)
            prefix.append(table(codes).unsqueeze(1))
        if self.cell_profile:
            prefix.append(self.profile(tokens, value_mask).unsqueeze(1).to(gene_tokens.dtype))
        if self.batch_token:
            codes = torch.full((n,), -1, device=gene_tokens.device) if batch_inputs is None else batch_inputs
            codes = torch.where((codes < 0) | (codes >= self.n_batches), self.n_batches, codes.long())
            prefix.append(self.batch_embedding(codes).unsqueeze(1))
        x = torch.cat([*prefix, gene_tokens], 1)
        key_mask = torch.cat([tokens.is_token.new_ones(n, self.n_prefix), tokens.is_context], 1)
        return x, key_mask

    def query_tokens(self, genes: torch.Tensor, held_share: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``(n, n_queries, d)`` of query tokens of vocabulary ``genes``.

        Identity plus the [MASK] value plus the embedding of the cell's held-out share ``(n,)``.
        """
        mask = self.bin_embedding.weight[-1] if self.value_encoding == "binned" else self.value_mask
        x = self.gene_embedding(genes) + mask
        held = self.held_embedding(held_share[:, None].to(x.dtype))[:, None]
        return (x if x.dim() == 3 else x.unsqueeze(0)) + held

    @torch.no_grad()
    def init_query_bias(self, expressed: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor) -> None:
        """Start the query outputs of each gene at its share of expressing cells and its value's mean and variance."""
        share = expressed.float().clamp(1e-4, 1 - 1e-4)
        self.query_bias.weight[:, 0] = torch.log(share / (1 - share))
        self.query_bias.weight[:, 1] = mean.float()
        self.query_bias.weight[:, 2] = torch.log(variance.float().clamp(min=1e-2))

    def encode_context(
        self,
        tokens: TokenizedCells,
        phenotype_inputs: torch.Tensor,
        batch_inputs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """:meth:`encode`, also returning each block's attention keys and values and the key mask.

        With them, :meth:`decode_queries` gives the outputs of any number of query tokens without
        encoding the context again. On CUDA the keys, values and key mask may hold padding
        (masked) beyond the tokens, see :func:`~sctransformer.module._attention.sdpa_length_padding`.
        """
        x, key_mask = self.embed_tokens(tokens, phenotype_inputs, batch_inputs=batch_inputs)
        length = x.shape[1]
        x, key_mask = _pad_for_sdpa(x, key_mask)
        cache = []
        for block in self.blocks:
            x, keys, values = block(x, key_mask, return_keys_values=True)
            cache.append((keys, values))
        return self.norm(x[:, :length]), cache, key_mask

    def decode_queries(
        self,
        cache: list[tuple[torch.Tensor, torch.Tensor]],
        key_mask: torch.Tensor,
        genes: torch.Tensor,
        held_share: torch.Tensor,
    ) -> torch.Tensor:
        """Final hidden states ``(n, n_queries, d)`` of query tokens, from :meth:`encode_context`'s cache.

        ``genes`` is ``(n_queries,)`` (shared by all cells) or ``(n, n_queries)``. The same as appending them to the cells as query tokens and calling :meth:`encode`.
        """
        x = self.query_tokens(
            genes, held_share
        )  # float32, as the tokens of encode (autocast casts the layers)
        for block, (k, v) in zip(self.blocks, cache, strict=True):
            x = block.decode(x, k, v, key_mask)
        return self.norm(x)

    def query_outputs(
        self, query_hidden: torch.Tensor, genes: torch.Tensor, cell: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(expressed logit, mean, log-variance)`` of the log1p-normalised value of query ``genes``.

        ``query_hidden`` ``(..., d)`` are the query tokens' outputs, ``cell`` ``(..., d)`` (or
        broadcastable to them) the cells' embeddings (:meth:`cell_embedding`), which reach the
        head directly as well as through attention. The expected value is
        ``sigmoid(logit) * mean``. The logit is the odds among held-out genes: training corrects
        for the different sampling rates of expressed and unexpressed query genes (see
        :meth:`loss`).
        """
        cell = self.query_cell(cell.to(query_hidden.dtype))
        interaction = self.query_interaction(cell * self.gene_embedding(genes))
        out = (
            self.query_head(query_hidden + cell).float()
            + interaction.float()
            + self.query_bias(genes).float()
        )
        return out[..., 0], out[..., 1], out[..., 2].clamp(-10, 10)

    def encode(
        self,
        tokens: TokenizedCells,
        phenotype_inputs: torch.Tensor,
        value_mask: torch.Tensor | None = None,
        batch_inputs: torch.Tensor | None = None,
        gene_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states ``(n, n_prefix + length, d)``.

        On the packed backends (see :attr:`attention`) the positions of padding tokens are 0.
        ``gene_mask``: see :meth:`embed_tokens`.
        """
        x, key_mask = self.embed_tokens(tokens, phenotype_inputs, value_mask, batch_inputs, gene_mask)
        backend = select_attention(self.attention, x, self.head_dim)
        if backend == "sdpa":
            length = x.shape[1]
            x, key_mask = _pad_for_sdpa(x, key_mask)
            for block in self.blocks:
                x = block(x, key_mask)
            return self.norm(x[:, :length])
        present = torch.cat([key_mask[:, : self.n_prefix], tokens.is_token], 1)
        packed = PackedTokens.from_masks(key_mask, present, check=False)  # keys: prefix and context
        y = packed.pack(x)
        for block in self.blocks:
            y = block.forward_packed(y, packed, VARLEN_KERNELS[backend])
        return packed.unpack(self.norm(y))

    def encode_with_attention(
        self,
        tokens: TokenizedCells,
        phenotype_inputs: torch.Tensor,
        layers: list[int],
        batch_inputs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """:meth:`encode`, also returning the attention probabilities of ``layers``.

        Each map is ``(n, heads, n_prefix + length, n_prefix + length)``: row ``i`` is the softmax
        over every token (prefix tokens included) of token ``i``'s attention, computed explicitly
        (the forward pass itself stays on fused kernels).
        """
        if any(not 0 <= layer < len(self.blocks) for layer in layers):
            raise ValueError(f"layers must lie in [0, {len(self.blocks)}), got {layers}")
        x, key_mask = self.embed_tokens(tokens, phenotype_inputs, batch_inputs=batch_inputs)
        length = x.shape[1]
        x, key_mask = _pad_for_sdpa(x, key_mask)
        maps = {}
        for i, block in enumerate(self.blocks):
            if i in layers:
                probabilities = block.attention.attention_probabilities(block.norm_attention(x), key_mask)
                maps[i] = probabilities[..., :length, :length]  # padding keys have probability 0
            x = block(x, key_mask)
        return self.norm(x[:, :length]), [maps[layer] for layer in layers]

    def pool(self, hidden: torch.Tensor, tokens: TokenizedCells, pooling: Pooling) -> torch.Tensor:
        """Cell embedding ``(n, d)``: the ``[CLS]`` or ``[PROFILE]`` output, or the gene-token mean."""
        if pooling == "cls":
            return hidden[:, 0]
        if pooling == "profile":
            if not self.cell_profile:
                raise ValueError(
                    "pooling='profile' needs a model with the [PROFILE] token (cell_profile=True)"
                )
            return hidden[:, self.profile_index]
        weights = tokens.is_context.to(hidden.dtype)
        gene_hidden = hidden[:, self.n_prefix :]
        total = (gene_hidden * weights.unsqueeze(-1)).sum(1)
        # cells with no expressed gene fall back to the [CLS] output
        n_tokens = weights.sum(1, keepdim=True)
        return torch.where(n_tokens > 0, total / n_tokens.clamp(min=1), hidden[:, 0])

    def cell_embedding(self, hidden: torch.Tensor, tokens: TokenizedCells) -> torch.Tensor:
        """The default cell embedding: the ``[PROFILE]`` output, else the ``[CLS]`` output."""
        return self.pool(hidden, tokens, "profile" if self.cell_profile else "cls")

    def aligned(self, hidden: torch.Tensor, tokens: TokenizedCells) -> torch.Tensor:
        """The cell embedding in the shared space, L2-normalised ``(n, align_dim)``."""
        return F.normalize(self.align_transcriptome(self.cell_embedding(hidden, tokens)).float(), dim=-1)

    def aligned_other(self, other: torch.Tensor) -> torch.Tensor:
        """The other modality's vectors in the shared space, L2-normalised ``(n, align_dim)``."""
        return F.normalize(self.align_other(other).float(), dim=-1)

    def phenotype_logits(self, hidden: torch.Tensor, tokens: TokenizedCells) -> list[torch.Tensor]:
        """Logits ``(n, n_categories)`` of each phenotype head.

        A head reads its slot's output; with ``phenotype_input="token+mean"`` also the mean of the
        expressed-gene outputs (a direct path from every gene to the prediction); with
        ``cell_profile`` also the ``[PROFILE]`` output.
        """
        shared = []
        if self.phenotype_input == "token+mean":
            shared.append(self.pool(hidden, tokens, "mean"))
        if self.cell_profile:
            shared.append(hidden[:, self.profile_index])
        return [
            head(torch.cat([hidden[:, 1 + slot], *shared], -1))
            for slot, head in enumerate(self.phenotype_heads)
        ]

    def gene_logits(self, hidden: torch.Tensor, tokens: TokenizedCells, rows: torch.Tensor) -> torch.Tensor:
        """Logits ``(m, n_genes)`` of the gene identity of the ``m`` tokens marked in ``rows`` ``(n, length)``.

        Each row scores every vocabulary gene by the scaled dot product of the token's transformed
        output with the gene's identity embedding, plus a per-gene bias; the genes of the cell's other
        context tokens, which the token cannot be, get ``-inf``.
        """
        if not self.gene_prediction:
            raise ValueError("gene logits need a module with gene_prediction=True")
        out = self.gene_head(hidden[:, self.n_prefix :][rows])
        scale = self.gene_embedding.embedding_dim**-0.5  # unit-scale logits from unit-scale vectors
        with torch.autocast(out.device.type, enabled=False):  # float32 logits under mixed precision
            logits = scale * out.float() @ self.gene_embedding.weight.float().T + self.gene_bias.float()
        n, n_genes = tokens.gene_ids.shape[0], self.gene_embedding.num_embeddings
        visible = tokens.is_context & ~rows
        taken = torch.zeros(n, n_genes + 1, dtype=torch.bool, device=logits.device)
        taken.scatter_(1, torch.where(visible, tokens.gene_ids, n_genes), True)  # column n_genes: none
        cell = torch.nonzero(rows)[:, 0]
        return logits.masked_fill_(taken[cell, :n_genes], float("-inf"))

    def loss_heads(self) -> dict[str, list[nn.Parameter]]:
        """Parameters of each head that only its own loss term uses, by term.

        The terms are ``expression``, ``expression_from_cell``, ``query``, ``gene``,
        ``phenotype_<slot>`` (by slot number), ``batch_adversary`` and ``alignment``, those this
        module has. :meth:`loss` leaves a head out when its term has nothing to score in a minibatch
        (no masked value, no query, no hidden gene, no labelled masked cell, ...), and then adds a
        term of exactly 0 that depends on its parameters instead: every parameter takes part in every
        minibatch's loss, which distributed data parallel training requires of every rank.
        """
        heads = {"expression": list(self.expression_head.parameters())}
        if self.cell_expression_loss:
            heads["expression_from_cell"] = [
                *self.cell_query.parameters(),
                *self.cell_expression_head.parameters(),
            ]
        if self.expression_queries:
            heads["query"] = [
                *self.query_head.parameters(),
                *self.query_bias.parameters(),
                *self.query_cell.parameters(),
                *self.query_interaction.parameters(),
            ]
        if self.gene_prediction:  # the [GENE] mask too: the encoder does not use it without a gene mask
            heads["gene"] = [*self.gene_head.parameters(), self.gene_bias, self.gene_mask]
        for slot, head in enumerate(self.phenotype_heads):
            heads[f"phenotype_{slot}"] = list(head.parameters())
        if self.batch_adversary:
            heads["batch_adversary"] = list(self.batch_discriminator.parameters())
        if self.align_dims is not None:
            heads["alignment"] = [
                *self.align_transcriptome.parameters(),
                *self.align_other.parameters(),
                self.align_logit_scale,
            ]
        return heads

    def loss_names(self, phenotype_names: list[str]) -> list[str]:
        """Every name of a component or metric that :meth:`loss` may return for this module.

        Components first, then metrics, in a fixed order: what a minibatch scores is a subset.
        """
        terms = [("expression", "expression_accuracy")]
        if self.cell_expression_loss:
            terms.append(("expression_from_cell", "expression_from_cell_accuracy"))
        if self.expression_queries:
            terms += [("query_expressed", "query_expressed_accuracy"), ("query_value", "query_value_error")]
        if self.gene_prediction:
            terms.append(("gene", "gene_accuracy"))
        terms += [(f"phenotype_{name}", f"phenotype_{name}_accuracy") for name in phenotype_names]
        if self.batch_adversary:
            terms.append(("batch_adversary", "batch_adversary_accuracy"))
        if self.align_dims is not None:
            terms.append(("alignment", "alignment_accuracy"))
        return [component for component, _ in terms] + [metric for _, metric in terms]

    def _value_loss(
        self, prediction: torch.Tensor, tokens: TokenizedCells, scored: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and accuracy of value predictions at the ``scored`` gene tokens."""
        if self.value_encoding == "binned":
            logits = prediction[scored]
            target = tokens.bins[scored]
            loss = F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)
            accuracy = (logits.argmax(-1) == target).float().mean()
        else:
            pred = prediction[scored].squeeze(-1).float()
            target = tokens.values[scored]
            loss = F.mse_loss(pred, target)
            # "accuracy" of a continuous prediction: within 0.5 (log1p units) of the truth
            accuracy = ((pred - target).abs() < 0.5).float().mean()
        return loss, accuracy

    def _query_losses(self, out: LossOutput, hidden: torch.Tensor, tokens: TokenizedCells) -> None:
        """Is-expressed and value losses of the query tokens, added to ``out``.

        A cell's queries are drawn from its held-out genes: up to ``k`` of the ``n_e`` it
        expresses and up to ``k`` of the ``n_u`` it does not, at rates ``q_e`` and ``q_u``. The
        logit is trained with the offset ``log(q_e / q_u)``, so that the head itself learns the
        odds among all held-out genes.
        """
        queries = tokens.is_query
        expressed = queries & ~tokens.is_unexpressed
        if tokens.n_held is None:
            raise ValueError("query losses need tokens with sampled queries (tokenize with n_queries > 0)")
        # the chance that a held-out gene of each kind was queried: 1 where the pool is empty
        n_held = tokens.n_held.float()
        drawn = torch.stack([expressed.sum(1), tokens.is_unexpressed.sum(1)], 1).float()
        rate = torch.where(n_held > 0, drawn / n_held.clamp(min=1), torch.ones_like(n_held))
        offset = torch.log(rate[:, 0].clamp(min=1e-12)) - torch.log(rate[:, 1].clamp(min=1e-12))
        rows = torch.nonzero(queries)[:, 0]
        cell = self.cell_embedding(hidden, tokens)[rows]
        logit, mean, log_var = self.query_outputs(
            hidden[:, self.n_prefix :][queries], tokens.gene_ids[queries], cell
        )
        adjusted = logit + offset[rows]
        target = expressed[queries].float()
        out.components["query_expressed"] = F.binary_cross_entropy_with_logits(adjusted, target)
        out.metrics["query_expressed_accuracy"] = ((adjusted > 0).float() == target).float().mean()
        out.counts["query_expressed"] = out.counts["query_expressed_accuracy"] = int(queries.sum())
        is_expressed = target.bool()
        if bool(is_expressed.any()):
            value = tokens.values[queries][is_expressed].float()
            out.components["query_value"] = F.gaussian_nll_loss(
                mean[is_expressed], value, log_var[is_expressed].exp()
            )
            out.metrics["query_value_error"] = (mean[is_expressed] - value).abs().mean()
            out.counts["query_value"] = out.counts["query_value_error"] = int(is_expressed.sum())

    def loss(
        self,
        hidden: torch.Tensor,
        tokens: TokenizedCells,
        value_mask: torch.Tensor,
        phenotype_targets: torch.Tensor,
        phenotype_mask: torch.Tensor,
        phenotype_names: list[str],
        phenotype_weights: list[torch.Tensor | None] | None = None,
        focal_gamma: float = 0.0,
        batch_targets: torch.Tensor | None = None,
        adversary_weight: float = 1.0,
        other: torch.Tensor | None = None,
        align_weight: float = 1.0,
        gene_mask: torch.Tensor | None = None,
    ) -> LossOutput:
        """Masked-modelling losses of a minibatch.

        A head whose term has nothing to score in the minibatch adds a term of exactly 0 that
        depends on its parameters instead (:meth:`loss_heads`); the names it may return are
        :meth:`loss_names`.

        Parameters
        ----------
        hidden
            Output of :meth:`encode`.
        tokens
            The minibatch's tokens.
        value_mask
            ``(n, length)`` gene tokens whose value was hidden and is scored.
        phenotype_targets
            ``(n, n_phenotypes)`` true category codes; ``-1`` for unknown (never scored).
        phenotype_mask
            ``(n, n_phenotypes)`` phenotype slots that were fed [MASK] and are scored.
        phenotype_names
            Name of each phenotype slot, for the component names.
        phenotype_weights
            Optional class weights per phenotype slot.
        focal_gamma
            Focal-loss exponent of the phenotype losses; ``0`` gives the cross-entropy.
        batch_targets
            ``(n,)`` batch codes, scored by the batch discriminator (``-1``: not scored).
        adversary_weight
            Weight of the discriminator's loss. Its gradient reaches the encoder reversed and
            scaled by :attr:`adversary_scale`, so the encoder is trained to hide the batch.
        other
            ``(n, d_other)`` the other modality's vectors of the same cells, for the alignment loss.
        align_weight
            Weight of the alignment loss.
        gene_mask
            ``(n, length)`` context tokens whose gene identity was hidden and is scored
            (:meth:`gene_logits`).
        """
        # 0 with a gradient path: a minibatch with nothing to score still trains (a no-op step)
        out = LossOutput(total=hidden.sum() * 0)
        heads = self.loss_heads()

        def unscored(term: str) -> None:
            # the sum of none of the head's entries: exactly 0, with a gradient path to each parameter
            # (every parameter must take part on every distributed rank); the total and every other
            # gradient stay exactly as they were
            for param in heads[term]:
                out.total = out.total + param.reshape(-1)[:0].sum()

        gene_hidden = hidden[:, self.n_prefix :]
        scored = value_mask & tokens.is_context
        n_scored = int(scored.sum())
        if n_scored > 0:
            prediction = self.expression_head(gene_hidden)
            loss, accuracy = self._value_loss(prediction, tokens, scored)
            out.components["expression"] = loss
            out.metrics["expression_accuracy"] = accuracy
            out.counts["expression"] = out.counts["expression_accuracy"] = n_scored
            if self.cell_expression_loss:
                query = self.cell_query(hidden[:, 0]).unsqueeze(1)
                from_cell = self.cell_expression_head(query * self.gene_embedding(tokens.gene_ids))
                loss, accuracy = self._value_loss(from_cell, tokens, scored)
                out.components["expression_from_cell"] = loss
                out.metrics["expression_from_cell_accuracy"] = accuracy
                out.counts["expression_from_cell"] = n_scored
                out.counts["expression_from_cell_accuracy"] = n_scored
        else:
            unscored("expression")
            if self.cell_expression_loss:
                unscored("expression_from_cell")
        if self.expression_queries:
            if bool(tokens.is_query.any()):
                self._query_losses(out, hidden, tokens)
            else:
                unscored("query")
        hidden_genes = None if gene_mask is None else gene_mask & tokens.is_context
        if hidden_genes is not None and bool(hidden_genes.any()):
            logits = self.gene_logits(hidden, tokens, hidden_genes)
            target = tokens.gene_ids[hidden_genes]
            out.components["gene"] = F.cross_entropy(logits, target)
            out.metrics["gene_accuracy"] = (logits.argmax(-1) == target).float().mean()
            out.counts["gene"] = out.counts["gene_accuracy"] = int(hidden_genes.sum())
        elif self.gene_prediction:
            unscored("gene")
        for slot, logits in enumerate(self.phenotype_logits(hidden, tokens)):
            target = phenotype_targets[:, slot]
            rows = phenotype_mask[:, slot] & (target >= 0)
            n_rows = int(rows.sum())
            if n_rows == 0:
                unscored(f"phenotype_{slot}")
                continue
            name = phenotype_names[slot]
            weight = None if phenotype_weights is None else phenotype_weights[slot]
            out.components[f"phenotype_{name}"] = phenotype_loss(
                logits[rows], target[rows], weight=weight, focal_gamma=focal_gamma
            )
            out.metrics[f"phenotype_{name}_accuracy"] = (
                (logits[rows].argmax(-1) == target[rows]).float().mean()
            )
            out.counts[f"phenotype_{name}"] = out.counts[f"phenotype_{name}_accuracy"] = n_rows
        if self.batch_adversary:
            rows = None if batch_targets is None else (batch_targets >= 0) & (batch_targets < self.n_batches)
            if rows is None or not bool(rows.any()):
                unscored("batch_adversary")
            else:
                embedding = reverse_gradient(self.cell_embedding(hidden, tokens)[rows], self.adversary_scale)
                logits = self.batch_discriminator(embedding).float()
                target = batch_targets[rows].long()
                out.components["batch_adversary"] = adversary_weight * F.cross_entropy(logits, target)
                out.metrics["batch_adversary_accuracy"] = (logits.argmax(-1) == target).float().mean()
                out.counts["batch_adversary"] = out.counts["batch_adversary_accuracy"] = int(rows.sum())
        if self.align_dims is not None:
            if other is None or len(other) < 2:
                unscored("alignment")
            else:
                scale = self.align_logit_scale.clamp(max=math.log(100.0))  # CLIP's cap on 1/temperature
                a = self.align_transcriptome(self.cell_embedding(hidden, tokens))
                b = self.align_other(other.to(a.dtype))
                out.components["alignment"] = align_weight * symmetric_info_nce(a, b, scale)
                with torch.no_grad():
                    similarity = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T
                    matched = similarity.argmax(1) == torch.arange(len(a), device=a.device)
                out.metrics["alignment_accuracy"] = matched.float().mean()
                out.counts["alignment"] = out.counts["alignment_accuracy"] = len(a)
        for value in out.components.values():
            out.total = out.total + value
        return out
