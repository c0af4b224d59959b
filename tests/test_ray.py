"""`backend: ray`: the teacher in a Ray actor on a local Ray started here (2 CPUs, 1 actor).

Greedy records must equal the in-process engine's bit for bit (same engine settings, same token
ids in); a batch that raises inside the actor is retried, and one that keeps failing stops the
job with its batch named while every finished shard stays and a rerun completes the corpus.
The failures are raised inside the actor by the test hook `RayTeacher.fail_batches`.
"""

import pytest

from distill import corpus
from distill.config import GenerateConfig, ScoreConfig
from distill.generate import generate, score
from tests.conftest import MAX_MODEL_LEN, PROMPTS, write_jsonl

pytestmark = pytest.mark.engine
ray = pytest.importorskip("ray", reason="install the `scale` extra: pip install -e '.[scale]'")

CHUNK = 2  # 6 prompts -> 3 shards; window 4 -> batches of 2 (one actor, two batches queued)


@pytest.fixture(scope="module")
def ray_teacher(tiny_models):
    from distill.generate.ray_teacher import RayTeacher

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = GenerateConfig(teacher=str(tiny_models["llama-teacher"]), prompts="unused", out="unused", backend="ray")
    teacher = RayTeacher(cfg, max_logprobs=20, max_model_len=MAX_MODEL_LEN)
    yield teacher
    teacher.close()
    ray.shutdown()


def config(tmp_path, tiny_models, name, **kw):
    prompts = tmp_path / "prompts.jsonl"
    if not prompts.exists():
        write_jsonl(prompts, PROMPTS)
    return GenerateConfig(teacher=str(tiny_models["llama-teacher"]), prompts=prompts, out=tmp_path / name,
                          max_tokens=12, temperature=0.0, top_k=5, chunk_size=CHUNK, max_model_len=MAX_MODEL_LEN,
                          logprob_encoding="float32", **kw)


def shards(out):
    return {p.name: corpus.read_shard(p) for p in corpus.shard_paths(out)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_models, teacher):
    """The in-process corpus."""
    return shards(generate(config(tmp_path_factory.mktemp("local"), tiny_models, "corpus"), teacher=teacher).path)


def test_ray_corpus_equals_in_process_corpus(tmp_path, tiny_models, ray_teacher, reference):
    out = generate(config(tmp_path, tiny_models, "ray", backend="ray"), teacher=ray_teacher).path
    got = shards(out)
    assert sorted(got) == sorted(reference) and len(got) == 3
    for name, table in got.items():
        assert table.equals(reference[name]), name
    assert corpus.read_manifest(out).stats.complete


def test_failed_batch_is_retried(tmp_path, tiny_models, ray_teacher, reference):
    ray_teacher.fail_batches = {1: 2}  # the second batch raises twice, then runs
    try:
        out = generate(config(tmp_path, tiny_models, "ray"), teacher=ray_teacher).path
    finally:
        ray_teacher.fail_batches = {}
    got = shards(out)
    assert sorted(got) == sorted(reference)
    assert all(table.equals(reference[name]) for name, table in got.items())


def test_batch_failing_every_attempt_is_reported_and_finished_shards_kept(tmp_path, tiny_models, ray_teacher,
                                                                          reference):
    from distill.generate.ray_teacher import MAX_ATTEMPTS, RayTeacherError

    cfg = config(tmp_path, tiny_models, "ray")
    ray_teacher.fail_batches = {1: MAX_ATTEMPTS}
    try:
        with pytest.raises(RayTeacherError, match=r"batch 1 \(requests 2-3\) failed 3 times.*InjectedFailure"):
            generate(cfg, teacher=ray_teacher)
    finally:
        ray_teacher.fail_batches = {}
    kept = shards(cfg.out)
    assert "part-00000.parquet" in kept and "part-00001.parquet" not in kept, sorted(kept)
    assert all(table.equals(reference[name]) for name, table in kept.items())
    assert corpus.read_manifest(cfg.out).stats.complete is False

    out = generate(cfg, teacher=ray_teacher).path  # the rerun fills in the missing shard only
    got = shards(out)
    assert sorted(got) == sorted(reference)
    assert all(table.equals(reference[name]) for name, table in got.items())
    assert corpus.read_manifest(out).stats.complete


def test_score_on_ray_equals_in_process(tmp_path, tiny_models, teacher, ray_teacher):
    data = write_jsonl(tmp_path / "answers.jsonl", [
        {"messages": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]},
        {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}]},
        {"messages": [{"role": "user", "content": "Sort 3 1"}, {"role": "assistant", "content": "1 3"}]}])

    def cfg(name, **kw):
        return ScoreConfig(teacher=str(tiny_models["llama-teacher"]), data=data, out=tmp_path / name, top_k=5,
                           chunk_size=CHUNK, max_model_len=MAX_MODEL_LEN, logprob_encoding="float32", **kw)

    local = shards(score(cfg("local"), teacher=teacher).path)
    remote = shards(score(cfg("ray", backend="ray"), teacher=ray_teacher).path)
    assert sorted(local) == sorted(remote) and len(local) == 2
    assert all(table.equals(local[name]) for name, table in remote.items())
