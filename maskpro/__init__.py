"""maskpro: learn strict N:M sparsity masks for causal LMs (MaskPro), export and serve them.

The public API in one place; the CLI (``maskpro``) is a thin layer over it.
"""

__version__ = "0.1.0"

from .artifacts import load_masks, read_metadata, save_pruned  # noqa: E402
from .errors import MaskproError  # noqa: E402
from .learner import LearnerConfig, MaskProLearner  # noqa: E402
from .models import find_linears, load_model  # noqa: E402
from .nm import NM  # noqa: E402
from .pipeline import CalibConfig, PruneJob, run_prune  # noqa: E402

__all__ = ["NM", "CalibConfig", "LearnerConfig", "MaskProLearner", "MaskproError", "PruneJob", "find_linears",
           "load_masks", "load_model", "read_metadata", "run_prune", "save_pruned"]
