"""Loss functions: small pure functions in a registry, one per loss name.

See base.py for the batch layout every loss sees, and policy.py / preference.py /
supervised.py for the formulas. `LossRegistry.load(modules)` is one server's set.
"""

from tinsmith.engine.losses.base import LossBatch, LossFn, LossSpec, masked_mean
from tinsmith.engine.losses.registry import BUILTIN, LossRegistry

__all__ = ["BUILTIN", "LossBatch", "LossFn", "LossRegistry", "LossSpec", "masked_mean"]
