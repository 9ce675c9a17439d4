"""Records of a run: run directories, resume and signals (``runs``), exact continuation state
(``continuation``) and MLflow tracking (``tracking``).

Layer: below training and the commands, above the foundations; it never imports training code.
"""
