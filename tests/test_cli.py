"""The `distill` command: every documented subcommand (docs/design.md) listed, flags from the config fields,
user errors as one clear line (before any model loads), shipped YAML valid."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from distill import corpus
from distill.cli import COMMANDS, build_parser, main
from distill.config import CurateConfig, EvalConfig, GenerateConfig, TrainConfig
from tests.helpers import ROOT, make_corpus, record, write_jsonl

DOCUMENTED_COMMANDS = ["generate", "score", "curate", "train", "eval", "export", "serve", "chat", "run", "demo", "inspect"]


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "distill.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for name in DOCUMENTED_COMMANDS:
        assert f"\n    {name} " in out, name


def test_generate_flags_derive_from_config_fields(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for field in GenerateConfig.model_fields:
        assert "--" + field.replace("_", "-") in out, field
    assert "Teacher top-k logprobs stored per response token. [default: 20]" in " ".join(out.split())


def test_train_help_prints_a_description_with_a_percent_sign_and_the_online_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit_.value.code == 0 and "fewer than 90% of the teacher's token ids" in out
    assert "--online-targets {full,topk}" in out and "--teacher-top-k" in out


@pytest.mark.parametrize("flags, lora", [([], True), (["--lora"], True), (["--no-lora"], False), (["--full"], False)])
def test_full_is_the_other_name_of_no_lora(flags, lora):
    args = vars(build_parser().parse_args(["train", "--corpus", "c", "--student", "s", "--out", "o", *flags]))
    assert TrainConfig(**{k: v for k, v in args.items() if k not in ("command", "config", "debug")}).lora is lora


def test_engine_settings_carry_revision_and_remote_code():
    """What `eval` hands to the engines that answer and the scorer that reads the student."""
    cfg = EvalConfig(student="s", teacher="t", prompts="p.jsonl", out="o", revision="v1", trust_remote_code=True)
    settings = cfg.engine_settings()
    assert settings["revision"] == "v1" and settings["trust_remote_code"] is True
    assert GenerateConfig(teacher="t", prompts="p.jsonl", out="o", **settings).trust_remote_code is True


def test_ray_flags_need_the_ray_backend(capsys):
    args = ["generate", "--teacher", "t", "--prompts", "p.jsonl", "--out", "o"]
    assert main([*args, "--replicas", "2"]) == 1
    assert "`replicas` applies to `backend: ray` only" in capsys.readouterr().err
    assert main([*args, "--backend", "ray", "--urls", "http://box:8000"]) == 1
    assert "`urls` applies to `backend: endpoint` only" in capsys.readouterr().err
    cfg = GenerateConfig(teacher="t", prompts="p.jsonl", out="o", backend="ray", ray_address="auto", replicas=4,
                         gpus_per_replica=2)
    assert (cfg.backend, cfg.ray_address, cfg.replicas, cfg.gpus_per_replica) == ("ray", "auto", 4, 2)


def test_missing_and_invalid_fields_are_named(capsys, tmp_path):
    assert main(["generate", "--prompts", "p.jsonl", "--out", str(tmp_path), "--top-k", "0"]) == 1  # README: 1
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "distill generate: error: `teacher`: Field required"
    assert "`teacher`: Field required" in err and "`top_k`: Input should be greater than or equal to 1" in err


def test_bad_prompt_file_is_one_line_before_the_model_loads(capsys, tmp_path, tiny_models):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}, "{oops"])
    code = main(["generate", "--teacher", str(tiny_models["llama-teacher"]), "--prompts", str(prompts),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith(f"distill generate: error: {prompts} line 2: invalid JSON")
    assert main(["generate", "--teacher", str(tiny_models["llama-teacher"]), "--prompts", str(tmp_path / "none.jsonl"),
                 "--out", str(tmp_path / "out")]) == 1
    assert "none.jsonl`: prompt file not found" in capsys.readouterr().err


def test_overwrite_keeps_the_old_corpus_when_the_new_input_is_bad(capsys, tmp_path, tiny_models):
    old = make_corpus(tmp_path / "out", [record(0)])
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": ""}]}])
    code = main(["generate", "--teacher", str(tiny_models["llama-teacher"]), "--prompts", str(prompts),
                 "--out", str(old), "--overwrite"])
    assert code == 1 and "line 1: empty prompt" in capsys.readouterr().err
    assert (old / "data" / "part-00000.parquet").exists()


def test_yaml_config_with_flag_override(tmp_path):
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump({"teacher": "t", "prompts": "p.jsonl", "out": "o", "top_k": 5,
                                    "engine_args": {"tensor_parallel_size": 2}}))
    cfg = GenerateConfig.from_yaml(path, top_k=7)
    assert (cfg.top_k, cfg.engine_args, cfg.prompts) == (7, {"tensor_parallel_size": 2}, Path("p.jsonl"))
    path.write_text(yaml.safe_dump({"teacher": "t", "prompts": "p", "out": "o", "topk": 5}))
    with pytest.raises(ValueError, match="topk"):
        GenerateConfig.from_yaml(path)


SHIPPED_CONFIGS = sorted((ROOT / "examples").glob("*.yaml")) + sorted((ROOT / "distill" / "demo").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path, tmp_path):
    if "sweep" in yaml.safe_load(path.read_text()):  # a `distill sweep` config: a run config plus its search
        from distill.curation.pipeline import build_filters
        from distill.sweep.study import load_plan

        build_filters(load_plan(path, tmp_path).run.curate.filters)
    elif isinstance(yaml.safe_load(path.read_text()).get("teacher"), dict) or \
            "teachers" in yaml.safe_load(path.read_text()):  # a `distill run` config
        from distill.curation.pipeline import build_filters
        from distill.pipeline import load_config

        build_filters(load_config(path).curate.filters)
    elif path.name.startswith("generate"):
        GenerateConfig.from_yaml(path)
    elif path.name.startswith("curate"):
        from distill.curation.pipeline import build_filters

        cfg = CurateConfig.from_yaml(path)
        # every filter but decontaminate (its eval file is the user's) builds from the YAML
        assert len(build_filters([f for f in cfg.filters if not (isinstance(f, dict) and f["name"] == "decontaminate")])) > 5
    else:
        pytest.fail(f"no validator for {path.name}")


def test_inspect_prints_summary_and_a_decoded_record(tmp_path, capsys, tiny_models):
    root = make_corpus(tmp_path / "c", [record(0), record(1)])
    manifest = corpus.read_manifest(root)
    manifest.teacher.model = str(tiny_models["llama-teacher"])
    corpus.write_manifest(root, manifest)
    assert main(["inspect", str(root), "--record", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 in 1 shards" in out and "record r1" in out and "top-5" in out
    assert "incomplete" in out  # this manifest never said `complete`


def test_shipped_accelerate_configs_parse_with_the_fields_that_matter():
    """examples/accelerate/*.yaml through accelerate's own loader (what `accelerate launch
    --config_file` reads). DDP and ZeRO-3 run in tests/test_train.py; FSDP needs GPUs."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    folder = ROOT / "examples" / "accelerate"
    assert sorted(p.name for p in folder.glob("*.yaml")) == ["ddp.yaml", "deepspeed-zero3.yaml", "fsdp.yaml"]
    ddp = load_config_from_file(str(folder / "ddp.yaml"))
    assert ddp.distributed_type == DistributedType.MULTI_GPU and not ddp.use_cpu
    assert ddp.mixed_precision == "no"  # the trainer picks bf16 on GPUs itself
    fsdp = load_config_from_file(str(folder / "fsdp.yaml"))
    assert fsdp.distributed_type == DistributedType.FSDP
    assert fsdp.fsdp_config["fsdp_version"] == 2 and fsdp.fsdp_config["fsdp_reshard_after_forward"] is True
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # a whole model is saved
    zero3 = load_config_from_file(str(folder / "deepspeed-zero3.yaml"))
    assert zero3.distributed_type == DistributedType.DEEPSPEED
    assert zero3.deepspeed_config["zero_stage"] == 3 and zero3.deepspeed_config["zero3_save_16bit_model"] is True


def test_run_config_generate_section_takes_the_ray_backend():
    from distill.pipeline import load_config, stage_configs

    demo = ROOT / "distill" / "demo" / "demo.yaml"
    cfg = load_config(demo, ["generate.backend=ray", "generate.ray_address=auto", "generate.replicas=2"])
    generate = stage_configs(cfg)["generate"]
    assert (generate.backend, generate.ray_address, generate.replicas) == ("ray", "auto", 2)
    with pytest.raises(ValueError, match="`replicas` applies to `backend: ray` only"):
        load_config(demo, ["generate.replicas=2"])


def test_run_config_train_section_takes_the_accelerate_launcher():
    from distill.pipeline import load_config, stage_configs

    demo = ROOT / "distill" / "demo" / "demo.yaml"
    ddp = ROOT / "examples" / "accelerate" / "ddp.yaml"
    cfg = load_config(demo, ["train.launcher=accelerate", f"train.config_file={ddp}", "train.num_processes=2"])
    assert (cfg.train.launcher, cfg.train.config_file, cfg.train.num_processes) == ("accelerate", ddp, 2)
    assert isinstance(stage_configs(cfg)["train"], TrainConfig)  # the launch fields stay in the run's section
    with pytest.raises(ValueError, match="`launcher: accelerate` needs `config_file`"):
        load_config(demo, ["train.launcher=accelerate"])
    with pytest.raises(ValueError, match="apply to `launcher: accelerate` only"):
        load_config(demo, ["train.num_processes=2"])


def test_train_refuses_fsdp_launches_on_cpu(monkeypatch, capsys, tmp_path):
    """What `accelerate launch --config_file fsdp.yaml` sets: on CPU accelerate would quietly run DDP."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert main(["train", "--corpus", str(tmp_path / "c"), "--student", "s", "--out", str(tmp_path / "o")]) == 1
    assert "FSDP needs GPUs: on CPU the processes would silently" in capsys.readouterr().err


ZERO3 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}


@pytest.mark.parametrize("env, lora, message", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, False, "FSDP1 is not supported"),
    (ZERO3, True, "LoRA under DeepSpeed ZeRO-3 is not supported"),
])
def test_train_refuses_unsupported_sharding(monkeypatch, env, lora, message):
    from distill.train.trainer import check_launch

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=message):
        check_launch(gpu=True, lora=lora)


@pytest.mark.parametrize("env, gpu, lora", [
    ({}, False, True),  # no accelerate sharding: single process, torchrun or ddp.yaml
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, True, True),
    (ZERO3, False, False),  # DeepSpeed runs on CPU too (its CPU accelerator, gloo)
])
def test_supported_launches_are_accepted(monkeypatch, env, gpu, lora):
    from distill.train.trainer import check_launch

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    check_launch(gpu=gpu, lora=lora)


@pytest.mark.parametrize("generated, wall, resumed, whole_run", [
    ((12, 0.3), 58.6, 0, "0.205 tok/s over the whole run"),  # 6 prompts x 2 tokens: mostly the engine's start
    ((768, 2.0), 40.0, 14, "19.2 tok/s over the whole run"),  # a resume: the 14 kept shards' tokens are not this run's
])
def test_summary_rates_count_this_runs_tokens_with_significant_digits(capsys, tmp_path, generated, wall, resumed,
                                                                       whole_run):
    from distill.generate.job import CorpusJob

    job = CorpusJob(GenerateConfig(teacher="t", prompts=tmp_path / "p.jsonl", out=tmp_path / "c"), tmp_path / "p.jsonl",
                    scoring=False)
    stats = corpus.CorpusStats(records=240, response_tokens=11520, shards=15, bytes=10**6, complete=True)
    job._summary(stats, skipped=0, wall=wall, resumed=resumed, generated=generated)
    throughput = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("throughput"))
    assert whole_run in throughput and f"({generated[0]:,} new tokens in {generated[1]:.1f} s)" in throughput


@pytest.mark.parametrize("flags, quiet", [([], True), (["--verbose"], False)])
def test_engine_noise_is_off_unless_verbose(monkeypatch, tmp_path, flags, quiet):
    """vLLM, torch and Python read these when they start: the CLI sets them before any stage runs
    (the stage fails here on a missing prompt file, before any model loads)."""
    for name in ("VLLM_LOGGING_LEVEL", "VLLM_LOGGING_STREAM", "TORCH_CPP_LOG_LEVEL", "PYTHONWARNINGS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))  # the CLI's filters end with the test
    code = main(["generate", "--teacher", "t", "--prompts", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o"),
                 *flags])
    assert code == 1
    assert os.environ.get("VLLM_LOGGING_LEVEL") == ("ERROR" if quiet else None)
    assert os.environ.get("TORCH_CPP_LOG_LEVEL") == ("ERROR" if quiet else None)
    assert ("ignore::FutureWarning" in os.environ.get("PYTHONWARNINGS", "")) == quiet
    assert os.environ["VLLM_LOGGING_STREAM"] == "ext://sys.stderr"  # stdout: only the command's result


# One bad value per command with a config model: the field and the value the model refuses.
BAD_VALUE = {"generate": ["--top-k", "0"], "score": ["--top-k", "0"], "curate": ["--batch-size", "0"],
             "init-student": ["--num-layers", "0"], "train": ["--alpha", "2"], "eval": ["--top-k", "0"],
             "serve": ["--port", "-1"], "chat": ["--max-tokens", "0"], "synthesize": ["--n", "0"],
             "export": ["--out", "x.gguf"]}  # export: no --student


@pytest.mark.parametrize("command", [name for name, (_, model, _) in COMMANDS.items() if model is not None])
def test_a_bad_value_is_exit_1_with_the_prefix_and_bad_usage_exit_2(command, capsys):
    assert set(BAD_VALUE) == {name for name, (_, model, _) in COMMANDS.items() if model is not None}
    assert main([command, *BAD_VALUE[command]]) == 1
    err = capsys.readouterr().err
    assert err and all(line.startswith(f"distill {command}: error: ") for line in err.splitlines()), err
    with pytest.raises(SystemExit) as usage:  # argparse: an unknown flag is a usage error
        main([command, "--no-such-flag"])
    assert usage.value.code == 2


@pytest.mark.parametrize("args", [["inspect", "no/such/corpus"], ["run", "no/such/run.yaml"]])
def test_commands_without_a_config_model_say_errors_the_same_way(args, capsys):
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"distill {args[0]}: error: ") and len(err.splitlines()) == 1, err


def test_a_key_given_as_a_flag_is_warned_about(capsys):
    from distill.launcher import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: chat stops at once
    assert main(["chat", "--url", url, "--api-key", "sk-visible"]) == 1
    err = capsys.readouterr().err
    assert "distill chat: warning: `--api-key` on the command line is visible to every user in `ps`" in err
    assert main(["chat", "--url", url]) == 1
    assert "warning" not in capsys.readouterr().err
