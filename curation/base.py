"""What a curation filter is.

A filter is a small pydantic model: its fields are its parameters (typed, with defaults; `None`
switches a check off), `name` is what the YAML calls it, and `check(record)` returns `None` to
keep a record or a short detail saying why it fails. The pipeline prefixes the detail with the
filter's name, so every rejection reads `filter_name: detail`; the report counts each rejection
against the filter that made it, never by parsing that string (a plug-in's label, its YAML
`name` or else `module:callable`, may itself contain a colon).

Filters that can look at a whole Arrow batch at once override `check_batch` (vectorised); a
filter that `remembers` earlier records can split off what it computes per record (`prepare`).
`reads()` names the corpus columns a filter reads (by default its `columns`; a filter whose
settings change what it reads overrides it): curation reads and decodes only those, so the top-k
is never decoded unless a filter asks for it.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict


class Filter(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]] = ("response",)
    # True when a verdict depends on the records seen before (dedup): such a filter runs in the
    # curating process in corpus order; the others may run ahead in workers (curation/workers.py).
    remembers: ClassVar[bool] = False
    registry: ClassVar[dict[str, type["Filter"]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            Filter.registry[cls.name] = cls

    def check(self, record: dict[str, Any]) -> str | None:
        raise NotImplementedError

    def reads(self) -> tuple[str, ...] | None:
        """The logical columns `check_batch` reads (None: every column)."""
        return self.columns

    def prepare(self, batch: pa.RecordBatch) -> Any:
        """What a remembering filter's `check_batch` computes from each record alone (a signature, a
        digest), for every row of `batch`: computed ahead in a worker (curation/workers.py) and handed
        to `check_batch` as `prepared`. None: nothing to compute ahead."""
        return None

    def reserve(self, records: int) -> None:
        """Make room at once for what a remembering filter keeps of up to `records` records (curate
        knows the corpus's size): state grown instead is copied at every doubling."""

    def check_batch(self, batch: pa.RecordBatch, rows: list[int]) -> dict[int, str]:
        """Reasons for the failing rows among `rows` (indices into `batch`)."""
        columns = self.reads()
        data = {c: batch.column(c).to_pylist() for c in columns} if rows else {}
        failed = {}
        for i in rows:
            detail = self.check({c: data[c][i] for c in columns})
            if detail is not None:
                failed[i] = detail
        return failed

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, **self.model_dump(mode="json")}


WORD = re.compile(r"\w+", re.UNICODE)


def response_text(record: dict) -> str:
    return record.get("response") or ""


def prompt_text(record: dict) -> str:
    return "\n".join(m["content"] for m in record.get("messages") or [])
