"""The effective parameter count ``N_eff(ε) = 2λ(ε)`` by SGLD on the behavioural loss (docs/llc.md).

    from tl_degeneracy.llc import estimate_neff, ParamSubset
    result = estimate_neff(model, tokens, eps=[1e-4, 1e-3, 1e-2], params=ParamSubset("blocks.1.attn.W_*", head=0))
    result.summary(); result.to_dict()
"""
from .config import Integrator, LLCConfig, ParamSubset, Preconditioning
from .estimate import ChainEstimate, NeffResult, ScaleEstimate, estimate_neff, quadratic_neff
from .pilot import StepSizeChoice
from .preconditioner import Factor, preconditioner
from .sampler import Chain, ChainCallback, ChainStatus, DivergenceGuard, ProgressBar, run_chain
from .targets import FunctionTarget, ParamSlot, Target, TransformerTarget, parameter_map, resolve_subset

__all__ = [
    "Integrator", "LLCConfig", "ParamSubset", "Preconditioning", "ChainEstimate", "NeffResult", "ScaleEstimate",
    "estimate_neff", "quadratic_neff", "StepSizeChoice", "Factor", "preconditioner", "Chain", "ChainCallback",
    "ChainStatus", "DivergenceGuard", "ProgressBar", "run_chain", "FunctionTarget", "ParamSlot", "Target",
    "TransformerTarget", "parameter_map", "resolve_subset",
]
