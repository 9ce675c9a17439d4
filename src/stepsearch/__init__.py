"""stepsearch: train LLM search agents with step-wise PPO (StePPO, arXiv 2505.15107).

Heavy dependencies (torch, transformers, pyserini) are imported lazily by the modules that need
them, so ``import stepsearch`` and ``python -m stepsearch --help`` stay fast.
"""

__version__ = "0.1.0"
