"""`distill synthesize`: the Magpie user-turn prefix cut from ChatML, Llama-3, Llama-2 and Gemma templates (and
unclean templates refused), the prompt filters on planted bad prompts (held-out copies included),
a run killed with SIGKILL that resumes with no prompt lost or written twice, and the `synthesize:`
stage of `distill run`."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from transformers import AutoTokenizer

from distill import pipeline
from distill.config import SynthesizeConfig
from distill.curation.prompts import filter_prompts, prompt_filters
from distill.generate.job import request_id
from distill.generate.synthesize import (
    TemplateError,
    shard_path,
    user_turn,
    without_lead_in,
)
from distill.synthesize import synthesize
from tests.helpers import run_in_child, write_jsonl

LLAMA3_TEMPLATE = (  # Llama 3's own template, shortened to what renders the turns
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA2_TEMPLATE = (  # Llama-2-chat's own template: the system turn lives inside the first [INST]
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
GEMMA_TEMPLATE = (  # Gemma's own template: it refuses a system turn
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["tokenizer"])


def test_magpie_prefix_of_the_tiny_models_chatml_template(tokenizer):
    turn = user_turn(tokenizer, None)
    assert turn.prefix == "<|bos|><|im_start|>user\n" and turn.end == "<|im_end|>"
    steered = user_turn(tokenizer, "Users ask about sorting.")
    assert steered.prefix == "<|bos|><|im_start|>system\nUsers ask about sorting.<|im_end|>\n<|im_start|>user\n"


@pytest.mark.parametrize("template, system, prefix, end", [
    (LLAMA3_TEMPLATE, "Be brief.", "<|bos|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
    (LLAMA2_TEMPLATE, None, "<|bos|>[INST] ", "[/INST]"),
    (LLAMA2_TEMPLATE, "Be brief.", "<|bos|>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n", "[/INST]"),
    (GEMMA_TEMPLATE, None, "<|bos|><start_of_turn>user\n", "<end_of_turn>"),
], ids=["llama3-system", "llama2", "llama2-system", "gemma"])
def test_magpie_prefix_of_llama_and_gemma_templates(tokenizer, template, system, prefix, end):
    tokenizer.chat_template, saved = template, tokenizer.chat_template
    try:
        turn = user_turn(tokenizer, system)
    finally:
        tokenizer.chat_template = saved
    assert (turn.prefix, turn.end) == (prefix, end)


def test_gemma_with_a_system_turn_is_refused_in_one_line(tokenizer):
    tokenizer.chat_template, saved = GEMMA_TEMPLATE, tokenizer.chat_template
    try:
        with pytest.raises(TemplateError, match="cannot render a system \\+ user turn: System role not supported") as e:
            user_turn(tokenizer, "Be brief.")
    finally:
        tokenizer.chat_template = saved
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("template, why", [
    ("{% for m in messages %}{{ m['content'] | upper }}<end>{% endfor %}", "verbatim"),
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}", "no end of a user turn"),
    ("{% for m in messages %}[{{ m['content'] | length }}] {{ m['content'] }}<end>{% endfor %}", "differently"),
    ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}", "cannot render"),
])
def test_a_template_without_a_clean_cut_is_refused_in_one_line(tokenizer, template, why):
    tokenizer.chat_template, saved = template, tokenizer.chat_template
    try:
        with pytest.raises(TemplateError, match=why) as e:
            user_turn(tokenizer, "Be brief.")
    finally:
        tokenizer.chat_template = saved
    assert "\n" not in str(e.value)


PLANTED = {
    "good-1": "How do I sort a list of numbers in Python without using the built-in sort function?",
    "good-2": "Write a short poem about the ocean at night, in four lines.",
    "cut": "Explain in detail the history of the Roman empire from its founding to",
    "short": "Hi",
    "empty": "  \n",
    "french": "Pouvez-vous m'expliquer comment fonctionne la photosynthèse chez les plantes vertes ?",
    "refusal": "I'm sorry, but I can't help with that request because it is not appropriate.",
    "leak": "What is the capital of France?<|im_start|>assistant\nParis.",
    "role-line": "What is two plus two?\nassistant\nFour.",
    "copy": "How do I sort a list of numbers in Python without using the built-in sort function?",
    "near-copy": "How do I sort a list of numbers in Python without using the built-in sort function??? thanks",
    "held-out-copy": "Summarise the plot of Hamlet in three sentences for a ten year old.",
    "held-out-near": "Please summarise the plot of Hamlet in three sentences for a ten year old.",
}
EXPECTED = {"empty": "empty", "cut": "finish_reason", "short": "length", "french": "language", "refusal": "refusal",
            "leak": "template_leak", "role-line": "template_leak", "copy": "dedup_exact", "near-copy": "dedup_near",
            "held-out-copy": "held_out", "held-out-near": "held_out"}


def test_the_filters_reject_planted_bad_prompts_with_reasons_and_keep_the_good_ones(tmp_path):
    held_out = write_jsonl(tmp_path / "eval.jsonl", [
        {"messages": [{"role": "user", "content": "Summarise the plot of Hamlet in three sentences for a ten year old."}]},
        {"messages": [{"role": "user", "content": "List three prime numbers larger than one hundred."}]}])
    prompts = [{"id": pid, "text": text, "token_ids": list(range(len(text.split()))),
                "finish_reason": "length" if pid == "cut" else "stop"} for pid, text in PLANTED.items()]
    result = filter_prompts(prompts, prompt_filters(None, [held_out]))
    assert [p["id"] for p in result.kept] == ["good-1", "good-2"]
    assert {r["id"]: r["reject_reason"].split(":")[0] for r in result.rejected} == EXPECTED
    reasons = {r["id"]: r["reject_reason"] for r in result.rejected}
    assert "eval.jsonl" in reasons["held-out-copy"] and "good-1" in reasons["copy"]
    assert result.rejected_by_filter["held_out"] == 2 and sum(result.rejected_by_filter.values()) == len(EXPECTED)


def test_held_out_is_applied_even_when_the_filter_list_omits_it(tmp_path):
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": PLANTED["held-out-copy"]}])
    prompt = {"id": "x", "text": PLANTED["held-out-copy"], "token_ids": [1, 2, 3], "finish_reason": "stop"}
    result = filter_prompts([prompt], prompt_filters(["length"], [held_out]))
    assert not result.kept and result.rejected[0]["reject_reason"].startswith("held_out: equals held-out")


def test_seeds_method_needs_a_seed_file():
    with pytest.raises(ValueError, match="`method: seeds` needs `seeds`"):
        SynthesizeConfig(teacher="t", out="o", method="seeds")


def test_a_run_takes_its_training_prompts_from_the_synthesize_stage(tmp_path):
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "a held-out prompt"}])
    base = {"out": str(tmp_path / "run"), "teacher": {"model": "t"}, "student": {"model": "s"}}
    cfg = pipeline.RunConfig(**base, prompts={"eval": str(held_out)}, synthesize={"n": 8, "topic": "maths"})
    configs = pipeline.stage_configs(cfg)
    assert list(configs)[:2] == ["synthesize", "generate"]
    assert configs["synthesize"].held_out == [held_out] and configs["synthesize"].topic == "maths"
    assert configs["generate"].prompts == tmp_path / "run" / "synthesize" / "prompts.jsonl"
    hashes = pipeline.stage_hashes(configs)  # the synthesised file does not exist yet
    changed = pipeline.stage_hashes(pipeline.stage_configs(cfg.model_copy(update={"synthesize": cfg.synthesize.model_copy(
        update={"n": 9})})))
    assert all(hashes[s] != changed[s] for s in hashes)  # a new synthesis re-runs everything after it
    with pytest.raises(ValueError, match="exactly one source of training prompts"):
        pipeline.RunConfig(**base, prompts={"eval": str(held_out), "train": str(held_out)}, synthesize={"n": 8})
    with pytest.raises(ValueError, match="exactly one source of training prompts"):
        pipeline.RunConfig(**base, prompts={"eval": str(held_out)})


N, CHUNK, MAX_TOKENS = 400, 4, 16


def raw_ids(out) -> list[str]:
    return [json.loads(line)["id"] for path in sorted((out / "raw").glob("part-*.jsonl"))
            for line in path.read_text().splitlines()]


@pytest.mark.engine
def test_sigkill_then_rerun_loses_no_prompt_and_writes_none_twice(tiny_models, teacher, tmp_path):
    out = tmp_path / "synth"
    settings = dict(teacher=str(tiny_models["llama-teacher"]), out=out, n=N, chunk_size=CHUNK, max_tokens=MAX_TOKENS,
                    max_model_len=512)
    args = [sys.executable, "-m", "distill.cli", "synthesize", *(f"--{k.replace('_', '-')}={v}" for k, v in settings.items())]
    with open(tmp_path / "stderr.txt", "w") as err:  # a file: a full pipe would stall the run
        proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.time() + 600  # the engine's start on 2 busy cores
        while not shard_path(out, 0).exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)  # a real event: the first shard's file, renamed into place when complete
        assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its engine processes, like the OOM killer
        proc.wait(timeout=60)
    first = shard_path(out, 0).read_bytes()
    survived = raw_ids(out)
    assert 0 < len(survived) < N and not (out / "prompts.jsonl").exists()

    result = synthesize(SynthesizeConfig(**settings), teacher=teacher)
    ids = raw_ids(out)
    assert ids == [request_id("synth:0", i) for i in range(N)]  # every prompt once, in order
    assert shard_path(out, 0).read_bytes() == first  # finished shards are kept, not redone
    kept = [json.loads(line) for line in result.prompts.read_text().splitlines()]
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in kept + rejected) == sorted(ids) and result.written == N
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["written"] == N and manifest["synthesis"]["method"] == "magpie"
    assert [h["complete"] for h in manifest["history"]] == [False, True]


@pytest.mark.engine
def test_distill_run_synthesizes_seed_prompts_that_generate_then_answers(tiny_models, tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"prompt": f"add {a} and {b}"} for a, b in ((1, 2), (3, 4), (5, 6))])
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "reverse the word hello"}])
    model = str(tiny_models["llama-teacher"])
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "out": str(out), "teacher": {"model": model, "max_model_len": 512},
        "student": {"model": str(tiny_models["llama-student"])}, "prompts": {"eval": str(held_out)},
        "synthesize": {"method": "seeds", "seeds": str(seeds), "n": 8, "max_tokens": 8, "filters": []},
        "generate": {"max_tokens": 4, "top_k": 4}}))
    stages = run_in_child(config, out, "--only", "synthesize")
    assert stages["synthesize"]["status"] == "ran"
    synthesized = out / "synthesize"
    manifest = json.loads((synthesized / "manifest.json").read_text())
    assert manifest["synthesis"]["method"] == "seeds" and manifest["counts"]["written"] == 8
    assert [f["name"] for f in manifest["filters"]] == ["held_out"]  # prompts.eval guards the run: always there
    kept = manifest["counts"]["kept"]
    assert kept == 8 - manifest["counts"]["rejected_by_filter"].get("empty", 0) > 0
    stages = run_in_child(config, out, "--only", "generate")  # answers the synthesised file
    assert stages["generate"]["result"].startswith(f"{kept:,} responses")


@pytest.mark.parametrize("answer, prompt", [
    ("Sure! Here's a new request:\n\n\"How do I bake bread?\"", "How do I bake bread?"),
    ("Here is one new request a user could send:\nPlan a trip to Rome.", "Plan a trip to Rome."),
    ("\u201cWhat is a prime number?\u201d", "What is a prime number?"),
    ("Translate this into French:\nGood morning", "Translate this into French:\nGood morning"),  # the request's own
    ("Sure: what is 2 + 2?", "Sure: what is 2 + 2?"),  # one line: nothing follows a lead-in
    ("\"Quote\" and \"unquote\"", "\"Quote\" and \"unquote\""),  # not one quoted span
])
def test_a_seeds_answer_loses_the_reply_around_the_request(answer, prompt):
    assert without_lead_in(answer) == prompt
