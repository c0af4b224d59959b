"""What a user gets wrong gets one line, before anything loads or is written; interrupted or
damaged corpora are refused or named; one writer per output directory (issue 16's probes)."""

import errno
import json
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from distill import corpus, files
from distill.cli import main
from tests.helpers import (
    PROMPTS,
    ROOT,
    make_corpus,
    one_line_error,
    record,
    write_jsonl,
)


def incomplete_corpus(root: Path, teacher: str = "t") -> Path:
    """What an interrupted `generate` leaves: shards, `complete: false`, its own history entry."""
    from distill.config import GenerateConfig

    make_corpus(root, [record(i) for i in range(4)])
    manifest = corpus.read_manifest(root)
    manifest.teacher.model = teacher
    manifest.stats.complete = False
    cfg = GenerateConfig(teacher=teacher, prompts="p.jsonl", out=root)
    manifest.history = [corpus.history_entry("generate", cfg, 0.0, complete=False)]
    corpus.write_manifest(root, manifest)
    return root


# -- incomplete corpora ------------------------------------------------------------------------

def test_curate_and_train_refuse_an_incomplete_corpus(tmp_path, capsys, tiny_models):
    source = incomplete_corpus(tmp_path / "c")
    assert main(["curate", "--corpus", str(source), "--out", str(tmp_path / "o")]) == 1
    err = one_line_error(capsys, "curate")
    assert "is incomplete" in err and "`--allow-incomplete`" in err
    assert not (tmp_path / "o").exists()
    assert main(["train", "--corpus", str(source), "--student", str(tiny_models["llama-student"]),
                 "--out", str(tmp_path / "s")]) == 1
    assert "is incomplete" in one_line_error(capsys, "train")


def test_allow_incomplete_carries_completeness_and_history_into_the_curated_corpus(tmp_path, capsys, tiny_models):
    source = incomplete_corpus(tmp_path / "c")
    curated = tmp_path / "curated"
    assert main(["curate", "--corpus", str(source), "--out", str(curated), "--allow-incomplete",
                 "--config", str(write_yaml(tmp_path / "f.yaml", {"filters": ["finish_reason"]}))]) == 0
    manifest = corpus.read_manifest(curated)
    assert manifest.stats.complete is False and manifest.stats.records == 4
    assert [(h["stage"], h["complete"]) for h in manifest.history] == [("generate", False), ("curate", True)]
    assert manifest.history[1]["config"]["allow_incomplete"] is True
    capsys.readouterr()
    # the curated corpus is as incomplete as its source: train refuses it too
    assert main(["train", "--corpus", str(curated), "--student", str(tiny_models["llama-student"]),
                 "--out", str(tmp_path / "s")]) == 1
    assert "is incomplete" in one_line_error(capsys, "train")


def test_a_student_trained_with_allow_incomplete_says_so(tmp_path, tiny_models):
    from distill.config import TrainConfig
    from distill.train.trainer import train

    source = incomplete_corpus(tmp_path / "c", teacher=str(tiny_models["llama-teacher"]))
    card = train(TrainConfig(corpus=source, student=str(tiny_models["llama-student"]), out=tmp_path / "s",
                             max_steps=1, batch_size=2, eval_fraction=0, allow_incomplete=True)).card
    assert card.corpus_complete is False
    assert json.loads((tmp_path / "s" / "distill.json").read_text())["corpus_complete"] is False
    assert "incomplete" in (tmp_path / "s" / "README.md").read_text()


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# -- damaged shards ------------------------------------------------------------------------------

def two_shard_corpus(root: Path) -> Path:
    corpus.write_shard(root, 0, corpus.records_to_table([record(0), record(1)], 4))
    corpus.write_shard(root, 1, corpus.records_to_table([record(2), record(3)], 4))
    corpus.write_manifest(root, corpus.Manifest(teacher={"model": "t"}, generation={"top_k": 4},
                                                stats=corpus.corpus_stats(root)))
    return root


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_inspect_names_a_truncated_shard_and_a_count_mismatch(tmp_path, capsys):
    root = two_shard_corpus(tmp_path / "c")
    truncate(root / "data" / "part-00001.parquet")
    assert main(["inspect", str(root)]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "data/part-00001.parquet` is unreadable" in out
    root = two_shard_corpus(tmp_path / "d")
    (root / "data" / "part-00001.parquet").unlink()
    assert main(["inspect", str(root)]) == 1
    assert "the manifest says 4 records in 2 shards, the shards hold 2 records in 1" in \
        " ".join(capsys.readouterr().out.split())


def test_validate_names_an_unreadable_shard(tmp_path):
    root = two_shard_corpus(tmp_path / "c")
    truncate(root / "data" / "part-00000.parquet")
    with pytest.raises(corpus.CorpusError, match=r"data/part-00000.parquet` is unreadable \("):
        corpus.validate(root)


def test_resume_over_a_damaged_shard_names_it_and_the_remedy(tmp_path, capsys, tiny_models):
    from distill.config import GenerateConfig
    from distill.generate.job import CorpusJob

    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out"
    flags = ["--teacher", str(tiny_models["llama-teacher"]), "--prompts", str(prompts), "--out", str(out),
             "--chunk-size", "2", "--max-model-len", "512", "--max-tokens", "16"]
    # The state an interrupted run leaves: its manifest (same settings), a shard damaged since.
    job = CorpusJob(GenerateConfig(teacher=str(tiny_models["llama-teacher"]), prompts=prompts, out=out, chunk_size=2,
                                   max_model_len=512, max_tokens=16), prompts, scoring=False)
    job._prepare()
    corpus.write_shard(out, 0, corpus.records_to_table([record(0)], 4))
    (out / "data" / "part-00001.parquet").write_bytes(b"PAR1 and then the disk failed")
    corpus.write_manifest(out, corpus.Manifest(**job.identity, stats=corpus.CorpusStats(complete=False)))
    assert main(["generate", *flags]) == 1
    err = one_line_error(capsys, "generate")
    assert f"`{out}/data/part-00001.parquet` is unreadable (" in err
    assert err.endswith(": delete it and rerun to regenerate its records")


def test_a_full_disk_is_one_line_and_keeps_the_finished_shards(tmp_path, capsys, monkeypatch):
    """A simulated full disk: the Parquet writer raises ENOSPC from the second shard on."""
    import pyarrow.parquet as pq

    source = two_shard_corpus(tmp_path / "c")
    real_write = pq.write_table
    written = []

    def full_after_one_shard(table, where, **kwargs):
        if written:
            raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
        written.append(where)
        real_write(table, where, **kwargs)

    monkeypatch.setattr(pq, "write_table", full_after_one_shard)
    out = tmp_path / "out"
    assert main(["curate", "--corpus", str(source), "--out", str(out), "--config",
                 str(write_yaml(tmp_path / "f.yaml", {"filters": ["finish_reason"]}))]) == 1
    err = one_line_error(capsys, "curate")
    assert f"no space left on device writing shard 1 (`{out}/data/part-00001.parquet`)" in err
    # generate's "the finished shards are kept" is no help here: curate starts over (issue 31)
    assert err.endswith("free space and rerun the same command: curation starts over (no --overwrite needed)")
    assert [p.name for p in corpus.shard_paths(out)] == ["part-00000.parquet"]
    assert not list(out.rglob(files.PARTIAL_GLOB))


# -- one writer per output directory ---------------------------------------------------------------

@contextmanager
def held(out: Path):
    """Another process holding `out` the way every writing command does."""
    code = "import sys, time\nfrom distill import files\nwith files.exclusive(sys.argv[1]):\n" \
           "    print('held', flush=True)\n    time.sleep(120)\n"
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def commands(tmp_path: Path, tiny_models, out: Path) -> dict[str, list[str]]:
    teacher, student = str(tiny_models["llama-teacher"]), str(tiny_models["llama-student"])
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    source = make_corpus(tmp_path / "c", [record(0)])
    config = write_yaml(tmp_path / "run.yaml", {
        "out": str(out), "teacher": {"model": teacher}, "student": {"model": student},
        "prompts": {"train": str(prompts), "eval": str(prompts)}})
    return {
        "generate": ["--teacher", teacher, "--prompts", str(prompts), "--out", str(out)],
        "score": ["--teacher", teacher, "--data", str(prompts), "--out", str(out)],
        "curate": ["--corpus", str(source), "--out", str(out)],
        "train": ["--corpus", str(source), "--student", student, "--out", str(out)],
        "eval": ["--student", student, "--teacher", teacher, "--prompts", str(prompts), "--out", str(out)],
        "run": [str(config), "--only", "eval"],
    }


@pytest.mark.parametrize("command", ["generate", "score", "curate", "train", "eval", "run"])
def test_a_second_writer_into_the_same_out_fails_at_once(tmp_path, capsys, tiny_models, command):
    out = tmp_path / "out"
    args = commands(tmp_path, tiny_models, out)[command]
    with held(out) as holder:
        assert main([command, *args]) == 1
        assert one_line_error(capsys, command) == \
            f"distill {command}: error: `{out}` is in use by pid {holder.pid}: wait for it to finish or choose " \
            "another output directory"


def test_a_killed_holder_frees_the_directory_and_no_lock_file_stays(tmp_path, capsys, tiny_models):
    out = tmp_path / "out"
    args = commands(tmp_path, tiny_models, out)["curate"]
    with held(out) as holder:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert (out / files.LOCK_NAME).exists()  # a dead holder's file: its lock went with it
        assert main(["curate", *args]) == 0
    assert corpus.validate(out)["records"] == 1
    assert not (out / files.LOCK_NAME).exists()


def test_the_lock_leaves_no_trace(tmp_path):
    with files.exclusive(tmp_path / "new") as out:
        assert files.is_empty(out) and (out / files.LOCK_NAME).exists()
        with files.exclusive(out / "stage"):  # `distill run` holds the run, each stage its own folder
            pass
    assert not (tmp_path / "new").exists()  # created here and left empty: removed
    with files.exclusive(tmp_path):
        (tmp_path / "kept").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


# -- models, paths and files ---------------------------------------------------------------------------

@pytest.mark.parametrize("teacher", ["{tmp}/no-such-model", "./no/such/model", "~/no-such-model", "runs/no/such"])
def test_a_teacher_path_that_does_not_exist_is_not_found_not_a_hub_error(tmp_path, capsys, teacher):
    teacher = teacher.format(tmp=tmp_path)
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    assert main(["generate", "--teacher", teacher, "--prompts", str(prompts), "--out", str(tmp_path / "o")]) == 1
    err = one_line_error(capsys, "generate")
    assert f"`teacher`: model `{teacher}` not found" in err and "Repo id" not in err
    assert not (tmp_path / "o").exists()


def test_hub_ids_pass_through_untouched():
    from distill.engine import check_model

    for hub_id in ("Qwen/Qwen2.5-7B-Instruct", "gpt2", "meta-llama/Llama-3.1-8B-Instruct"):
        check_model(hub_id, "teacher")


def test_a_model_dir_without_config_or_tokenizer_is_named(tmp_path, capsys, tiny_models):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_models["llama-teacher"], no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    assert main(["generate", "--teacher", str(no_tokenizer), "--prompts", str(prompts), "--out", str(tmp_path / "o")]) == 1
    assert f"`teacher`: `{no_tokenizer}` has no tokenizer (none of tokenizer.json" in one_line_error(capsys, "generate")
    (tmp_path / "empty").mkdir()
    assert main(["train", "--corpus", str(make_corpus(tmp_path / "c", [record(0)])), "--student", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "s")]) == 1
    assert f"`student`: `{tmp_path / 'empty'}` is not a model directory (no config.json)" in one_line_error(capsys, "train")


def test_run_checks_the_models_before_writing_anything(tmp_path, capsys, tiny_models):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    config = write_yaml(tmp_path / "run.yaml", {
        "out": str(tmp_path / "run"), "teacher": {"model": str(tmp_path / "missing-teacher")},
        "student": {"model": str(tiny_models["llama-student"])}, "prompts": {"train": str(prompts), "eval": str(prompts)}})
    assert main(["run", str(config)]) == 1
    assert "`teacher.model`: model" in one_line_error(capsys, "run")
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file_is_one_line(tmp_path, capsys, tiny_models):
    taken = tmp_path / "taken"
    taken.write_text("not a directory")
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    assert main(["generate", "--teacher", str(tiny_models["llama-teacher"]), "--prompts", str(prompts),
                 "--out", str(taken)]) == 1
    assert f"`{taken}` is a file, not a directory" in one_line_error(capsys, "generate")
    source = make_corpus(tmp_path / "c", [record(0)])
    assert main(["curate", "--corpus", str(source), "--out", str(taken), "--overwrite"]) == 1
    assert f"`{taken}` is a file, not a directory" in one_line_error(capsys, "curate")
    assert taken.read_text() == "not a directory"


def test_a_directory_given_as_the_prompt_file(tmp_path, capsys, tiny_models):
    assert main(["generate", "--teacher", str(tiny_models["llama-teacher"]), "--prompts", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 1
    assert one_line_error(capsys, "generate").endswith(f"`{tmp_path}` is a directory, not a prompt file")


def test_yaml_syntax_errors_name_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("corpus: c\nout: [o\nfilters: x\n")
    assert main(["curate", "--config", str(bad)]) == 1
    assert f"`{bad}:3:" in one_line_error(capsys, "curate")
    assert main(["run", str(bad)]) == 1
    assert f"`{bad}:3:" in one_line_error(capsys, "run")


def test_non_utf8_prompt_line_is_one_line_naming_it(tmp_path, capsys, tiny_models):
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9 latin-1"}\n{"prompt": "also fine"}\n')
    assert main(["generate", "--teacher", str(tiny_models["llama-teacher"]), "--prompts", str(prompts),
                 "--out", str(tmp_path / "o")]) == 1
    err = one_line_error(capsys, "generate")
    assert f"{prompts} line 2: not UTF-8 (byte 0xe9 at byte 16 of the line)" in err and "`--skip-bad`" in err


# -- serve pre-checks ------------------------------------------------------------------------------------

def test_serve_on_a_busy_port_or_a_dir_without_config_is_one_line(tmp_path, capsys, tiny_models):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", str(tiny_models["llama-student"]), "--port", str(port)]) == 1
        assert f"`port` {port} on 127.0.0.1 is not available" in one_line_error(capsys, "serve")
        assert main(["serve", "--model", str(tiny_models["llama-student"]), "--port", "0", "--ui",
                     "--ui-port", str(port)]) == 1
        assert f"`ui_port` {port} on 127.0.0.1 is not available" in one_line_error(capsys, "serve")
    assert main(["serve", "--model", str(tmp_path), "--port", "0"]) == 1
    assert "is not a model directory (no config.json)" in one_line_error(capsys, "serve")


# -- --debug ------------------------------------------------------------------------------------------------

def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    args = ["curate", "--corpus", str(tmp_path / "none"), "--out", str(tmp_path / "o")]
    assert main(args) == 1
    one_line_error(capsys, "curate")
    with pytest.raises(corpus.CorpusError, match="not a distill corpus"):
        main(["--debug", *args])
    with pytest.raises(corpus.CorpusError):
        main([*args, "--debug"])
    monkeypatch.setenv("DISTILL_DEBUG", "1")
    with pytest.raises(corpus.CorpusError):
        main(args)


def tiny_gguf(path: Path) -> Path:
    """A small well-formed GGUF file (one tensor): what a cut-off download is cut from."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("keep", [1000, 100, 3])
def test_a_truncated_gguf_is_one_line_exit_1(tmp_path, capsys, monkeypatch, keep):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    data = tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    (tmp_path / "t.gguf").write_bytes(data[:keep])
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    assert main(["generate", "--teacher", str(tmp_path / "t.gguf"), "--prompts", str(prompts),
                 "--out", str(tmp_path / "out")]) == 1
    assert "not a readable GGUF file (truncated?)" in one_line_error(capsys, "generate")
    assert not (tmp_path / "out").exists()


def test_a_converted_gguf_is_served_under_its_file_stem_with_the_hash_in_the_log(tmp_path, capsys):
    from distill.launcher import served_name
    from distill.models import SOURCE_FILE

    converted = tmp_path / "gguf" / "0123456789abcdef"  # as convert_gguf names its cache directory
    converted.mkdir(parents=True)
    (converted / SOURCE_FILE).write_text(json.dumps({"gguf": "/models/SmolLM2-135M-Instruct-Q8_0.gguf",
                                                     "sha256": "0123456789abcdef" * 4}))
    assert served_name(str(converted)) == "SmolLM2-135M-Instruct-Q8_0"
    assert "0123456789abcdef" * 4 in capsys.readouterr().err
    assert served_name(str(tmp_path)) == tmp_path.name  # any other directory: its name


@pytest.mark.parametrize("form", ["{host}:{port}", "ray://{host}:{port}"])
def test_an_unreachable_ray_address_is_one_line_before_anything_is_written(tmp_path, capsys, tiny_models, form):
    import socket

    with socket.socket() as closed:  # a port that was just free: nothing listens there
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    address = form.format(host="127.0.0.1", port=port)
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    assert main(["generate", "--teacher", str(tiny_models["llama-teacher"]), "--prompts", str(prompts),
                 "--out", str(tmp_path / "out"), "--backend", "ray", "--ray-address", address]) == 1
    error = one_line_error(capsys, "generate")
    assert f"`ray_address` {address}: no Ray cluster answers at 127.0.0.1:{port}" in error
    assert not (tmp_path / "out").exists()
