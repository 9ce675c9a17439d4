"""Records of a run: run directories, resume and signals (``runs``), opening and recording a run
(``session``), the one-writer lock (``lock``), verified and atomic checkpoints (``checkpoints``),
checks of the tracking store and output paths (``store``), resuming into the recorded MLflow run
(``mlflow_resume``) and MLflow tracking (``tracking``). Exact continuation state is in
``stepsearch.data.continuation``.

Layer: below training and the commands, above the foundations; it never imports training code.
"""
