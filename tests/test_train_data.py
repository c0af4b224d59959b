"""The collator aligns tokens, labels and teacher top-k rows, truncates them together and
honours `loss_mask`."""

import numpy as np
import pytest
import torch

from distill.train.data import DistillCollator, trainable
from tests.helpers import record

K = 3


def recognisable(rid, prompt, response, loss_mask=None):
    """A `record` whose top-k row j is recognisable: ids [100j, 100j+1, 100j+2], logprobs [-j, -j-1, -j-2]."""
    n = len(response)
    return record(rid, k=K, prompt_ids=prompt, response_ids=response, loss_mask=loss_mask,
                  topk_ids=[[100 * j + c for c in range(K)] for j in range(n)],
                  topk_logprobs=[[-float(j) - c for c in range(K)] for j in range(n)])


def test_alignment_padding_and_masks():
    recs = [recognisable("a", [1, 2, 3], [10, 11, 12, 13]), recognisable("b", [1, 2], [20, 21], loss_mask=[True, False])]
    batch = DistillCollator(pad_token_id=0, max_length=64, top_k=K)(recs)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 10, 11, 12, 13], [1, 2, 20, 21, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 1, 0, 0, 0]]
    # position t predicts token t + 1: labels are the next tokens on response positions only
    assert batch["labels"].tolist() == [[-100, -100, 10, 11, 12, 13, -100], [-100, 20, -100, -100, -100, -100, -100]]
    for i, r in enumerate(recs):
        p = len(r["prompt_token_ids"])
        for t in torch.nonzero(batch["target_mask"][i]).flatten().tolist():
            j = t + 1 - p  # the response token predicted at t
            assert batch["input_ids"][i, t + 1] == r["response_token_ids"][j] == batch["labels"][i, t]
            assert batch["topk_ids"][i, t].tolist() == r["topk_token_ids"][j]
            np.testing.assert_allclose(batch["topk_logprobs"][i, t].numpy(), r["topk_logprobs"][j])
    assert batch["target_mask"].sum().item() == 4 + 1  # "b"'s second token is masked out by loss_mask


def test_truncation_cuts_tokens_and_topk_rows_together():
    rec = recognisable("a", [1, 2, 3], [10, 11, 12, 13, 14])
    batch = DistillCollator(pad_token_id=0, max_length=5, top_k=K)([rec])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 10, 11]]
    assert batch["labels"].tolist() == [[-100, -100, 10, 11, -100]]
    assert batch["topk_ids"][0, 3].tolist() == [100, 101, 102]  # row of response token 1 (11)
    assert batch["topk_ids"][0, 4].tolist() == [0, 0, 0]  # no target past the cut


def test_a_prompt_that_fills_the_context_is_refused_by_name():
    rec = recognisable("long", list(range(8)), [10])
    assert not trainable(rec, 8) and trainable(rec, 9)
    with pytest.raises(ValueError, match="record 'long': prompt of 8 tokens leaves no room"):
        DistillCollator(pad_token_id=0, max_length=8, top_k=K)([rec])


@pytest.mark.engine
def test_teacher_copy_has_zero_kd_loss_on_its_own_corpus_and_a_random_student_does_not(tmp_path, tiny_models,
                                                                                        teacher, prompts_file):
    """End to end: vLLM corpus -> collator -> chunked loss on a transformers model."""
    from transformers import AutoModelForCausalLM

    from distill import corpus
    from distill.config import GenerateConfig
    from distill.generate import generate
    from distill.train.losses import chunked_distill_loss

    out = generate(GenerateConfig(teacher=str(tiny_models["llama-teacher"]), prompts=prompts_file, out=tmp_path / "c",
                                  max_tokens=16, top_k=20, logprob_encoding="float32"), teacher=teacher).path
    batch = DistillCollator(pad_token_id=0, max_length=512, top_k=20)(list(corpus.iter_records(out)))

    def kd(model_dir):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            _, parts = chunked_distill_loss(hidden, model.lm_head.weight, batch["labels"].clamp(min=0),
                                            batch["topk_ids"], batch["topk_logprobs"], batch["target_mask"])
        return parts["kd"].item()

    assert kd(tiny_models["llama-teacher"]) < 1e-3
    assert kd(tiny_models["llama-student"]) > 0.1


def test_a_non_finite_gradient_norm_stops_training_before_saving():
    """The loss can stay finite while a NaN gradient destroys the weights (seen: a teacher build
    logged loss 0.75 with grad_norm NaN, then saved an all-NaN model and exited 0)."""
    from transformers import TrainerControl, TrainerState

    from distill.train.trainer import StopOnNonFinite

    state = TrainerState(global_step=250)
    StopOnNonFinite().on_log(None, state, TrainerControl(), logs={"loss": 0.75, "grad_norm": 1.4})
    with pytest.raises(FloatingPointError, match="step 250: the gradient norm is nan; no model was saved"):
        StopOnNonFinite().on_log(None, state, TrainerControl(), logs={"loss": 0.75, "grad_norm": float("nan")})


def test_training_batches_are_the_same_from_every_encoding(tmp_path):
    """What the trainer reads (`corpus.load_dataset` -> collator) is the same records whatever the
    storage: identical ids, logprobs within each encoding's bound, and nearly the same KD loss."""
    from distill import corpus
    from distill.train.losses import topk_kd_loss
    from tests.helpers import make_corpus

    k, vocab = 8, 300
    rng = np.random.default_rng(0)
    records = []
    for i in range(6):
        n = 5 + i
        logits = rng.standard_normal((n, vocab)) * 4
        lps = torch.log_softmax(torch.tensor(logits), -1).numpy()
        ids = np.argsort(-lps, axis=1)[:, :k]
        top = np.take_along_axis(lps, ids, axis=1).astype(np.float32)
        records.append(record(i, k=k, response_ids=ids[:, 0].tolist(), topk_ids=ids, topk_logprobs=top))
    collate = DistillCollator(pad_token_id=0, max_length=64, top_k=k)
    batches = {e: collate(list(corpus.load_dataset(make_corpus(tmp_path / e, records, k=k, encoding=e))))
               for e in corpus.LOGPROB_ENCODINGS}
    exact = batches["float32"]
    student = torch.randn(*exact["topk_ids"].shape[:2], vocab, generator=torch.Generator().manual_seed(0))
    reference = topk_kd_loss(student, exact["topk_ids"], exact["topk_logprobs"], exact["target_mask"])
    for encoding, batch in batches.items():
        for key in ("input_ids", "labels", "target_mask", "topk_ids"):
            assert torch.equal(batch[key], exact[key]), (encoding, key)
        lp = exact["topk_logprobs"].double()
        assert ((batch["topk_logprobs"] - lp).abs() <= torch.tensor(corpus.logprob_tolerance(encoding, lp)) + 1e-7).all()
        loss = topk_kd_loss(student, batch["topk_ids"], batch["topk_logprobs"], batch["target_mask"])
        assert abs(loss - reference) / reference < 1e-3, encoding


def test_the_pre_pass_reads_the_corpus_once_keeping_what_can_train_and_counting_the_rest(tmp_path, monkeypatch):
    """One pass over the shards (several, several batches each) gives the training dataset of
    the records whose prompt leaves room (the collator's columns only), the number dropped, and
    the largest token id anywhere in the corpus; the shards are opened once each."""
    import pyarrow.parquet as pq

    from distill import corpus
    from distill.train.data import TRAINING_COLUMNS, prepare_training_data
    from tests.helpers import K
    from tests.helpers import record as corpus_record

    records = [corpus_record(i) for i in range(3000)]
    for i, r in enumerate(records):
        r["prompt_token_ids"] = list(range(1, 2 + i % 7))  # 1..7 tokens
    records[1234]["prompt_token_ids"] = [5, 9000, 7]  # the largest id: in a prompt, not in the top-k
    root = tmp_path / "c"
    for shard, start in enumerate(range(0, len(records), 1500)):
        table, _ = corpus.records_to_checked_table(records[start:start + 1500], K, "quantized", None,
                                                   corpus.corpus_dictionary(root))
        corpus.write_shard(root, shard, table)
    corpus.write_manifest(root, corpus.Manifest(teacher={"model": "t"}, generation={"top_k": K},
                                                stats=corpus.corpus_stats(root)))
    opened = []
    real_open = pq.ParquetFile
    monkeypatch.setattr(pq, "ParquetFile", lambda path, *a, **kw: opened.append(path) or real_open(path, *a, **kw))

    data = prepare_training_data(root, max_length=5, scratch=tmp_path / "scratch")

    assert sorted(opened) == corpus.shard_paths(root)
    kept = [r for r in records if len(r["prompt_token_ids"]) < 5]
    assert (data.records, data.skipped, data.max_token_id) == (3000, 3000 - len(kept), 9000)
    # the file keeps the top-k as stored; the rows read come decoded, a record's top-k one [T, k] array
    assert data.dataset.column_names == [c for c in TRAINING_COLUMNS if c not in ("topk_token_ids", "topk_logprobs", "loss_mask")]
    assert data.dataset["id"] == [r["id"] for r in kept]
    stored = {r["id"]: r for r in corpus.iter_records(root)}
    for row in (data.dataset[0], data.dataset[len(kept) - 1]):
        assert set(row) == {"id", "prompt_token_ids", "response_token_ids", "topk_token_ids", "topk_logprobs"}
        topk = ("topk_token_ids", "topk_logprobs")
        assert all(row[c].shape == (len(row["response_token_ids"]), K) for c in topk)
        assert {c: row[c].tolist() if c in topk else row[c] for c in row} == {c: stored[row["id"]][c] for c in row}


def test_the_pre_pass_refuses_an_invalid_corpus_as_validate_does(tmp_path):
    from distill import corpus
    from distill.train.data import prepare_training_data
    from tests.helpers import make_corpus
    from tests.helpers import record as corpus_record

    root = make_corpus(tmp_path / "c", [corpus_record(0), corpus_record(1), corpus_record(0)])
    with pytest.raises(corpus.CorpusError) as validated:
        corpus.validate(root)
    with pytest.raises(corpus.CorpusError) as prepared:
        prepare_training_data(root, max_length=64, scratch=tmp_path / "scratch")
    assert "duplicate id 'r0'" in str(prepared.value) and str(prepared.value) == str(validated.value)


def test_no_trainable_record_is_one_line(tmp_path):
    from distill.train.data import prepare_training_data
    from tests.helpers import make_corpus
    from tests.helpers import record as corpus_record

    root = make_corpus(tmp_path / "c", [corpus_record(0), corpus_record(1)])
    with pytest.raises(ValueError, match="the prompts of all 2 fill max_length 3"):
        prepare_training_data(root, max_length=3, scratch=tmp_path / "scratch")


def test_eval_checks_vocabularies_without_importing_trl():
    """`check_vocabulary` lives with the data, not the trainer: eval's fidelity imports no TRL."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import sys, distill.evaluation.fidelity; print('trl' in sys.modules)"],
                          capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip() == "False"


def test_a_curated_corpus_keeps_its_loss_mask_for_the_collator(tmp_path):
    from distill.train.data import prepare_training_data
    from tests.helpers import make_corpus
    from tests.helpers import record as corpus_record

    records = [corpus_record(i) for i in range(4)]
    for r in records:
        r["loss_mask"] = [True, False, True]
    data = prepare_training_data(make_corpus(tmp_path / "c", records), max_length=64, scratch=tmp_path / "scratch")
    assert data.dataset[2]["loss_mask"] == [True, False, True]
    assert DistillCollator(pad_token_id=0, max_length=64, top_k=4)([data.dataset[2]])["target_mask"].tolist() == \
        [[False, False, True, False, True, False]]


def test_an_epoch_whose_last_batch_holds_one_record_trains(tmp_path, tiny_models):
    """5 records, batches of 4: the second step's batch is one record. accelerate's
    `gather_for_metrics` cut the logged [kd, ce] pair to that one row (a crash at every such epoch end)."""
    import json

    from distill.config import TrainConfig
    from distill.train.trainer import train
    from tests.helpers import make_corpus, record

    source = make_corpus(tmp_path / "c", [record(i) for i in range(5)], teacher=str(tiny_models["llama-teacher"]))
    out = train(TrainConfig(corpus=source, student=str(tiny_models["llama-student"]), out=tmp_path / "s", lora=False,
                            max_steps=2, batch_size=4, logging_steps=1, eval_fraction=0)).path
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"kd"' in line]
    assert [m["step"] for m in logs] == [1, 2] and all(m["ce"] > 0 for m in logs)


def test_dataloader_workers_collate_the_same_batches(tmp_path, tiny_models, monkeypatch):
    """Two worker processes read and collate the batches (the collator runs in them), and training
    logs the same losses as with none."""
    import json
    import os

    from distill.config import TrainConfig
    from distill.train import data
    from distill.train.trainer import train
    from tests.helpers import make_corpus, record

    source = make_corpus(tmp_path / "c", [record(i) for i in range(12)], teacher=str(tiny_models["llama-teacher"]))
    collated_in = tmp_path / "pids"
    collate = data.DistillCollator.__call__

    def recording(self, records):
        with collated_in.open("a") as f:  # appended by whichever process collates
            f.write(f"{os.getpid()}\n")
        return collate(self, records)

    monkeypatch.setattr(data.DistillCollator, "__call__", recording)
    logged = {}
    for workers in (0, 2):
        collated_in.write_text("")
        out = train(TrainConfig(corpus=source, student=str(tiny_models["llama-student"]), out=tmp_path / f"w{workers}",
                                lora=False, max_steps=3, batch_size=4, logging_steps=1, eval_fraction=0,
                                dataloader_workers=workers)).path
        pids = set(collated_in.read_text().split())
        assert (pids == {str(os.getpid())}) == (workers == 0), pids
        metrics = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        logged[workers] = [(m["step"], m["kd"], m["ce"]) for m in metrics if "kd" in m]
    assert len(logged[0]) == 3 and logged[2] == logged[0]


def test_scoring_reads_only_the_asked_prompts_with_the_topk_as_arrays(tmp_path, tiny_models):
    """What eval and the sweep score a student along: the records of the asked prompts (the
    corpus may be a whole training corpus, read a batch at a time), each top-k a [T, k] array."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill import corpus
    from distill.evaluation.fidelity import scoring_inputs
    from tests.helpers import make_corpus, record

    root = make_corpus(tmp_path / "c", [record(i, n_tokens=2 + i % 3) for i in range(7)],
                       teacher=str(tiny_models["llama-teacher"]))
    k = corpus.read_manifest(root).generation.top_k
    student = tiny_models["llama-student"]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(student), AutoTokenizer.from_pretrained(student)
    records, _ = scoring_inputs(root, tokenizer, model, {"p1", "p4", "p6"})
    stored = {r["id"]: r for r in corpus.iter_records(root)}
    assert [r["id"] for r in records] == ["r1", "r4", "r6"]
    for r in records:
        assert r["topk_token_ids"].shape == (len(r["response_token_ids"]), k) == r["topk_logprobs"].shape
        assert r["topk_token_ids"].tolist() == stored[r["id"]]["topk_token_ids"]
        assert r["topk_logprobs"].tolist() == stored[r["id"]]["topk_logprobs"]
    assert len(scoring_inputs(root, tokenizer, model)[0]) == 7


def mixed_corpus(root, kind: str):
    """Several shards as corpora hold them: `stamped` (generate's stamped shards, one written
    without a stamp, curated `loss_mask` and a student view), `layouts` (a corpus resumed by a newer
    distill: a layout-1 shard among layout-2 ones), `float16`."""
    import shutil

    from distill import corpus
    from tests.helpers import ROOT, K
    from tests.helpers import record as corpus_record

    def rec(i):
        r = corpus_record(f"x{i}", n_tokens=1 + i % 5, prompt_ids=list(range(1, 2 + i % 6)))
        if kind == "stamped":
            r["loss_mask"] = [bool((i + j) % 3) for j in range(len(r["response_token_ids"]))]
            r["student_prompt_token_ids"] = [7, 8] if i % 2 else r["prompt_token_ids"]
            r["student_messages"] = [{"role": "user", "content": "q"}] if i % 2 else r["messages"]
        return r

    encoding = "float16" if kind == "float16" else "quantized"
    for shard in range(3):
        # each shard with the top-k dictionary of the first, as generate writes them
        table, checked = corpus.records_to_checked_table([rec(10 * shard + i) for i in range(10)], K, encoding, 512,
                                                         corpus.corpus_dictionary(root))
        corpus.write_shard(root, shard, table, checked=checked if shard != 1 else None)
    if kind == "layouts":
        shutil.copy(ROOT / "tests" / "data" / "quantized-layout1-w2.parquet", root / "data" / "part-00003.parquet")
    corpus.write_manifest(root, corpus.Manifest(teacher={"model": "t", "vocab_size": 512},
                                                generation={"top_k": K, "logprob_encoding": encoding},
                                                stats=corpus.corpus_stats(root)))
    return root


@pytest.mark.parametrize("kind", ["stamped", "layouts", "float16"])
def test_training_batches_are_those_of_the_decoded_corpus(tmp_path, kind):
    """Whatever the pre-pass keeps stored or skips decoding, training reads the same records in the
    same order as the decoded corpus gives them (the pre-pass of before: decode, student view,
    `trainable`), and a seeded sampler collates the same batches from them."""
    from torch.utils.data import DataLoader, RandomSampler

    from distill import corpus
    from distill.train.data import TRAINING_COLUMNS, prepare_training_data, trainable

    root = mixed_corpus(tmp_path / "c", kind)
    max_length = 5
    reference = [{c: r[c] for c in TRAINING_COLUMNS if c in r}
                 for batch in corpus.iter_batches(root) for r in corpus.as_student_view(batch).to_pylist()
                 if trainable(r, max_length)]
    data = prepare_training_data(root, max_length, tmp_path / "scratch")
    # the top-k kept as stored where the shards share one quantized encoding, else decoded before step 1
    assert (corpus.PACKED_IDS in data.dataset.column_names) == (kind == "stamped")
    assert 0 < len(reference) < data.records and data.skipped == data.records - len(reference)
    read = data.dataset.__getitems__(list(range(len(data.dataset))))  # a stored top-k comes as arrays
    assert [{c: v.tolist() if isinstance(v, np.ndarray) else v for c, v in r.items()} for r in read] == reference
    largest = max(max(max(r["topk_token_ids"], key=max, default=[0]), default=0) for r in reference)
    assert data.max_token_id >= largest
    collator = DistillCollator(pad_token_id=0, max_length=max_length, top_k=4)

    def batches(dataset):
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(3))
        return list(DataLoader(dataset, batch_size=4, sampler=sampler, collate_fn=collator))

    for got, want in zip(batches(data.dataset), batches(reference), strict=True):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_the_held_out_share_is_capped():
    import datasets

    from distill.config import TrainConfig
    from distill.train.trainer import held_out_split

    rows = datasets.Dataset.from_dict({"id": [f"r{i}" for i in range(200)]})
    cfg = TrainConfig(corpus="c", student="s", out="o", eval_fraction=0.05)
    train, held = held_out_split(rows, cfg)
    assert (len(train), len(held)) == (190, 10)
    assert held["id"] == rows.train_test_split(test_size=0.05, seed=cfg.seed)["test"]["id"]  # the split as before
    train, held = held_out_split(rows, cfg.model_copy(update={"eval_max_records": 4}))
    assert (len(train), len(held)) == (196, 4) and set(train["id"]).isdisjoint(held["id"])
    assert held_out_split(rows, cfg.model_copy(update={"eval_fraction": 0.0})) == (rows, None)
