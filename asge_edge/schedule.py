"""Learning-rate schedule (pure).

Contract: ``cosine_lr`` is the paper's cosine annealing from ``lr0`` to ``lr_min``,
evaluated per optimisation step (not per epoch), so that a 3-epoch run anneals as
smoothly as a 100-epoch one. It is a function of the step alone, so resuming needs
no scheduler state.
"""

import math


def cosine_lr(step: int, total: int, lr0: float, lr_min: float) -> float:
    """lr at ``step`` (0-based) of ``total``: lr0 at 0, lr_min at total."""
    t = min(max(step, 0), total) / max(1, total)
    return lr_min + 0.5 * (lr0 - lr_min) * (1 + math.cos(math.pi * t))
