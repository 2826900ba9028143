"""AnnData registration fields, validation, gene vocabulary and minibatch reading."""

from ._fields import BatchObsField, PhenotypeObsField, category_codes, observed_categories
from ._loader import iter_minibatches, to_torch_csr
from ._splitting import EpochSeededDataSplitter, epoch_seed
from ._validation import check_counts, gene_identifiers, get_matrix
from ._vocabulary import GeneVocabulary

__all__ = [
    "BatchObsField",
    "EpochSeededDataSplitter",
    "GeneVocabulary",
    "PhenotypeObsField",
    "category_codes",
    "check_counts",
    "epoch_seed",
    "gene_identifiers",
    "get_matrix",
    "iter_minibatches",
    "observed_categories",
    "to_torch_csr",
]
