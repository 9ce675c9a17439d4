"""Rollouts: prompt templates, the multi-turn search environment, and the trajectory batch.

Import from the submodules (``stepsearch.rollout.engine``, ``.template``, ``.scripted``,
``.trajectory``); this package module stays cheap to import.
"""
