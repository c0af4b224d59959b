"""The `distill` command: one table of subcommands, each a typed Python function and its config
model. Flags derive from the config fields (their docs are the help text) and a `--config
FILE.yaml` gives any of them; flags win. Stages are imported only when their command runs, so
`distill --help` stays instant."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import sys
import types
import typing
import warnings
from pathlib import Path

from pydantic import BaseModel, ValidationError

from distill.config import (
    RENAMED_KEYS,
    SECRET_FIELDS,
    ChatConfig,
    CurateConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    InitStudentConfig,
    ScoreConfig,
    ServeConfig,
    SynthesizeConfig,
    TeacherJobConfig,
    TrainConfig,
    format_validation_error,
)
from distill.files import DiskFull, OutputInUse
from distill.launcher import ServerError
from distill.lifetime import stop_on_signals
from distill.plugins import PluginError

# name -> (function "module:attr", config model, one-line help)
COMMANDS: dict[str, tuple[str, type[BaseModel] | None, str]] = {
    "synthesize": ("distill.synthesize:synthesize", SynthesizeConfig,
                   "The teacher writes new user prompts (Magpie or few-shot from seeds), filtered: a prompt file."),
    "generate": ("distill.generate.job:generate", GenerateConfig, "Run the teacher over prompts: responses + top-k logprobs."),
    "score": ("distill.generate.job:score", ScoreConfig, "Teacher top-k logprobs along existing responses."),
    "curate": ("distill.curation.pipeline:curate", CurateConfig, "Filter teacher outputs, keeping every rejection with its reason."),
    "init-student": ("distill.train.init_student:init_student", InitStudentConfig,
                     "A depth-pruned copy of the teacher (same tokenizer) to train as the student."),
    "train": ("distill.train.trainer:train", TrainConfig, "Train a student: SFT + token-level KL on the stored top-k."),
    "eval": ("distill.evaluation.job:evaluate", EvalConfig, "Measure a student against its teacher: fidelity, answers, cost."),
    "export": ("distill.export.job:export", ExportConfig,
               "The student as one GGUF file (f16, q8_0 or q4_0) for llama.cpp / Ollama, with an Ollama Modelfile."),
    "serve": ("distill.serve.server:serve", ServeConfig, "Serve a model behind vLLM's OpenAI-compatible endpoint."),
    "chat": ("distill.serve.chat:chat", ChatConfig, "Terminal chat with a served model."),
    "run": ("distill.pipeline:main", None, "All stages from one YAML config into one run directory, resumable."),
    "sweep": ("distill.sweep.job:main", None, "Search train settings (alpha, temperature, loss, ...) on held-out "
              "fidelity: one corpus, many students, an Optuna study."),
    "demo": ("distill.demo.run:main", None, "The offline end-to-end demo: teacher -> KD and SFT students -> report."),
    "demo-real": ("distill.demo.real:main", None,
                  "The demo on a real chat model (SmolLM2-135M-Instruct -> a pruned student), offline, ~25 minutes on 2 CPU cores."),
    "inspect": ("distill.inspect:inspect", None, "Summary of a corpus and one decoded record."),
}
# Errors a user causes: printed as one line, no traceback (`--debug` or DISTILL_DEBUG=1 shows it).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, ConnectionError, PermissionError,
               ServerError, FloatingPointError, OutputInUse, DiskFull, PluginError)
DEBUG_HELP = "Show the traceback of an error (also: DISTILL_DEBUG=1)."
# Commands that run vLLM engines in-process: their start-up noise is off unless `--verbose` (`quiet_engines`).
ENGINE_COMMANDS = ("synthesize", "generate", "score", "eval", "run", "sweep", "demo", "demo-real")
# Commands that pass everything after `--` through to the program they launch (their `vllm_args`).
PASSTHROUGH_FIELD = "vllm_args"
# Commands whose libraries print logs to stdout (Trainer's loss dicts through tqdm.write, DeepSpeed's
# logger): while they run, stdout is stderr, so that stdout carries only the result (`out`).
LOGS_ON_STDOUT = ("train",)
# Commands that leave nothing to resume: a stop signal just stops them.
NOTHING_TO_RESUME = ("serve", "chat", "inspect")
# Boolean fields with a second name for their `--no-` form (`--lora` / `--full`, docs/reference.md).
NEGATIVE_ALIASES = {"lora": "full"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_model_arguments(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One flag per field; unset flags stay absent so YAML values and field defaults apply. The
    old names of renamed teacher-job keys stay as hidden flags (`--endpoint URL`): the config
    reads them with a deprecation line."""
    for name, field in model.model_fields.items():
        parser.add_argument(_flag(name), **_argument(name, field, parser))
    if issubclass(model, TeacherJobConfig):
        for old, new in RENAMED_KEYS.items():
            if old not in model.model_fields:
                parser.add_argument(_flag(old), **{**_argument(old, model.model_fields[new]), "help": argparse.SUPPRESS})


def _argument(name: str, field, parser: argparse.ArgumentParser | None = None) -> dict:
    """`add_argument` keywords for a config field (`parser`: where a boolean's second name goes)."""
    ann = field.annotation
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        ann = next(a for a in typing.get_args(ann) if a is not type(None))
    origin = typing.get_origin(ann)
    help_text = field.description or ""
    if field.is_required():
        help_text += " (required)"
    elif field.default_factory is None and field.default is not None:
        help_text += f" [default: {field.default}]"
    # argparse %-formats help text: a literal % ("90% of ...") would break `--help`
    kwargs: dict = dict(dest=name, default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))
    if ann is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
        if name in NEGATIVE_ALIASES and parser is not None:
            parser.add_argument(_flag(NEGATIVE_ALIASES[name]), dest=name, action="store_false",
                                default=argparse.SUPPRESS, help=f"Same as --no-{name.replace('_', '-')}.")
    elif origin is list:
        kwargs.update(action="append", metavar=name.upper())
    elif origin is dict or ann is dict:
        kwargs.update(type=json.loads, metavar="JSON")
    elif origin is typing.Literal:
        kwargs.update(choices=typing.get_args(ann))
    else:
        kwargs["metavar"] = name.upper()
    return kwargs


def _inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="A corpus directory.")
    p.add_argument("--record", type=int, default=0, help="Index of the record to decode.")
    p.add_argument("--tokens", type=int, default=12, help="Response tokens to show with their top-k.")
    p.add_argument("--check", action="store_true",
                   help="Validate every record first (types, lengths, logprobs, token ids against the teacher's "
                   "vocabulary) and exit 1 on a problem.")


def _run_arguments(p: argparse.ArgumentParser) -> None:
    from distill.pipeline import ALL_STAGES

    p.add_argument("config", type=Path, help="Run config YAML (sections: teacher or teachers, prompts, student, synthesize, generate, "
                   "curate, train, eval, serve); see distill/demo/demo.yaml.")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="Override a config value, e.g. --set train.max_steps=10 (repeatable).")
    p.add_argument("--only", choices=ALL_STAGES, help="Run only this stage (its inputs must be complete); with "
                   "`teachers`, every teacher's.")
    p.add_argument("--from", dest="start_from", choices=ALL_STAGES, help="Re-run this stage (with `teachers`: every "
                   "teacher's) and every later one.")
    p.add_argument("--serve", action="store_true", help="Serve the student when the run is done (until Ctrl-C).")
    p.add_argument("--ui", action="store_true", help="Serve it with the browser chat page too (implies --serve; "
                   "`serve.ui_port`, `serve.compare` in the config).")


def _sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="A `distill run` config with a `sweep:` section (space, objective, "
                   "trials); see examples/sweep-demo.yaml.")
    p.add_argument("--out", type=Path, required=True, help="Sweep directory: study.db, the corpus, trials/, report.md, "
                   "best.yaml, best-student (a rerun continues the study).")
    p.add_argument("--trials", type=int, help="Trials to finish in all (completed + pruned) [default: sweep.trials].")
    p.add_argument("--parallel", type=int, default=1, help="Worker processes on the study [default: 1].")
    p.add_argument("--storage", metavar="URL", help="Optuna storage shared by workers on several machines, e.g. "
                   "postgresql://user@host/db [default: sqlite DIR/study.db].")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="Override a run config value, e.g. --set train.max_steps=10 (repeatable).")


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    from distill.demo import cross_tokenizer as cross

    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="Demo directory [default: runs/demo].")
    p.add_argument("--seeds", type=int, default=3, help="Students per arm (KD, SFT-only) [default: 3].")
    p.add_argument("--serve", action="store_true", help="Keep the KD student's server running at the end.")
    p.add_argument("--build-teacher", action="store_true",
                   help="Instead: retrain the shipped demo teacher from scratch (about an hour on 2 cores).")
    p.add_argument("--ground-truth", type=Path, metavar="DIR",
                   help="With --build-teacher: start the noisy-label stage from this finished ground-truth stage.")
    p.add_argument("--report-to", action="append", metavar="TRACKER",
                   help="Log every headline student (training, eval) and the summary to these trackers, e.g. "
                   "tensorboard,mlflow; files in --out (docs/recipes/tracking.md).")
    p.add_argument("--cross-tokenizer", action="store_true",
                   help="Instead: distil the demo teacher into a student of another tokenizer, per seed SFT-only vs "
                   "the span loss (446 s on 2 quiet cores once the demo's corpus exists); students and report in "
                   "OUT/cross-tokenizer/ (docs/recipes/cross-tokenizer.md).")
    p.add_argument("--steps", type=int,
                   help=f"With --cross-tokenizer: optimiser steps per student [default: {cross.DEFAULT_STEPS}].")
    p.add_argument("--arms", nargs="+", choices=list(cross.ARMS),
                   help=f"With --cross-tokenizer: the arms, `sft` among them [default: {' '.join(cross.DEFAULT_ARMS)}].")


def _demo_real_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/demo-real"), help="Demo directory [default: runs/demo-real].")
    p.add_argument("--seeds", type=int, default=2, help="Students per arm (KD, SFT-only) [default: 2].")
    p.add_argument("--serve", action="store_true", help="Serve the KD student at the end (until Ctrl-C).")


# Commands without a stage config: their own arguments.
ARGUMENTS = {"inspect": _inspect_arguments, "run": _run_arguments, "sweep": _sweep_arguments, "demo": _demo_arguments,
             "demo-real": _demo_real_arguments}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Distil a large chat model into a small one and serve it.")
    parser.add_argument("--version", action="version", version=f"distill {_version()}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, model, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=(model.__doc__ or help_text) if model else help_text)
        # also after the command; SUPPRESS keeps a `--debug` given before it
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        if model is None:
            ARGUMENTS[name](p)
        else:
            p.add_argument("--config", type=Path, help="YAML file with any of the fields below; flags override it.")
            add_model_arguments(p, model)
        if name in ENGINE_COMMANDS:
            p.add_argument("--verbose", action="store_true", help="Show vLLM's log (INFO and warnings), torch's C++ warnings and libraries' deprecation warnings.")
    return parser


def _version() -> str:
    from distill import __version__

    return __version__


def quiet_engines(verbose: bool) -> None:
    """An engine start prints ~20 lines a user cannot act on: vLLM's warnings about the settings
    distill chose (eager mode, no chunked prefill), Triton and LD_PRELOAD hints, torch's NUMA
    note, libraries' FutureWarnings. Unless `verbose`, vLLM logs errors only, torch's C++ log
    likewise, and deprecation warnings are off. These are environment variables: vLLM, torch and
    Python read them at start, here and in the engine processes and servers they spawn (which
    inherit them); values the user exported win. vLLM's log goes to stderr: stdout carries only
    the command's result."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if verbose:
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    for category in (FutureWarning, DeprecationWarning):  # this process read PYTHONWARNINGS already
        warnings.filterwarnings("ignore", category=category)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    args = vars(build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv))
    command = args.pop("command")
    debug = args.pop("debug") or os.environ.get("DISTILL_DEBUG", "") not in ("", "0")
    if command in ENGINE_COMMANDS:
        quiet_engines(args.pop("verbose"))
    stop_on_signals()  # SIGTERM, SIGHUP: the KeyboardInterrupt path below, like Ctrl-C
    if passthrough:
        model = COMMANDS.get(command, (None, None))[1]
        if model is None or PASSTHROUGH_FIELD not in model.model_fields:
            print(f"distill {command}: arguments after `--` are not accepted", file=sys.stderr)
            return 2
        args[PASSTHROUGH_FIELD] = passthrough
    target, model, _ = COMMANDS[command]
    module, attr = target.split(":")
    try:
        if model is None:
            result = getattr(importlib.import_module(module), attr)(**args)
        else:
            config_file = args.pop("config", None)
            for field in SECRET_FIELDS & args.keys():
                print(f"distill {command}: warning: `{_flag(field)}` on the command line is visible to every user "
                      "in `ps`: give it in the environment (see --help) or a --config file", file=sys.stderr)
            try:
                cfg = model.from_yaml(config_file, **args) if config_file else model(**args)
            except ValidationError as e:
                # a bad value is the user's error like any other: exit 1 (2 stays argparse's, for bad usage)
                print(format_validation_error(e, f"distill {command}: error: "), file=sys.stderr)
                return 1
            with contextlib.redirect_stdout(sys.stderr) if command in LOGS_ON_STDOUT else contextlib.nullcontext():
                result = getattr(importlib.import_module(module), attr)(cfg)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"distill {command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        print(f"distill {command}: stopped ({name})." if command in NOTHING_TO_RESUME else
              f"distill {command}: interrupted ({name}); rerun the same command to resume.", file=sys.stderr)
        return 128 + signum  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP
    if model is not None and "out" in model.model_fields:
        print(cfg.out)  # where the stage wrote its result
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
