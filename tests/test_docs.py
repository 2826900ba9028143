"""The tutorials the docs render are the worked examples in ``notebooks/``, byte for byte."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_notebook_is_a_tutorial_of_the_docs_and_the_same_file():
    notebooks = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    tutorials = sorted(p.name for p in (ROOT / "docs" / "tutorials").glob("*.ipynb"))
    assert notebooks and notebooks == tutorials
    differ = [
        name
        for name in notebooks
        if (ROOT / "notebooks" / name).read_bytes() != (ROOT / "docs" / "tutorials" / name).read_bytes()
    ]
    assert not differ, f"edit notebooks/ and copy to docs/tutorials/: {differ} differ"


def test_the_api_reference_lists_every_public_name_of_the_subpackages():
    import importlib
    import inspect

    api = (ROOT / "docs" / "api.md").read_text()
    listed = {line.strip() for line in api.splitlines() if line.startswith("   ")}
    missing = [
        f"{package}.{name}"
        for package in ("data", "datasets", "metrics", "pl", "tl")
        for name in importlib.import_module(f"sctransformer.{package}").__all__
        if f"{package}.{name}" not in listed
    ]
    top = importlib.import_module("sctransformer")
    missing += [  # the package's own names, not its subpackages
        name
        for name in top.__all__
        if not name.startswith("_") and not inspect.ismodule(getattr(top, name)) and name not in listed
    ]
    assert not missing, f"add to an autosummary of docs/api.md: {missing}"
