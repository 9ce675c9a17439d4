"""The registered algorithms (``stepsearch.ppo.registry``): importing this package registers them.

One import line per algorithm file; a new algorithm is a new file here (docs/training.md "Algorithms").
"""

from stepsearch.ppo.algorithms import builtin, reinforce_plus_plus  # noqa: F401  (registration)
from stepsearch.ppo.registry import ALGORITHMS, resolve_algorithm

__all__ = ["ALGORITHMS", "resolve_algorithm"]
