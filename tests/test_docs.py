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
