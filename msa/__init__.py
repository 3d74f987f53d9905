"""msa: Multi-Scale Alignment for remote-sensing image-text retrieval."""

from msa import ops
from msa.ops import mscmat_scores

__version__ = "0.1.0"

__all__ = ["mscmat_scores", "ops"]
