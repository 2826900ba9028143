"""AnnData registration fields, validation, gene vocabulary and minibatch reading."""

from ._fields import BatchObsField, PhenotypeObsField, category_codes, observed_categories
from ._loader import expressed_per_cell, iter_minibatches, to_torch_csr
from ._splitting import EpochSeededDataSplitter, EpochSeededRandomSampler, LengthBucketedSampler, epoch_seed
from ._validation import check_counts, gene_identifiers, get_matrix
from ._vocabulary import GeneVocabulary

__all__ = [
    "BatchObsField",
    "EpochSeededDataSplitter",
    "EpochSeededRandomSampler",
    "GeneVocabulary",
    "LengthBucketedSampler",
    "PhenotypeObsField",
    "category_codes",
    "check_counts",
    "epoch_seed",
    "expressed_per_cell",
    "gene_identifiers",
    "get_matrix",
    "iter_minibatches",
    "observed_categories",
    "to_torch_csr",
]
