"""On-policy training with several served teachers: each student sample is scored by the
teacher of the corpus its prompt came from (MOPD's routing; docs/recipes/multi-teacher.md).

`distill train --corpus code --corpus chat --on-policy --teacher-endpoints code=URL1
--teacher-endpoints chat=URL2`: the records of corpus `code` carry `teacher` 0 (train/corpora.py),
so the student's continuations of their prompts go to URL1's teacher, the others to URL2's. The
rows each teacher returns are ordinary top-k rows (`TeacherClient.score_pairs`), collated and
learnt like a one-teacher on-policy batch. One `teacher_endpoint` is the one-teacher case: every
sample goes to it.
"""

from __future__ import annotations

from collections.abc import Sequence

from distill.config import TrainConfig
from distill.teacher import Completion
from distill.teacher_client import TeacherClient


class RoutedTeachers:
    """Served teachers by corpus index; `score_pairs` sends each pair to its own."""

    def __init__(self, clients: Sequence[TeacherClient], names: Sequence[str]):
        self.clients, self.names = list(clients), list(names)

    def score_pairs(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], top_k: int,
                    teachers: Sequence[int] | None = None) -> list[Completion]:
        """The teacher's top-k along each (prompt, response) pair, in order; `teachers[i]`: the
        index of pair i's teacher (None, or one client: all go to the first)."""
        if teachers is None or len(self.clients) == 1:
            return self.clients[0].score_pairs(pairs, top_k)
        scored: list[Completion | None] = [None] * len(pairs)
        for index, client in enumerate(self.clients):
            mine = [i for i, t in enumerate(teachers) if t == index]
            if mine:
                for i, completion in zip(mine, client.score_pairs([pairs[i] for i in mine], top_k)):
                    scored[i] = completion
        missing = [i for i, c in enumerate(scored) if c is None]
        if missing:
            raise ValueError(f"sample {missing[0]} names teacher {teachers[missing[0]]}, but only "
                             f"{len(self.clients)} teachers are served ({', '.join(self.names)})")
        return scored


def routed_teachers(cfg: TrainConfig, tokenizer, local: str = "student") -> RoutedTeachers:
    """The on-policy teachers of `cfg`, each checked to use `tokenizer` (the `local` one: the
    student's, or the teacher's where the student has another tokenizer)."""
    if cfg.teacher_endpoint:
        clients, names = [TeacherClient(cfg.teacher_endpoint, api_key=cfg.teacher_api_key)], ["teacher"]
    else:
        urls, names = cfg.endpoints(), cfg.corpus_names()
        clients = [TeacherClient(urls[name], api_key=cfg.teacher_api_key) for name in names]
    for client, name in zip(clients, names):
        client.check_tokenizer(tokenizer, local)
    return RoutedTeachers(clients, names)
