"""Small shims around third-party behaviour."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# scvi-tools' `view_anndata_setup` calls `rich.pretty.pprint` without importing `rich.pretty` (1.4.2): imported
# here, so that `model.view_anndata_setup()` prints the registry instead of raising AttributeError.
try:
    import rich.pretty  # noqa: F401
except ImportError:  # a later scvi-tools without rich: nothing to mend
    pass

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
