"""`distill inspect DIR`: what made a corpus, what it holds, and one record decoded token by
token beside the teacher's top-k; `--check` validates every record first."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from distill import corpus


def _tokenizer(model: str):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model)
    except Exception:  # not available here (hub id offline, moved dir): show ids only
        return None


def inspect(path: Path, record: int = 0, tokens: int = 12, check: bool = False,
            console: Console | None = None) -> int:
    """Prints the summary; returns 1 if the shards do not match the manifest or, with `check`, if
    `corpus.validate` finds a problem in any record (0 otherwise)."""
    console = console or Console()
    manifest = corpus.read_manifest(path)
    stats, teacher, source = manifest.stats, manifest.teacher, manifest.source
    summary = Table(title=f"corpus {path}", show_header=False)
    summary.add_row("teacher", f"{teacher.model} (tokenizer {str(teacher.tokenizer_sha256)[:12]})")
    summary.add_row("generation", ", ".join(f"{k}={v}" for k, v in manifest.generation.model_dump(exclude_none=True).items()))
    summary.add_row("source", f"{source.get('file')} ({source.get('format')}), {source.get('prompts')} prompts, "
                    f"{source.get('skipped', 0)} skipped {source.get('skipped_by_kind') or ''}")
    summary.add_row("records", f"{stats.records:,} in {stats.shards} shards"
                    + ("" if stats.complete else "  (incomplete: rerun the command to resume)"))
    summary.add_row("tokens", f"{stats.response_tokens:,} response tokens, "
                    f"{stats.bytes / max(stats.response_tokens, 1):.1f} bytes/token")
    for h in manifest.history:
        summary.add_row("history", f"{h.get('stage')} at {h.get('finished_at')} ({h.get('wall_time_s')} s)")
    console.print(summary)
    problems = corpus.check_shards(path)
    for problem in problems:
        console.print(f"[bold red]damaged:[/] {problem}", highlight=False)
    if problems:
        console.print("The corpus does not match its manifest: rerun the command that wrote it (generate resumes and "
                      "rewrites missing shards; delete an unreadable one first).", highlight=False)
        return 1
    if check:
        try:
            valid = corpus.validate(path)
        except corpus.CorpusError as e:
            console.print(f"[bold red]invalid:[/] {e}", highlight=False)
            return 1
        console.print(f"valid: every record checked ({valid['records']:,} records, "
                      f"{valid['response_tokens']:,} response tokens)", highlight=False)
    report = Path(path) / "report.json"
    if report.exists():
        from distill.curation.report import table

        console.print("[bold]curation[/]")
        console.print(table(json.loads(report.read_text())), highlight=False, markup=False)

    rows = corpus.iter_records(path)
    rec = next((r for i, r in enumerate(rows) if i == record), None)
    if rec is None:
        console.print(f"(no record {record})")
        return 0
    console.print(f"[bold]record {rec['id']}[/] prompt {rec['prompt_id']}, finish_reason={rec['finish_reason']}, "
                  f"{len(rec['prompt_token_ids'])} prompt + {len(rec['response_token_ids'])} response tokens")
    for m in rec["messages"]:
        console.print(f"[cyan]{m['role']}:[/] {m['content'][:300]}", markup=True, highlight=False)
    console.print(f"[green]assistant (teacher):[/] {rec['response'][:500]}", highlight=False)
    tok = _tokenizer(teacher.model)
    show = (lambda i: repr(tok.convert_ids_to_tokens(int(i)))) if tok is not None else str
    table = Table(title=f"first {tokens} response tokens with the teacher's top-5")
    table.add_column("pos", justify="right")
    table.add_column("token")
    table.add_column("logprob", justify="right")
    table.add_column("top-k (token: logprob)")
    for pos, (tid, lp, top_ids, top_lps) in enumerate(zip(rec["response_token_ids"], rec["response_logprobs"],
                                                         rec["topk_token_ids"], rec["topk_logprobs"])):
        if pos >= tokens:
            break
        table.add_row(str(pos), show(tid), f"{lp:.3f}",
                      "  ".join(f"{show(i)}: {v:.2f}" for i, v in zip(top_ids[:5], top_lps[:5])))
    console.print(table)
    return 0
