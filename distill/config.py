"""One pydantic model per stage. Field docs are the only help text: the CLI flags and the
YAML keys both derive from these fields (see `distill.cli`)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    model_validator,
)

from distill import models
from distill.files import require_file
from distill.teacher import BACKENDS, check_backend
from distill.tracking import Tracker, parse_trackers

# A model argument: hub id, Hugging Face directory, or a GGUF file (converted once, cached; see
# `distill.models`). After validation it is always something vLLM and transformers load.
ModelPath = Annotated[str, AfterValidator(models.resolve)]

PromptFormat = Literal["auto", "messages", "sharegpt", "alpaca", "prompt"]
# The KD divergences and tail treatments of `train/losses.py`, declared here once: the config
# fields, the CLI choices and the loss functions all take them from these.
LossKind = Literal["forward_kl", "reverse_kl", "jsd"]
LossTail = Literal["bucket", "renormalize"]
# How a student layer's hidden states are compared with its teacher layer's (`train/online.py`).
HiddenLoss = Literal["mse", "cosine"]
# What the online teacher's KD term compares against (`train/losses.py: chunked_online_loss`): its
# whole-vocabulary distribution, or its top `teacher_top_k` + tail taken live (the offline loss).
OnlineTargets = Literal["full", "topk"]
# How `distill init-student` chooses the teacher layers the student keeps (`train/importance.py`).
LayerSelection = Literal["even", "importance"]
# The cross-tokenizer losses of `train/cross_losses.py` (a student with another tokenizer than the
# teacher's), declared here once; `auto` detects such a student and uses `span`, `off` refuses it.
CrossLossKind = Literal["span", "uld"]
CrossTokenizer = Literal["auto", "off", CrossLossKind]


def load_yaml(path: Path) -> Any:
    """A YAML file's data; a syntax error is one line naming `file:line:column`."""
    path = require_file(path, "config file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"`{path}`: not UTF-8 ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"`{where}`: invalid YAML ({problem})") from None


# Fields that hold a secret: left out of every record a result carries (manifests, model cards, run.json).
SECRET_FIELDS = frozenset({"api_key", "teacher_api_key"})


def provenance(config: BaseModel) -> dict[str, Any]:
    """`config` as JSON for a provenance record, without its secrets (nested sections too)."""
    def redact(data: Any) -> Any:
        if isinstance(data, dict):
            return {k: redact(v) for k, v in data.items() if k not in SECRET_FIELDS}
        return [redact(v) for v in data] if isinstance(data, list) else data

    return redact(json.loads(config.model_dump_json()))


ALLOW_INCOMPLETE = ("Accept a corpus whose generate job was interrupted (`complete: false`); "
                    "the output records that it came from one.")


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def from_yaml(cls, path: Path, **overrides: Any) -> StageConfig:
        data = load_yaml(path) or {}
        if not isinstance(data, dict):
            raise ValueError(f"`{path}`: expected a YAML mapping of {cls.__name__} fields")
        return cls(**{**data, **overrides})


class EngineConfig(StageConfig):
    """How a model runs under vLLM; the same settings feed offline `LLM` and a launched server
    (`distill.engine`)."""

    revision: str | None = Field(None, description="Model revision (hub branch, tag or commit).")
    dtype: str = Field("auto", description="Weights/activations dtype for vLLM (`auto` = float32 on CPU, the checkpoint's on GPU).")
    max_model_len: int | None = Field(None, description="Context length (prompt + response); default: the model's.")
    trust_remote_code: bool = Field(False, description="Allow the model repo to run its own Python code.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description='Extra vLLM engine arguments as JSON, e.g. \'{"tensor_parallel_size": 2}\'.')

    def engine_settings(self) -> dict[str, Any]:
        """Just the engine fields, to build another stage's config that runs a model the same way."""
        return self.model_dump(include=set(EngineConfig.model_fields))


class TeacherConfig(EngineConfig):
    teacher: ModelPath = Field(description="Teacher model: a local directory, a hub id or a .gguf file.")


# Old teacher-job keys and what they became: still read, with one line on stderr.
RENAMED_KEYS = {"endpoint": "urls", "concurrency": "requests_per_url"}
# Fields that belong to one backend: given with another backend, they are refused.
BACKEND_FIELDS = {"urls": "endpoint", "api_key": "endpoint", "requests_per_url": "endpoint",
                  "ray_address": "ray", "replicas": "ray", "gpus_per_replica": "ray"}


def accept_renamed_keys(cls, data: Any) -> Any:
    """`endpoint: [URL, ...]` -> `backend: endpoint` + `urls`; `concurrency: N` -> `requests_per_url`
    (where the model has no field of the old name: eval's `concurrency` is its latency levels)."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for old, new in RENAMED_KEYS.items():
        if old in data and old not in cls.model_fields:
            value = data.pop(old)
            hint = "`backend: endpoint` and `urls` (`--urls URL`)" if old == "endpoint" else f"`{new}`"
            print(f"distill: warning: `{old}` is deprecated; use {hint}", file=sys.stderr)
            data.setdefault(new, value)
            if old == "endpoint" and value:
                data.setdefault("backend", "endpoint")
    return data


class TeacherJobConfig(TeacherConfig):
    """The teacher and where it runs: the fields generate, score and eval share. `backend` names
    an entry of `distill.teacher.BACKENDS`."""

    backend: Annotated[str, AfterValidator(check_backend)] = Field(
        "local", description=f"Where the teacher runs, one of {', '.join(BACKENDS)}: `local` (one vLLM engine in this "
        "process), `ray` (a pool of vLLM engines in Ray actors; prompts, templating and shard writing stay here; "
        "needs `pip install distill[scale]`), `endpoint` (running vLLM OpenAI servers at `urls`).")
    urls: list[str] = Field(
        default_factory=list, description="URL of a running vLLM OpenAI server of the teacher (`backend: endpoint`); "
        "repeat to spread load. Start it with `--logprobs-mode raw_logprobs --max-logprobs K`.")
    api_key: str | None = Field(None, description="API key for the `urls` servers (default: $VLLM_API_KEY).")
    requests_per_url: int = Field(64, ge=1, description="Requests in flight per URL (`backend: endpoint`).")
    ray_address: str | None = Field(
        None, description="Ray cluster to join (`auto`, `ray://HOST:10001`, ...; `backend: ray`). Default: $RAY_ADDRESS, "
        "else a local Ray started for this job.")
    replicas: int = Field(1, ge=1, description="Teacher engines (Ray actors) with `backend: ray`.")
    gpus_per_replica: int | None = Field(
        None, ge=0, description="GPUs per teacher engine with `backend: ray` (tensor parallel inside the engine when "
        "> 1). Default: 1 if the cluster has GPUs, else 0.")

    _accept_renamed_keys = model_validator(mode="before")(classmethod(accept_renamed_keys))

    @model_validator(mode="after")
    def _check_backend_fields(self) -> TeacherJobConfig:
        for name, backend in BACKEND_FIELDS.items():
            given = getattr(self, name) != TeacherJobConfig.model_fields[name].get_default(call_default_factory=True)
            if given and self.backend != backend:
                raise ValueError(f"`{name}` applies to `backend: {backend}` only")
        if self.backend == "endpoint" and not self.urls:
            raise ValueError("`backend: endpoint` needs `urls`: the running vLLM servers of the teacher")
        return self

    def backend_settings(self) -> dict[str, Any]:
        """Just the backend fields, to build another stage's config that reaches the teacher the same way."""
        return self.model_dump(include={"backend", *BACKEND_FIELDS})


class CorpusJobConfig(TeacherJobConfig):
    """Fields shared by the stages that write a teacher corpus."""

    out: Path = Field(description="Output corpus directory.")
    format: PromptFormat = Field("auto", description="Input format; `auto` detects it from the first record.")
    top_k: int = Field(20, ge=1, le=100, description="Teacher top-k logprobs stored per response token.")
    chunk_size: int = Field(1024, ge=1, description="Requests per durable shard (the unit of resume).")
    skip_bad: bool = Field(False, description="Skip bad input records (reasons recorded in the manifest) instead of failing.")
    overwrite: bool = Field(False, description="Discard an existing corpus in `out` made with other settings.")
    logprob_encoding: Literal["quantized", "float16", "float32"] = Field(
        "quantized", description="How the top-k ids and logprobs are stored: `quantized` (~40 B per response token "
        "at k=20 with a 49k vocabulary; ids exact, top-k logprobs within 3/128 nat), `float16` (~75 B; within "
        "|x|/2048), `float32` (exact, ~150 B). Readers decode every one to the same columns.")


class GenerateConfig(CorpusJobConfig):
    """`distill generate`: the teacher answers every prompt; responses + top-k logprobs are stored."""

    prompts: Path = Field(description="Prompt file: JSONL, JSON, Parquet or CSV.")
    samples: int = Field(1, ge=1, description="Responses sampled per prompt.")
    max_tokens: int = Field(1024, ge=1, description="Maximum response tokens.")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold.")
    seed: int = Field(0, description="Base seed; each sample's seed derives from it and the record id.")
    student_view: str | None = Field(
        None, description="Context distillation: the teacher answers the whole prompt, the student is trained on this "
        "view of it: `drop-system`, `drop-examples` (the system prompt and the last user turn), `user-only`, or a "
        "YAML / JSON file `{system: TEXT, examples: keep | drop}` (docs/recipes/context-distillation.md).")

    @model_validator(mode="after")
    def _check_max_tokens(self) -> GenerateConfig:
        if self.max_model_len is not None and self.max_tokens >= self.max_model_len:
            raise ValueError(f"`max_tokens` ({self.max_tokens}) must be below `max_model_len` ({self.max_model_len})")
        return self


class ScoreConfig(CorpusJobConfig):
    """`distill score`: teacher top-k logprobs along existing responses (teacher forcing)."""

    data: Path | None = Field(None, description="Conversations whose last turn is the assistant response to score.")
    corpus: Path | None = Field(None, description="Instead of `data`: a corpus whose responses the teacher scores "
                                "token for token, written as a sibling corpus aligned record by record (a second "
                                "teacher for `distill train --ensemble`; same tokenizer).")

    @model_validator(mode="after")
    def _one_input(self) -> ScoreConfig:
        if (self.data is None) == (self.corpus is None):
            raise ValueError("give exactly one of `data` (conversations) and `corpus` (a corpus to score as a sibling)")
        return self


PromptFilters = Field(
    None, description="Filters on the written prompts, in order, each a name or `{name: FILTER, PARAM: VALUE}` "
    "(curate's filters, read on the prompt text; default: finish_reason, length, language, refusal, "
    "template_leak, dedup_exact, dedup_near, held_out when `held_out` is given).")


class SynthesizeConfig(TeacherJobConfig):
    """`distill synthesize`: new user prompts written by the teacher itself (Magpie: its chat template up to a
    user turn; or few-shot from seed prompts), filtered, as a prompt file `distill generate` reads
    (`out/prompts.jsonl`), the rejected ones with their reason (`out/rejected.jsonl`) and a manifest."""

    out: Path = Field(description="Output directory: prompts.jsonl, rejected.jsonl, manifest.json, raw/.")
    n: int = Field(1000, ge=1, description="Prompts to ask the teacher for (before filtering).")
    method: Literal["magpie", "seeds"] = Field(
        "magpie", description="`magpie`: the teacher continues its chat template from the start of a user turn; "
        "`seeds`: it writes a new prompt after a few examples from `seeds`.")
    seeds: Path | None = Field(None, description="Seed prompt file (any format `generate` reads), for `method: seeds`.")
    shots: int = Field(3, ge=1, description="Seed prompts shown per request (`method: seeds`).")
    topic: str | None = Field(None, description="Steer the prompts toward a topic (added to the system turn, or "
                              "to the few-shot request).")
    system: str | None = Field(None, description="System turn the teacher sees before the user turn it writes.")
    max_tokens: int = Field(128, ge=1, description="Most tokens per written prompt (longer ones are cut and rejected "
                            "by `finish_reason`).")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature (Magpie needs > 0: every request "
                               "starts from the same text).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold.")
    seed: int = Field(0, description="Base seed; each request's seed derives from it and its index.")
    chunk_size: int = Field(256, ge=1, description="Prompts per durable shard (the unit of resume).")
    held_out: list[Path] = Field(default_factory=list, description="Evaluation prompt files: written prompts that "
                                 "equal or nearly equal one of theirs are rejected (`held_out` filter).")
    filters: list[dict[str, Any] | str] | None = PromptFilters
    overwrite: bool = Field(False, description="Discard an existing synthesis in `out` made with other settings.")

    @model_validator(mode="after")
    def _check_method(self) -> SynthesizeConfig:
        if self.method == "seeds" and self.seeds is None:
            raise ValueError("`method: seeds` needs `seeds`: a prompt file of examples")
        if self.method == "magpie" and self.seeds is not None:
            raise ValueError("`seeds` applies to `method: seeds` only")
        if self.method == "magpie" and self.temperature == 0:
            raise ValueError("`method: magpie` with `temperature: 0` writes the same prompt every time: use > 0")
        return self


class CurateConfig(StageConfig):
    """`distill curate`: filter a corpus; kept records in `out/data`, rejected ones with their
    reason in `out/rejected`, a report beside them."""

    corpus: Path = Field(description="Input corpus directory.")
    out: Path = Field(description="Output corpus directory.")
    filters: list[dict[str, Any] | str] | None = Field(
        None, description="Filters in order, each `{name: FILTER, PARAM: VALUE}` or `{name: N, plugin: "
        "'module:callable', params: {...}}` (default: finish_reason, length, repetition, refusal, pii, "
        "dedup_exact, dedup_near, teacher_confidence).")
    batch_size: int = Field(1024, ge=1, description="Records per filtering batch.")
    workers: int | None = Field(
        None, ge=0, description="Processes that run the filters judging each record alone (all but dedup and "
        "plug-ins, and the dedup filters' signatures) a few shards ahead (default: one per CPU, for corpora of "
        "10,000 records or more; 0: every filter in the curating process).")
    overwrite: bool = Field(False, description="Replace an existing `out`.")
    allow_incomplete: bool = Field(False, description=ALLOW_INCOMPLETE)


# Where a train run is reported, not what it computes: a rerun that changes only these resumes (train's
# settings check) and a finished `distill run` stage stays done (its stage hash leaves them out).
TRACKING_FIELDS = frozenset({"report_to", "run_name", "experiment", "tracking_dir"})


def _one_or_more(value: Any) -> Any:
    """One path (a YAML scalar, `TrainConfig(corpus=PATH)`) as a list of one."""
    return [value] if isinstance(value, (str, Path)) else value


def _named_values(value: Any) -> Any:
    """`a=0.7,b=0.3` (a flag, repeatable), a YAML list of `name=value` or a YAML mapping -> ["a=0.7", "b=0.3"]."""
    if isinstance(value, dict):
        return [f"{k}={v}" for k, v in value.items()]
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        return [part.strip() for item in value for part in str(item).split(",") if part.strip()]
    return value


def _check_named(items: list[str], field: str, number: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"`{field}`: {item!r} is not NAME=VALUE")
        if name.strip() in out:
            raise ValueError(f"`{field}`: {name.strip()!r} is given twice")
        if number:
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"`{field}`: {item!r}: {value!r} is not a number") from None
            if value < 0:
                raise ValueError(f"`{field}`: {item!r}: a weight must be >= 0")
        out[name.strip()] = value.strip() if isinstance(value, str) else value
    return out


def _floats(value: Any) -> Any:
    """`--teacher-weights 0.7,0.3` (or repeated flags, or a YAML list) -> [0.7, 0.3]."""
    if isinstance(value, (str, int, float)):
        value = [value]
    if isinstance(value, list):
        return [float(part) for item in value for part in (str(item).split(",")) if str(part).strip()]
    return value


# How `ensemble` combines several teachers' top-k of the same responses (train/ensemble.py).
Ensemble = Literal["mixture", "sum"]


def _comma_separated(value: Any) -> Any:
    """`--keep-layers 0,3,6` (or repeated flags, or a YAML list) -> [0, 3, 6]."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        return [int(part) for item in value for part in (str(item).split(",") if isinstance(item, str) else [item])
                if str(part).strip()]
    return value


class TrainConfig(StageConfig):
    """`distill train`: a student learns the teacher's tokens (CE) and its top-k distributions (KL)."""

    corpus: Annotated[list[Path], BeforeValidator(_one_or_more)] = Field(
        min_length=1, description="Training corpus directory (from generate / curate). Repeat for several corpora of "
        "different teachers (the same tokenizer): each record learns from its own teacher's top-k (routing), or, with "
        "`ensemble`, from all teachers' top-k of the same responses (`distill score --corpus`).")
    mix: Annotated[list[str], BeforeValidator(_named_values)] = Field(
        default_factory=list, description="Share of each corpus in the training data, by corpus directory name, e.g. "
        "`a=0.7,b=0.3` (records resampled to these shares; default: all records once).")
    ensemble: Ensemble | None = Field(
        None, description="Several corpora scoring the same responses: `mixture` (KL to the weighted mixture of the "
        "teachers' distributions on the union of their top-k + one tail) or `sum` (the weighted sum of the KL to each "
        "teacher on its own top-k + tail).")
    teacher_weights: Annotated[list[float], BeforeValidator(_floats)] = Field(
        default_factory=list, description="One weight per corpus for `ensemble`, in `corpus` order, e.g. 0.7,0.3 "
        "(normalised to sum 1; default: equal).")
    student: ModelPath = Field(description="Student model: a local directory, a hub id or a .gguf file (another tokenizer "
                               "than the teacher's: see `cross_tokenizer`).")
    out: Path = Field(description="Output directory: merged model, adapter, metrics, model card.")
    loss: LossKind = Field("forward_kl", description="KD divergence.")
    tail: LossTail = Field("bucket", description="How the teacher's mass outside its top-k is treated.")
    beta: float = Field(0.5, gt=0.0, lt=1.0, description="JSD interpolation (`loss: jsd`).")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Weight of KD; 1 - alpha weighs CE on the teacher's tokens.")
    kd_temperature: float = Field(1.0, gt=0.0, description="KD temperature (loss scaled by T^2).")
    lora: bool = Field(True, description="Train LoRA adapters (`--no-lora` or `--full`: full fine-tuning).")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha.")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    keep_adapter: bool = Field(False, description="With `lora`: keep the adapter unmerged (`out/adapter`, PEFT format) "
                               "instead of writing a merged model: many such students share one base in `distill serve "
                               "--lora NAME=DIR ...`.")
    epochs: float = Field(1.0, gt=0.0, description="Training epochs (ignored when `max_steps` is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    learning_rate: float = Field(2e-4, gt=0.0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"] = Field("linear", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Share of the steps spent warming the learning rate up linearly.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    batch_size: int = Field(8, ge=1, description="Sequences per device per step.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    max_length: int = Field(2048, ge=2, description="Truncate prompt + response to this many tokens.")
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of records held out for eval loss / KL / agreement.")
    eval_max_records: int = Field(2000, ge=1, description="At most this many records held out: a share of a large corpus "
                                  "would make every evaluation (one before step 1 among them) score tens of thousands.")
    chunk_size: int = Field(1024, ge=1, description="Positions per chunk of the KD loss (memory vs speed).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    dataloader_workers: int | None = Field(None, ge=0, description="Processes that read, decode and collate the next "
                                           "batches while the model steps (the same batches as without). Default: 2 "
                                           "with a GPU; 0 without, where training already uses every core.")
    save_steps: int = Field(500, ge=1, description="Checkpoint every this many steps.")
    logging_steps: int = Field(10, ge=1, description="Log metrics every this many steps.")
    seed: int = Field(0, description="Seed for init, data order and the eval split.")
    resume: bool = Field(False, description="Continue from the newest checkpoint in `out` even if its settings differ "
                         "(the same settings resume without it).")
    overwrite: bool = Field(False, description="Replace a finished student or a run with other settings in `out`.")
    allow_incomplete: bool = Field(False, description=ALLOW_INCOMPLETE)
    on_policy: bool = Field(False, description="Also train on the student's own samples, scored by the teacher behind "
                            "`teacher_endpoint` (on-policy distillation).")
    teacher_endpoint: str | None = Field(None, description="URL of a vLLM server of the teacher (`distill serve --model "
                                         "TEACHER`), for `on_policy`.")
    teacher_endpoints: Annotated[list[str], BeforeValidator(_named_values)] = Field(
        default_factory=list, description="Several teachers for `on_policy`, one per corpus: `NAME=URL` with NAME a "
        "corpus directory's name (repeatable); each sample is scored by the teacher of the corpus its prompt came from.")
    teacher_api_key: str | None = Field(None, description="API key for `teacher_endpoint` (default: $VLLM_API_KEY).")
    lmbda: float = Field(0.5, ge=0.0, le=1.0, description="Share of each batch sampled from the student (`on_policy`); "
                         "the rest is the stored corpus.")
    max_new_tokens: int = Field(128, ge=1, description="Most tokens the student samples per on-policy answer.")
    sample_temperature: float = Field(1.0, ge=0.0, description="Temperature of the student's on-policy samples (0 = greedy).")
    teacher_top_k: int = Field(20, ge=1, description="Teacher top-k per on-policy position (at most the server's "
                               "`--max-logprobs`), and per position of the online `teacher` with `online_targets: topk`.")
    on_policy_loss: LossKind = Field(
        "forward_kl", description="KD divergence on the student's samples (no CE: they are the student's own tokens).")
    cross_tokenizer: CrossTokenizer = Field(
        "auto", description="A student whose tokenizer is not the teacher's: `auto` detects one (fewer than 90% of the "
        "teacher's token ids are the same token in the student) and trains it with `span`; `span` (KL on text spans both "
        "tokenizations cover) or `uld` (universal logit distillation) force that loss; `off` refuses such a student.")
    teacher_tokenizer: str | None = Field(
        None, description="The teacher's tokenizer (directory or hub id) for a corpus that does not store it (written "
        "before distill kept tokenizer files in the corpus); only read for a student of another tokenizer.")
    report_to: Annotated[list[Tracker], BeforeValidator(parse_trackers)] = Field(
        default_factory=list, description="Experiment trackers to log the run to, e.g. tensorboard,mlflow (also wandb, "
        "trackio; default: none). `distill eval` of the student logs to the same run.")
    run_name: str | None = Field(None, description="The run's name in the trackers (default: the name of `out`).")
    experiment: str | None = Field(None, description="MLflow experiment the run belongs to (default: distill).")
    tracking_dir: Path | None = Field(None, description="Where the trackers' files go: TensorBoard events in "
                                      "TRACKING_DIR/tensorboard/RUN_NAME, MLflow's sqlite store TRACKING_DIR/mlflow.db "
                                      "unless $MLFLOW_TRACKING_URI is set (default: `out`).")

    teacher: ModelPath | None = Field(
        None, description="Online teacher: a model (directory, hub id or .gguf file, same tokenizer as the student) run "
        "frozen in the training process on each batch; KD is then against it (see `online_targets`), not the stored "
        "top-k. With it, `corpus` may also be a chat dataset file (JSONL / JSON / Parquet / CSV messages or ShareGPT "
        "records, as `distill generate` reads): each record's last assistant turn is the answer the student learns.")
    online_targets: OnlineTargets = Field(
        "full", description="KD targets of the online `teacher`: `full` (its whole-vocabulary distribution) or `topk` "
        "(its `teacher_top_k` best tokens + tail, taken live: the offline loss, with `tail`).")
    hidden_weight: float = Field(0.0, ge=0.0, description="Weight of the intermediate-state loss against the online "
                                 "`teacher` (0 = off), added to the KD + CE loss.")
    hidden_loss: HiddenLoss = Field("mse", description="Intermediate-state loss per position: `mse` (squared error "
                                    "relative to the teacher state's squared norm) or `cosine` (1 - cosine similarity).")
    layer_map: Annotated[list[int] | None, BeforeValidator(_comma_separated)] = Field(
        None, description="Teacher layer each student layer is matched to by the intermediate-state loss, e.g. "
        "0,3,6,9 (default: the student's `distill_layer_map`, written by `distill init-student`).")

    @model_validator(mode="after")
    def _check_keep_adapter(self) -> TrainConfig:
        if self.keep_adapter and not self.lora:
            raise ValueError("`keep_adapter` keeps a LoRA adapter: full fine-tuning (`--no-lora`) has none")
        return self

    @model_validator(mode="after")
    def _check_on_policy(self) -> TrainConfig:
        if self.on_policy and not (self.teacher_endpoint or self.teacher_endpoints):
            raise ValueError("`on_policy` needs `teacher_endpoint`: the URL of a vLLM server of the teacher")
        if self.teacher_endpoint and self.teacher_endpoints:
            raise ValueError("give `teacher_endpoint` (one teacher) or `teacher_endpoints` (one per corpus), not both")
        if self.teacher_endpoints and not self.on_policy:
            raise ValueError("`teacher_endpoints` apply to `on_policy` only")
        if self.teacher_endpoints:
            self._check_corpus_names("teacher_endpoints", _check_named(self.teacher_endpoints, "teacher_endpoints", False))
        if self.on_policy and self.teacher:
            raise ValueError("`on_policy` and the online `teacher` cannot be combined: choose one")
        if (self.hidden_weight > 0 or self.layer_map is not None or self.online_targets != "full") and not self.teacher:
            raise ValueError("`hidden_weight`, `layer_map` and `online_targets` need the online `teacher` (`--teacher MODEL`)")
        return self

    @model_validator(mode="after")
    def _check_teachers(self) -> TrainConfig:
        names = self.corpus_names()
        if len(set(names)) < len(names):
            raise ValueError(f"`corpus`: two corpora share the directory name {next(n for n in names if names.count(n) > 1)!r}; "
                             "`mix` and `teacher_endpoints` name corpora by it: rename one")
        if self.mix:
            if self.ensemble:
                raise ValueError("`mix` applies to corpora of different prompts; an `ensemble` trains on the same records")
            self._check_corpus_names("mix", _check_named(self.mix, "mix", True))
            if not sum(self.mix_weights().values()) > 0:
                raise ValueError("`mix`: the weights sum to 0")
        if self.ensemble and len(self.corpora) < 2:
            raise ValueError("`ensemble` needs two or more corpora (`--corpus A --corpus B`) of the same responses")
        if self.ensemble and self.on_policy:
            raise ValueError("`on_policy` with an `ensemble` is not supported: route on-policy samples with "
                             "`teacher_endpoints` instead")
        if self.teacher_weights:
            if not self.ensemble:
                raise ValueError("`teacher_weights` apply to an `ensemble` only (routing: `mix`)")
            if len(self.teacher_weights) != len(self.corpora):
                raise ValueError(f"`teacher_weights` has {len(self.teacher_weights)} weights for {len(self.corpora)} corpora")
            if min(self.teacher_weights) < 0 or not sum(self.teacher_weights) > 0:
                raise ValueError("`teacher_weights` must be >= 0 and not all 0")
        return self

    def _check_corpus_names(self, field: str, named: dict[str, Any]) -> None:
        names = self.corpus_names()
        for name in named:
            if name not in names:
                raise ValueError(f"`{field}`: {name!r} is not a corpus (the corpora are {', '.join(names)})")
        for name in names:
            if name not in named:
                raise ValueError(f"`{field}`: no value for corpus {name!r}")

    @property
    def corpora(self) -> list[Path]:
        """The corpus directories. `model_copy(update=...)` skips validation: a single path set
        that way still reads as one corpus."""
        return [Path(p) for p in _one_or_more(self.corpus)]

    def corpus_names(self) -> list[str]:
        """What `mix` and `teacher_endpoints` call each corpus: its directory's name."""
        return [p.resolve().name or str(p) for p in self.corpora]

    def mix_weights(self) -> dict[str, float]:
        return _check_named(self.mix, "mix", True)

    def endpoints(self) -> dict[str, str]:
        """Corpus name -> URL of its teacher for on-policy samples (`teacher_endpoints`)."""
        return _check_named(self.teacher_endpoints, "teacher_endpoints", False)

    def normalised_teacher_weights(self) -> list[float]:
        weights = self.teacher_weights or [1.0] * len(self.corpora)
        return [w / sum(weights) for w in weights]


class InitStudentConfig(StageConfig):
    """`distill init-student`: a depth-pruned copy of the teacher that shares its tokenizer."""

    teacher: ModelPath = Field(description="Teacher model: a local directory, a hub id or a .gguf file.")
    out: Path = Field(description="Output directory for the student checkpoint.")
    num_layers: int | None = Field(None, ge=1, description="Keep this many evenly spaced layers (first and last included).")
    keep_layers: Annotated[list[int] | None, BeforeValidator(_comma_separated)] = Field(
        None, description="Exactly these teacher layers, e.g. 0,3,6,9 (instead of `num_layers`).")
    select: LayerSelection = Field("even", description="How `num_layers` layers are chosen: `even` (evenly spaced) or "
                                   "`importance` (highest Block Influence on `calibration` text); first and last kept.")
    calibration: Path | None = Field(None, description="Corpus directory (from `generate`) whose prompts + answers "
                                     "measure layer importance (`select: importance`).")
    samples: int = Field(32, ge=1, description="Calibration records read from `calibration`.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Dtype of the saved weights.")
    overwrite: bool = Field(False, description="Replace an existing `out`.")

    @model_validator(mode="after")
    def _one_choice(self) -> "InitStudentConfig":
        if (self.num_layers is None) == (self.keep_layers is None):
            raise ValueError("give exactly one of `num_layers` and `keep_layers`")
        if self.keep_layers == []:  # `--keep-layers ''` or `,`: a student with no layers would still train
            raise ValueError("`keep_layers` names no layer: give the teacher layers to keep, e.g. 0,3,6,9")
        if self.select == "importance" and (self.calibration is None or self.keep_layers is not None):
            raise ValueError("`select: importance` needs `num_layers` and a `calibration` corpus")
        if self.calibration is not None and self.select != "importance":
            raise ValueError("`calibration` is read by `select: importance` only: add `--select importance`")
        return self


class ServeConfig(EngineConfig):
    """`distill serve`: a model behind vLLM's OpenAI-compatible server, until Ctrl-C / SIGTERM."""

    model: ModelPath = Field(description="Model directory (a trained student), hub id or .gguf file; with `lora`, the base model.")
    lora: list[str] = Field(default_factory=list, description="LoRA adapter to serve on top of `model`, as NAME=DIR "
                            "(repeatable: one base, many students, each a model name); DIR is an adapter or a student "
                            "trained with `--lora` (its `adapter/`). A lone bare DIR is served as `served_model_name`.")
    served_model_name: str | None = Field(None, description="Name clients request (default: the model's directory name).")
    host: str = Field("127.0.0.1", description="Interface to bind (0.0.0.0 exposes the server to the network: it needs "
                      "an API key, or `insecure_public`).")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on (0: any free port).")
    api_key: str | None = Field(None, description="Require this bearer key on every route but /health (default: "
                                "$VLLM_API_KEY, which keeps it out of `ps`; unset = no key).")
    insecure_public: bool = Field(False, description="Serve on a non-loopback `host` without an API key: anyone who "
                                  "reaches the port may use the model.")
    startup_timeout: float = Field(600.0, gt=0, description="Seconds to wait for the server to answer /health.")
    vllm_args: list[str] = Field(default_factory=list, description="Extra vLLM server flags (on the command line: after `--`).")
    ui: bool = Field(False, description="Also serve a browser chat page (on `host`:`ui_port`; the API key, if set, is its password).")
    ui_port: int = Field(7860, ge=0, le=65535, description="Port of the chat page (0: any free port).")
    compare: str | None = Field(
        None, description="Teacher to answer beside the student on the page: a server URL (.../v1) or a model "
        "(then started like `model`).")

    @model_validator(mode="after")
    def _check_ui(self) -> ServeConfig:
        if self.compare and not self.ui:
            raise ValueError("`compare` shows the teacher on the chat page: add `ui` (`--ui`)")
        if self.ui and self.ui_port and self.ui_port == self.port:
            raise ValueError(f"`ui_port` and `port` are both {self.port}: give the chat page another port")
        return self


class EvalConfig(TeacherJobConfig):
    """`distill eval`: the student against its teacher on held-out prompts: fidelity (KL, top-1
    agreement, perplexity on teacher text), answers (lengths, exact match, a task scorer) and
    cost (throughput, latency, size), as `out/report.md`, `report.json` and plots."""

    student: ModelPath = Field(description="Student model directory (`distill train` output), hub id or .gguf file.")
    prompts: Path = Field(description="Held-out prompt file (never the training prompts).")
    out: Path = Field(description="Output directory: report, plots, both models' answers.")
    corpus: Path | None = Field(None, description="Existing teacher corpus of these prompts to reuse instead of generating one.")
    format: PromptFormat = Field("auto", description="Prompt file format; `auto` detects it.")
    max_tokens: int = Field(256, ge=1, description="Maximum answer tokens (both models).")
    temperature: float = Field(0.0, ge=0.0, description="Sampling temperature for both models (0 = greedy).")
    top_k: int = Field(20, ge=1, le=100, description="Teacher top-k stored for the KL measurement.")
    seed: int = Field(0, description="Sampling seed (both models).")
    scorer: str | None = Field(None, description="Task scorer plug-in `module:callable(prompt, answer) -> float` (e.g. 1.0 = correct).")
    latency: bool = Field(True, description="Measure throughput and latency of both models behind vLLM's server.")
    concurrency: list[int] = Field(default_factory=lambda: [1, 8, 32], description="Concurrent requests per latency level.")
    latency_requests: int = Field(64, ge=1, description="Requests per concurrency level (at least the level itself).")
    latency_tokens: int = Field(64, ge=1, description="Output tokens per latency request (`ignore_eos`: equal work for both).")
    allow_overlap: bool = Field(False, description="Evaluate even if prompts overlap the student's training corpus.")
    batch_size: int = Field(16, ge=1, description="Sequences per teacher-forced scoring batch.")
    on_policy_kl: bool = Field(False, description="Also let the teacher score the student's own answers: KL(teacher || "
                               "student) per token along them (the on-policy divergence; the same teacher engine).")
    overwrite: bool = Field(False, description="Discard answers in `out` made with other settings.")


# The GGUF types `distill export` writes (docs/recipes/export.md: what each costs).
GGUFType = Literal["f16", "q8_0", "q4_0"]


class ExportConfig(StageConfig):
    """`distill export`: the student as one GGUF file for llama.cpp / Ollama / LM Studio, with its
    tokenizer, special tokens and chat template inside, and an Ollama Modelfile beside it."""

    student: ModelPath = Field(description="Student model directory (`distill train` or `init-student` output; a LoRA "
                               "adapter directory is merged into its base first), hub id or .gguf file.")
    out: Path = Field(description="The GGUF file to write, e.g. student-q8_0.gguf (`NAME.Modelfile` goes beside it).")
    format: Literal["gguf"] = Field("gguf", description="Output format.")
    outtype: GGUFType = Field("f16", description="Weight type: f16 (lossless for a float16 model), q8_0 (8-bit "
                              "blocks), q4_0 (4-bit blocks; the output layer stays q8_0).")
    overwrite: bool = Field(False, description="Replace an existing `out`.")


class ChatConfig(StageConfig):
    """`distill chat`: chat in the terminal with a served model (streaming, multi-turn)."""

    url: str = Field(description="Server base URL, e.g. http://127.0.0.1:8000/v1.")
    model: str | None = Field(None, description="Model name (default: the first one the server lists).")
    api_key: str | None = Field(None, description="Bearer key (default: $VLLM_API_KEY).")
    system: str | None = Field(None, description="System prompt for the conversation.")
    max_tokens: int = Field(512, ge=1, description="Maximum tokens per reply.")
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature.")
    timeout: float = Field(120.0, gt=0, description="Seconds to wait for a reply.")


def section(model: type[StageConfig], owned: set[str], doc: str) -> type[StageConfig]:
    """`model` without the fields `distill run` fills in itself (paths between stages, the teacher)."""
    fields = {name: (f.annotation, f) for name, f in model.model_fields.items() if name not in owned}
    # A section reads the old teacher-job keys as its stage does (`generate: {endpoint: [...]}`).
    renamed = {"_accept_renamed_keys": model_validator(mode="before")(classmethod(accept_renamed_keys))} \
        if issubclass(model, TeacherJobConfig) else {}
    return create_model(f"{model.__name__}Section", __base__=StageConfig, __doc__=doc, __validators__=renamed, **fields)


ENGINE_FIELDS = set(EngineConfig.model_fields)


class TeacherSection(EngineConfig):
    """The teacher and how vLLM runs it (generate and eval)."""

    model: ModelPath = Field(description="Teacher model: a local directory, a hub id or a .gguf file.")


class PromptsSection(StageConfig):
    train: Path | None = Field(None, description="Prompts the teacher answers for the training corpus (none: the "
                               "`synthesize` section has the teacher write them).")
    eval: Path = Field(description="Held-out prompts for `eval` (disjoint from `train`).")
    format: PromptFormat = Field("auto", description="Format of both prompt files; `auto` detects it.")


class DomainPromptsSection(PromptsSection):
    """One teacher's domain: the prompts it answers for training and those its eval compares on."""

    train: Path = Field(description="Prompts this teacher answers for its part of the training corpus.")
    eval: Path = Field(description="Held-out prompts of this teacher's domain (disjoint from every teacher's `train`): "
                       "its `eval` compares the student with this teacher on them.")


def _teacher_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"{name!r}: use letters, digits, `-` and `_` only (it names the teacher's directories and "
                         "its `mix` share)")
    return name


class TeacherEntry(TeacherSection):
    """One teacher of `teachers`: its model, how vLLM runs it (or the servers that already do), its
    share of the training data and its domain's prompts."""

    name: Annotated[str, AfterValidator(_teacher_name)] = Field(
        description="The teacher's name: its corpus is corpus/NAME, curated/NAME, its eval eval/NAME, and "
        "`train.teacher_endpoints` calls it NAME.")
    urls: list[str] = Field(
        default_factory=list, description="Running vLLM OpenAI servers of `model` to generate and evaluate with "
        "(`backend: endpoint`) instead of a vLLM engine in the run's process.")
    weight: float | None = Field(None, gt=0, description="Share of this teacher's corpus in the training data (its "
                                 "`train.mix` weight; give it for every teacher or none: none trains on every "
                                 "record once).")
    prompts: DomainPromptsSection


class StudentSection(StageConfig):
    model: ModelPath = Field(description="Student base model: a local directory, a hub id or a .gguf file (same tokenizer family).")


SynthesizeSection = section(SynthesizeConfig, {"teacher", "out", *ENGINE_FIELDS},
                            "`synthesize` fields: the teacher writes the training prompts (`prompts.eval` is always "
                            "among `held_out`).")
GenerateSection = section(GenerateConfig, {"teacher", "prompts", "format", "out", *ENGINE_FIELDS},
                          "`generate` fields; the teacher section says how vLLM runs the teacher.")
CurateSection = section(CurateConfig, {"corpus", "out"}, "`curate` fields.")
TrainFields = section(TrainConfig, {"corpus", "student", "out", "resume"}, "`train` fields.")
# How `distill run` launches training: fields of the run's `train` section that are not TrainConfig's.
LAUNCH_FIELDS = {"launcher", "config_file", "num_processes"}


class TrainSection(TrainFields):
    """`train` fields, and how `distill run` launches the training."""

    launcher: Literal["in_process", "accelerate"] = Field(
        "in_process", description="`accelerate`: train under `accelerate launch --config_file CONFIG_FILE` "
        "(DDP / FSDP processes as that file says) instead of in the run's own process.")
    config_file: Path | None = Field(
        None, description="accelerate config for `launcher: accelerate`, e.g. examples/accelerate/ddp.yaml.")
    num_processes: int | None = Field(None, ge=1, description="Processes, overriding `config_file`'s `num_processes`.")

    @model_validator(mode="after")
    def _check_launcher(self) -> TrainSection:
        if self.launcher == "accelerate" and self.config_file is None:
            raise ValueError("`launcher: accelerate` needs `config_file` (e.g. examples/accelerate/ddp.yaml)")
        if self.launcher != "accelerate" and (self.config_file is not None or self.num_processes is not None):
            raise ValueError("`config_file` and `num_processes` apply to `launcher: accelerate` only")
        if self.keep_adapter:  # eval (and `--serve`) load the run's student as a model directory
            raise ValueError("`keep_adapter` leaves no merged model for the run's eval: train the adapter with "
                             "`distill train --keep-adapter` on the run's curated corpus instead")
        return self

EvalSection = section(EvalConfig, {"student", "teacher", "prompts", "format", "out"},
                      "`eval` fields; engine settings default to the teacher section's.")
ServeSection = section(ServeConfig, {"model"}, "`serve` fields (`distill run --serve`); `lora`: other students "
                       "trained on the run's student base, served beside the run's own (its adapter, named after `out`).")


class RunConfig(StageConfig):
    """`distill run`: every stage from one YAML file into one run directory. Each stage section
    takes its stage's fields except those the run fills in (paths between stages, the teacher)."""

    out: Path = Field(description="Run directory: corpus/, curated/, student/, eval/, run.json.")
    teacher: TeacherSection | None = Field(None, description="The teacher (or `teachers`).")
    teachers: list[TeacherEntry] | None = Field(
        None, min_length=1, description="Several teachers instead of `teacher`, each answering its own domain's "
        "prompts into its own corpus; one student trains on all of them, each record against its own teacher "
        "(routing), and is evaluated against each teacher on that teacher's `prompts.eval`.")
    prompts: PromptsSection | None = Field(None, description="The training and held-out prompts (required with `teacher`; "
                                           "with `teachers`, each teacher has its own `prompts`).")
    student: StudentSection
    synthesize: SynthesizeSection | None = Field(
        None, description="Have the teacher write the training prompts first (instead of `prompts.train`).")
    generate: GenerateSection = Field(default_factory=GenerateSection)
    curate: CurateSection = Field(default_factory=CurateSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    serve: ServeSection = Field(default_factory=ServeSection)

    @model_validator(mode="after")
    def _serve_adapters(self) -> RunConfig:
        if self.serve.lora and not self.train.lora:
            raise ValueError("`serve.lora` serves the run's student as a LoRA adapter beside the others: it needs "
                             "`train.lora: true`")
        return self

    @model_validator(mode="after")
    def _check_teacher_and_prompts(self) -> RunConfig:
        if (self.teacher is None) == (self.teachers is None):
            raise ValueError("give exactly one of `teacher` (one teacher) and `teachers` (a list, each with its "
                             "own prompts)")
        if self.teachers is not None:
            self._check_teachers()
        elif self.prompts is None:
            raise ValueError("`prompts`: Field required")
        elif (self.prompts.train is None) == (self.synthesize is None):
            raise ValueError("give exactly one source of training prompts: `prompts.train` (a file) or a "
                             "`synthesize` section (the teacher writes them)")
        return self

    def _check_teachers(self) -> None:
        names = [t.name for t in self.teachers]
        if len(set(names)) < len(names):
            raise ValueError(f"`teachers`: two teachers are named {next(n for n in names if names.count(n) > 1)!r}: "
                             "each name is its own corpus directory")
        if self.prompts is not None:
            raise ValueError("`prompts` applies to `teacher`; with `teachers`, each teacher has its own `prompts`")
        if self.synthesize is not None:
            raise ValueError("`synthesize` writes one teacher's prompts; with `teachers`, give each teacher's "
                             "`prompts.train`")
        if len({t.weight is None for t in self.teachers}) > 1:
            raise ValueError("`teachers`: give `weight` to every teacher or to none")
        # the teachers' weights are train's `mix`; their corpora hold different prompts (routing, not an ensemble)
        for field in ("mix", "ensemble", "teacher_weights"):
            if field in self.train.model_fields_set:
                raise ValueError(f"`train.{field}` does not apply to `teachers`: each teacher's `weight` is its "
                                 "share of the training data")
        for i, t in enumerate(self.teachers):
            for section in ("generate", "eval"):
                backend = getattr(self, section).model_fields_set & {"backend", "urls"}
                if t.urls and backend:
                    raise ValueError(f"`teachers.{i}.urls` and `{section}.{sorted(backend)[0]}` both say where the "
                                     "teacher runs: give one")


def format_validation_error(err: ValidationError, source: str = "") -> str:
    """One line per problem, each naming the field (`a.b`) the way the YAML/flag spells it."""
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])  # empty for a check across fields: its message names them
        # a validator's ValueError: its own message, without pydantic's "Value error, " in front
        message = str(e["ctx"]["error"]) if e["type"] == "value_error" and "error" in e.get("ctx", {}) else e["msg"]
        lines.append(f"{source}`{where}`: {message}" if where else f"{source}{message}")
    return "\n".join(lines)


# What a sweep trial is judged on, declared once: teacher-forced KL(teacher || student) per token
# and top-1 agreement on the teacher's answers to held-out prompts (what `distill eval` reports as
# fidelity), or the mean of the eval section's `scorer` over the student's own answers.
SweepMeasure = Literal["kl", "top1_agreement", "score"]
MINIMISED_MEASURES = ("kl",)
# Train fields a sweep may not search: where things are and how training is launched, not what it computes.
# Nor which corpora train and how their teachers combine (names of corpora the run does not have).
NOT_SEARCHABLE = {"overwrite", "allow_incomplete", "teacher_endpoint", "teacher_endpoints", "teacher_api_key", "teacher",
                  "keep_adapter", "mix", "ensemble", "teacher_weights", *LAUNCH_FIELDS}


class SearchRange(BaseModel):
    """A numeric range of a train field: `{low: 0.1, high: 0.9}`; `log: true` samples on a log
    scale; `step` rounds to a grid (an int field always steps by at least 1)."""

    model_config = ConfigDict(extra="forbid")
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)


class SweepSection(StageConfig):
    """`distill sweep`: the search space over `train` fields, the objective and the budget. The
    rest of the file is a `distill run` config: its corpus is generated and curated once, then
    every trial trains a student with the train section plus the trial's values."""

    space: dict[str, SearchRange | list[Any]] = Field(
        description="Train field -> a list of choices (`loss: [forward_kl, jsd]`) or a range (`alpha: {low: 0, high: 1}`, "
        "with `log: true`, `step: N`).")
    objective: SweepMeasure = Field("kl", description="What a trial is judged on: `kl` (teacher-forced KL(teacher || "
                                    "student) per token on the teacher's answers to `prompts`), `top1_agreement` (on the "
                                    "same), `score` (mean of `eval.scorer` over the student's greedy answers; not pruned).")
    direction: Literal["minimize", "maximize"] | None = Field(
        None, description="Default: minimize `kl`, maximize the others.")
    trials: int = Field(20, ge=1, description="Trials to finish (completed + pruned; failed ones do not count), all "
                        "workers and reruns together.")
    timeout_minutes: float | None = Field(None, gt=0, description="Start no trial after this many minutes of this run.")
    prompts: Path | None = Field(None, description="Held-out prompts the trials are judged on (default: `prompts.eval`; "
                                 "keep a separate file to compare the winner on `prompts.eval` afterwards unbiased).")
    held_out: Path | None = Field(None, description="Existing teacher corpus of `prompts` (the teacher's answers) "
                                  "instead of generating one.")
    corpus: Path | None = Field(None, description="Existing curated training corpus instead of generating and curating "
                                "one (then no teacher engine starts unless `held_out` is missing).")
    pruner: Literal["median", "none"] = Field("median", description="`median`: stop a trial whose held-out value at a "
                                              "report is worse than the median of earlier trials at that step.")
    pruner_startup_trials: int = Field(3, ge=0, description="Trials that finish before the pruner stops any.")
    report_every: int = Field(100, ge=1, description="Training steps between held-out reports (what the pruner judges).")
    startup_trials: int | None = Field(None, ge=1, description="Random trials before TPE samples from what it learnt "
                                       "(default: half of `trials`, at least 1, at most 10).")
    seed: int = Field(0, description="Seed of the sampler.")
    study: str = Field("distill-sweep", description="Study name in the storage (several sweeps can share a database).")
    start_with: list[dict[str, Any]] = Field(
        default_factory=list, description="Trials to run first, each a mapping of space fields to values (e.g. the "
        "train section's own values, as a baseline).")

    @model_validator(mode="after")
    def _check_space(self) -> SweepSection:
        if not self.space:
            raise ValueError("`space` is empty: name at least one train field to search, e.g. `alpha: {low: 0, high: 1}`")
        for name, values in self.space.items():
            check_search_field(name, values)
        for i, trial in enumerate(self.start_with):
            unknown = sorted(set(trial) - set(self.space))
            if unknown:
                raise ValueError(f"`start_with.{i}.{unknown[0]}`: not in `space` ({', '.join(self.space)})")
            for name, value in trial.items():
                _check_train_value(f"start_with.{i}.{name}", name, value)
        return self

    @property
    def maximise(self) -> bool:
        return (self.direction or ("minimize" if self.objective in MINIMISED_MEASURES else "maximize")) == "maximize"


def searchable_fields() -> list[str]:
    return [name for name in TrainFields.model_fields if name not in NOT_SEARCHABLE]


def is_int_field(name: str) -> bool:
    annotation = TrainFields.model_fields[name].annotation
    return annotation is int or annotation == (int | None)


def _check_train_value(where: str, name: str, value: Any) -> None:
    try:
        TrainFields(**{name: value})
    except ValidationError as e:
        raise ValueError(f"`{where}`: {value!r}: {e.errors()[0]['msg']}") from None


def check_search_field(name: str, values: SearchRange | list[Any]) -> None:
    """One search dimension: a searchable train field, choices or a non-empty range its field accepts."""
    where = f"space.{name}"
    if name not in TrainFields.model_fields or name in NOT_SEARCHABLE:
        raise ValueError(f"`{where}`: not a train field a sweep can search (one of {', '.join(searchable_fields())})")
    if isinstance(values, list):
        if not values:
            raise ValueError(f"`{where}`: no choices: give at least one value")
        for value in values:
            _check_train_value(where, name, value)
        return
    annotation = TrainFields.model_fields[name].annotation
    if annotation not in (int, float) and annotation not in (int | None, float | None):
        raise ValueError(f"`{where}`: `{name}` is not numeric: give a list of choices")
    if not values.low < values.high:
        raise ValueError(f"`{where}`: empty range (low {values.low} is not below high {values.high})")
    if values.log and values.low <= 0:
        raise ValueError(f"`{where}`: a log range needs low > 0 (got {values.low})")
    if is_int_field(name) and (values.low != int(values.low) or values.high != int(values.high)):
        raise ValueError(f"`{where}`: `{name}` is an integer: give integer bounds")
    for bound in ("low", "high"):
        value = getattr(values, bound)
        _check_train_value(f"{where}.{bound}", name, int(value) if is_int_field(name) else value)
