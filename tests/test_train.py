"""`distill train` end to end on a vLLM-generated corpus with the real TRL trainer."""

import json

import pytest

from distill.config import GenerateConfig, TrainConfig
from distill.generate import generate
from distill.train.card import StudentCard
from distill.train.trainer import CHECKPOINT_DONE, train
from tests.helpers import in_child, logged_steps, write_jsonl

pytestmark = pytest.mark.engine  # the corpus comes from the vLLM teacher


@pytest.fixture(scope="module")
def teacher_corpus(tiny_models, teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    prompts = write_jsonl(root / "p.jsonl", [{"prompt": f"Sort the numbers {i} {i * 3 % 7} {i % 4}"} for i in range(24)])
    return generate(GenerateConfig(teacher=str(tiny_models["llama-teacher"]), prompts=prompts, out=root / "corpus",
                                   max_tokens=24, samples=2, top_k=20), teacher=teacher).path


@pytest.mark.slow
def test_student_learns_the_teacher(tmp_path, tiny_models, teacher_corpus):
    out = train(TrainConfig(corpus=teacher_corpus, student=str(tiny_models["llama-student"]), out=tmp_path / "s",
                            lora=False, max_steps=200, batch_size=8, learning_rate=1e-2, logging_steps=20,
                            save_steps=100, eval_fraction=0.2, chunk_size=64)).path
    card = json.loads((out / "distill.json").read_text())
    before, after = card["initial"], card["final"]
    print("held-out before/after:", before, after)
    assert card["steps"] == 200 and card["last_loss"] < card["first_loss"]
    assert after["eval_kl"] < 0.8 * before["eval_kl"]  # direction, with margin
    # the random-weight teacher answers with token soup: little to generalise, so a small margin
    assert after["eval_top1_agreement"] > before["eval_top1_agreement"] + 0.02
    assert (out / "loss.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def lora_student(tiny_models, teacher_corpus, tmp_path_factory):
    return train(TrainConfig(corpus=teacher_corpus, student=str(tiny_models["llama-student"]),
                             out=tmp_path_factory.mktemp("lora") / "s", max_steps=20, batch_size=8, learning_rate=2e-2,
                             logging_steps=5, save_steps=10, eval_fraction=0.2, chunk_size=16, lora_r=8,
                             gradient_checkpointing=True))


@pytest.mark.slow
def test_lora_student_is_saved_for_serving(tiny_models, lora_student):
    from transformers import AutoModelForCausalLM

    out = lora_student.path
    card = json.loads((out / "distill.json").read_text())
    assert StudentCard.load(out) == lora_student.card  # distill.json is the returned card
    assert card["steps"] == 20 and card["last_loss"] < card["first_loss"]
    assert card["teacher"]["model"] == str(tiny_models["llama-teacher"]) and card["history"][-1]["stage"] == "train"
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("kd" in m and "ce" in m for m in metrics)
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain model dir: what vLLM serves
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert "Distilled student" in (out / "README.md").read_text()


def test_a_copy_of_the_teacher_has_zero_kl_and_full_agreement(tmp_path, tiny_models, teacher_corpus):
    out = train(TrainConfig(corpus=teacher_corpus, student=str(tiny_models["llama-teacher"]), out=tmp_path / "copy",
                            lora=False, max_steps=1, learning_rate=1e-12, eval_fraction=0.25, batch_size=4)).path
    final = json.loads((out / "distill.json").read_text())["final"]
    assert final["eval_kl"] < 1e-2 and final["eval_top1_agreement"] > 0.97


def test_resume_continues_from_the_checkpoint(tmp_path, tiny_models, teacher_corpus):
    common = dict(corpus=teacher_corpus, student=str(tiny_models["llama-student"]), out=tmp_path / "r",
                  batch_size=8, save_steps=2, eval_fraction=0.0, logging_steps=1)
    train(TrainConfig(max_steps=2, **common))
    out = train(TrainConfig(max_steps=4, resume=True, **common)).path
    assert logged_steps(out) == [1, 2, 3, 4]  # steps 3-4 continued from checkpoint-2, not from scratch

    # As if killed while writing checkpoint-4, after steps 3-4 were logged: the rerun resumes from
    # checkpoint-2 and its metrics replace the killed run's steps 3-4 instead of repeating them.
    (out / "checkpoints" / "checkpoint-4" / CHECKPOINT_DONE).unlink()
    train(TrainConfig(max_steps=4, resume=True, **common))
    assert logged_steps(out) == [1, 2, 3, 4]


def test_rerunning_the_same_command_resumes_and_a_finished_student_is_kept(tmp_path, tiny_models, teacher_corpus):
    cfg = TrainConfig(corpus=teacher_corpus, student=str(tiny_models["llama-student"]), out=tmp_path / "s",
                      max_steps=4, batch_size=8, save_steps=2, eval_fraction=0.0, logging_steps=1)
    out = train(cfg).path
    # As a kill during step 4's checkpoint leaves it: no student yet, checkpoint-4 half written.
    (out / "distill.json").unlink()
    (out / "checkpoints" / "checkpoint-4" / CHECKPOINT_DONE).unlink()
    kept = (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match=r"other settings \(max_steps differ\)"):
        train(cfg.model_copy(update={"max_steps": 2}))
    train(cfg)  # the same command, no --resume: what the interrupt message tells the user to do
    assert (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").stat().st_mtime_ns == kept  # not redone
    assert logged_steps(out) == [1, 2, 3, 4]
    card = (out / "distill.json").read_bytes()
    with pytest.raises(FileExistsError, match="holds a finished student"):
        train(cfg)
    assert (out / "distill.json").read_bytes() == card
    train(cfg.model_copy(update={"max_steps": 2, "overwrite": True}))
    assert logged_steps(out) == [1, 2] and not (out / "checkpoints" / "checkpoint-4").exists()


def test_student_with_another_vocabulary_is_refused(tmp_path, tiny_models, teacher_corpus):
    import shutil

    from distill.tiny import build_model, build_tokenizer

    swapped = tmp_path / "swapped"  # the student's tokenizer with ids 100 and 101 exchanged
    shutil.copytree(tiny_models["llama-student"], swapped)
    spec = json.loads((swapped / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted((t for t, i in vocab.items() if i in (100, 101)), key=vocab.get)
    vocab[a], vocab[b] = 101, 100
    (swapped / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=rf"vocabularies differ on 2 of the corpus's ids \(id 100: teacher {a!r} "
                                         rf"vs student {b!r}"):
        train(TrainConfig(corpus=teacher_corpus, student=str(swapped), out=tmp_path / "x", max_steps=1))

    build_tokenizer(tmp_path / "tok", vocab_size=300)
    small = build_model(tmp_path / "small", tmp_path / "tok", size="student")
    # another tokenizer trains cross-tokenizer by default (tests/test_cross_tokenizer.py); `off` refuses it
    with pytest.raises(ValueError, match=r"the corpus uses token id \d+ but the student has 300 embeddings"):
        train(TrainConfig(corpus=teacher_corpus, student=str(small), out=tmp_path / "y", max_steps=1,
                          cross_tokenizer="off"))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate-ddp", "deepspeed-zero3"])
def test_two_processes_give_the_single_process_loss_curve_and_model(tmp_path, tiny_models, teacher_corpus, launcher):
    """2 processes x 4 sequences against 1 x 8: the same global batches (each process takes every
    other batch of the same shuffled order), so the same per-token losses (the logged KD and CE
    terms too: means over the processes) and the same saved model up to float rounding.
    `accelerate-ddp` runs the shipped examples/accelerate/ddp.yaml (its MULTI_GPU becomes gloo on CPU); `deepspeed-zero3` the shipped deepspeed-zero3.yaml on
    DeepSpeed's CPU accelerator (gloo), fp32, with a student whose LM head is tied to its
    embeddings: ZeRO-3 partitions that one parameter, which the KD loss gathers outside forward."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from distill.tiny import build_model
    from tests.helpers import ROOT

    student = tiny_models["llama-student"]
    if launcher == "deepspeed-zero3":
        student = build_model(tmp_path / "tied", tiny_models["tokenizer"], "llama", "student", tie_word_embeddings=True)

    def run(name, command, batch_size):
        args = ["-m", "distill.cli", "train", "--corpus", str(teacher_corpus), "--student", str(student),
                "--out", str(tmp_path / name), "--no-lora", "--max-steps", "6", "--batch-size", str(batch_size),
                "--learning-rate", "5e-3", "--logging-steps", "1", "--eval-fraction", "0"]
        done = subprocess.run(command + args, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        logs = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        curve = [value for m in logs if "loss" in m for value in (m["loss"], m["grad_norm"], m["kd"], m["ce"])]
        return curve, load_file(tmp_path / name / "model.safetensors")

    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--config_file"]
    launch = {"torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
              "accelerate-ddp": [*accelerate, str(ROOT / "examples" / "accelerate" / "ddp.yaml")],
              "deepspeed-zero3": [*accelerate, str(ROOT / "examples" / "accelerate" / "deepspeed-zero3.yaml"),
                                  "--mixed_precision", "no"]}[launcher]
    (two, two_model), (single, single_model) = run("two", launch, 4), run("single", [sys.executable], 8)
    assert len(two) == len(single) == 24  # (loss, grad_norm, kd, ce) at each of 6 steps
    assert two == pytest.approx(single, rel=1e-4)
    assert two[-4] < two[0]  # and it learns
    assert two_model.keys() == single_model.keys()
    for name, weight in single_model.items():  # the whole model was saved, not one process's shard
        assert two_model[name].shape == weight.shape, name
        # Adam divides by sqrt(v) + 1e-8: where a gradient is as small as that eps (an embedding row
        # barely used), the rounding difference between a 2-process all-reduce and a 1-process sum is
        # amplified to a share of the learning rate (seen: 1 element of 32,768 off by 1.05e-4). So:
        # every element within 1e-4 but at most 1 in 10,000, and those within the learning rate.
        off = (two_model[name] - weight).abs()
        assert (off > 1e-4).float().mean() <= 1e-4 and off.max() < 5e-3, (name, off.max().item())


@pytest.mark.slow
def test_lora_adapter_and_merged_model_generate_the_same_in_vllm(tiny_models, lora_student):
    from distill import corpus

    prompts = [r["prompt_token_ids"] for r in list(corpus.iter_records(lora_student.card.corpus))[:4]]
    adapted, untouched, from_merged = in_child(greedy_in_vllm, prompts, str(tiny_models["llama-student"]),
                                               str(lora_student.path))
    assert adapted == from_merged  # the merged weights are the adapter applied
    assert adapted != untouched  # and the adapter did change the student


def greedy_in_vllm(prompts: list[list[int]], base_model: str, student: str) -> tuple[list, list, list]:
    """Greedy answers of the base model with the student's adapter and without, and of the merged
    student (in a child process: `in_child`)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    settings = dict(dtype="float32", max_model_len=512, enable_chunked_prefill=False)

    def tokens(outputs):
        return [list(o.outputs[0].token_ids) for o in outputs]

    base = LLM(model=base_model, enable_lora=True, max_lora_rank=8, **settings)
    try:
        adapted = tokens(base.generate(prompts, greedy, use_tqdm=False,
                                       lora_request=LoRARequest("student", 1, f"{student}/adapter")))
        untouched = tokens(base.generate(prompts, greedy, use_tqdm=False))
    finally:
        base.llm_engine.engine_core.shutdown()
    merged = LLM(model=student, **settings)
    try:
        from_merged = tokens(merged.generate(prompts, greedy, use_tqdm=False))
    finally:
        merged.llm_engine.engine_core.shutdown()
    return adapted, untouched, from_merged


@pytest.mark.slow
def test_distill_run_trains_under_accelerate_launch(tmp_path, tiny_models, teacher_corpus):
    """`train: {launcher: accelerate, config_file: ddp.yaml, num_processes: 2}` in a run config:
    `distill run`'s train stage (`launch_train`) starts 2 processes and returns the card rank 0 wrote."""
    from distill.config import TrainSection
    from distill.pipeline import launch_train
    from tests.helpers import ROOT

    launch = TrainSection(launcher="accelerate", config_file=ROOT / "examples" / "accelerate" / "ddp.yaml",
                          num_processes=2)
    cfg = TrainConfig(corpus=teacher_corpus, student=str(tiny_models["llama-student"]), out=tmp_path / "student",
                      max_steps=2, batch_size=4, eval_fraction=0.0, logging_steps=1, resume=True)
    card = launch_train(cfg, launch)
    assert card == StudentCard.load(tmp_path / "student")
    assert card.steps == 2 and card.last_loss is not None and (tmp_path / "student" / "model.safetensors").exists()
    epochs = [json.loads(l)["epoch"] for l in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert epochs[0] == pytest.approx(8 / 48)  # 2 processes x 4 sequences per step: both took part


def test_a_full_disk_during_training_is_one_line(tmp_path, tiny_models, teacher_corpus, capsys):
    """A real full disk: a 1 MiB tmpfs as `out` (mounting needs root: skipped without it)."""
    import subprocess

    from distill.cli import main

    out = tmp_path / "small"
    out.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(out)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        code = main(["train", "--corpus", str(teacher_corpus), "--student", str(tiny_models["llama-student"]),
                     "--out", str(out), "--full", "--max-steps", "2", "--save-steps", "1", "--batch-size", "4",
                     "--eval-fraction", "0"])
        err = capsys.readouterr().err.strip()
    finally:
        subprocess.run(["umount", "--lazy", str(out)], check=False)  # lazy: a failed write may still hold a file
    assert code == 1, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("distill train: error: ")]
    assert errors == [f"distill train: error: no space left on device writing `{out}`; free space and rerun the same "
                      "command: it resumes from the newest complete checkpoint"], err[-2000:]
    assert "Traceback" not in err


def test_train_prints_only_its_result_on_stdout(tmp_path, tiny_models, teacher_corpus):
    """The Trainer's loss dicts (tqdm.write) and DeepSpeed's logger write to stdout: they go to stderr."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    out = tmp_path / "s"
    done = subprocess.run([sys.executable, "-m", "distill.cli", "train", "--corpus", str(teacher_corpus), "--student",
                           str(tiny_models["llama-student"]), "--out", str(out), "--max-steps", "2", "--logging-steps",
                           "1", "--batch-size", "4", "--eval-fraction", "0"], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == f"{out}\n"
    assert "'loss'" in done.stderr  # the loss dicts still show, on stderr
