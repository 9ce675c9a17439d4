"""Curves of the SmolLM2 experiment (experiments/smollm2_steppo_vs_ppo.sh) from its MLflow store:
validation EM, format-valid rate and searches per question (validation points, and the sampled
training batches per PPO iteration), one colour per algorithm. `compare` draws EM and rewards only;
this adds the two behaviour curves the question "does it learn to search?" needs.

    python experiments/smollm2_curves.py sqlite:///runs/smollm2_exp/mlflow.db docs/images/smollm2_curves.png
"""

from __future__ import annotations

import sys

PANELS = (("em", "EM (val: greedy; train: sampled)"), ("format_ok", "format-valid rate"),
          ("searches", "searches per question"))
COLOURS = {"steppo": "tab:blue", "ppo": "tab:orange"}


def main(uri: str, out: str, experiment: str = "smollm2-musique") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"{uri}: no experiment {experiment!r}")
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for run in client.search_runs([found.experiment_id]):
        algorithm = run.data.params.get("model.ppo.algorithm", run.info.run_name)
        colour = COLOURS.get(algorithm, "tab:gray")
        for ax, (key, title) in zip(axes, PANELS):
            for split, style in (("val", "-o"), ("train", ":")):
                name = f"{split}/{key}" if not (split == "train" and key == "em") else "train/answer_em"
                history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
                if history:
                    steps, values = zip(*history)
                    ax.plot(steps, values, style, color=colour, label=f"{algorithm} {split}", markersize=4)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("PPO iteration")
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct, MuSiQue + 2Wiki training questions, HotpotQA validation", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
