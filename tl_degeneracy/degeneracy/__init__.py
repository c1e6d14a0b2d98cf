"""The degeneracy account: free directions and effective parameters per weight matrix (docs/theory.md §3–§4).

- ``weights``: which weight matrices are counted and the hooks each reads (``G``) and writes (``K``).
- ``kfac``: the one K-FAC count ``#{g_i·k_j > c}`` (the account, the SGLD comparison and ``llc --kfac``).
- ``account``: ``degeneracy_report`` — ranks of ``G`` and ``K``, free directions, the K-FAC count at a
  loss scale, and the synchronised heads' and neurons' freedoms, per matrix, layer and model.
"""
from .account import DegeneracyReport, LayerTotals, MatrixAccount, Totals, degeneracy_report
from .kfac import KfacSpectra, MatrixSpectra, covering, kfac_count, logit_hessian
from .weights import (
    WeightMatrix,
    degeneracy_hooks,
    input_gram,
    input_hooks,
    norm_affine,
    output_hooks,
    weight_matrices,
)

__all__ = [
    "DegeneracyReport", "LayerTotals", "MatrixAccount", "Totals", "degeneracy_report", "KfacSpectra",
    "MatrixSpectra", "covering", "kfac_count", "logit_hessian", "WeightMatrix", "degeneracy_hooks",
    "input_gram", "input_hooks", "norm_affine", "output_hooks", "weight_matrices",
]
