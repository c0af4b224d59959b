"""`train()`: a student from a teacher corpus with TRL's `SFTTrainer`, one method overridden.

`DistillTrainer.compute_loss` runs the student for its last hidden states only
(`logits_to_keep=1`), then `chunked_distill_loss` computes alpha * KD + (1 - alpha) * CE chunk
by chunk, never holding `[B, T, V]` logits (`head.lm_head` hands it the head whole under FSDP2
and ZeRO-3). Everything else (optimizer, schedule, gradient accumulation, checkpoints, resume,
PEFT, DDP / FSDP / DeepSpeed) is TRL / transformers / accelerate as shipped. Before step 1 the
corpus is read once (`data.prepare_training_data`); after the last, `card` writes what the
student carries besides its weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from distill import corpus, files, tracking
from distill.adapters import ADAPTER_DIR
from distill.config import TrainConfig
from distill.engine import check_model
from distill.launcher import EndpointError
from distill.train import corpora
from distill.train.card import StudentCard, TrainResult, write_student_files
from distill.train.cross_tokenizer import Coverage, CrossCollator, CrossTokenizer, cross_training_data, detect
from distill.train.data import (
    TEACHER_COLUMN,
    DistillCollator,
    TrainingData,
    check_vocabulary,
)
from distill.train.head import lm_head
from distill.train.losses import LossSpec, chunked_distill_loss
from distill.train.onpolicy import on_policy_records, sample
from distill.train.resume import (
    CHECKPOINT_DONE,
    TRAINING_DATA,
    changed_settings,
    is_first_process,
    start_from,
)
from distill.train.routed_teachers import RoutedTeachers, routed_teachers
from distill.train.scoring import pad_token_id, teacher_forced
from distill.train.tracked import (
    active,
    log_result,
    open_training_run,
    trainer_callbacks,
    trainer_report_to,
)


class DistillTrainer(SFTTrainer):
    def __init__(self, *args, distill: TrainConfig, teacher: RoutedTeachers | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.distill = distill
        self.offline_loss, self.on_policy_loss = LossSpec.from_config(distill), LossSpec.on_policy(distill)
        self.teacher = teacher  # set: on-policy training against these served teachers
        self.on_policy_rng = np.random.default_rng(distill.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.distill
        # An on-policy step (`training_step`) carries two batches, each with its own loss, both
        # divided by the targets of the two together.
        mixed = "on_policy" in inputs
        parts = [(inputs.get("offline"), cfg.alpha, self.offline_loss),
                 (inputs["on_policy"], 1.0, self.on_policy_loss)] if mixed else [(inputs, cfg.alpha, self.offline_loss)]
        parts = [part for part in parts if part[0] is not None]
        targets = sum(int(batch["target_mask"].sum()) for batch, _, _ in parts)
        # As Trainer.compute_loss: `num_items_in_batch` counts the targets of every process.
        scale = self.accelerator.num_processes if num_items_in_batch is not None and \
            self.args.average_tokens_across_devices else 1
        loss = 0.0
        for batch, alpha, spec in parts:
            on_policy = batch is inputs.get("on_policy")
            out, part_loss, terms = self._batch_loss(model, batch, alpha, spec, targets if mixed else num_items_in_batch,
                                                     measure_on_policy=model.training and on_policy)
            loss = loss + part_loss * scale
            if model.training and not on_policy:
                # per target of this batch: in an on-policy step the terms were divided by both batches' targets
                self._log_terms(terms, targets / max(int(batch["target_mask"].sum()), 1) if mixed else scale)
        if model.training:
            self._check_finite(loss)
        return (loss, out) if return_outputs else loss

    def _batch_loss(self, model, batch: dict, alpha: float, spec: LossSpec, num_items, measure_on_policy: bool):
        """The loss of one collated batch (`(model output, loss, its terms)`), divided by `num_items`;
        with `measure_on_policy` (a batch of the student's samples) it logs `on_policy_kl`."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=True, logits_to_keep=1, use_cache=False)
        with lm_head(self.accelerator.unwrap_model(model)) as (weight, bias):
            loss, terms = chunked_distill_loss(
                out.hidden_states[-1], weight, batch["labels"].clamp(min=0), batch["topk_ids"],
                batch["topk_logprobs"], batch["target_mask"], spec, bias=bias, alpha=alpha,
                chunk_size=self.distill.chunk_size, num_items=num_items)
            if measure_on_policy:  # measured while the head is at hand
                self._metrics["train"]["on_policy_kl"].append(
                    self._forward_kl(out, weight, bias, batch, spec, terms, num_items))
        return out, loss, terms

    def _log_terms(self, terms: dict[str, torch.Tensor], per_target: float) -> None:
        """Log each loss term (kd, ce, ...) per target: the mean over processes, as Trainer logs the
        loss (one process's value would be noise). `gather`, not `gather_for_metrics`: at an epoch's
        end that cuts a tensor to the last batch's leftover rows, and with one row left it cut
        [kd, ce] to [kd]."""
        names = list(terms)
        values = self.accelerator.gather(torch.stack([terms[n] for n in names]) * per_target)
        for name, value in zip(names, values.view(-1, len(names)).mean(0).tolist()):
            self._metrics["train"][name].append(value)

    def _check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training stopped at step {self.state.global_step + 1}: the loss is {loss.item()}; "
                                     "no model was saved (lower `learning_rate`, or check the corpus)")

    def _forward_kl(self, out, weight, bias, batch, spec: LossSpec, terms, targets) -> float:
        """KL(teacher || student) per token of the student's samples, before this update: the number
        `teacher_scored_kl` and held-out metrics report, whichever divergence the loss uses."""
        tokens = max(int(batch["target_mask"].sum()), 1)
        metric = spec.as_metric()
        if (spec.kind, spec.temperature) == (metric.kind, metric.temperature):  # the loss's KD term is it
            return terms["kd"].item() * targets / tokens
        with torch.no_grad():
            _, measured = chunked_distill_loss(
                out.hidden_states[-1], weight, batch["labels"].clamp(min=0), batch["topk_ids"],
                batch["topk_logprobs"], batch["target_mask"], metric, bias=bias, alpha=1.0,
                chunk_size=self.distill.chunk_size)
        return measured["kd"].item()

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.teacher is None:
            return super().training_step(model, inputs, num_items_in_batch)
        inputs = self._on_policy_batch(model, inputs)
        started = time.perf_counter()
        # The targets are no longer those Trainer counted: each micro-batch is its own mean, and
        # Trainer divides it by the accumulation steps.
        loss = super().training_step(model, inputs, None)
        self._metrics["train"]["optimise_s"].append(time.perf_counter() - started)
        return loss

    def _on_policy_batch(self, model, inputs: dict) -> dict:
        """A share `lmbda` of the batch's rows (stochastically rounded, so any batch size gets that
        share on average) replaced by the student's continuations of their prompts, scored by the teacher."""
        cfg = self.distill
        rows = inputs["input_ids"].shape[0]
        n = min(rows, int(cfg.lmbda * rows + self.on_policy_rng.random()))
        offline = {key: value[n:] for key, value in inputs.items()} if n < rows else None
        if n == 0:
            return {"offline": offline}
        lengths = inputs["prompt_lengths"][:n].tolist()
        prompts = [inputs["input_ids"][i, :p].tolist() for i, p in enumerate(lengths)]
        student = self.accelerator.unwrap_model(model)
        started = time.perf_counter()
        responses = sample(student, prompts, max_new_tokens=min(cfg.max_new_tokens, cfg.max_length - min(lengths)),
                           temperature=cfg.sample_temperature, pad_token_id=self.data_collator.pad_token_id,
                           eos_token_id=student.generation_config.eos_token_id or self.processing_class.eos_token_id)
        sampled = time.perf_counter()
        routes = inputs[TEACHER_COLUMN][:n].tolist() if TEACHER_COLUMN in inputs else None
        collated = self._scored_samples(inputs, prompts, responses, routes)
        metrics = self._metrics["train"]
        metrics["sample_s"].append(sampled - started)
        metrics["score_s"].append(time.perf_counter() - sampled)
        return {"offline": offline, "on_policy": self._prepare_inputs(collated)}

    def _scored_samples(self, inputs: dict, prompts: list[list[int]], responses: list[list[int]],
                        routes: list[int] | None) -> dict:
        """The student's samples (the first rows of `inputs`), scored by their teachers (`routes`),
        collated as this trainer's batches; logs `teacher_tokens`."""
        cfg = self.distill
        scored = self.teacher.score_pairs(list(zip(prompts, responses)), cfg.teacher_top_k, routes)
        self._metrics["train"]["teacher_tokens"].append(sum(len(r) for r in responses))
        return DistillCollator(self.data_collator.pad_token_id, cfg.max_length, cfg.teacher_top_k)(
            on_policy_records(prompts, responses, scored))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        metrics = self._metrics["train"]
        if self.model.training and metrics.get("score_s"):
            spent = {key: sum(metrics.get(f"{key}_s", [])) for key in ("sample", "score", "optimise")}
            total = sum(spent.values()) or 1.0
            for key, seconds in spent.items():
                metrics[f"{key}_share"] = [seconds / total]
            metrics["teacher_tokens_per_s"] = [sum(metrics["teacher_tokens"]) / max(spent["score"], 1e-9)]
        super().log(logs, start_time)


class MarkCompleteCheckpoints(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            files.atomic_write(Path(args.output_dir) / f"checkpoint-{state.global_step}" / CHECKPOINT_DONE, "")


class StopOnNonFinite(TrainerCallback):
    """A NaN gradient can leave the loss finite while it destroys the weights: stop at the first
    logged non-finite gradient norm, before the model is saved."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        norm = (logs or {}).get("grad_norm")
        if norm is not None and not math.isfinite(float(norm)):
            raise FloatingPointError(f"training stopped at step {state.global_step}: the gradient norm is {norm}; "
                                     "no model was saved (lower `learning_rate`, or check the corpus)")


class JsonlMetrics(TrainerCallback):
    """One line per log. A run that starts at step N (resumed from checkpoint-N, or 0 when fresh)
    first drops the lines of later steps, which a killed run logged after its last complete
    checkpoint: the file stays one curve, never two overlapping ones."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.path.exists():
            lines = self.path.read_text().splitlines(keepends=True)
            files.atomic_write(self.path, "".join(l for l in lines if json.loads(l)["step"] <= state.global_step))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def check_launch(gpu: bool, lora: bool) -> None:
    """Refuse, before anything loads, the `accelerate launch` set-ups this trainer cannot honour
    (the launcher says which in its environment)."""
    fsdp = os.environ.get("ACCELERATE_USE_FSDP") == "true"
    if fsdp and not gpu:
        raise ValueError("FSDP needs GPUs: on CPU the processes would silently train as plain DDP; launch with "
                         "examples/accelerate/ddp.yaml")
    if fsdp and os.environ.get("FSDP_VERSION", "1") != "2":
        raise ValueError("FSDP1 is not supported: set `fsdp_version: 2` (examples/accelerate/fsdp.yaml)")
    zero3 = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    if zero3 and lora:
        # transformers builds every model of a ZeRO-3 process partitioned, the merged one included
        raise ValueError("LoRA under DeepSpeed ZeRO-3 is not supported (the adapter cannot be merged into a "
                         "partitioned model): train with --no-lora, or launch LoRA with examples/accelerate/ddp.yaml or fsdp.yaml")


def train(cfg: TrainConfig, callbacks: Sequence[TrainerCallback] = ()) -> TrainResult:
    """`callbacks`: more `transformers.TrainerCallback`s for this run (`distill sweep` reports held-out
    scores to its pruner from one; an exception one raises stops training, nothing is saved)."""
    check_launch(torch.cuda.is_available(), cfg.lora)
    tracking.check_installed(cfg.report_to)
    # Under torchrun every rank writes into `out`: the first one holds it for all of them.
    with files.exclusive(cfg.out) if is_first_process() else contextlib.nullcontext():
        try:
            return _train(cfg, callbacks)
        except Exception as e:
            if files.is_disk_full(e, cfg.out):  # else a serializer traceback that never names disk space
                raise files.DiskFull(f"no space left on device writing `{cfg.out}`; free space and rerun the same "
                                     "command: it resumes from the newest complete checkpoint") from None
            raise


def _train(cfg: TrainConfig, callbacks: Sequence[TrainerCallback]) -> TrainResult:
    start = time.time()
    check_model(cfg.student, "student")
    online = None
    if cfg.teacher:
        from distill.train.online import check_online

        check_model(cfg.teacher, "teacher")
        online = check_online(cfg)  # from the configs, before the corpus is read or a model loads
    manifests = corpora.read_manifests(cfg)  # a chat dataset's needs the checked teacher
    viewed = [m.generation.student_view for m in manifests if m.generation.student_view]
    if cfg.on_policy and viewed:
        # the student samples after its view of the prompt; the teacher would score that without the full context
        raise ValueError(f"`on_policy` with a student-view corpus (view {viewed[0]}) is not supported: train it offline")
    # A run resumed with the same settings continues its tracked run; with others (`--resume`) it opens a new one.
    continues_run = not changed_settings(cfg, Path(cfg.out))
    resume = start_from(cfg, Path(cfg.out))  # refuses another run's `out` before the corpus is read
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.student)
    # a student of another tokenizer trains on its own tokens of the texts, not the stored ids
    cross = detect(cfg, manifests[0], tokenizer)  # all corpora share the first one's tokenizer
    # The decoded training records, one file per process, removed when training ends (and at the
    # start of the next run, if a kill left it).
    scratch = Path(cfg.out) / TRAINING_DATA / f"rank-{os.environ.get('RANK', '0')}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        coverage = None
        if cross is None:
            data = corpora.prepare(cfg, manifests, scratch)
        else:  # the student's own tokens of the teacher's texts replace the stored ids (train/cross_tokenizer.py)
            data, coverage = cross_training_data(cfg.corpora[0], cross, cfg.max_length, scratch)
            print(f"cross-tokenizer ({cross.kind}): {coverage.aligned_share:.1%} of the student's "
                  f"{coverage.student_tokens:,} response tokens aligned; {coverage.one_to_one_share:.1%} of the spans "
                  f"1:1, {coverage.mapped_topk_mass:.1%} of their teacher top-k mass on tokens the student has")
        if data.skipped:
            print(f"skipped {data.skipped} records whose prompt fills max_length {cfg.max_length}")
        return _fit(cfg, manifests, data, tokenizer, cross, coverage, resume, start, callbacks,
                    continues_run=resume is not None and continues_run, online=online)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        with contextlib.suppress(OSError):  # another process's data may still be there
            scratch.parent.rmdir()


def _fit(cfg: TrainConfig, manifests: list[corpus.Manifest], data: TrainingData, tokenizer,
         cross: CrossTokenizer | None, coverage: Coverage | None, resume: Path | None, start: float,
         callbacks: Sequence[TrainerCallback] = (), continues_run: bool = False, online=None) -> TrainResult:
    """Train on the prepared records, from `resume` (a checkpoint) or from step 0; `cross`: the plan
    of a student of another tokenizer, and `coverage` its records' (`cross_training_data`);
    `continues_run`: in the tracked run the checkpoint's run logged to; `manifests`: one per corpus,
    in `cfg.corpora` order; `online`: the checked `online.OnlinePlan` when `cfg.teacher` runs in
    this process."""
    from transformers import AutoModelForCausalLM

    manifest = manifests[0]  # all share its tokenizer (`corpora.read_manifests`)
    # a subclass of this module's trainer, so imported here
    from distill.train.cross_trainer import CrossTokenizerTrainer

    out = Path(cfg.out)
    gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=torch.bfloat16 if gpu else torch.float32)
    if cross is None:
        check_vocabulary(manifest, tokenizer, model.get_output_embeddings().weight.shape[0], data.max_token_id)
    teacher = None
    if cfg.on_policy:  # the served teacher reads its own tokens: across tokenizers, the teacher's
        teacher = routed_teachers(cfg, tokenizer) if cross is None else routed_teachers(cfg, cross.teacher, "teacher")
    # one process logs (under torchrun every rank trains); a resumed run continues its tracked run
    run = open_training_run(cfg, manifest, continues_run) if is_first_process() else None

    train_data, eval_data = held_out_split(data.dataset, cfg)

    peft_config = None
    if cfg.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    workers = cfg.dataloader_workers if cfg.dataloader_workers is not None else 2 if gpu else 0
    args = SFTConfig(
        output_dir=str(out / "checkpoints"), per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1, learning_rate=cfg.learning_rate,
        # transformers >= 5 reads a warmup_steps below 1 as a share of the steps (warmup_ratio is gone)
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps, save_steps=cfg.save_steps, eval_strategy="steps" if eval_data else "no",
        eval_steps=cfg.save_steps, seed=cfg.seed, bf16=gpu, use_cpu=not gpu,
        ddp_backend="gloo" if not gpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        gradient_checkpointing=cfg.gradient_checkpointing,
        # a step waits for its batch where the training process collates it (benchmarks/train_batches.py)
        dataloader_num_workers=workers, dataloader_persistent_workers=workers > 0,
        # the online teacher's hidden-state projections run outside the model's forward: DDP's search for
        # unused parameters would mark them unused there and then see their gradients (every weight is used)
        ddp_find_unused_parameters=False if online is not None and online.projection else None,
        remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
        report_to=trainer_report_to(cfg), run_name=run.run_name if run else cfg.run_name, max_length=None)
    top_k, teachers = corpora.top_k_width(cfg, manifests)
    if cross is None:
        collator = DistillCollator(pad_token_id=pad_token_id(tokenizer), max_length=cfg.max_length, top_k=top_k,
                                   teachers=teachers)
    else:
        collator = CrossCollator(pad_token_id=pad_token_id(tokenizer), max_length=cfg.max_length, top_k=top_k,
                                 student_first_byte=cross.vocabularies.student_first_byte)
    trainer_class, extra = DistillTrainer, {}
    if cross is not None:
        trainer_class, extra = CrossTokenizerTrainer, {"plan": cross}
    elif online is not None:
        from distill.train.online import OnlineDistillTrainer, load_teacher

        trainer_class = OnlineDistillTrainer
        extra = {"teacher_model": load_teacher(cfg.teacher, model.dtype), "plan": online}
    trainer = trainer_class(model=model, args=args, train_dataset=train_data, eval_dataset=eval_data,
                            processing_class=tokenizer, data_collator=collator, peft_config=peft_config,
                            callbacks=[JsonlMetrics(out / "metrics.jsonl"), MarkCompleteCheckpoints(), StopOnNonFinite(),
                                       *trainer_callbacks(run), *callbacks],
                            distill=cfg, teacher=teacher, **extra)
    # held-out KL on the stored top-k needs the teacher's ids: a cross-tokenizer run, or one on a chat
    # dataset (no top-k stored), logs only `eval_loss`
    scored = eval_data is not None and cross is None and top_k > 0
    initial = held_out_metrics(trainer, eval_data, collator, cfg) if scored else {}
    try:
        with active(run):
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except EndpointError as e:
        raise EndpointError(f"{e} Training stopped at step {trainer.state.global_step}; rerun the same command to "
                            f"continue from the newest complete checkpoint in {out / 'checkpoints'}") from None
    final = held_out_metrics(trainer, eval_data, collator, cfg) if scored else {}
    card = StudentCard.of_run(cfg, manifests, trainer.state.global_step, trainer.state.log_history, initial, final,
                              time.time() - start,
                              cross_tokenizer=None if cross is None else {"kind": cross.kind, **coverage.as_dict(),
                                                                           "same_vocabulary_share": cross.vocabularies.same_share})
    _save(trainer, out, cfg, model.dtype)
    if trainer.is_world_process_zero():  # under torchrun / accelerate launch, one process writes
        write_student_files(out, cfg, card)
        log_result(run, out, trainer.state.global_step, initial, final)
    return TrainResult(out, card)


def held_out_split(dataset, cfg: TrainConfig) -> tuple[Any, Any]:
    """(train, held-out) records: `eval_fraction` of them held out, at most `eval_max_records`
    (seeded; None held out when `eval_fraction` is 0)."""
    if not cfg.eval_fraction:
        return dataset, None
    # the share as a float, as `datasets` rounds it, unless the cap applies
    size = cfg.eval_max_records if math.ceil(cfg.eval_fraction * len(dataset)) > cfg.eval_max_records else cfg.eval_fraction
    split = dataset.train_test_split(test_size=size, seed=cfg.seed)
    return split["train"], split["test"]


def held_out_metrics(trainer: DistillTrainer, data, collator: DistillCollator, cfg: TrainConfig) -> dict[str, float]:
    """Held-out KL to the teacher (forward KL on the stored top-k), CE, and top-1 agreement."""
    scored = teacher_forced(trainer.model, data, collator, cfg.batch_size, trainer.offline_loss.as_metric(),
                            chunk_size=cfg.chunk_size)
    return {"eval_kl": scored.kl, "eval_ce": scored.nll, "eval_top1_agreement": scored.top1_agreement,
            "eval_tokens": scored.tokens}


def _save(trainer: DistillTrainer, out: Path, cfg: TrainConfig, dtype: torch.dtype) -> None:
    """The model vLLM serves goes to `out` (safetensors); LoRA's adapter to `out/adapter` (with
    `keep_adapter`, only the adapter and its tokenizer: served on its base by `distill serve --lora`).
    Every process calls this: under ZeRO-3 / FSDP `save_model` gathers the shards (a collective)
    and the first process writes. The merged LoRA model is rebuilt from the saved files, so
    merging never depends on how training sharded the model."""
    if not cfg.lora:
        trainer.save_model(str(out))
        return
    trainer.save_model(str(out / ADAPTER_DIR))
    if cfg.keep_adapter:
        return
    if trainer.is_world_process_zero():
        from peft import AutoPeftModelForCausalLM

        merged = AutoPeftModelForCausalLM.from_pretrained(out / ADAPTER_DIR, dtype=dtype).merge_and_unload()
        merged.save_pretrained(out, safe_serialization=True)
        trainer.processing_class.save_pretrained(out)
