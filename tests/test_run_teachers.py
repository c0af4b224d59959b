"""`distill run` with a `teachers:` list (docs/stages/run.md#several-teachers): each teacher
generates and curates its own corpus from its own prompts, one student trains on all of them
(routing, each teacher's `weight` its `mix` share), and eval compares the student with each
teacher on that teacher's own held-out prompts."""

import json

import pytest
import yaml

from distill import corpus, pipeline
from distill.cli import main
from tests.helpers import MAX_MODEL_LEN, ROOT, one_line_error, run_in_child, write_jsonl


def domain_prompts(tmp_path, name: str, train: list[str], held_out: list[str]) -> dict[str, str]:
    return {"train": str(write_jsonl(tmp_path / f"{name}-train.jsonl", [{"prompt": p} for p in train])),
            "eval": str(write_jsonl(tmp_path / f"{name}-eval.jsonl", [{"prompt": p} for p in held_out]))}


@pytest.fixture
def two_teachers(tmp_path) -> dict:
    """A run config (YAML data) of two teachers, `code` and `chat`, with prompt files on disk."""
    return {"out": str(tmp_path / "run"), "student": {"model": "org/student"},
            "teachers": [
                {"name": "code", "model": "org/coder", "weight": 0.7,
                 "prompts": domain_prompts(tmp_path, "code", ["sort 3 1 2", "reverse abc"], ["sort 9 8"])},
                {"name": "chat", "model": "org/chatter", "weight": 0.3,
                 "prompts": domain_prompts(tmp_path, "chat", ["hello there", "how are you"], ["good morning"])}]}


def invalid(capsys, tmp_path, data: dict) -> str:
    """`distill run` on `data`: its one problem line (after the `invalid run config` line); nothing runs."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("distill run: error: invalid run config"), err
    assert not (tmp_path / "run").exists()
    return err[1].strip()


def test_teachers_become_a_generate_curate_and_eval_stage_each_around_one_train(two_teachers, tmp_path):
    configs = pipeline.stage_configs(pipeline.RunConfig(**two_teachers))
    assert list(configs) == ["generate[code]", "generate[chat]", "curate[code]", "curate[chat]", "train",
                             "eval[code]", "eval[chat]"]
    out = tmp_path / "run"
    code, chat = configs["generate[code]"], configs["generate[chat]"]
    assert (code.teacher, code.prompts, code.out) == ("org/coder", tmp_path / "code-train.jsonl", out / "corpus" / "code")
    assert (chat.teacher, chat.prompts, chat.out) == ("org/chatter", tmp_path / "chat-train.jsonl", out / "corpus" / "chat")
    assert configs["curate[chat]"].corpus == out / "corpus" / "chat" and configs["curate[chat]"].out == out / "curated" / "chat"
    train = configs["train"]
    assert train.corpora == [out / "curated" / "code", out / "curated" / "chat"]
    assert train.mix_weights() == {"code": 0.7, "chat": 0.3}
    evaluate = configs["eval[chat]"]
    assert (evaluate.teacher, evaluate.student, evaluate.prompts, evaluate.out) == (
        "org/chatter", str(out / "student"), tmp_path / "chat-eval.jsonl", out / "eval" / "chat")


def test_the_shipped_example_has_two_teachers_weighted_into_one_train():
    configs = pipeline.stage_configs(pipeline.load_config(ROOT / "examples" / "run-multi-teacher.yaml"))
    assert [name for name in configs if name.startswith("eval")] == ["eval[code]", "eval[chat]"]
    assert configs["train"].mix_weights() == {"code": 0.4, "chat": 0.6}


def test_teachers_without_weights_train_on_every_record_once(two_teachers):
    for t in two_teachers["teachers"]:
        del t["weight"]
    assert pipeline.stage_configs(pipeline.RunConfig(**two_teachers))["train"].mix == []


def test_a_teachers_servers_and_engine_settings_are_its_own(two_teachers):
    two_teachers["teachers"][0].update(urls=["http://127.0.0.1:8001/v1"])
    two_teachers["teachers"][1].update(max_model_len=4096)
    configs = pipeline.stage_configs(pipeline.RunConfig(**two_teachers))
    for stage in ("generate[code]", "eval[code]"):
        assert (configs[stage].backend, configs[stage].urls, configs[stage].max_model_len) == (
            "endpoint", ["http://127.0.0.1:8001/v1"], None)
    for stage in ("generate[chat]", "eval[chat]"):
        assert (configs[stage].backend, configs[stage].urls, configs[stage].max_model_len) == ("local", [], 4096)


def test_a_teachers_change_reaches_its_own_stages_and_those_of_the_whole_run_only(two_teachers, tmp_path):
    before = pipeline.stage_hashes(pipeline.stage_configs(pipeline.RunConfig(**two_teachers)))
    (tmp_path / "chat-train.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    after = pipeline.stage_hashes(pipeline.stage_configs(pipeline.RunConfig(**two_teachers)))
    changed = sorted(name for name in before if before[name] != after[name])
    assert changed == sorted(["generate[chat]", "curate[chat]", "train", "eval[code]", "eval[chat]"])
    two_teachers["eval"] = {"max_tokens": 8}
    evals_only = pipeline.stage_hashes(pipeline.stage_configs(pipeline.RunConfig(**two_teachers)))
    assert sorted(name for name in after if after[name] != evals_only[name]) == ["eval[chat]", "eval[code]"]


def test_one_teacher_keeps_its_stage_names_and_hashes_chained_in_order(tmp_path):
    prompts = domain_prompts(tmp_path, "one", ["sort 3 1 2"], ["sort 9 8"])
    configs = pipeline.stage_configs(pipeline.RunConfig(out=str(tmp_path / "run"), teacher={"model": "org/t"},
                                                        student={"model": "org/s"}, prompts=prompts))
    assert list(configs) == list(pipeline.STAGES)
    assert {name: pipeline.inputs_of(name, list(configs)) for name in configs} == {
        "generate": [], "curate": ["generate"], "train": ["curate"], "eval": ["train"]}


@pytest.mark.parametrize("change, problem", [
    (lambda d: d.update(teacher={"model": "org/t"}), "give exactly one of `teacher` (one teacher) and `teachers`"),
    (lambda d: d.pop("teachers"), "give exactly one of `teacher` (one teacher) and `teachers`"),
    (lambda d: d["teachers"][1].update(name="code"), "`teachers`: two teachers are named 'code'"),
    (lambda d: d["teachers"][1].update(name="chat/x"), "`teachers.1.name`: 'chat/x': use letters, digits, `-` and `_`"),
    (lambda d: d["teachers"][1].pop("weight"), "`teachers`: give `weight` to every teacher or to none"),
    (lambda d: d["teachers"][0].update(weight=0), "`teachers.0.weight`: Input should be greater than 0"),
    (lambda d: d["teachers"][0]["prompts"].pop("eval"), "`teachers.0.prompts.eval`: Field required"),
    (lambda d: d.update(teachers=[]), "`teachers`: List should have at least 1 item"),
    (lambda d: d.update(prompts={"eval": "x.jsonl"}), "`prompts` applies to `teacher`; with `teachers`, each teacher"),
    (lambda d: d.update(synthesize={"n": 8}), "`synthesize` writes one teacher's prompts"),
    (lambda d: d.update(train={"mix": {"code": 1, "chat": 1}}), "`train.mix` does not apply to `teachers`"),
    (lambda d: (d["teachers"][0].update(urls=["http://h:1/v1"]), d.update(generate={"backend": "ray"})),
     "`teachers.0.urls` and `generate.backend` both say where the teacher runs"),
])
def test_invalid_teachers_are_one_line_naming_the_yaml_path(two_teachers, tmp_path, capsys, change, problem):
    change(two_teachers)
    assert invalid(capsys, tmp_path, two_teachers).startswith(problem)


def test_a_missing_prompt_file_is_named_by_its_yaml_path_before_anything_runs(two_teachers, tmp_path, capsys):
    missing = tmp_path / "nowhere.jsonl"
    two_teachers["teachers"][1]["prompts"]["eval"] = str(missing)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(two_teachers))
    assert main(["run", str(path)]) == 1
    assert one_line_error(capsys, "run") == \
        f"distill run: error: `{missing}`: prompt file `teachers.1.prompts.eval` not found"
    assert not (tmp_path / "run").exists()


def test_a_sweep_refuses_teachers(two_teachers, tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**two_teachers, "sweep": {"space": {"alpha": [0.5, 0.9]}}}))
    assert main(["sweep", str(path), "--out", str(tmp_path / "sweep")]) == 1
    assert "a sweep judges trials against one teacher" in one_line_error(capsys, "sweep")


@pytest.mark.engine
def test_run_with_two_teachers_routes_trains_one_student_and_evaluates_it_per_domain(tiny_models, tmp_path):
    """Two tiny models of one tokenizer as the teachers (the Llama teacher, and the Llama student: the tiny
    Qwen2 encodes text differently), two prompts each; a rerun skips every stage."""
    engine = {"max_model_len": MAX_MODEL_LEN}
    asked = {"big": ["sort 3 1 2", "reverse the list"], "small": ["hello there", "count the words"]}
    data = {
        "out": str(tmp_path / "run"), "student": {"model": str(tiny_models["llama-student"])},
        "teachers": [
            {"name": "big", "model": str(tiny_models["llama-teacher"]), "weight": 2, **engine,
             "prompts": domain_prompts(tmp_path, "big", asked["big"], ["sort 9 8 7"])},
            {"name": "small", "model": str(tiny_models["llama-student"]), "weight": 1, **engine,
             "prompts": domain_prompts(tmp_path, "small", asked["small"], ["good morning"])}],
        "generate": {"max_tokens": 8, "top_k": 4},
        "curate": {"filters": []},  # random tiny teachers: every answer runs to max_tokens
        "train": {"max_steps": 2, "batch_size": 2, "eval_fraction": 0.0},
        "eval": {"max_tokens": 8, "top_k": 4, "latency": False}}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    cfg = pipeline.load_config(config)
    out = tmp_path / "run"
    names = ["generate[big]", "generate[small]", "curate[big]", "curate[small]", "train", "eval[big]", "eval[small]"]
    first = run_in_child(config, out)
    assert {name: s["status"] for name, s in first.items()} == dict.fromkeys(names, "ran")

    for name, teacher in (("big", "llama-teacher"), ("small", "llama-student")):
        manifest = json.loads((out / "corpus" / name / "manifest.json").read_text())
        assert manifest["teacher"]["model"] == str(tiny_models[teacher]) and manifest["stats"]["records"] == 2
        messages = corpus.read_table(out / "corpus" / name, columns=["messages"]).column("messages").to_pylist()
        assert sorted(m[-1]["content"] for m in messages) == sorted(asked[name])
        report = json.loads((out / "eval" / name / "report.json").read_text())
        assert report["teacher"]["model"] == str(tiny_models[teacher]) and report["prompts"]["count"] == 1
    card = json.loads((out / "student" / "distill.json").read_text())
    assert card["corpora"] == [str(out / "curated" / "big"), str(out / "curated" / "small")]
    assert [t["model"] for t in card["teachers"]] == [str(tiny_models["llama-teacher"]), str(tiny_models["llama-student"])]
    assert card["config"]["mix"] == ["big=2.0", "small=1.0"]
    # the student starts as the small teacher and trained 2 steps: each eval measured it against its own teacher
    domains = json.loads((out / "eval" / pipeline.DOMAINS).read_text())
    assert list(domains) == ["big", "small"] and domains["small"]["kl"] < 0.01 < domains["big"]["kl"]

    assert {name: s["status"] for name, s in pipeline.run(cfg).items()} == dict.fromkeys(names, "skipped")
    curated_again = pipeline.run(cfg, only="curate")  # a kind of stage: every teacher's
    assert {name: s["status"] for name, s in curated_again.items()} == {
        **dict.fromkeys(names, "skipped"), "curate[big]": "ran", "curate[small]": "ran"}
