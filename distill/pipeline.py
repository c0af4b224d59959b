"""`distill run CONFIG.yaml`: [synthesize ->] generate -> curate -> train -> eval into one run directory.
With `teachers:`, each teacher has its own generate, curate and eval stage (`generate[NAME]`, ...)
around the one train stage.

`run.json` in the run directory records the resolved config, the library versions and, per
stage, the hash of what the stage was asked to do (its config, the hash of its inputs'
stage, the prompt file's bytes) and whether it completed. A completed stage with the same hash
is skipped; an interrupted one with the same hash is resumed (generate keeps its finished
shards, train its newest checkpoint); one whose hash changed starts over, which changes the
hash of every stage after it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from distill import files, versions
from distill.config import (
    LAUNCH_FIELDS,
    TRACKING_FIELDS,
    CurateConfig,
    EvalConfig,
    GenerateConfig,
    RunConfig,
    ServeConfig,
    StageConfig,
    SynthesizeConfig,
    TrainConfig,
    TrainSection,
    format_validation_error,
    load_yaml,
    provenance,
)
from distill.engine import check_model

if TYPE_CHECKING:
    from distill.train.card import StudentCard

STAGES = ("generate", "curate", "train", "eval")  # every run has these
ALL_STAGES = ("synthesize", *STAGES)  # synthesize: with a `synthesize` section only
STATE = "run.json"
DOMAINS = "domains.json"  # with `teachers`, under eval/: each teacher's eval headline


def load_config(path: Path, overrides: list[str] = ()) -> RunConfig:
    """The YAML file plus `section.key=value` overrides (values parsed as YAML); every problem
    is reported at once, each with its YAML path."""
    data = load_yaml(path) or {}
    if not isinstance(data, dict):
        raise ValueError(f"`{path}`: expected a YAML mapping with sections {', '.join(RunConfig.model_fields)}")
    return config_from_data(apply_overrides(data, overrides), path)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """A copy of the config data with each `section.key=value` set."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"override {item!r}: expected KEY=VALUE, e.g. train.max_steps=10")
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({getattr(e, 'problem', e)})") from None
    return data


def config_from_data(data: dict, path: Path) -> RunConfig:
    """The run config of YAML data read from `path` (`distill sweep` takes its `sweep` section out first)."""
    try:
        cfg = RunConfig(**data)
        stage_configs(cfg)  # the stages' own cross-field checks, before anything runs
    except ValidationError as e:
        raise ValueError(f"invalid run config `{path}`:\n" + format_validation_error(e, "  ")) from None
    return cfg


def given(section: StageConfig, exclude: set[str] = frozenset()) -> dict[str, Any]:
    """The fields the YAML set: the rest keep the stage model's own defaults."""
    return section.model_dump(include=section.model_fields_set - exclude)


def stage_configs(run: RunConfig) -> dict[str, StageConfig]:
    """The config of every stage the run has (`synthesize` only with its section), in the order they run."""
    if run.teachers is not None:
        return teachers_stage_configs(run)
    out = Path(run.out)
    engine = run.teacher.engine_settings()
    synthesize = {}
    if run.synthesize is not None:
        fields = given(run.synthesize)
        held_out = [run.prompts.eval, *(p for p in fields.pop("held_out", []) if Path(p) != Path(run.prompts.eval))]
        synthesize["synthesize"] = SynthesizeConfig(teacher=run.teacher.model, out=out / "synthesize", **engine,
                                                    held_out=held_out, **fields)
    prompts = run.prompts.train or out / "synthesize" / "prompts.jsonl"
    formats = {"format": run.prompts.format} if run.prompts.train else {}
    return {
        **synthesize,
        "generate": GenerateConfig(teacher=run.teacher.model, prompts=prompts, out=out / "corpus", **formats, **engine,
                                   **given(run.generate)),
        "curate": CurateConfig(corpus=out / "corpus", out=out / "curated", **given(run.curate)),
        "train": TrainConfig(corpus=out / "curated", student=run.student.model, out=out / "student", resume=True,
                             **given(run.train, exclude=LAUNCH_FIELDS)),
        "eval": EvalConfig(**{**engine, **given(run.eval)}, student=str(out / "student"), teacher=run.teacher.model,
                           prompts=run.prompts.eval, format=run.prompts.format, out=out / "eval"),
    }


def teachers_stage_configs(run: RunConfig) -> dict[str, StageConfig]:
    """With `teachers`: every teacher's generate, then every curate, the one train on all curated
    corpora (a teacher's `weight` is its `mix` share), then every teacher's eval on its own prompts."""
    out = Path(run.out)
    generate, curate, evaluate = {}, {}, {}
    for t in run.teachers:
        engine = t.engine_settings()
        servers = {"backend": "endpoint", "urls": t.urls} if t.urls else {}
        generate[f"generate[{t.name}]"] = GenerateConfig(
            teacher=t.model, prompts=t.prompts.train, format=t.prompts.format, out=out / "corpus" / t.name, **engine,
            **servers, **given(run.generate))
        curate[f"curate[{t.name}]"] = CurateConfig(corpus=out / "corpus" / t.name, out=out / "curated" / t.name,
                                                   **given(run.curate))
        evaluate[f"eval[{t.name}]"] = EvalConfig(
            **{**engine, **given(run.eval)}, **servers, student=str(out / "student"), teacher=t.model,
            prompts=t.prompts.eval, format=t.prompts.format, out=out / "eval" / t.name)
    mix = [f"{t.name}={t.weight}" for t in run.teachers if t.weight is not None]
    train = TrainConfig(corpus=[out / "curated" / t.name for t in run.teachers], mix=mix, student=run.student.model,
                        out=out / "student", resume=True, **given(run.train, exclude=LAUNCH_FIELDS))
    return {**generate, **curate, "train": train, **evaluate}


def stage_kind(stage: str) -> str:
    """`generate[code]` -> `generate`: what the stage does (its runner, `--only` / `--from`)."""
    return stage.partition("[")[0]


def stage_teacher(stage: str) -> str | None:
    """`generate[code]` -> `code`; None for a stage of the whole run (`train`, or any stage with one teacher)."""
    return stage.partition("[")[2].rstrip("]") or None


# The stage kind whose output each kind reads.
READS = {"generate": "synthesize", "curate": "generate", "train": "curate", "eval": "train"}


def inputs_of(stage: str, stages: list[str]) -> list[str]:
    """The stages whose output `stage` reads: a teacher's stage reads that teacher's stage (or the
    whole run's), the train stage every curate stage."""
    kind, teacher = stage_kind(stage), stage_teacher(stage)
    return [s for s in stages if stage_kind(s) == READS.get(kind)
            and (teacher is None or stage_teacher(s) in (None, teacher))]


# Each runner calls its stage and says in one line what the stage's typed result holds.
def _run_synthesize(cfg: SynthesizeConfig) -> str:
    from distill.synthesize import synthesize

    result = synthesize(cfg)
    return f"kept {result.kept:,} of {result.written:,} written prompts ({result.kept_percent}%)"


def _run_generate(cfg: GenerateConfig) -> str:
    from distill.generate.job import generate

    stats = generate(cfg).manifest.stats
    return f"{stats.records:,} responses, {stats.response_tokens:,} tokens"


def _run_curate(cfg: CurateConfig) -> str:
    from distill.curation.pipeline import curate

    result = curate(cfg.model_copy(update={"overwrite": True}))
    return f"kept {result.kept:,} ({result.kept_percent}%), rejected {result.rejected:,}"


def _run_train(cfg: TrainConfig, launch: TrainSection | None = None) -> str:
    if launch is not None and launch.launcher == "accelerate":
        card = launch_train(cfg, launch)
    else:
        from distill.train.trainer import train

        card = train(cfg).card
    loss = f", loss {card.first_loss:.3f} -> {card.last_loss:.3f}" if card.last_loss is not None else ""
    return f"{card.steps} steps{loss}"


def launch_train(cfg: TrainConfig, launch: TrainSection) -> StudentCard:
    """`accelerate launch ... distill train --config FILE` in child processes; rank 0 writes the
    student and its card, which is the result."""
    from distill.train.card import StudentCard

    with tempfile.TemporaryDirectory(prefix="distill-train-") as tmp:
        config = Path(tmp) / "train.yaml"
        config.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
        processes = ["--num_processes", str(launch.num_processes)] if launch.num_processes else []
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch.config_file),
                   *processes, "-m", "distill.cli", "train", "--config", str(config)]
        code = subprocess.run(command, check=False).returncode
    if code != 0:
        raise RuntimeError(f"`train` under `accelerate launch --config_file {launch.config_file}` exited with "
                           f"{code} (its error is above); rerun to resume from the last checkpoint")
    return StudentCard.load(cfg.out)


def _run_eval(cfg: EvalConfig) -> str:
    from distill.evaluation.job import evaluate

    h = evaluate(cfg).headline
    text = f"quality retained {h.quality_retained:.3f} ({h.quality_measure})"
    return text + (f", {h.speedup:.2f}x tokens/s" if h.speedup is not None else "")


RUNNERS: dict[str, Callable[[Any], str]] = {"synthesize": _run_synthesize, "generate": _run_generate, "curate": _run_curate,
                                            "train": _run_train, "eval": _run_eval}
# Where each stage writes; a stage counts as complete only if this exists too.
DONE_MARKERS = {"synthesize": "prompts.jsonl", "generate": "manifest.json", "curate": "report.json", "train": "distill.json", "eval": "report.json"}


def stage_hashes(configs: dict[str, StageConfig]) -> dict[str, str]:
    """Each stage's hash: its config, its input stages' hashes (so a change reaches every stage
    downstream of it, and only those) and its prompt file's bytes."""
    hashes: dict[str, str] = {}
    for name, cfg in configs.items():
        upstream = "\n".join(hashes[s] for s in inputs_of(name, list(configs)))
        inputs = [cfg.model_dump_json(exclude=TRACKING_FIELDS if isinstance(cfg, TrainConfig) else None), upstream]
        # a synthesised prompt file is not there yet: the synthesize stage's hash (upstream) stands for it
        if isinstance(cfg, (GenerateConfig, EvalConfig)) and not (name == "generate" and "synthesize" in configs):
            inputs.append(hashlib.sha256(Path(cfg.prompts).read_bytes()).hexdigest())
        hashes[name] = hashlib.sha256("\n".join(inputs).encode()).hexdigest()[:16]
    return hashes


def run(cfg: RunConfig, only: str | None = None, start_from: str | None = None, log=print,
        until: str | None = None) -> dict[str, dict]:
    """Run the stages (`until`: stop after that one, e.g. `curate` for a sweep's corpus); returns
    the per-stage state (`status`: ran / resumed / skipped)."""
    for name, value in (("--only", only), ("--from", start_from), ("until", until)):
        if value is not None and value not in ALL_STAGES:
            raise ValueError(f"{name} {value!r}: expected one of {', '.join(ALL_STAGES)}")
    # Everything a user can get wrong fails here, before the run directory or run.json is written.
    if cfg.teachers is not None:
        for i, t in enumerate(cfg.teachers):
            for split in ("train", "eval"):
                files.require_file(getattr(t.prompts, split), f"prompt file `teachers.{i}.prompts.{split}`")
        for i, t in enumerate(cfg.teachers):
            check_model(t.model, f"teachers.{i}.model")
    else:
        for p in (cfg.prompts.train, cfg.prompts.eval):
            if p is not None:
                files.require_file(p, "prompt file")
        check_model(cfg.teacher.model, "teacher.model")
    if cfg.synthesize is not None and cfg.synthesize.seeds is not None:
        files.require_file(cfg.synthesize.seeds, "seed prompt file")
    check_model(cfg.student.model, "student.model")
    with files.exclusive(cfg.out):
        return _run(cfg, only, start_from, log, until)


def _run(cfg: RunConfig, only: str | None, start_from: str | None, log, until: str | None = None) -> dict[str, dict]:
    out = Path(cfg.out)
    configs = stage_configs(cfg)
    hashes = stage_hashes(configs)
    stages = list(configs)
    kinds = [stage_kind(s) for s in stages]
    for name, value in (("--only", only), ("--from", start_from)):
        if value is not None and value not in kinds:
            raise ValueError(f"{name} {value!r}: this run has no `{value}` section")
    state_path = out / STATE
    previous = json.loads(state_path.read_text())["stages"] if state_path.exists() else {}
    state = {"config": provenance(cfg), "versions": versions(), "stages": dict(previous)}
    # `--only eval` / `--from curate` name a kind of stage: with `teachers`, every teacher's stage of that kind
    selected = [s for s in stages if stage_kind(s) == only] if only else \
        stages[kinds.index(start_from):] if start_from else stages
    if until:
        last = max((i for i, k in enumerate(kinds) if k == until), default=-1)
        selected = [s for s in selected if stages.index(s) <= last]
    forced = set(selected) if only or start_from else set()

    def save() -> None:
        files.write_json(state_path, state)

    for name in stages:
        if name not in selected:
            continue
        stage_cfg, before = configs[name], previous.get(name, {})
        stage_out = Path(stage_cfg.out)
        for upstream in stages[:stages.index(name)]:
            if state["stages"].get(upstream, {}).get("hash") != hashes[upstream] or \
                    state["stages"][upstream].get("status") == "running":
                raise ValueError(f"stage `{name}` needs `{upstream}` to be complete and current: run without --only / --from")
        same = before.get("hash") == hashes[name]
        if same and before.get("status") != "running" and (stage_out / DONE_MARKERS[stage_kind(name)]).exists() \
                and name not in forced:
            state["stages"][name] = {**before, "status": "skipped"}
            log(f"[{name}] unchanged and complete: skipped")
            continue
        resuming = same and before.get("status") == "running"
        if not resuming:
            shutil.rmtree(stage_out, ignore_errors=True)
        log(f"[{name}] {'resuming' if resuming else 'running'} -> {stage_out}")
        state["stages"][name] = {"hash": hashes[name], "status": "running", "config": provenance(stage_cfg)}
        save()
        start = time.time()
        result = RUNNERS[name](stage_cfg, cfg.train) if name == "train" else RUNNERS[stage_kind(name)](stage_cfg)
        state["stages"][name].update(status="resumed" if resuming else "ran", result=result,
                                     wall_seconds=round(time.time() - start, 1))
        save()
    save()
    log(summary({name: state["stages"][name] for name in stages if name in state["stages"]}))
    evals = [s for s in stages if stage_kind(s) == "eval"]
    if cfg.teachers is not None and all(state["stages"].get(s, {}).get("hash") == hashes[s]
                                        and state["stages"][s]["status"] != "running"
                                        and (Path(configs[s].out) / DONE_MARKERS["eval"]).exists() for s in evals):
        log(domains_summary(cfg))
    return state["stages"]


def summary(stages: dict[str, dict]) -> str:
    return _table(("stage", "status", "time", "result"),
                  [(name, s["status"], f"{s.get('wall_seconds', 0):.0f} s", s.get("result", "")) for name, s in stages.items()])


def domains_summary(cfg: RunConfig) -> str:
    """The student against each teacher on that teacher's own eval prompts: the headline of every
    teacher's eval report, written to `eval/domains.json` and returned as a table."""
    from distill.evaluation.report import EvalReport

    domains = {}
    for t in cfg.teachers:
        report = EvalReport.load(Path(cfg.out) / "eval" / t.name)
        metrics = report.headline_metrics()  # a student of another tokenizer has no per-token KL (None)
        domains[t.name] = {"teacher": t.model, "prompts": report.prompts.file, "kl": metrics["eval_report/kl"],
                           "top1_agreement": metrics["eval_report/top1_agreement"],
                           "quality_retained": report.headline.quality_retained,
                           "quality_measure": report.headline.quality_measure}
    files.write_json(Path(cfg.out) / "eval" / DOMAINS, domains)
    return _table(("teacher", "prompts", "kl", "top-1", "quality retained"),
                  [(name, f"{Path(d['prompts']).name}", "n/a" if d["kl"] is None else f"{d['kl']:.3f}",
                    f"{d['top1_agreement']:.3f}",
                    f"{d['quality_retained']:.3f} ({d['quality_measure']})") for name, d in domains.items()])


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(header), *(line(r) for r in rows)])


def serving_config(cfg: RunConfig, ui: bool = False) -> ServeConfig:
    """What `distill run --serve` serves: the run's student; with `serve.lora` (other students
    trained on the same base), the base model with the run's student as one more adapter,
    named after the run directory, so one server answers for all of them."""
    fields = {**given(cfg.serve), **({"ui": True} if ui else {})}
    student = Path(cfg.out) / "student"
    if not cfg.serve.lora:
        return ServeConfig(model=str(student), **fields)
    return ServeConfig(**{**fields, "model": cfg.student.model, "lora": [f"{Path(cfg.out).name}={student}", *cfg.serve.lora]})


def main(config: Path, set: list[str] | None = None, only: str | None = None, start_from: str | None = None,
         serve: bool = False, ui: bool = False) -> int:
    cfg = load_config(config, set or [])
    serve_cfg = None
    if serve or ui:  # checked before the run, not after hours of training
        try:
            serve_cfg = serving_config(cfg, ui)
        except ValidationError as e:
            raise ValueError(f"invalid run config `{config}`:\n" + format_validation_error(e, "  serve: ")) from None
        if serve_cfg.lora:
            from distill.adapters import load_adapters

            load_adapters(serve_cfg.lora[1:], serve_cfg.model)  # the other students: the run's own is not trained yet
    run(cfg, only=only, start_from=start_from)
    if serve_cfg is not None:
        from distill.serve.server import serve as serve_model

        return serve_model(serve_cfg)
    return 0
