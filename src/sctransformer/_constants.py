"""Registry keys and special-token constants, defined once (scvi-tools style)."""

from __future__ import annotations

from typing import NamedTuple


class _RegistryKeys(NamedTuple):
    X_KEY: str = "X"
    BATCH_KEY: str = "batch"
    PHENOTYPE_PREFIX: str = "phenotype:"
    ALIGN_KEY: str = "align"


REGISTRY_KEYS = _RegistryKeys()


class _SetupArgs(NamedTuple):
    LAYER: str = "layer"
    BATCH_KEY: str = "batch_key"
    PHENOTYPE_KEYS: str = "phenotype_keys"
    GENE_KEY: str = "gene_key"
    ALIGN_OBSM: str = "align_obsm"


SETUP_ARGS = _SetupArgs()

#: Sum that each cell's counts are scaled to before ``log1p`` (counts per 10,000).
TARGET_SUM: float = 1e4

#: Version of the on-disk model format; bumped whenever ``save`` writes something ``load`` of an
#: older version could not read.
MODEL_FORMAT_VERSION: int = 1


def phenotype_registry_key(key: str) -> str:
    """Registry key under which the phenotype column ``key`` is registered."""
    return f"{REGISTRY_KEYS.PHENOTYPE_PREFIX}{key}"
