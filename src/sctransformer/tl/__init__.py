"""Tools that take ``(adata, model)`` and write results into the AnnData under ``key_added``."""

from ._embed import embed
from ._predict import predict

__all__ = ["embed", "predict"]
