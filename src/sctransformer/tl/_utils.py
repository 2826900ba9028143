"""Shared helpers of the ``tl`` functions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from anndata import AnnData

from sctransformer._keys import KEYS
from sctransformer.data import ShardedAnnData


def record_run(
    adata: AnnData,
    key_added: str,
    function: str,
    model: Any,
    params: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """Record a tool's parameters (and ``extra`` entries beside them) in ``adata.uns["sct"][key_added]``."""
    runs = dict(recorded_runs(adata))
    # None cannot be written to .h5ad; an absent parameter means None
    params = {k: v for k, v in params.items() if v is not None}
    runs[key_added] = {"function": function, "params": params, **(extra or {})}
    if model is not None:
        runs[key_added]["model"] = repr(model)
    adata.uns[KEYS.UNS] = runs


def recorded_runs(adata: AnnData) -> Mapping[str, Any]:
    """The run records of ``adata.uns["sct"]`` (empty if there are none)."""
    runs = adata.uns.get(KEYS.UNS)
    return runs if isinstance(runs, Mapping) else {}


def previous_run(adata: AnnData, key_added: str, function: str) -> Mapping[str, Any]:
    """The record of the last ``function`` run with ``key_added`` (empty if there is none)."""
    run = recorded_runs(adata).get(key_added)
    return run if isinstance(run, Mapping) and run.get("function") == function else {}


def suffixed_key(key_added: str, suffix: object) -> str:
    """``f"{key_added}_{suffix}"`` with ``/`` (not allowed in .h5ad keys) as ``_``."""
    return f"{key_added}_{suffix}".replace("/", "_")


def counts_of(adata: AnnData, counts: ShardedAnnData | None) -> AnnData | ShardedAnnData:
    """Where a tool reads the counts of ``adata``'s cells: ``counts`` if given (checked to match), else ``adata``."""
    if counts is None:
        return adata
    if not isinstance(counts, ShardedAnnData):
        raise TypeError(f"counts must be a sctransformer.data.ShardedAnnData, got {type(counts).__name__}")
    if counts.n_obs != adata.n_obs:
        raise ValueError(
            f"counts has {counts.n_obs} cells and adata {adata.n_obs}; they must be the same cells, in order"
        )
    return counts
