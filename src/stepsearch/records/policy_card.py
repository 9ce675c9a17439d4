"""The policy card: ``stepsearch_policy.json`` beside an exported policy (its template, rollout limits
and MLflow run), written by ``records.tracking.log_policy_dir`` and read by ``evaluate``/``ask``.
A module of its own, importing nothing, so the commands can name the file without loading MLflow or
Lightning (a tool command's one-line error comes back in well under a second)."""

POLICY_CARD = "stepsearch_policy.json"
