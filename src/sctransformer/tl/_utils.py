"""Shared helpers of the ``tl`` functions."""

from __future__ import annotations

from typing import Any

from anndata import AnnData

from sctransformer._keys import KEYS


def record_run(adata: AnnData, key_added: str, function: str, model: Any, params: dict[str, Any]) -> None:
    """Record a tool's parameters in ``adata.uns["sct"][key_added]``."""
    runs = dict(adata.uns.get(KEYS.UNS, {}))
    # None cannot be written to .h5ad; an absent parameter means None
    params = {k: v for k, v in params.items() if v is not None}
    runs[key_added] = {"function": function, "params": params}
    if model is not None:
        runs[key_added]["model"] = repr(model)
    adata.uns[KEYS.UNS] = runs
