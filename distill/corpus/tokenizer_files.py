"""The teacher's tokenizer files inside the corpus (`tokenizer/`, each file's SHA-256 in
`manifest.teacher.tokenizer_files`): a corpus alone says which strings its stored top-k ids are,
so a student of another tokenizer trains from it without the teacher model or the hub
(docs/recipes/cross-tokenizer.md).

Corpora written before distill stored the files fall back to the teacher path in the manifest;
if that does not load either, one line says what to pass (`--teacher-tokenizer`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from distill import files
from distill.corpus.codec import CorpusError
from distill.corpus.manifest import Manifest, tokenizer_fingerprint

TOKENIZER_DIR = "tokenizer"


def store_tokenizer(root: Path, tokenizer) -> dict[str, str]:
    """Save `tokenizer` under `root/tokenizer/`; returns file name -> SHA-256, for the manifest."""
    out = Path(root) / TOKENIZER_DIR
    tokenizer.save_pretrained(out)
    return {p.name: files.sha256(p) for p in sorted(out.iterdir()) if p.is_file()}


def copy_tokenizer(source: Path, out: Path) -> None:
    """A corpus derived from `source` (curated, subset) keeps its tokenizer files."""
    stored = Path(source) / TOKENIZER_DIR
    if stored.is_dir():
        shutil.copytree(stored, Path(out) / TOKENIZER_DIR, dirs_exist_ok=True)


def teacher_tokenizer(root: Path, manifest: Manifest, given: str | Path | None = None):
    """The teacher's tokenizer for the corpus at `root`: `given` (a directory or hub id) if set,
    else the files stored in the corpus (checked against their hashes), else the manifest's teacher.
    Whichever loads must have the fingerprint the manifest recorded. Raises `CorpusError`, one line."""
    from transformers import AutoTokenizer

    root = Path(root)
    recorded = getattr(manifest.teacher, "tokenizer_files", None) or {}
    stored = root / TOKENIZER_DIR
    if given is not None:
        source, what = str(given), f"--teacher-tokenizer `{given}`"
    elif recorded:
        for name, digest in recorded.items():
            path = stored / name
            if not path.is_file():
                raise CorpusError(f"`{path}` is missing: the manifest records it among the teacher's tokenizer files")
            if files.sha256(path) != digest:
                raise CorpusError(f"`{path}` does not match the SHA-256 in `{root / 'manifest.json'}`: "
                                  "the corpus's tokenizer files were changed")
        source, what = str(stored), f"the tokenizer stored in `{stored}`"
    else:
        source, what = manifest.teacher.model, f"the manifest's teacher `{manifest.teacher.model}`"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as e:  # noqa: BLE001 - any load failure is the same one line to the user
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        hint = "" if given is not None else (
            f"; `{root}` holds no tokenizer files (written before distill stored them): pass "
            "--teacher-tokenizer with the teacher's tokenizer directory or hub id")
        raise CorpusError(f"cannot load the teacher's tokenizer from {what} ({reason}){hint}") from None
    expected = manifest.teacher.tokenizer_sha256
    if expected and tokenizer_fingerprint(tokenizer)["tokenizer_sha256"] != expected:
        raise CorpusError(f"{what} is not the tokenizer that wrote `{root}` (its fingerprint differs from "
                          "`teacher.tokenizer_sha256` in the manifest)")
    return tokenizer
