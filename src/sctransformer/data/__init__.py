"""AnnData registration fields, validation, gene vocabulary, minibatch reading and sharded streaming."""

from ._fields import BatchObsField, PhenotypeObsField, category_codes, observed_categories
from ._loader import expressed_per_cell, iter_minibatches, to_torch_csr
from ._sharded import (
    ShardBatches,
    ShardBlockSampler,
    ShardedAnnData,
    ShardedDataModule,
    shard_buffer_order,
    shard_sequence,
    shuffle_within_buffers,
    split_blocks,
)
from ._splitting import (
    EpochBatchSampler,
    EpochSeededDataSplitter,
    EpochSeededRandomSampler,
    LengthBucketedSampler,
    ResumableBatchSampler,
    epoch_seed,
    make_resumable,
    rank_batch_sizes,
)
from ._validation import check_counts, gene_identifiers, get_matrix
from ._vocabulary import GeneVocabulary

__all__ = [
    "BatchObsField",
    "EpochBatchSampler",
    "EpochSeededDataSplitter",
    "EpochSeededRandomSampler",
    "GeneVocabulary",
    "LengthBucketedSampler",
    "PhenotypeObsField",
    "ResumableBatchSampler",
    "ShardBatches",
    "ShardBlockSampler",
    "ShardedAnnData",
    "ShardedDataModule",
    "category_codes",
    "check_counts",
    "epoch_seed",
    "expressed_per_cell",
    "gene_identifiers",
    "get_matrix",
    "iter_minibatches",
    "make_resumable",
    "observed_categories",
    "rank_batch_sizes",
    "shard_buffer_order",
    "shard_sequence",
    "shuffle_within_buffers",
    "split_blocks",
    "to_torch_csr",
]
