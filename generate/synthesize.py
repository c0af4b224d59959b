"""`write_raw()`: new user prompts written by the teacher itself, in resumable shards.

Two methods. Magpie (Xu et al. 2024, arXiv 2406.08464): the teacher is given its chat template
only up to the start of a user turn (after an optional system turn) and continues it, so what it
writes is a user's message. The prefix is cut from the template itself: a conversation whose user
message is a sentinel is rendered and cut at the sentinel, so any template distill can render works
if the cut is clean (the sentinel appears once, and the text before it does not depend on it).
`seeds`: the teacher sees a few example prompts from a seed file and writes one more (few-shot).

Request `i` lands in chunk `i // chunk_size`; a chunk becomes `raw/part-{c}.jsonl` (written to a
temporary name, then renamed: its existence is the completion marker) the moment its last request
finishes, so a killed job loses only chunks in flight and a rerun skips the finished ones, with no
prompt written twice.
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from distill import files
from distill.config import SynthesizeConfig
from distill.corpus import history_entry, tokenizer_fingerprint
from distill.engine import check_model
from distill.generate.job import per_second, request_id, request_seed
from distill.generate.prompts import Prompt, iter_prompts, resolve_format
from distill.generate.templating import load_tokenizer, model_max_len
from distill.models import model_source
from distill.teacher import Completion, Request, Sampling, Teacher, start_teacher

MANIFEST = "manifest.json"
RAW = "raw"
SENTINELS = ("DistillSentinel", "DistillSentinelOfAnotherLength")  # lengths differ: a template may count
DEFAULT_SYSTEM = "You are a helpful assistant."
SEED_INSTRUCTION = ("Here are requests that users sent to an AI assistant:\n\n{examples}\n\nWrite one new request "
                    "that a user could send{about}. Make it different from the examples. Reply with the request only.")


class TemplateError(ValueError):
    """A chat template whose user-turn prefix cannot be cut cleanly (Magpie refuses it)."""


@dataclass(frozen=True)
class UserTurn:
    """The rendered text before and after a user message: Magpie's prompt and where the turn ends."""

    prefix: str
    end: str  # the template's end of a user turn (e.g. `<|im_end|>`), stripped


def system_text(cfg: SynthesizeConfig) -> str | None:
    """The steering system turn: `system`, plus the topic when one is given."""
    if cfg.topic is None:
        return cfg.system
    return f"{cfg.system or DEFAULT_SYSTEM} Users ask you about {cfg.topic}."


def user_turn(tokenizer, system: str | None, model: str = "the teacher") -> UserTurn:
    """The template rendered up to the start of a user message (after `system`, if given)."""
    if not tokenizer.chat_template:
        raise TemplateError(f"`{model}` has no chat template: Magpie needs one (use `method: seeds`?)")
    head = [{"role": "system", "content": system}] if system else []
    renders = []
    for sentinel in SENTINELS:
        try:
            text = tokenizer.apply_chat_template([*head, {"role": "user", "content": sentinel}], tokenize=False,
                                                 add_generation_prompt=False)
        except Exception as e:  # noqa: BLE001 (the template's own error, e.g. no system role)
            raise TemplateError(f"the chat template of `{model}` cannot render a "
                                f"{'system + ' if system else ''}user turn: {e}") from None
        if text.count(sentinel) != 1:
            raise TemplateError(f"the chat template of `{model}` does not render a user message verbatim "
                                "(it changes or repeats the text): Magpie cannot cut its user-turn prefix")
        renders.append(text.split(sentinel))
    (prefix, after), (other_prefix, other_after) = renders
    if prefix != other_prefix or after != other_after:
        raise TemplateError(f"the chat template of `{model}` renders the start of a user turn differently for "
                            "different messages: Magpie cannot cut its user-turn prefix")
    if not after.strip():
        raise TemplateError(f"the chat template of `{model}` marks no end of a user turn: Magpie cannot tell "
                            "where the written prompt stops")
    return UserTurn(prefix, after.strip())


def read_seeds(path: Path) -> list[str]:
    """The last user message of every good record of a prompt file (any format `generate` reads)."""
    seeds = [next(m["content"] for m in reversed(item.messages) if m["role"] == "user")
             for item in iter_prompts(path, resolve_format(path, "auto")) if isinstance(item, Prompt)]
    if len(seeds) < 2:
        raise ValueError(f"`seeds`: `{path}` holds {len(seeds)} usable prompts; few-shot needs at least 2")
    return seeds


@dataclass
class RawPrompt:
    """One thing the teacher wrote, before filtering."""

    id: str
    text: str
    token_ids: list[int]
    finish_reason: str


class SynthesisJob:
    def __init__(self, cfg: SynthesizeConfig):
        self.cfg, self.out = cfg, Path(cfg.out)

    # -- before any model loads ---------------------------------------------------------------
    def prepare(self) -> None:
        cfg = self.cfg
        check_model(cfg.teacher, "teacher")
        self.tokenizer = load_tokenizer(cfg)
        system = system_text(cfg)
        if cfg.method == "magpie":
            self.turn = user_turn(self.tokenizer, system, cfg.teacher)
            self.prefix_ids = self.encode(self.turn.prefix)
            self.seeds: list[str] = []
        else:
            if not self.tokenizer.chat_template:
                raise TemplateError(f"`{cfg.teacher}` has no chat template: the seeds method asks it in a chat turn")
            self.seeds = read_seeds(cfg.seeds)
            self.turn = UserTurn("", self.tokenizer.eos_token or "")
        self.identity = self._identity(system)
        self._check_resume()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _identity(self, system: str | None) -> dict:
        cfg = self.cfg
        source = model_source(cfg.teacher)
        return {
            "teacher": {"model": cfg.teacher, "revision": cfg.revision, **tokenizer_fingerprint(self.tokenizer),
                        **({"source": source.model_dump()} if source else {})},
            "synthesis": {"method": cfg.method, "n": cfg.n, "system": system, "topic": cfg.topic,
                          "seeds_sha256": files.sha256(cfg.seeds) if cfg.seeds else None, "shots": cfg.shots,
                          "max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
                          "seed": cfg.seed, "chunk_size": cfg.chunk_size},
        }

    def _check_resume(self) -> None:
        path = self.out / MANIFEST
        if self.cfg.overwrite or not path.exists():
            if not self.cfg.overwrite and not files.is_empty(self.out):
                raise FileExistsError(f"`{self.out}` exists and is not a synthesis: choose another `out` or pass `--overwrite`")
            return
        old = json.loads(path.read_text())
        changed = [f"{section}.{key}" for section, values in self.identity.items() for key, value in values.items()
                   if old.get(section, {}).get(key) != value]
        if changed:
            raise FileExistsError(f"`{self.out}` holds prompts synthesised with other settings ({', '.join(changed)} "
                                  "differ): rerun with the same settings to resume, or pass `--overwrite`")

    # -- the requests ---------------------------------------------------------------------------
    def prompt_ids(self, index: int) -> list[int]:
        if self.cfg.method == "magpie":
            return self.prefix_ids
        rng = random.Random(f"{self.cfg.seed}:{index}")
        examples = "\n".join(f"- {s}" for s in rng.sample(self.seeds, min(self.cfg.shots, len(self.seeds))))
        about = f" about {self.cfg.topic}" if self.cfg.topic else ""
        messages = [{"role": "user", "content": SEED_INSTRUCTION.format(examples=examples, about=about)}]
        if self.cfg.system:
            messages.insert(0, {"role": "system", "content": self.cfg.system})
        return self.encode(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    def text(self, token_ids) -> str:
        """The written prompt: decoded with special tokens (so leaked role tokens stay visible to the
        filters), cut at the template's end of turn and the end-of-sequence token; a seeds answer
        without the chat reply around it (`without_lead_in`)."""
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=False)
        for end in (self.turn.end, self.tokenizer.eos_token):
            if end:
                text = text.split(end, 1)[0]
        return without_lead_in(text.strip()) if self.cfg.method == "seeds" else text.strip()

    # -- the run --------------------------------------------------------------------------------
    def run(self, teacher: Teacher | None = None) -> list[RawPrompt]:
        start = time.time()
        cfg = self.cfg
        if cfg.overwrite:
            files.clear_dir(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        files.remove_partial_files(self.out / RAW)
        n_chunks = -(-cfg.n // cfg.chunk_size)
        done = {c for c in range(n_chunks) if shard_path(self.out, c).exists()}
        old = json.loads((self.out / MANIFEST).read_text()) if (self.out / MANIFEST).exists() else {}
        self.manifest = {**self.identity, "complete": False, "history": [*old.get("history", []),
                                                      history_entry("synthesize", cfg, 0.0, complete=False)]}
        files.write_json(self.out / MANIFEST, self.manifest)
        todo = [c for c in range(n_chunks) if c not in done]
        if todo:
            max_len = teacher.max_model_len if teacher is not None and teacher.max_model_len else model_max_len(cfg)
            started = None if teacher is not None else start_teacher(cfg, max_logprobs=1, max_model_len=max_len)
            try:
                written, seconds = self._generate(teacher or started, set(todo), cfg.n - self._size(done), max_len)
            finally:
                if started is not None:
                    started.close()
            print(f"synthesised {written:,} prompts in {seconds:.1f} s ({per_second(written, seconds)} prompts/s)"
                  + (f"; {len(done)} shards kept from an earlier run" if done else ""), file=sys.stderr)
        self.manifest["history"][-1] = history_entry("synthesize", cfg, time.time() - start)
        return read_raw(self.out, n_chunks)

    def _size(self, chunks: set[int]) -> int:
        return sum(min(self.cfg.chunk_size, self.cfg.n - c * self.cfg.chunk_size) for c in chunks)

    def _generate(self, teacher: Teacher, todo: set[int], total: int, max_len: int) -> tuple[int, float]:
        cfg = self.cfg
        buffers: dict[int, list[tuple[Request, Completion]]] = {c: [] for c in todo}
        bar = tqdm(total=total, unit="prompt", desc="synthesize", dynamic_ncols=True, file=sys.stderr)
        t0 = time.time()

        def requests() -> Iterator[Request]:
            for index in range(cfg.n):
                if index // cfg.chunk_size in todo:
                    rid, ids = request_id(f"synth:{cfg.seed}", index), self.prompt_ids(index)
                    if len(ids) + cfg.max_tokens > max_len:
                        raise ValueError(f"request {index}: its prompt has {len(ids)} tokens, which with `max_tokens` "
                                         f"{cfg.max_tokens} exceeds the context ({max_len}): lower `shots` or `max_tokens`")
                    yield Request(index, rid, rid, [], ids, seed=request_seed(cfg.seed, rid))

        def on_done(req: Request, completion: Completion) -> None:
            chunk = req.index // cfg.chunk_size
            buffers[chunk].append((req, completion))
            bar.update(1)
            bar.set_postfix_str(f"{per_second(bar.n, time.time() - t0)} prompts/s", refresh=False)
            if len(buffers[chunk]) == self._size({chunk}):
                write_shard(self.out, chunk, [self._raw(r, c) for r, c in sorted(buffers.pop(chunk),
                                                                                   key=lambda rc: rc[0].index)])

        sampling = Sampling(1, cfg.max_tokens, cfg.temperature, cfg.top_p)
        try:
            teacher.generate(requests(), sampling, on_done, window=2 * cfg.chunk_size)
        finally:
            bar.close()
        if buffers:
            raise RuntimeError(f"chunks {sorted(buffers)} did not complete")
        return total, time.time() - t0

    def _raw(self, req: Request, c: Completion) -> RawPrompt:
        ids = [int(t) for t in c.response_token_ids]
        return RawPrompt(req.id, self.text(ids), ids, c.finish_reason)


# The reply's own first line: an assent, or a line that names what follows as the request. A request
# may itself open with a line ending in ':' ("Translate this into French:"): that one stays.
LEAD_IN = re.compile(r"(?:(?:sure|certainly|of course|okay|ok|absolutely)\b.*|.*\b(?:request|prompt)\b.*):", re.I)
QUOTES = ('"', "'", "\u201c\u201d")


def without_lead_in(text: str) -> str:
    """A seeds answer as a prompt: chat models reply "Sure! Here's a new request:" and then the
    request, often quoted; that first line and the quotes are the reply, not the request."""
    first, newline, rest = text.partition("\n")
    if newline and rest.strip() and LEAD_IN.fullmatch(first.strip()):
        text = rest.strip()
    for quote in QUOTES:
        opening, closing = quote[0], quote[-1]
        if len(text) > 2 and text[0] == opening and text[-1] == closing and opening not in text[1:-1]:
            return text[1:-1].strip()
    return text


def shard_path(out: Path, chunk: int) -> Path:
    return Path(out) / RAW / f"part-{chunk:05d}.jsonl"


def write_shard(out: Path, chunk: int, prompts: list[RawPrompt]) -> None:
    path = shard_path(out, chunk)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write(path, "".join(json.dumps(vars(p)) + "\n" for p in prompts))


def read_raw(out: Path, n_chunks: int) -> list[RawPrompt]:
    return [RawPrompt(**json.loads(line)) for c in range(n_chunks)
            for line in shard_path(out, c).read_text().splitlines() if line]


def write_raw(cfg: SynthesizeConfig, teacher: Teacher | None = None,
              prepared: Callable[[SynthesisJob], None] | None = None) -> tuple[SynthesisJob, list[RawPrompt]]:
    """Everything the teacher wrote for `cfg` (resuming finished shards); `prepared` sees the job
    once its settings are checked, before the teacher starts."""
    job = SynthesisJob(cfg)
    job.prepare()
    if prepared is not None:
        prepared(job)
    return job, job.run(teacher)
