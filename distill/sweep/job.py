"""`sweep()`: the corpus and the held-out teacher answers once, then workers run trials on one
study until `trials` have finished, then the report, `best.yaml` and the best student."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from distill import corpus, files
from distill.config import EvalConfig, GenerateConfig, TrainConfig
from distill.sweep.study import (
    HELD_OUT,
    WORKER_ATTR,
    SweepPlan,
    counted,
    fail_dead_trials,
    load_plan,
    open_storage,
    open_study,
    storage_url,
    worker_identity,
)
from distill.sweep.trial import HeldOut, format_params, run_trial

# Trials that fail one after another (not pruned: an error) before a worker gives up: failed
# trials do not count against the budget, so a broken setting would otherwise never stop.
MAX_FAILURES_IN_A_ROW = 3


@dataclass(frozen=True)
class Inputs:
    """What every trial starts from: the run's train and eval configs and the held-out answers."""

    train: TrainConfig
    eval: EvalConfig
    held_out: HeldOut


def prepare(plan: SweepPlan, out: Path) -> Inputs:
    """The training corpus (generated and curated as `distill run` does, in `out/run`, unless
    `sweep.corpus`) and the teacher's answers to the held-out prompts (unless `sweep.held_out`),
    each made once: a rerun finds them done."""
    from distill import pipeline

    configs = pipeline.stage_configs(plan.run)
    train_cfg, eval_cfg, sweep = configs["train"], configs["eval"], plan.sweep
    for given in (sweep.corpus, sweep.held_out):
        if given:
            corpus.read_manifest(given)  # not a corpus, or a broken manifest: one line, before anything runs
    if sweep.corpus:
        train_cfg = train_cfg.model_copy(update={"corpus": [sweep.corpus]})
    else:
        pipeline.run(plan.run, until="curate", log=lambda text: print(
            "\n".join(f"[sweep] {line}" for line in text.splitlines()), file=sys.stderr, flush=True))
    prompts = sweep.prompts or plan.run.prompts.eval
    held_out = sweep.held_out or held_out_answers(eval_cfg, prompts, Path(out) / HELD_OUT)
    ids = frozenset(corpus.read_table(held_out, columns=["prompt_id"]).column("prompt_id").to_pylist())
    for path in train_cfg.corpora:
        trained_on = set(corpus.read_table(path, columns=["prompt_id"]).column("prompt_id").to_pylist())
        if ids & trained_on:
            raise ValueError(f"{len(ids & trained_on)} of the {len(ids)} held-out prompts (`{prompts}`) are in the "
                             f"training corpus `{path}` (e.g. prompt_id {sorted(ids & trained_on)[0]!r}): judge trials "
                             "on held-out prompts")
    return Inputs(train_cfg, eval_cfg.model_copy(update={"prompts": prompts}), HeldOut(Path(held_out), Path(prompts), ids))


def held_out_answers(eval_cfg: EvalConfig, prompts: Path, out: Path) -> Path:
    """The teacher's answers to `prompts` with its top-k, sampled as `distill eval` samples them."""
    from distill.generate.job import generate

    manifest = out / corpus.MANIFEST
    if manifest.exists() and corpus.read_manifest(out).stats.complete:
        return out
    return generate(GenerateConfig(
        teacher=eval_cfg.teacher, prompts=prompts, out=out, format=eval_cfg.format, top_k=eval_cfg.top_k,
        max_tokens=eval_cfg.max_tokens, temperature=eval_cfg.temperature, seed=eval_cfg.seed,
        **eval_cfg.engine_settings(), **eval_cfg.backend_settings())).path


def progress(study, trial) -> None:
    """One line per finished trial: its value and the best so far (stderr, as all progress). The
    one place that sees every finished trial."""
    from optuna.trial import TrialState

    name = study.user_attrs.get("objective", "value")
    where = f"trial {trial.number}"
    if trial.state == TrialState.COMPLETE:
        what = f"{where} complete: {name} {trial.value:.4g}"
    elif trial.state == TrialState.PRUNED:
        step = trial.last_step
        what = f"{where} pruned at step {step}: {name} {trial.intermediate_values[step]:.4g}" if step is not None \
            else f"{where} pruned"
    else:
        what = f"{where} failed ({trial.user_attrs.get('failure') or trial.system_attrs.get('fail_reason', 'error')})"
    try:
        best = study.best_trial
        what += f" | best {name} {best.value:.4g} (trial {best.number})"
    except ValueError:  # no completed trial yet
        pass
    print(f"[sweep] {what} | {format_params(trial.params)}", file=sys.stderr, flush=True)


def work(plan: SweepPlan, out: Path, url: str, inputs: Inputs, budget: int, deadline: float | None,
         worker: int = 0, threads: int | None = None, ready=None, ask_lock=None) -> None:
    """One worker: ask the study for trials and run them until `budget` trials count (all
    workers together) or the deadline passes. With sibling worker processes: `ready`, a barrier
    they all wait at, so that none takes the first trials while the others still start, and
    `ask_lock`, held while asking for a trial (SQLite cannot lock rows: two workers could otherwise
    both claim the same queued `start_with` trial)."""
    import optuna

    if threads:
        import torch

        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(url)
    study = open_study(plan, storage, seed=plan.sweep.seed + 1000 * worker + len(study_trials(storage, plan)))
    study_id = storage.get_study_id_from_name(study.study_name)
    failures = 0
    if ready is not None:
        ready.wait()
    while counted(study) < budget and (deadline is None or time.time() < deadline):
        optuna.storages.fail_stale_trials(study)  # trials of workers elsewhere that stopped beating (shared databases)
        with ask_lock or contextlib.nullcontext():
            trial = study.ask()
        trial.set_user_attr(WORKER_ATTR, worker_identity())
        with heartbeat(storage, storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)):
            finished = run_and_tell(study, trial, plan, inputs, out)
        progress(study, finished)
        failures = failures + 1 if finished.state == optuna.trial.TrialState.FAIL else 0
        if failures >= MAX_FAILURES_IN_A_ROW:
            raise RuntimeError(f"{failures} trials in a row failed (their errors are above): check the search space")


def run_and_tell(study, trial, plan: SweepPlan, inputs: Inputs, out: Path):
    """Run the trial and record how it ended; returns it as the study now holds it."""
    import optuna
    from optuna.trial import TrialState

    try:
        value = run_trial(trial, inputs.train, inputs.eval, inputs.held_out, plan.sweep, out).value
    except optuna.TrialPruned:
        return study.tell(trial, state=TrialState.PRUNED)
    except FloatingPointError as e:  # the trial's settings diverged (train refuses a non-finite loss): a failed trial
        trial.set_user_attr("failure", str(e))
        return study.tell(trial, state=TrialState.FAIL)
    except BaseException as e:  # anything else (Ctrl-C included) fails the trial and stops the sweep
        trial.set_user_attr("failure", f"{type(e).__name__}: {e}")
        study.tell(trial, state=TrialState.FAIL)
        raise
    return study.tell(trial, value)


@contextlib.contextmanager
def heartbeat(storage, trial_id: int) -> Iterator[None]:
    """While a trial runs, record its heartbeat (storages with one: those shared by machines), so
    that a worker elsewhere fails it if this one dies."""
    if storage.get_heartbeat_interval() is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            storage.record_heartbeat(trial_id)
            stop.wait(storage.get_heartbeat_interval())

    thread = threading.Thread(target=beat, name="distill-sweep-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def study_trials(storage, plan: SweepPlan) -> list:
    try:
        study_id = storage.get_study_id_from_name(plan.sweep.study)
    except KeyError:
        return []
    return storage.get_all_trials(study_id, deepcopy=False)


def _worker_process(parent: int, config: Path, overrides: list[str], out: Path, *args) -> None:
    """A spawned worker: it reads the config again (the run config's section classes are made at
    import time, and do not pickle)."""
    from distill.lifetime import watch_parent

    watch_parent(parent)  # a worker ends with its sweep, kill -9 included
    work(load_plan(config, out, overrides), out, *args)


def sweep(config: Path, out: Path, trials: int | None = None, parallel: int = 1, storage: str | None = None,
          overrides: list[str] = ()) -> Path:
    """Run the sweep of `config` into `out`; returns `out` (report.md, best.yaml, best-student)."""
    import optuna

    from distill.sweep.report import write_outputs

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own line per trial
    plan = load_plan(config, out, overrides)
    if parallel < 1:
        raise ValueError(f"--parallel {parallel}: expected at least 1 worker process")
    budget = trials or plan.sweep.trials
    with files.exclusive(out):
        url = storage_url(out, storage)
        inputs = prepare(plan, out)
        start = time.time()
        deadline = start + plan.sweep.timeout_minutes * 60 if plan.sweep.timeout_minutes else None
        storage_obj = open_storage(url)
        study = open_study(plan, storage_obj)
        study.set_user_attr("objective", plan.sweep.objective)
        dead = fail_dead_trials(study, storage_obj)
        if dead:
            print(f"[sweep] trials {', '.join(map(str, dead))}: their worker died; marked failed (not counted)",
                  file=sys.stderr, flush=True)
        done = counted(study)
        print(f"[sweep] {done} of {budget} trials counted; {parallel} worker(s); study {url}", file=sys.stderr, flush=True)
        if parallel == 1:
            work(plan, out, url, inputs, budget, deadline)
        else:
            threads = max(1, (os.cpu_count() or 1) // parallel)
            context = get_context("spawn")
            ready, ask_lock = context.Barrier(parallel), context.Lock()
            workers = [context.Process(target=_worker_process, args=(os.getpid(), config, list(overrides), out, url, inputs,
                                                                       budget, deadline, i, threads, ready, ask_lock))
                       for i in range(parallel)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            failed = [w.exitcode for w in workers if w.exitcode]
            if failed:
                raise RuntimeError(f"{len(failed)} of {parallel} sweep workers failed (exit {failed[0]}; their error is above)")
        write_outputs(plan, out, open_study(plan, storage_obj), inputs, time.time() - start)
    return out


def main(config: Path, out: Path, trials: int | None = None, parallel: int = 1, storage: str | None = None,
         set: list[str] | None = None) -> int:
    sweep(config, out, trials, parallel, storage, set or [])
    print(out)
    return 0
