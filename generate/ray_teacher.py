"""The teacher as a pool of vLLM engines in Ray actors (`backend: ray`).

The driver keeps everything else: prompt parsing, templating, validation, the request order,
shard writing and resume (`generate/job.py`). Here requests go out in batches to `replicas`
actors, each holding the in-process backend (`VLLMTeacher`, built from the same engine settings
and fed the same token ids), so a record is token-exact with an in-process run.

Plain actors rather than `ray.data.map_batches`: the corpus writer hands over a lazy stream of
requests and wants each completion back through `on_done` as it finishes. A Ray Dataset would
first have to own that stream (materialized on the driver, or re-read from the prompt file
with templating moved into the workers), and its retries and ordering are the Dataset's own.
With actors the driver holds at most `window` requests in flight (memory flat in the number of
prompts), resubmits exactly the batch that failed, and names it when it gives up.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator

from distill.config import TeacherJobConfig
from distill.launcher import ServerError
from distill.teacher import Completion, Request, Sampling

log = logging.getLogger(__name__)
# Attempts per batch before the job stops (an actor that dies is restarted once by Ray).
MAX_ATTEMPTS = 3
# Batches queued per actor: the next is waiting in the actor when one returns.
QUEUED_PER_ACTOR = 2
# Seconds to wait for a cluster address to accept a connection (ray.init retries for about half a minute).
ADDRESS_TIMEOUT_S = 3.0
# The port an address without one means: Ray Client's (ray://) or the head's GCS.
DEFAULT_PORTS = {"ray://": 10001, "": 6379}


class RayTeacherError(ServerError):
    """The engines in the Ray actors failed (a batch after every retry, or starting them): the
    CLI prints it as one line, as for a vLLM server that failed."""


class InjectedFailure(RuntimeError):
    """Raised inside an actor by the test hook `RayTeacher.fail_batches`."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("`backend: ray` needs Ray: pip install 'distill[scale]'") from None
    return ray


def check_address(address: str | None) -> None:
    """Fail in seconds, naming the address, when nothing accepts connections at the Ray cluster
    address `address` (or $RAY_ADDRESS): `ray.init` would retry for half a minute and log ~20
    lines. `auto`, none (a local Ray) and other schemes are left to Ray."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local"):
        return
    scheme = "ray://" if address.startswith("ray://") else ""
    if "://" in address.removeprefix(scheme):
        return
    host, _, port = address.removeprefix(scheme).rpartition(":")
    if not host or not port.isdigit():
        host, port = address.removeprefix(scheme), str(DEFAULT_PORTS[scheme])
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=ADDRESS_TIMEOUT_S).close()
    except OSError as e:
        raise RayTeacherError(f"`ray_address` {address}: no Ray cluster answers at {host}:{port} "
                              f"({e.strerror or type(e).__name__}): start it (`ray start --head`) or fix the address") from None


class TeacherActor:
    """One vLLM engine. Ray runs one method call at a time, so the engine is never shared."""

    def __init__(self, cfg: TeacherJobConfig, max_logprobs: int, max_model_len: int, tensor_parallel: int):
        from distill.generate.engine import VLLMTeacher

        # The engine core in this process, not in a child: when the actor dies (its driver was
        # killed, say) a child engine would live on, orphaned, holding its memory and GPUs; the
        # engine's own workers exit with their parent.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if tensor_parallel > 1:
            # Workers as processes of this actor, on the GPUs Ray gave it: inside a Ray job vLLM
            # would otherwise pick its Ray executor and ask the cluster for more GPUs. (Not run: no GPU here.)
            parallel = {"tensor_parallel_size": tensor_parallel, "distributed_executor_backend": "mp"}
            cfg = cfg.model_copy(update={"engine_args": {**parallel, **cfg.engine_args}})
        self.teacher = VLLMTeacher(cfg, max_logprobs, max_model_len)

    def max_model_len(self) -> int:
        return self.teacher.max_model_len

    def run(self, requests: list[Request], sampling: Sampling | None, top_k: int,
            fail: bool = False) -> list[tuple[int, Completion]]:
        """Generate (`sampling`) or score (None) one batch -> (request index, completion) pairs."""
        if fail:
            raise InjectedFailure("injected failure (test hook `fail_batches`)")
        done: list[tuple[int, Completion]] = []

        def on_done(req: Request, completion: Completion) -> None:
            done.append((req.index, completion))

        if sampling is None:
            self.teacher.score(requests, top_k, on_done, window=len(requests))
        else:
            self.teacher.generate(requests, sampling, on_done, window=len(requests))
        return done

    def shutdown(self) -> None:
        # Without this the engine's worker processes outlive the actor by seconds.
        self.teacher.llm.llm_engine.engine_core.shutdown()


class RayTeacher:
    """A `distill.teacher.Teacher`: `generate` / `score` stream completions to `on_done` on the driver."""

    def __init__(self, cfg: TeacherJobConfig, max_logprobs: int, max_model_len: int):
        ray = import_ray()
        self._ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            check_address(cfg.ray_address)
            # address None: $RAY_ADDRESS if set, else a local Ray for this job.
            # The engines' logs stay in Ray's log files: interleaved here they would bury the progress bar.
            ray.init(address=cfg.ray_address, log_to_driver=False)
        gpus = cfg.gpus_per_replica
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
        actor = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=1)(TeacherActor)
        self.actors = [actor.remote(cfg, max_logprobs, max_model_len, gpus) for _ in range(cfg.replicas)]
        # Engines start in parallel; the first error (bad model, no room for the KV cache) surfaces here.
        lengths = self._get([a.max_model_len.remote() for a in self.actors], "starting the teacher engines")
        self.max_model_len = min(lengths)
        # Test hook: batch number -> how many of its attempts raise inside the actor.
        self.fail_batches: dict[int, int] = {}

    def generate(self, requests: Iterable[Request], sampling: Sampling,
                 on_done: Callable[[Request, Completion], None], window: int) -> None:
        self._run(requests, sampling, sampling.top_k, on_done, window)

    def score(self, requests: Iterable[Request], top_k: int,
              on_done: Callable[[Request, Completion], None], window: int) -> None:
        self._run(requests, None, top_k, on_done, window)

    def _batches(self, requests: Iterable[Request], size: int) -> Iterator[list[Request]]:
        # The actor needs ids, tokens and seeds only: the messages stay on the driver.
        slim = (dataclasses.replace(r, messages=[], response=None) for r in requests)
        while batch := list(itertools.islice(slim, size)):
            yield batch

    def _run(self, requests, sampling: Sampling | None, top_k: int, on_done, window: int) -> None:
        ray = self._ray
        size = max(1, window // (QUEUED_PER_ACTOR * len(self.actors)))
        originals: dict[int, Request] = {}

        def remember(stream: Iterable[Request]) -> Iterator[Request]:
            for req in stream:
                originals[req.index] = req
                yield req

        batches = enumerate(self._batches(remember(requests), size))
        in_flight: dict = {}  # ObjectRef -> (batch number, batch, attempt, actor)
        load = {i: 0 for i in range(len(self.actors))}

        def submit(number: int, batch: list[Request], attempt: int) -> None:
            i = min(load, key=load.__getitem__)
            fail = attempt < self.fail_batches.get(number, 0)
            ref = self.actors[i].run.remote(batch, sampling, top_k, fail)
            in_flight[ref] = (number, batch, attempt, i)
            load[i] += 1

        try:
            exhausted = False
            while True:
                while not exhausted and len(in_flight) < QUEUED_PER_ACTOR * len(self.actors):
                    nxt = next(batches, None)
                    if nxt is None:
                        exhausted = True
                    else:
                        submit(*nxt, attempt=0)
                if not in_flight:
                    return
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                number, batch, attempt, i = in_flight.pop(ready[0])
                load[i] -= 1
                try:
                    results = ray.get(ready[0])
                except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
                    cause = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                    where = f"batch {number} (requests {batch[0].index}-{batch[-1].index})"
                    if attempt + 1 >= MAX_ATTEMPTS:
                        raise RayTeacherError(f"ray teacher: {where} failed {MAX_ATTEMPTS} times; "
                                              f"finished shards are kept, rerun to resume. Last error: {cause}") from None
                    log.warning("ray teacher: %s failed (attempt %d of %d), retrying: %s",
                                where, attempt + 1, MAX_ATTEMPTS, cause)
                    submit(number, batch, attempt + 1)
                    continue
                for index, completion in results:
                    on_done(originals.pop(index), completion)
        finally:
            for ref in in_flight:  # interrupted: the engines need not finish work nobody collects
                ray.cancel(ref)

    def _get(self, refs, doing: str):
        ray = self._ray
        try:
            return ray.get(refs)
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
            self.close()
            raise RayTeacherError(f"ray teacher: {doing} failed: {e}") from None

    def close(self) -> None:
        """Stop the engines (and the local Ray this teacher started)."""
        ray = self._ray
        try:
            ray.get([a.shutdown.remote() for a in self.actors], timeout=60)
        except ray.exceptions.RayError as e:  # a dead actor has nothing left to stop
            log.debug("ray teacher: engine shutdown: %s", e)
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self._owns_ray:
            ray.shutdown()
