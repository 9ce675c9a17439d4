"""Evaluation: EM/F1 as the official SQuAD/HotpotQA scripts compute them (``metrics``, also used by
the rewards) and the one rollout-and-score loop shared by validation, ``evaluate`` and ``ask``
(``loop``). Kept import-free so that ``stepsearch.rewards`` can use ``metrics`` without loading the loop.
"""
