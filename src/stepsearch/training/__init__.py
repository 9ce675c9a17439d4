"""Training: one PPO iteration in pure parts (``iteration``), FSDP2/DDP sharding, the supervised
warm-start (``sft``), the quickstart bootstrap, and the Lightning module that drives them
(``module``; its validation/test/predict hooks in ``validation``).

Layer: above models, rollout and the evaluation loop; below the commands. Nothing here imports
``stepsearch.commands`` or ``stepsearch.cli``.
"""
