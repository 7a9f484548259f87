"""Which process of a distributed run does the tracking."""

from __future__ import annotations

import torch.distributed as dist


def is_rank_zero() -> bool:
    """Whether this process logs: always without ``torch.distributed``, else only rank 0."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
