"""Small shims around third-party behaviour."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

_SPARSE_WARNINGS = (
    ".*Sparse CSR tensor support is in beta.*",
    ".*Sparse invariant checks are implicitly disabled.*",
)


@contextmanager
def quiet_sparse_tensors() -> Iterator[None]:
    """Silence torch's notices about its (beta) sparse CSR tensors, which sctransformer relies on."""
    with warnings.catch_warnings():
        for message in _SPARSE_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield
