"""The online teacher (`distill train --teacher`), the intermediate-state loss, and Block Influence
layer selection (`distill init-student --select importance`), on tiny local models."""

import json

import pytest
import torch

from distill import corpus
from distill.config import InitStudentConfig, TrainConfig
from distill.train.importance import block_influence, most_important
from distill.train.init_student import LAYER_MAP_KEY, init_student
from distill.train.losses import KINDS, LossSpec, chunked_online_loss
from tests.helpers import make_corpus, record

QUESTIONS = [f"Sort the numbers {i} {i * 3 % 7} {i % 4}, then add {i}" for i in range(16)]


def chat_corpus(root, teacher_dir):
    """Records whose prompts are chat prompts and whose responses are token ids of the tiny vocabulary."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    records = []
    for i, q in enumerate(QUESTIONS):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        records.append(record(i, question=q, prompt_ids=ids, response_ids=[40 + i, 41, 42 + i % 3, 43, 3]))
    return make_corpus(root, records, teacher={"model": str(teacher_dir), **corpus.tokenizer_fingerprint(tokenizer)})


def deep_teacher(tmp_path, tiny_models, layers=4):
    from distill import tiny

    return tiny.build_model(tmp_path / "teacher", tiny_models["tokenizer"], "llama",
                            dict(tiny.SIZES["teacher"], num_hidden_layers=layers), init_std=0.1)


def train_online(tmp_path, data, student, teacher, name="s", **overrides):
    from distill.train.trainer import train

    settings = dict(corpus=data, student=str(student), out=tmp_path / name, teacher=str(teacher), lora=False,
                    max_steps=8, batch_size=4, learning_rate=3e-3, logging_steps=1, eval_fraction=0, chunk_size=7)
    train(TrainConfig(**{**settings, **overrides}))
    return [m for m in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def dense_reference(h, w, th, tw, labels, spec: LossSpec, alpha):
    """Float64, whole `[N, V]` logits: the definition the chunked loss must equal."""
    s = torch.log_softmax(h.double() @ w.double().T / spec.temperature, -1)
    t = torch.log_softmax(th.double() @ tw.double().T / spec.temperature, -1)
    if spec.kind == "forward_kl":
        kd = (t.exp() * (t - s)).sum(-1)
    elif spec.kind == "reverse_kl":
        kd = (s.exp() * (s - t)).sum(-1)
    else:
        m = torch.log(spec.beta * t.exp() + (1 - spec.beta) * s.exp())
        kd = spec.beta * (t.exp() * (t - m)).sum(-1) + (1 - spec.beta) * (s.exp() * (s - m)).sum(-1)
    kd = kd * spec.temperature**2
    ce = torch.nn.functional.cross_entropy(h.double() @ w.double().T, labels, reduction="none")
    return (alpha * kd + (1 - alpha) * ce).mean(), kd.mean()


@pytest.mark.parametrize("kind", KINDS)
def test_full_vocabulary_kd_equals_a_float64_dense_reference_at_every_chunk_size(kind):
    torch.manual_seed(0)
    b, t, hs, ht, v = 2, 5, 8, 12, 50
    h = torch.randn(b, t, hs, requires_grad=True)
    w = torch.randn(v, hs, requires_grad=True)
    th, tw = torch.randn(b, t, ht), torch.randn(v, ht)
    labels = torch.randint(0, v, (b, t))
    mask = torch.rand(b, t) > 0.3
    spec = LossSpec(kind=kind, temperature=2.0)
    reference, reference_kd = dense_reference(h[mask], w, th[mask], tw, labels[mask], spec, alpha=0.7)
    ref_grads = torch.autograd.grad(reference, [h, w])
    for chunk in (1, 3, 1000):
        loss, terms = chunked_online_loss(h, w, labels, th, tw, mask, spec, alpha=0.7, chunk_size=chunk)
        grads = torch.autograd.grad(loss, [h, w])
        torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(terms["kd"].double(), reference_kd, rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # the evaluation path (no fused gradients) gives the same value
        loss, _ = chunked_online_loss(h, w, labels, th, tw, mask, spec, alpha=0.7, chunk_size=2)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-6)


def test_hidden_state_loss_against_a_hand_computation():
    from distill.train.online import hidden_state_loss

    s = [torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])]  # [1, 3, 2]; the last position is masked out
    t = [torch.tensor([[[2.0, 0.0], [0.0, -2.0], [1.0, 1.0]]])]
    mask = torch.tensor([[True, True, False]])
    # mse: |(-1, 0)|^2 / |(2, 0)|^2 = 1/4 and |(0, 4)|^2 / |(0, -2)|^2 = 4: sum 4.25
    assert hidden_state_loss(s, t, [(0, 0)], mask, "mse").item() == pytest.approx(4.25)
    # cosine: same direction 0, opposite 2
    assert hidden_state_loss(s, t, [(0, 0)], mask, "cosine").item() == pytest.approx(2.0)
    # averaged over pairs: a pair with zero loss halves it
    assert hidden_state_loss(s + t, t + t, [(0, 0), (1, 1)], mask, "mse").item() == pytest.approx(2.125)


def test_online_training_lowers_the_loss_and_logs_full_vocabulary_kd(tmp_path, tiny_models):
    data = chat_corpus(tmp_path / "corpus", tiny_models["llama-teacher"])
    logs = train_online(tmp_path, data, tiny_models["llama-student"], tiny_models["llama-teacher"], max_steps=12,
                        alpha=0.9)
    assert len(logs) == 12 and all("kd" in m and "ce" in m and "hidden" not in m for m in logs)
    assert logs[-1]["kd"] < 0.7 * logs[0]["kd"] and logs[-1]["loss"] < logs[0]["loss"]


def test_a_student_that_is_a_slice_of_the_teacher_has_zero_hidden_loss(tmp_path, tiny_models):
    """Layers 0, 1 of a 3-layer teacher: layer 0's output equals the teacher's layer 0, and the
    student's last (layer 1, after the final norm) the teacher's layer 1 put through the teacher's
    final norm. The logits still differ (layer 2 is missing): KD is not zero."""
    teacher = deep_teacher(tmp_path, tiny_models, layers=3)
    student = init_student(InitStudentConfig(teacher=str(teacher), out=tmp_path / "student", keep_layers=[0, 1])).path
    assert json.loads((student / "config.json").read_text())[LAYER_MAP_KEY] == [0, 1]
    data = chat_corpus(tmp_path / "corpus", teacher)
    logs = train_online(tmp_path, data, student, teacher, name="slice", max_steps=1, hidden_weight=1.0,
                        hidden_loss="cosine")
    assert logs[0]["hidden"] == pytest.approx(0.0, abs=1e-5) and logs[0]["kd"] > 1e-3
    # (mse) against other layers the loss is not zero, and training with a large weight lowers it
    logs = train_online(tmp_path, data, student, teacher, name="mapped", max_steps=6, hidden_weight=50.0,
                        learning_rate=3e-4, layer_map=[1, 2])
    assert logs[0]["hidden"] > 1e-3 and logs[-1]["hidden"] < logs[0]["hidden"]


def test_layer_map_checks_are_one_line_before_any_model_loads(tmp_path, tiny_models):
    from distill.train.online import check_online

    teacher = deep_teacher(tmp_path, tiny_models, layers=4)
    student = init_student(InitStudentConfig(teacher=str(teacher), out=tmp_path / "student", num_layers=2)).path

    def plan(**overrides):
        return check_online(TrainConfig(corpus=tmp_path, student=str(student), out=tmp_path / "o", teacher=str(teacher),
                                        **overrides))

    assert plan().layer_map is None
    assert plan(hidden_weight=0.5).layer_map == [0, 3]  # from the student's config.json
    assert plan(hidden_weight=0.5, layer_map="1,3").layer_map == [1, 3]  # the flag overrides it
    with pytest.raises(ValueError, match=r"`layer_map` \[0, 1, 3\] has 3 entries but the student has 2 layers"):
        plan(hidden_weight=0.5, layer_map=[0, 1, 3])
    with pytest.raises(ValueError, match=r"teacher layers are 0\.\.3"):
        plan(hidden_weight=0.5, layer_map=[0, 4])
    assert plan(hidden_weight=0.5).projection is None  # the same width
    narrow = check_online(TrainConfig(corpus=tmp_path, student=str(tiny_models["llama-student"]), out=tmp_path / "o",
                                      teacher=str(teacher), hidden_weight=0.5, layer_map=[0]))
    assert narrow.projection == (64, 128)
    with pytest.raises(ValueError, match="records no `distill_layer_map`"):
        check_online(TrainConfig(corpus=tmp_path, student=str(tiny_models["llama-student"]), out=tmp_path / "o",
                                 teacher=str(teacher), hidden_weight=0.5))
    with pytest.raises(ValueError, match="need the online `teacher`"):
        TrainConfig(corpus=tmp_path, student="s", out=tmp_path / "o", hidden_weight=0.5)
    with pytest.raises(ValueError, match="`on_policy` and the online `teacher` cannot be combined"):
        TrainConfig(corpus=tmp_path, student="s", out=tmp_path / "o", teacher="t", on_policy=True,
                    teacher_endpoint="http://x")


def test_importance_selection_drops_a_layer_made_identity(tmp_path, tiny_models, capsys):
    """Layer 2 of 5 writes nothing into the residual stream (its attention and MLP outputs are
    zeroed), so its Block Influence is 0 and it is the layer a 4-layer student loses; evenly spaced
    would have dropped layer 1 or 3."""
    from safetensors.torch import load_file, save_file

    teacher = deep_teacher(tmp_path, tiny_models, layers=5)
    weights = load_file(teacher / "model.safetensors")
    for name in ("model.layers.2.self_attn.o_proj.weight", "model.layers.2.mlp.down_proj.weight"):
        weights[name] = torch.zeros_like(weights[name])
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    calibration = chat_corpus(tmp_path / "calibration", teacher)
    result = init_student(InitStudentConfig(teacher=str(teacher), out=tmp_path / "student", num_layers=4,
                                            select="importance", calibration=calibration, samples=4))
    assert result.layers == [0, 1, 3, 4]
    config = json.loads((result.path / "config.json").read_text())
    assert config[LAYER_MAP_KEY] == [0, 1, 3, 4] and config["distill_layer_importance"][2] == pytest.approx(0, abs=1e-6)
    assert min(config["distill_layer_importance"][i] for i in (1, 3)) > 1e-3
    assert "block influence per teacher layer (kept *): 0* " in capsys.readouterr().err


def test_block_influence_is_one_minus_the_cosine_of_a_layer_s_input_and_output():
    class Scale(torch.nn.Module):  # a "layer" that maps h to h * [1, -1]: cos = (a^2 - b^2) / (a^2 + b^2)
        def forward(self, h):
            return h * torch.tensor([1.0, -1.0])

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Scale()])
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids, use_cache=False):
            h = torch.stack([ids.float(), torch.ones_like(ids, dtype=torch.float)], -1)  # [1, T, 2]: (id, 1)
            return self.layers[0](h)

    model = Model()
    scores = block_influence(model, model.layers, [[1, 2], [3]])
    want = sum(1 - (a * a - 1) / (a * a + 1) for a in (1, 2, 3)) / 3
    assert scores == [pytest.approx(want)]
    assert most_important([0.0, 0.1, 0.5, 0.2, 0.0], 3) == [0, 2, 4]
    with pytest.raises(ValueError, match=r"keeps the first and last layers, so 2\.\.5, got 1"):
        most_important([0.0] * 5, 1)


def test_init_student_importance_needs_calibration(tmp_path):
    with pytest.raises(ValueError, match="`select: importance` needs `num_layers` and a `calibration` corpus"):
        InitStudentConfig(teacher="t", out=tmp_path, num_layers=2, select="importance")
    with pytest.raises(ValueError, match="`calibration` is read by `select: importance` only"):
        InitStudentConfig(teacher="t", out=tmp_path, num_layers=2, calibration=tmp_path / "corpus")


def test_the_online_teacher_is_not_a_sweep_dimension():
    from distill.config import searchable_fields

    assert "teacher" not in searchable_fields() and "hidden_weight" in searchable_fields()


@pytest.mark.slow
@pytest.mark.parametrize("width", ["pruned", "narrow"])
def test_two_processes_with_the_online_teacher_give_the_single_process_curve(tmp_path, tiny_models, width):
    """torchrun, 2 processes x 2 sequences against 1 x 4, with full-vocabulary KD and the hidden loss:
    the same logged loss, grad norm, kd, ce and hidden terms per step. `narrow`: a student half the
    teacher's width, through a learned projection, whose gradients DDP must average like the
    student's (else the processes' projections drift apart after step 1)."""
    import subprocess
    import sys

    teacher = deep_teacher(tmp_path, tiny_models, layers=3)
    if width == "pruned":
        student, layer_map = init_student(InitStudentConfig(teacher=str(teacher), out=tmp_path / "student",
                                                            num_layers=2)).path, []
    else:
        student, layer_map = tiny_models["llama-student"], ["--layer-map", "1"]
    data = chat_corpus(tmp_path / "corpus", teacher)

    def run(name, command, batch_size):
        args = ["-m", "distill.cli", "train", "--corpus", str(data), "--student", str(student), "--teacher",
                str(teacher), "--hidden-weight", "0.5", *layer_map, "--out", str(tmp_path / name), "--no-lora",
                "--max-steps", "4", "--batch-size", str(batch_size), "--learning-rate", "3e-3", "--logging-steps", "1",
                "--eval-fraction", "0", "--chunk-size", "7"]
        done = subprocess.run(command + args, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        logs = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [m[key] for m in logs if "loss" in m for key in ("loss", "grad_norm", "kd", "ce", "hidden")]

    two = run("two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"], 2)
    single = run("single", [sys.executable], 4)
    assert len(two) == len(single) == 20
    assert two == pytest.approx(single, rel=1e-4)


def chat_dataset(path, tokenizer_dir):
    """QUESTIONS as a JSONL chat dataset: every record ends in the assistant answer; some have a
    system turn and an earlier exchange."""
    from tests.helpers import write_jsonl

    records = []
    for i, q in enumerate(QUESTIONS):
        turns = [{"role": "user", "content": q}, {"role": "assistant", "content": f"the answer is {i * 3}"}]
        if i % 3 == 0:
            turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"}, *turns]
        records.append({"id": f"c{i}", "messages": turns})
    return write_jsonl(path, records)


def test_a_chat_dataset_becomes_the_prompt_and_the_last_assistant_turn_as_generate_templates_them(tmp_path, tiny_models):
    from transformers import AutoTokenizer

    from distill.train.chat_data import chat_training_data
    from tests.helpers import write_jsonl

    teacher = tiny_models["llama-teacher"]
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    path = chat_dataset(tmp_path / "chat.jsonl", teacher)
    cfg = TrainConfig(corpus=path, student=str(tiny_models["llama-student"]), out=tmp_path / "o", teacher=str(teacher))
    data = chat_training_data(path, cfg, tmp_path / "scratch")
    assert (data.records, data.skipped, len(data.dataset)) == (16, 0, 16)
    assert set(data.dataset.column_names) == {"id", "prompt_token_ids", "response_token_ids"}
    row = data.dataset[3]  # the one with a system turn and an earlier exchange
    messages = [json.loads(line) for line in path.read_text().splitlines()][3]["messages"]
    assert row["prompt_token_ids"] == tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True,
                                                                    tokenize=True, return_dict=True)["input_ids"]
    assert tokenizer.decode(row["response_token_ids"], skip_special_tokens=True).strip() == "the answer is 9"
    # ShareGPT, the other loader of `generate`: the same tokens
    sharegpt = write_jsonl(tmp_path / "chat-sharegpt.jsonl", [
        {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[t["role"]],
                            "value": t["content"]} for t in messages]}])
    assert chat_training_data(sharegpt, cfg, tmp_path / "scratch2").dataset[0]["prompt_token_ids"] == \
        row["prompt_token_ids"]
    # a record whose last turn is not the answer stops the run, naming the file and the line
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": messages}, {"messages": messages[:-1]}])
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2: last turn is not an assistant response.*fix or remove"):
        chat_training_data(bad, cfg, tmp_path / "scratch3")


def test_the_online_teacher_trains_on_a_chat_dataset_with_live_top_k(tmp_path, tiny_models):
    """No corpus: the file's answers are the CE targets, the teacher's top-8 + tail, taken live, the KD's."""
    from distill.train.card import StudentCard

    teacher = tiny_models["llama-teacher"]
    path = chat_dataset(tmp_path / "chat.jsonl", teacher)
    logs = train_online(tmp_path, path, tiny_models["llama-student"], teacher, max_steps=10, alpha=0.9,
                        online_targets="topk", teacher_top_k=8)
    assert len(logs) == 10 and logs[-1]["kd"] < 0.8 * logs[0]["kd"] and logs[-1]["loss"] < logs[0]["loss"]
    card = StudentCard.load(tmp_path / "s")
    assert card.teacher.model == str(teacher) and card.corpus == str(path)


def test_a_chat_dataset_without_the_online_teacher_is_refused_in_one_line(tmp_path, tiny_models):
    from distill.train.trainer import train

    path = chat_dataset(tmp_path / "chat.jsonl", tiny_models["llama-teacher"])
    with pytest.raises(ValueError, match=r"chat\.jsonl is a chat dataset, not a corpus directory: a chat dataset "
                                         r"needs the online `teacher`"):
        train(TrainConfig(corpus=path, student=str(tiny_models["llama-student"]), out=tmp_path / "o"))
    with pytest.raises(ValueError, match="`online_targets` need the online `teacher`"):
        TrainConfig(corpus=path, student="s", out=tmp_path / "o", online_targets="topk")


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_live_top_k_with_k_the_vocabulary_is_full_vocabulary_kd(temperature):
    torch.manual_seed(0)
    b, t, hs, ht, v = 2, 5, 8, 12, 50
    h = torch.randn(b, t, hs, requires_grad=True)
    w = torch.randn(v, hs, requires_grad=True)
    th, tw = torch.randn(b, t, ht), torch.randn(v, ht)
    labels, mask = torch.randint(0, v, (b, t)), torch.rand(b, t) > 0.3
    spec = LossSpec(kind="forward_kl", temperature=temperature)
    full, full_terms = chunked_online_loss(h, w, labels, th, tw, mask, spec, alpha=0.7, chunk_size=3)
    topk, topk_terms = chunked_online_loss(h, w, labels, th, tw, mask, spec, alpha=0.7, chunk_size=3, top_k=v)
    torch.testing.assert_close(topk, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(topk_terms["kd"], full_terms["kd"], rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(topk, [h, w]), torch.autograd.grad(full, [h, w])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # with k below the vocabulary it is another loss (the tail bucket is coarser)
    fewer, _ = chunked_online_loss(h, w, labels, th, tw, mask, spec, alpha=0.7, chunk_size=3, top_k=5)
    assert not torch.allclose(fewer, full, rtol=1e-3)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("kind", KINDS)
def test_live_top_k_is_the_offline_loss_on_a_corpus_of_the_teacher_s_top_k(kind, tail):
    from distill.train.losses import chunked_distill_loss

    torch.manual_seed(1)
    b, t, hs, ht, v, k = 2, 6, 8, 12, 40, 4
    h = torch.randn(b, t, hs, requires_grad=True)
    w = torch.randn(v, hs, requires_grad=True)
    th, tw = torch.randn(b, t, ht), torch.randn(v, ht)
    labels, mask = torch.randint(0, v, (b, t)), torch.rand(b, t) > 0.3
    spec = LossSpec(kind=kind, temperature=1.5, tail=tail)
    # what `generate` stores: the teacher's raw logprobs of its k best tokens, best first
    stored_lps, stored_ids = torch.log_softmax(th @ tw.T, -1).topk(k, -1)
    offline, offline_terms = chunked_distill_loss(h, w, labels, stored_ids, stored_lps, mask, spec, alpha=0.6,
                                                  chunk_size=4)
    online, online_terms = chunked_online_loss(h, w, labels, th, tw, mask, spec, alpha=0.6, chunk_size=4, top_k=k)
    torch.testing.assert_close(online, offline)
    torch.testing.assert_close(online_terms["kd"], offline_terms["kd"])
    for got, want in zip(torch.autograd.grad(online, [h, w]), torch.autograd.grad(offline, [h, w])):
        torch.testing.assert_close(got, want)


def test_a_narrower_student_learns_through_projections_that_train_and_are_not_saved(tmp_path, tiny_models):
    """A 64-wide student against a 128-wide teacher: its state is projected into the teacher's space.
    The hidden loss drops, the projection changes between checkpoints (it receives gradients and
    the optimizer steps it), checkpoints hold it, and the saved student does not."""
    from safetensors.torch import load_file

    from distill.train.online import PROJECTIONS

    teacher = deep_teacher(tmp_path, tiny_models, layers=3)
    data = chat_corpus(tmp_path / "corpus", teacher)
    logs = train_online(tmp_path, data, tiny_models["llama-student"], teacher, max_steps=6, hidden_weight=5.0,
                        layer_map=[1], save_steps=3, learning_rate=1e-2)
    assert logs[-1]["hidden"] < 0.8 * logs[0]["hidden"]
    key = f"{PROJECTIONS}.0.weight"
    first, last = (load_file(tmp_path / "s" / "checkpoints" / f"checkpoint-{n}" / "model.safetensors") for n in (3, 6))
    assert first[key].shape == (128, 64) and not torch.allclose(first[key], last[key])
    assert not any(PROJECTIONS in name for name in load_file(tmp_path / "s" / "model.safetensors"))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_teacher_s_decoder_alone_gives_the_last_hidden_state_kd_reads(tiny_models, family):
    """Without the hidden loss the teacher runs as its decoder only (no layer's state kept): its
    output must be the state after the final norm that `hidden_states[-1]` is with the loss on."""
    from distill.train.online import load_teacher

    teacher = load_teacher(str(tiny_models[f"{family}-teacher"]), torch.float32)
    ids = torch.tensor([[5, 9, 40, 41, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    with torch.no_grad():
        full = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        alone = teacher.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    torch.testing.assert_close(alone, full)
    assert not torch.allclose(alone, teacher.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False,
                                                           output_hidden_states=True).hidden_states[-2])


@pytest.mark.parametrize("env", [{"ACCELERATE_USE_FSDP": "true"},
                                 {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}])
def test_fsdp_and_zero3_are_refused_in_one_line_before_any_model_loads(tmp_path, monkeypatch, env):
    """What `accelerate launch` sets for an FSDP or ZeRO-3 config: the online teacher would be whole
    on every process, so it is refused before the models (here: paths that do not exist) are read."""
    from distill.train.online import check_online

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="not supported under FSDP or DeepSpeed ZeRO-3") as err:
        check_online(TrainConfig(corpus=tmp_path, student=str(tmp_path / "none"), out=tmp_path / "o",
                                 teacher=str(tmp_path / "none")))
    assert "\n" not in str(err.value)
