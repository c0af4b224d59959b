"""Prompt files: every format and container normalises to the same messages; bad records are
named with file, line/record and what is wrong."""

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill.generate.prompts import BadRecord, Prompt, PromptError, iter_prompts
from tests.helpers import write_jsonl

SYSTEM, Q1, A1, Q2 = "You are terse.", "Sort 5 3 1", "1 3 5", "Now reverse it"
EXPECTED = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1},
            {"role": "assistant", "content": A1}, {"role": "user", "content": Q2}]

SAME_CONVERSATION = {
    "messages": {"messages": EXPECTED},
    # a trailing assistant turn is dropped: the teacher answers the last user turn
    "messages_trailing_answer": {"messages": EXPECTED + [{"role": "assistant", "content": "1 5 3"}]},
    "messages_content_parts": {"messages": [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}]
                               + EXPECTED[1:]},
    "sharegpt": {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": Q1},
                                   {"from": "gpt", "value": A1}, {"from": "human", "value": Q2}]},
}
SINGLE_TURN = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{Q1}\n\n{Q2}"}]
SINGLE_TURN_FORMS = {
    "alpaca": {"instruction": Q1, "input": Q2, "system": SYSTEM},
    "prompt": {"prompt": f"{Q1}\n\n{Q2}", "system": SYSTEM},
    "messages": {"messages": SINGLE_TURN},
}


def only_prompts(path, **kw):
    items = list(iter_prompts(path, **kw))
    bad = [i for i in items if isinstance(i, BadRecord)]
    assert not bad, bad
    return items


@pytest.mark.parametrize("name", SAME_CONVERSATION)
def test_multi_turn_forms_normalise_to_same_messages(tmp_path, name):
    (p,) = only_prompts(write_jsonl(tmp_path / "p.jsonl", [SAME_CONVERSATION[name]]))
    assert p.messages == EXPECTED


@pytest.mark.parametrize("name", SINGLE_TURN_FORMS)
def test_single_turn_forms_normalise_to_same_messages(tmp_path, name):
    (p,) = only_prompts(write_jsonl(tmp_path / "p.jsonl", [SINGLE_TURN_FORMS[name]]))
    assert p.messages == SINGLE_TURN


def test_containers_json_parquet_csv_match_jsonl(tmp_path):
    records = [{"messages": EXPECTED}] + [{"messages": [{"role": "user", "content": f"question {i}"}]} for i in range(3)]
    jsonl = only_prompts(write_jsonl(tmp_path / "p.jsonl", records))
    (tmp_path / "p.json").write_text(json.dumps(records))
    pq.write_table(pa.Table.from_pylist([{"messages": r["messages"]} for r in records[:3]]), tmp_path / "p.parquet")
    with open(tmp_path / "p.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "messages"])
        w.writeheader()
        for i, r in enumerate(records[:3]):
            w.writerow({"id": f"q{i}", "messages": json.dumps(r["messages"])})
    assert [p.messages for p in only_prompts(tmp_path / "p.json")] == [p.messages for p in jsonl]
    assert [p.messages for p in only_prompts(tmp_path / "p.parquet")] == [p.messages for p in jsonl[:3]]
    from_csv = only_prompts(tmp_path / "p.csv")
    assert [p.messages for p in from_csv] == [p.messages for p in jsonl[:3]]
    assert [p.prompt_id for p in from_csv] == ["q0", "q1", "q2"]  # ids from the input are kept


def test_prompt_id_is_a_stable_hash_of_the_messages(tmp_path):
    a = only_prompts(write_jsonl(tmp_path / "a.jsonl", [SAME_CONVERSATION["messages"]]))[0]
    b = only_prompts(write_jsonl(tmp_path / "b.jsonl", [SAME_CONVERSATION["sharegpt"]]))[0]
    assert a.prompt_id == b.prompt_id and len(a.prompt_id) == 16


def test_score_mode_keeps_the_answer_and_allows_several_per_prompt(tmp_path):
    rows = [{"prompt": "Hi", "response": "Hello"}, {"prompt": "Hi", "output": "Hey"},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}]
    items = list(iter_prompts(write_jsonl(tmp_path / "s.jsonl", rows[:2]), with_response=True))
    assert [i.messages[-1]["content"] for i in items] == ["Hello", "Hey"]
    assert [i.occurrence for i in items] == [0, 1]
    (bad,) = list(iter_prompts(write_jsonl(tmp_path / "n.jsonl", [{"prompt": "Hi"}]), with_response=True))
    assert isinstance(bad, BadRecord) and "not an assistant response" in bad.reason


@pytest.mark.parametrize("line, reason, kind", [
    ('{"messages": [{"role": "user", "content": "hi"}', "invalid JSON", "malformed"),
    ('{"messages": [{"role": "user", "content": "   "}]}', "empty prompt", "empty"),
    ('{"messages": []}', "empty prompt", "empty"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "not a known role", "malformed"),
    ('{"messages": [{"role": "user"}]}', "must have `role` and `content`", "malformed"),
    ('{"messages": [{"role": "user", "content": 5}]}', "must be a string", "malformed"),
    ('{"messages": [{"role": "system", "content": "only a system prompt"}]}', "no user turn", "empty"),
    ('{"prompt_text": "hi"}', "missing field `messages`", "malformed"),
    ('[1, 2]', "expected an object", "malformed"),
])
def test_bad_records_name_file_line_and_problem(tmp_path, line, reason, kind):
    good = json.dumps({"messages": [{"role": "user", "content": "fine"}]})
    path = tmp_path / "p.jsonl"
    path.write_text(f"{good}\n{line}\n{good.replace('fine', 'also fine')}\n")
    items = list(iter_prompts(path))
    assert [type(i) for i in items] == [Prompt, BadRecord, Prompt]
    assert items[1].where == f"{path} line 2" and reason in items[1].reason and items[1].kind == kind
    assert str(items[1]).startswith(f"{path} line 2: ")


def test_duplicate_prompt_is_bad_in_generate_mode(tmp_path):
    rec = {"messages": [{"role": "user", "content": "same"}]}
    items = list(iter_prompts(write_jsonl(tmp_path / "p.jsonl", [rec, rec])))
    assert isinstance(items[1], BadRecord) and items[1].kind == "duplicate" and "line 1" in items[1].reason


def test_undetectable_format_and_unknown_file_type(tmp_path):
    with pytest.raises(PromptError, match="no prompt field found"):
        list(iter_prompts(write_jsonl(tmp_path / "p.jsonl", [{"text": "hi"}])))
    (tmp_path / "p.txt").write_text("hi")
    with pytest.raises(PromptError, match="unsupported file type"):
        list(iter_prompts(tmp_path / "p.txt"))
