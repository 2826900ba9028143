"""Sphinx configuration of the sctransformer documentation (Sphinx + myst-nb)."""

from __future__ import annotations

import os
import socket
from datetime import date
from importlib.metadata import version as _version

project = "sctransformer"
author = "sctransformer developers"
copyright = f"{date.today().year}, {author}"
release = _version("sctransformer")
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx_autodoc_typehints",
    "sphinx.ext.intersphinx",
]

# sources: Markdown (MyST) pages and notebooks committed with their outputs
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

# notebooks are executed before they are committed; the docs build never runs them
nb_execution_mode = "off"
nb_merge_streams = True
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3

# API pages
autosummary_generate = True
autodoc_member_order = "groupwise"
autodoc_default_options = {"members": True, "inherited-members": False, "show-inheritance": False}
# sphinx_autodoc_typehints puts the signature's types into the parameter list
autodoc_typehints = "description"
typehints_defaults = "braces"
always_document_param_types = False
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_use_param = True
napoleon_use_ivar = True  # "Attributes" sections as field lists (also right for the settings instance)

# Only members defined and documented in sctransformer: the classes derive from scvi-tools'
# BaseModelClass, torch's Module and Lightning's LightningModule, whose many members are documented
# there. The class template lists a class's own members; members without a docstring of their own
# (Lightning hooks such as ``training_step``) are left out of both the tables and the pages.
autodoc_inherit_docstrings = False


def _skip_undocumented(app, what, name, obj, skip, options):
    if skip:
        return None
    if name == "training" and what == "attribute":  # torch.nn.Module's train/eval flag, seen as an annotation
        return True
    target = obj.fget if isinstance(obj, property) else obj
    if callable(target) and not (getattr(target, "__doc__", None) or "").strip():
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_undocumented)


# Cross-links to the projects the API talks about. Sphinx reports an unreachable inventory as a
# warning that cannot be suppressed, which would fail an offline ``sphinx-build -W``; so the
# inventories are only used when the network answers (set SCT_DOCS_OFFLINE=1 to skip them). Without
# them the links to other projects are rendered as plain text.
_INTERSPHINX = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable", None),
    "pandas": ("https://pandas.pydata.org/docs", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable", None),
    "scvi": ("https://docs.scvi-tools.org/en/stable", None),
    "torch": ("https://docs.pytorch.org/docs/stable", None),
    "lightning": ("https://lightning.ai/docs/pytorch/stable", None),
}


def _online(host: str = "docs.python.org", timeout: float = 3.0) -> bool:
    if os.environ.get("SCT_DOCS_OFFLINE"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


intersphinx_mapping = _INTERSPHINX if _online() else {}
intersphinx_timeout = 10

html_theme = "sphinx_book_theme"
html_title = "sctransformer"
html_theme_options = {"navigation_with_keys": False}
