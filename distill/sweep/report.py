"""What a sweep leaves in its directory: `report.md` / `report.html` (the trials, the optimisation
history, parameter importances, parallel coordinates, the held-out curves), `best.yaml` (the
best trial as a ready `distill run` config) and `best-student` (a link to its student)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import yaml

from distill import files
from distill.html import write_html_report
from distill.sweep.study import SweepPlan
from distill.sweep.trial import format_params, trial_dir

BEST_CONFIG = "best.yaml"
BEST_STUDENT = "best-student"
BEST_RUN = "best-run"  # where `distill run best.yaml` writes
PLOTS = {
    "history.png": ("plot_optimization_history", "Optimisation history"),
    "importances.png": ("plot_param_importances", "Parameter importances (fANOVA)"),
    "parallel.png": ("plot_parallel_coordinate", "Parallel coordinates"),
    "intermediate.png": ("plot_intermediate_values", "Held-out value during training (pruned trials stop early)"),
}


def best_config(plan: SweepPlan, params: dict[str, Any], out: Path) -> dict[str, Any]:
    """The sweep's run config with the trial's values in its train section: `distill run` of it
    trains exactly the trial's config (on a corpus it generates and curates the same way)."""
    data = {**plan.data, "out": str(Path(out) / BEST_RUN)}
    data["train"] = {**(plan.data.get("train") or {}), **params}
    return data


def write_best(plan: SweepPlan, out: Path, trial) -> None:
    header = (f"# The best trial ({trial.number}) of `distill sweep {plan.source}`: {format_params(trial.params)}\n"
              f"# Reproduce it with: distill run {Path(out) / BEST_CONFIG}\n")
    files.atomic_write(Path(out) / BEST_CONFIG, header + yaml.safe_dump(best_config(plan, trial.params, out),
                                                                         sort_keys=False))
    link = Path(out) / BEST_STUDENT
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(os.path.relpath(trial_dir(out, trial.number), out), link)


def trial_rows(study, measure: str) -> list[str]:
    """The trials best first (completed by value, then pruned, then failed), as table rows."""
    from optuna.trial import TrialState

    order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1}
    sign = -1 if study.direction.name == "MAXIMIZE" else 1
    trials = sorted(study.trials, key=lambda t: (order.get(t.state, 2), sign * t.value if t.value is not None else 0,
                                                 t.number))
    names = sorted({name for t in study.trials for name in t.params})
    others = [m for m in ("kl", "top1_agreement") if m != measure]
    header = ["trial", "state", measure, *others, *names, "steps", "minutes"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in trials:
        measures = t.user_attrs.get("measures", {})
        steps = t.user_attrs.get("steps", t.last_step if t.state == TrialState.PRUNED else None)
        minutes = (t.datetime_complete - t.datetime_start).total_seconds() / 60 \
            if t.datetime_complete and t.datetime_start else None
        cells = [t.number, t.state.name.lower(), _num(t.value), *(_num(measures.get(m)) for m in others),
                 *(_num(t.params.get(n)) for n in names), steps if steps is not None else "", _num(minutes, 2)]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return rows


def _num(value, digits: int = 4) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def write_plots(study, out: Path) -> dict[str, str]:
    """Optuna's matplotlib plots as PNGs; a plot the study cannot make yet (too few trials) is
    left out with the reason."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as plots

    made = {}
    for name, (function, title) in PLOTS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                ax = getattr(plots, function)(study)
            figure = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            figure.set_size_inches(9, 5)
            figure.tight_layout()
            figure.savefig(Path(out) / name, dpi=110)
            made[name] = title
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            made[name] = f"{title}: not drawn ({e})"
        finally:
            plt.close("all")
    return made


def importances(study) -> dict[str, float] | str:
    import optuna

    try:
        return optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError) as e:
        return f"not computed ({e})"


def write_outputs(plan: SweepPlan, out: Path, study, inputs, wall_seconds: float) -> None:
    from optuna.trial import TrialState

    sweep, out = plan.sweep, Path(out)
    states = [t.state for t in study.trials]
    complete = states.count(TrialState.COMPLETE)
    best = study.best_trial if complete else None
    if best is not None:
        write_best(plan, out, best)
    direction = "maximised" if sweep.maximise else "minimised"
    lines = [f"# distill sweep: {plan.source}", "",
             f"Objective: **{sweep.objective}** ({direction}) on the teacher's answers to `{inputs.held_out.prompts}` "
             f"({len(inputs.held_out.prompt_ids)} prompts). Trials: {complete} completed, "
             f"{states.count(TrialState.PRUNED)} pruned, {states.count(TrialState.FAIL)} failed "
             f"(pruner: {sweep.pruner}, a held-out report every {sweep.report_every} steps). "
             f"This run's wall time: {wall_seconds / 60:.1f} min.", ""]
    if best is not None:
        lines += [f"**Best: trial {best.number}**, {sweep.objective} {best.value:.4g}: {format_params(best.params)}. "
                  f"Its config: `{BEST_CONFIG}` (`distill run {out / BEST_CONFIG}`); its student: `{BEST_STUDENT}/`.", ""]
    lines += ["## Trials", "", *trial_rows(study, sweep.objective), ""]
    weights = importances(study) if complete >= 2 else "not computed (fewer than 2 completed trials)"
    lines += ["## Parameter importances", ""]
    if isinstance(weights, dict):
        lines += ["| parameter | importance |", "|---|---|", *(f"| {k} | {v:.3f} |" for k, v in weights.items()), ""]
    else:
        lines += [weights, ""]
    for name, title in write_plots(study, out).items():
        lines += [f"## {title}", "", f"![{title}]({name})" if (out / name).exists() and ":" not in title else "", ""]
    files.atomic_write(out / "report.md", "\n".join(lines))
    write_html_report(out, title=f"distill sweep: {plan.source}")
