"""`distill init-student` on a tiny local Llama, and model arguments that name GGUF files."""

import pytest
import torch

from distill import models
from distill.config import InitStudentConfig
from distill.train.init_student import evenly_spaced, init_student


def test_evenly_spaced_keeps_first_and_last():
    assert evenly_spaced(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert evenly_spaced(4, 4) == [0, 1, 2, 3] and evenly_spaced(5, 2) == [0, 4] and evenly_spaced(7, 1) == [0]
    with pytest.raises(ValueError, match="cannot keep 5 of the teacher's 4 layers"):
        evenly_spaced(4, 5)


def test_keep_layers_accepts_commas_and_needs_one_choice(tmp_path):
    assert InitStudentConfig(teacher="t", out=tmp_path, keep_layers="0, 2,3").keep_layers == [0, 2, 3]
    assert InitStudentConfig(teacher="t", out=tmp_path, keep_layers=["0,1", "3"]).keep_layers == [0, 1, 3]
    for bad in ({}, {"num_layers": 2, "keep_layers": [0]}):
        with pytest.raises(ValueError, match="exactly one of `num_layers` and `keep_layers`"):
            InitStudentConfig(teacher="t", out=tmp_path, **bad)


def _forward_through(model, layers, input_ids):
    """The teacher's logits computed through only `layers` (the reference a pruned student must equal)."""
    decoder = model.get_decoder()
    original = decoder.layers
    decoder.layers = torch.nn.ModuleList([original[i] for i in layers])
    saved = {i: original[i].self_attn.layer_idx for i in layers}
    for new, i in enumerate(layers):
        original[i].self_attn.layer_idx = new
    try:
        with torch.no_grad():
            return model(input_ids, use_cache=False).logits
    finally:
        decoder.layers = original
        for i, idx in saved.items():
            original[i].self_attn.layer_idx = idx


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_pruned_student_is_the_teacher_without_the_dropped_layers(tmp_path, tiny_models, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill import tiny

    teacher_dir = tiny.build_model(tmp_path / "teacher", tiny_models["tokenizer"], arch,
                                   dict(tiny.SIZES["teacher"], num_hidden_layers=5), init_std=0.1)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    keep = [0, 2, 4]
    result = init_student(InitStudentConfig(teacher=str(teacher_dir), out=tmp_path / "student", num_layers=3))
    assert result.layers == keep and result.parameters < result.teacher_parameters
    student = AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.float32).eval()
    assert student.config.num_hidden_layers == 3 and student.num_parameters() == result.parameters
    assert [layer.self_attn.layer_idx for layer in student.get_decoder().layers] == [0, 1, 2]
    # Same tokenizer and chat template by construction.
    assert AutoTokenizer.from_pretrained(result.path).get_vocab() == AutoTokenizer.from_pretrained(teacher_dir).get_vocab()
    assert (result.path / "chat_template.jinja").read_text() == (teacher_dir / "chat_template.jinja").read_text()
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.no_grad():
        got = student(ids, use_cache=False).logits
    torch.testing.assert_close(got, _forward_through(teacher, keep, ids))
    # Generation with the KV cache works (layer_idx renumbered).
    assert student.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, ids.shape[1] + 4)


def test_init_student_refuses_bad_layers_and_a_full_out(tmp_path, tiny_models):
    teacher_dir = str(tiny_models["llama-teacher"])
    with pytest.raises(ValueError, match="need distinct increasing indices"):
        init_student(InitStudentConfig(teacher=teacher_dir, out=tmp_path / "a", keep_layers=[1, 0]))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        init_student(InitStudentConfig(teacher=teacher_dir, out=tmp_path / "full", num_layers=1))


def test_model_arguments_pass_through_unless_they_name_a_gguf_file(tmp_path, tiny_models):
    hf_dir = str(tiny_models["llama-teacher"])
    assert models.resolve("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert models.resolve(hf_dir) == hf_dir and models.model_source(hf_dir) is None
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="holds 2 GGUF files"):
        models.resolve(str(two))


def test_init_student_names_a_missing_teacher_in_one_line(tmp_path, capsys):
    from distill.cli import main

    assert main(["init-student", "--teacher", str(tmp_path / "nope"), "--num-layers", "2",
                 "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"distill init-student: error: `teacher`: model `{tmp_path / 'nope'}` not found (no such directory; " \
                  "hub ids look like `org/name`)"
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("flag", ["", ",", " , "])
def test_an_empty_keep_layers_is_refused(tmp_path, flag, capsys):
    from distill.cli import main

    with pytest.raises(ValueError, match="`keep_layers` names no layer"):
        InitStudentConfig(teacher="t", out=tmp_path, keep_layers=flag)
    assert main(["init-student", "--teacher", "t", "--out", str(tmp_path / "s"), "--keep-layers", flag]) == 1
    assert "distill init-student: error: " in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_an_interrupted_init_student_reruns_and_a_finished_one_needs_overwrite(tmp_path, tiny_models):
    cfg = InitStudentConfig(teacher=str(tiny_models["llama-teacher"]), out=tmp_path / "s", num_layers=1)
    init_student(cfg)
    for saved_last in [p for p in cfg.out.iterdir() if "token" in p.name or p.suffix == ".jinja"]:
        saved_last.unlink()  # as a kill between the model's files and the tokenizer's leaves it
    assert init_student(cfg).layers == [0]  # the same command reruns
    with pytest.raises(FileExistsError, match="holds a student or other files.*--overwrite"):
        init_student(cfg)
    assert init_student(cfg.model_copy(update={"overwrite": True})).layers == [0]
