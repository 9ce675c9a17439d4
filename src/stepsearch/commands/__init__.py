"""User-facing commands behind ``python -m stepsearch``: ``fit`` (LightningCLI), ``evaluate``/``ask``
(the benchmark table) and ``compare``/``ui``. The top layer: only ``stepsearch.cli`` imports it."""
