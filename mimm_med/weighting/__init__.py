"""Weighting of MIMM-X loss terms: confounder attention over MI terms, dynamic loss scaling."""

from mimm_med.weighting.confounder_attention import ConfounderAttention
from mimm_med.weighting.loss_scaling import GradNorm, adaptive_mi_scale

__all__ = ["ConfounderAttention", "GradNorm", "adaptive_mi_scale"]
