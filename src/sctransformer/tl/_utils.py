"""Shared helpers of the ``tl`` functions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from anndata.utils import make_index_unique

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
    """Record a tool's parameters (and ``extra`` entries beside them) in ``adata.uns["sct"][key_added]``.

    The last record of each other tool run with the same ``key_added`` is kept in the new record's
    ``"others"`` (by function name), so that a later run of that tool still finds what it wrote.
    """
    runs = dict(recorded_runs(adata))
    # None cannot be written to .h5ad; an absent parameter means None
    params = {k: v for k, v in params.items() if v is not None}
    old = runs.get(key_added)
    others: dict[str, Any] = {}
    if isinstance(old, Mapping):
        others = {str(k): v for k, v in dict(old.get("others") or {}).items() if isinstance(v, Mapping)}
        if old.get("function") is not None:
            others[str(old["function"])] = {k: v for k, v in old.items() if k != "others"}
    others.pop(function, None)
    record = {"function": function, "params": params, **(extra or {})}
    if model is not None:
        record["model"] = repr(model)
    if others:
        record["others"] = others
    runs[key_added] = record
    adata.uns[KEYS.UNS] = runs


def recorded_runs(adata: AnnData) -> Mapping[str, Any]:
    """The run records of ``adata.uns["sct"]`` (empty if there are none)."""
    runs = adata.uns.get(KEYS.UNS)
    return runs if isinstance(runs, Mapping) else {}


def tool_records(run: object) -> list[Mapping[str, Any]]:
    """A record of ``adata.uns["sct"]`` and the records of other tools kept in its ``"others"``."""
    if not isinstance(run, Mapping):
        return []
    others = run.get("others")
    return [
        run,
        *(r for r in (others.values() if isinstance(others, Mapping) else ()) if isinstance(r, Mapping)),
    ]


def previous_run(adata: AnnData, key_added: str, function: str) -> Mapping[str, Any]:
    """The record of the last ``function`` run with ``key_added`` (empty if there is none)."""
    found = [r for r in tool_records(recorded_runs(adata).get(key_added)) if r.get("function") == function]
    return found[0] if found else {}


def forget_run(runs: dict[str, Any], key_added: str, function: str) -> None:
    """Remove the record of ``function`` under ``key_added`` from ``runs``, keeping other tools' records.

    Where ``function``'s record is the top one, one kept in its ``"others"`` takes its place.
    """
    run = runs.get(key_added)
    if not isinstance(run, Mapping):
        return
    others = {k: v for k, v in dict(run.get("others") or {}).items() if isinstance(v, Mapping)}
    if run.get("function") == function:
        if not others:
            del runs[key_added]
            return
        _, top = others.popitem()  # the last recorded
        run = dict(top)
    else:
        others.pop(function, None)
        run = dict(run)
    if others:
        run["others"] = others
    else:
        run.pop("others", None)
    runs[key_added] = run


def check_key_added(key_added: str) -> None:
    """Raise if ``key_added`` is not a string, is empty or blank, or holds ``/``.

    .h5ad files cannot read back a key that is empty or holds ``/``; a blank key (only
    whitespace) is refused too, as it names nothing a user can see. Called before any
    computation, so that a bad key costs nothing.
    """
    if not isinstance(key_added, str) or "/" in key_added or not key_added.strip():
        raise ValueError(
            "key_added must be a string without '/', neither empty nor blank (.h5ad cannot read "
            f"such keys back); pass a name such as 'sct_run1', got {key_added!r}"
        )


def suffixed_key(key_added: str, suffix: object) -> str:
    """``f"{key_added}_{suffix}"`` with ``/`` (not allowed in .h5ad keys) as ``_``."""
    return f"{key_added}_{suffix}".replace("/", "_")


def refuse_backed_copy(adata: AnnData, copy: bool) -> None:
    """Raise before any computation where the results could not be written: anndata cannot copy ``adata``.

    A backed AnnData is copied only to a new file, so ``copy=True`` fails on one, and so does writing
    into a view of one (``backed[mask]``), which anndata turns into an AnnData of its own by copying it.
    """
    if not getattr(adata, "isbacked", False):
        return
    if copy:
        raise ValueError(
            "copy=True cannot copy a backed AnnData (anndata copies those only to a new file); load it "
            "first with adata = adata.to_memory(), or pass copy=False to write the results into adata"
        )
    if getattr(adata, "is_view", False):
        raise ValueError(
            "adata is a view of a backed AnnData, which the results cannot be written into (anndata "
            "would have to copy it, and copies a backed AnnData only to a new file); load the subset "
            "first, e.g. adata = backed[mask].to_memory()"
        )


def check_distinct_keys(
    key_added: str,
    suffixes: Iterable[object],
    what: str,
    where: str,
    fix: str = "run them separately, each with its own key_added",
) -> None:
    """Raise if distinct ``suffixes`` would share a :func:`suffixed_key`.

    Two values share a key when their text is the same once ``/`` becomes ``_`` (``"A/B"`` and
    ``"A_B"``), and also when they differ only in type (``1`` and ``"1"``). Equal values given
    more than once are one value.
    """
    by_key: dict[str, list[object]] = {}
    for value in dict.fromkeys(suffixes):  # distinct values, in order
        by_key.setdefault(suffixed_key(key_added, value), []).append(value)
    clashes = [
        f"{' and '.join(map(repr, values))} -> {key!r}" for key, values in by_key.items() if len(values) > 1
    ]
    if clashes:
        raise ValueError(
            f"{what} would share a {where} key (a key holds a value's text, '/' becoming '_'): "
            f"{'; '.join(clashes)}; {fix}"
        )


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
    ours, theirs = np.asarray(adata.obs_names, dtype=str), np.asarray(counts.obs_names, dtype=str)
    if not pd.Index(
        theirs
    ).is_unique:  # e.g. barcodes repeated across samples: as obs_names_make_unique() reads them
        unique = np.asarray(make_index_unique(pd.Index(theirs)), dtype=str)
        theirs = min((theirs, unique), key=lambda names: int((names != ours).sum()))
    differ = np.flatnonzero(ours != theirs)
    if differ.size:
        i = int(differ[0])
        raise ValueError(
            f"counts and adata hold other cells or another order: {differ.size} of {adata.n_obs} cell "
            f"names differ, the first at position {i} ({str(theirs[i])!r} in counts, {str(ours[i])!r} in adata); "
            "pass adata with the shards' cells in the shards' order (e.g. adata[counts.obs_names])"
        )
    return counts
