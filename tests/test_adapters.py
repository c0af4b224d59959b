"""LoRA adapters for `distill serve --lora NAME=DIR` (distill/adapters.py): found in a student
directory, checked against the base model and named before any server starts, and the launcher's
command line for several of them. No engine: tests/test_multi_lora.py serves them."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from distill.adapters import LORA_RANKS, Adapter, load_adapter, load_adapters, max_lora_rank, parse_spec
from distill.cli import main
from distill.config import ServeConfig
from distill.launcher import ServerError, base_model_name, check_startup, server_command
from distill.pipeline import config_from_data, serving_config


def write_adapter(path, base, r: int = 8, peft_type: str = "LORA"):
    """An adapter directory as PEFT writes it (the config is what is checked; no weights needed)."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "r": r,
                                                          "base_model_name_or_path": str(base)}))
    return path


def test_name_dir_and_bare_dir():
    assert parse_spec("support=runs/a/student") == ("support", Path("runs/a/student"))
    assert parse_spec("runs/a/adapter")[0] is None
    with pytest.raises(ValueError, match="expected NAME=DIR"):
        parse_spec("=runs/a")


def test_a_student_directory_names_its_adapter(tmp_path, tiny_models):
    base = tiny_models["llama-teacher"]
    write_adapter(tmp_path / "support" / "adapter", base)
    adapter = load_adapter(str(tmp_path / "support"), str(base))
    assert adapter == Adapter("support", tmp_path / "support" / "adapter", 8, str(base))
    assert load_adapter(f"helpdesk={tmp_path / 'support'}", str(base)).name == "helpdesk"


@pytest.mark.parametrize("make, message", [
    (lambda root, base, other: root / "missing", "no such directory"),
    (lambda root, base, other: (root / "empty").mkdir() or root / "empty", "not a LoRA adapter"),
    (lambda root, base, other: write_adapter(root / "ia3", base, peft_type="IA3"), "not LoRA"),
    (lambda root, base, other: write_adapter(root / "other", other), "was trained on"),
])
def test_a_bad_adapter_is_refused_in_one_line(tmp_path, tiny_models, make, message):
    base, other = tiny_models["llama-teacher"], tiny_models["qwen2-student"]
    spec = f"bad={make(tmp_path, base, other)}"
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        check_startup(ServeConfig(model=str(base), lora=[spec], port=0))
    assert "\n" not in str(err.value)


def test_a_copy_of_the_base_is_the_same_base(tmp_path, tiny_models):
    copy = shutil.copytree(tiny_models["llama-teacher"], tmp_path / "copy")
    write_adapter(tmp_path / "a", tiny_models["llama-teacher"])
    assert load_adapter(str(tmp_path / "a"), str(copy)).name == "a"


def test_two_adapters_of_one_name_are_refused(tmp_path, tiny_models):
    base = tiny_models["llama-teacher"]
    a, b = write_adapter(tmp_path / "x" / "a", base), write_adapter(tmp_path / "y" / "a", base)
    with pytest.raises(ValueError, match="two LoRA adapters are named `a`"):
        load_adapters([str(a), str(b)], str(base))


def test_the_server_command_lists_every_adapter_and_one_rank_for_all(tmp_path, tiny_models):
    base = tiny_models["llama-teacher"]
    adapters = load_adapters([f"one={write_adapter(tmp_path / 'one', base, r=4)}",
                              f"two={write_adapter(tmp_path / 'two', base, r=24)}"], str(base))
    cmd = server_command(str(base), ServeConfig(model=str(base)), name="base", host="127.0.0.1", port=8000,
                         adapters=adapters)
    at = cmd.index("--lora-modules")
    assert cmd[at + 1:at + 3] == [f"one={tmp_path / 'one'}", f"two={tmp_path / 'two'}"]
    assert cmd[cmd.index("--max-lora-rank") + 1] == "32" and cmd[cmd.index("--max-loras") + 1] == "2"
    assert "--enable-lora" not in server_command(str(base), ServeConfig(model=str(base)), name="base",
                                                 host="127.0.0.1", port=8000)
    too_big = Adapter("big", tmp_path, LORA_RANKS[-1] + 1, str(base))
    with pytest.raises(ValueError, match="vLLM serves ranks up to"):
        max_lora_rank([too_big])


def test_the_chat_page_offers_every_served_model():
    """The dropdown the student pane asks through (in a browser: not run here, see docs/limitations.md)."""
    from distill.serve.ui import Endpoint, build_ui

    def dropdowns(page):
        return [c["props"] for c in page.config["components"] if c.get("type") == "dropdown"]

    many = dropdowns(build_ui(Endpoint("http://127.0.0.1:1/v1", "support"), models=["support", "legal", "base"]))
    assert [(d["value"], [c[0] for c in d["choices"]], d["visible"]) for d in many] == \
        [("support", ["support", "legal", "base"], True)]
    (one,) = dropdowns(build_ui(Endpoint("http://127.0.0.1:1/v1", "student")))
    assert one["visible"] is False


def test_names_of_the_base_beside_its_adapters(tmp_path, tiny_models):
    base = str(tiny_models["llama-teacher"])
    bare = str(write_adapter(tmp_path / "student" / "adapter", base))

    def names(**settings):
        cfg = ServeConfig(model=base, **settings)
        return [a.name for a in load_adapters(cfg.lora, base, cfg.served_model_name)], base_model_name(
            cfg, load_adapters(cfg.lora, base, cfg.served_model_name))

    assert names(lora=[bare]) == (["student"], "student-base")  # as before NAME=DIR existed
    assert names(lora=[bare], served_model_name="bot") == (["bot"], "bot-base")
    assert names(lora=[f"a={bare}", f"b={bare}"], served_model_name="base") == (["a", "b"], "base")
    assert names(lora=[f"a={bare}"]) == (["a"], "llama-teacher")
    with pytest.raises(ServerError, match="both named `a`"):
        names(lora=[f"a={bare}"], served_model_name="a")


def run_config(tmp_path, base, **serve):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    return config_from_data({"out": str(tmp_path / "support-bot"), "teacher": {"model": str(base)},
                             "prompts": {"train": str(prompts), "eval": str(prompts)}, "student": {"model": str(base)},
                             "serve": serve}, tmp_path / "run.yaml")


def test_a_run_ends_serving_its_student_beside_the_other_students_of_its_base(tmp_path, tiny_models):
    """`distill run --serve` with `serve.lora`: the run's base with its own student (the adapter
    `distill train --lora` leaves in student/adapter, named after the run) and the others."""
    base = tiny_models["llama-teacher"]
    legal = write_adapter(tmp_path / "legal" / "adapter", base).parent
    cfg = serving_config(run_config(tmp_path, base, lora=[f"legal={legal}"], port=0))
    assert cfg.model == str(base)
    assert cfg.lora == [f"support-bot={tmp_path / 'support-bot' / 'student'}", f"legal={legal}"]
    assert serving_config(run_config(tmp_path, base)).model == str(tmp_path / "support-bot" / "student")  # no others: as before


def test_a_run_refuses_other_students_it_cannot_serve_before_it_starts(tmp_path, tiny_models, capsys):
    """A bad `serve.lora` is one line before any stage runs, not after training."""
    base, other = tiny_models["llama-teacher"], tiny_models["qwen2-student"]
    wrong = write_adapter(tmp_path / "wrong" / "adapter", other).parent
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(tmp_path, base, lora=[f"wrong={wrong}"]).model_dump(mode="json")))
    assert main(["run", str(config), "--serve"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("distill run: error: ") and "was trained on" in err and "\n" not in err, err
    assert not (tmp_path / "support-bot").exists()  # nothing ran
    data = yaml.safe_load(config.read_text())
    with pytest.raises(ValueError, match="needs `train.lora: true`"):
        config_from_data({**data, "train": {"lora": False}}, config)
