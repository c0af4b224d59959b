"""The student view (context distillation): `generate --student-view` stores what the student
sees beside what the teacher answered, curation keeps it, `train` reads the student's prompt ids
and `--keep-adapter` leaves a PEFT adapter; a toy teacher stands in for vLLM (no engine)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill import corpus
from distill.config import CurateConfig, GenerateConfig, TrainConfig
from distill.curation.pipeline import curate
from distill.generate import generate
from distill.generate.student_view import VIEWS, load_view
from distill.teacher import Completion
from distill.train.data import prepare_training_data
from distill.train.trainer import train
from tests.helpers import make_corpus, record, write_jsonl

K = 4
SYSTEM = "You are a careful assistant. Always end your answer with the line 'Done.' and never use lists."
CONVERSATION = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": "Example question"}, {"role": "assistant", "content": "Example answer. Done."},
                {"role": "user", "content": "What is 2+3?"}]


class ToyTeacher:
    """Answers with the last eight prompt tokens reversed: the answer depends on the prompt the
    teacher saw, so a corpus shows which prompt that was."""

    max_model_len = 512

    def generate(self, requests, sampling, on_done, window):
        for req in requests:
            tokens = np.asarray(req.prompt_token_ids[::-1][:8], dtype=np.int32)
            topk = np.stack([tokens, *[np.full_like(tokens, i) for i in range(1, K)]], axis=1)
            lps = np.tile(-0.5 * np.arange(1, K + 1, dtype=np.float32), (len(tokens), 1))
            on_done(req, Completion(tokens, lps[:, 0].copy(), topk, lps, "stop"))

    def close(self):
        pass


@pytest.mark.parametrize("view, roles", [("drop-system", ["user", "assistant", "user"]),
                                         ("drop-examples", ["system", "user"]), ("user-only", ["user"])])
def test_each_named_view_keeps_what_it_says(view, roles):
    seen = load_view(view)(CONVERSATION)
    assert [m["role"] for m in seen] == roles and seen[-1] == CONVERSATION[-1]
    assert set(VIEWS) == {"drop-system", "drop-examples", "user-only"}


def test_a_view_file_gives_a_short_system_prompt(tmp_path):
    path = tmp_path / "view.yaml"
    path.write_text("system: Be brief.\nexamples: keep\n")
    view = load_view(str(path))
    assert view(CONVERSATION) == [{"role": "system", "content": "Be brief."}, *CONVERSATION[1:]]
    assert view.identity.startswith("file:")  # the manifest records the file's hash, not its path
    (tmp_path / "view.json").write_text(json.dumps({"examples": "drop"}))
    assert load_view(str(tmp_path / "view.json"))(CONVERSATION) == CONVERSATION[-1:]


@pytest.mark.parametrize("content, message", [("system: [1, 2]\n", "`system` must be text"),
                                              ("examples: some\n", "`examples` must be `keep` or `drop`"),
                                              ("persona: x\n", "`system` and/or `examples` only")])
def test_a_bad_view_is_one_line(tmp_path, content, message):
    path = tmp_path / "view.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        load_view(str(path))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="expected one of drop-system, drop-examples, user-only"):
        load_view("drop-everything")


@pytest.fixture
def view_corpus(tmp_path, tiny_models):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"messages": [*CONVERSATION[:-1], {"role": "user", "content": question}]}
        for question in ("What is 2+3?", "Name a colour", "Count to four", "Spell cat backwards", "Why is ice cold?",
                         "Give me a word", "What day comes after Monday?", "Add one and one")])
    cfg = GenerateConfig(prompts=prompts, out=tmp_path / "corpus", teacher=str(tiny_models["llama-teacher"]),
                         top_k=K, max_tokens=8, student_view="user-only", chunk_size=4)
    return generate(cfg, teacher=ToyTeacher()).path, cfg


def test_the_corpus_stores_both_views_and_the_teacher_answered_the_full_prompt(view_corpus):
    out, _ = view_corpus
    assert corpus.validate(out)["records"] == 8
    assert corpus.read_manifest(out).generation.student_view == "user-only"
    for r in corpus.iter_records(out):
        assert r["messages"][0]["content"] == SYSTEM and len(r["messages"]) == 4
        assert r[corpus.STUDENT_MESSAGES] == r["messages"][-1:]
        assert len(r[corpus.STUDENT_PROMPT_IDS]) < len(r["prompt_token_ids"]) / 2
        # the answer came from the teacher's (full) prompt, not the student's
        assert r["response_token_ids"] == r["prompt_token_ids"][::-1][:8]


def test_a_rerun_with_another_view_is_refused(view_corpus):
    out, cfg = view_corpus
    with pytest.raises(FileExistsError, match="generation.student_view"):
        generate(cfg.model_copy(update={"student_view": "drop-system"}), teacher=ToyTeacher())


def test_curate_keeps_the_view_and_train_reads_the_students_ids(view_corpus, tmp_path, tiny_models):
    out, _ = view_corpus
    curated = curate(CurateConfig(corpus=out, out=tmp_path / "curated", filters=["finish_reason"])).path
    stored = {r["id"]: r for r in corpus.iter_records(curated)}
    assert len(stored) == 8 and all(r[corpus.STUDENT_PROMPT_IDS] for r in stored.values())

    data = prepare_training_data(curated, max_length=256, scratch=tmp_path / "scratch")
    trained_on = {r["id"]: r["prompt_token_ids"] for r in data.dataset}
    assert trained_on == {i: r[corpus.STUDENT_PROMPT_IDS] for i, r in stored.items()}

    student = train(TrainConfig(corpus=curated, student=str(tiny_models["llama-student"]), out=tmp_path / "student",
                                max_steps=2, batch_size=4, eval_fraction=0.0, lora_r=4, keep_adapter=True,
                                logging_steps=1)).path
    assert not (student / "model.safetensors").exists()  # unmerged: the adapter is the student
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(student / "adapter")
    assert any("lora_" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("student_ids, problem", [(None, "without `student_messages`"),
                                                   ([], "empty `student_prompt_token_ids`")])
def test_a_broken_student_view_is_invalid(tmp_path, student_ids, problem):
    """Both columns or neither; a student prompt of no tokens is no prompt."""
    records = [record(0, n_tokens=2), record(1, n_tokens=2)]
    if student_ids is not None:
        for r in records:
            r |= {corpus.STUDENT_MESSAGES: [{"role": "user", "content": "q"}], corpus.STUDENT_PROMPT_IDS: student_ids}
    root = make_corpus(tmp_path / "c", records, encoding="float32")
    if student_ids is None:  # only the ids column: written by hand, as a broken tool would
        path = corpus.shard_paths(root)[0]
        table = pq.read_table(path)
        pq.write_table(table.append_column(corpus.STUDENT_PROMPT_IDS, pa.array([[1], [2]], pa.list_(pa.int32()))), path)
    with pytest.raises(corpus.CorpusError, match=problem):
        corpus.validate(root)
