"""The corpus: the contract between stages (docs/corpus-format.md).

A corpus is a directory holding `manifest.json` and zstd Parquet shards under `data/`
(curation adds `rejected/`). Shards are written atomically (temp file, fsync, rename) and
carry their own record/token counts in the Parquet footer, so a reader never sees half a
shard and the manifest's stats can always be recomputed from the shards alone.

Six modules, each one job: `codec` (the logical columns and their stored encodings, no files),
`manifest` (`manifest.json`), `store` (shards on disk and the readers), `stamp` (the footer saying
a shard's top-k was validated), `tokenizer_files` (the teacher's tokenizer kept in the corpus),
`validate` (the validator). Every stage imports the names below as `distill.corpus.X`.
"""

from distill.corpus.codec import (
    COLUMNS,
    DEFAULT_ENCODING,
    ENCODING_KEY,
    FLOAT16_RELATIVE_ERROR,
    LOGPROB_CODES,
    LOGPROB_ENCODINGS,
    PACKED_IDS,
    QUANT_STEP,
    QUANTIZED_MAX_ERROR,
    STUDENT_MESSAGES,
    STUDENT_PROMPT_IDS,
    STUDENT_VIEW_COLUMNS,
    TAIL_STEP,
    TOKEN_COLUMNS,
    TOKEN_ID_COLUMNS,
    TOPK_LAYOUT,
    TOPK_LAYOUTS,
    CorpusError,
    arrow_schema,
    as_student_view,
    binary_values,
    decode,
    decode_inputs,
    encode,
    leaves,
    logprob_tolerance,
    records_to_table,
    shard_encoding,
    stored_topk_columns,
    topk_arrays,
    topk_rows,
)
from distill.corpus.manifest import (
    MANIFEST,
    SCHEMA,
    Corpus,
    CorpusStats,
    GenerationInfo,
    Manifest,
    TeacherInfo,
    check_complete,
    history_entry,
    read_manifest,
    tokenizer_fingerprint,
    write_manifest,
)
from distill.corpus.stamp import (
    STAMP_KEY,
    STAMP_VERSION,
    Stamp,
    TopkChecked,
    file_digest,
    pending,
    read_stamp,
    seal,
    verified_stamp,
)
from distill.corpus.store import (
    READ_ERRORS,
    STATS_KEY,
    TOPK_ZSTD_LEVEL,
    corpus_dictionary,
    corpus_stats,
    iter_batches,
    iter_records,
    load_dataset,
    read_shard,
    read_stored,
    read_table,
    records_of,
    shard_batches,
    shard_index,
    shard_paths,
    shard_stats,
    stored_batches,
    unreadable,
    write_shard,
)
from distill.corpus.tokenizer_files import (
    TOKENIZER_DIR,
    copy_tokenizer,
    store_tokenizer,
    teacher_tokenizer,
)
from distill.corpus.validate import (
    PARALLEL_MIN_RECORDS,
    CheckedBatch,
    check_records,
    check_shards,
    checked_batches,
    default_workers,
    records_to_checked_table,
    topk_checked,
    validate,
)

__all__ = [
    "COLUMNS", "DEFAULT_ENCODING", "ENCODING_KEY", "FLOAT16_RELATIVE_ERROR", "LOGPROB_CODES", "LOGPROB_ENCODINGS",
    "MANIFEST", "PACKED_IDS", "PARALLEL_MIN_RECORDS", "QUANTIZED_MAX_ERROR", "QUANT_STEP", "READ_ERRORS", "SCHEMA", "STAMP_KEY",
    "STAMP_VERSION", "STATS_KEY", "CheckedBatch", "Stamp", "TopkChecked", "check_records",
    "checked_batches", "default_workers", "read_stamp", "records_to_checked_table",
    "file_digest", "pending", "seal", "stored_topk_columns", "topk_arrays", "topk_checked", "topk_rows", "verified_stamp",
    "STUDENT_MESSAGES", "STUDENT_PROMPT_IDS", "STUDENT_VIEW_COLUMNS", "TAIL_STEP", "TOKENIZER_DIR", "TOKEN_COLUMNS",
    "TOKEN_ID_COLUMNS", "TOPK_LAYOUT", "TOPK_LAYOUTS", "TOPK_ZSTD_LEVEL", "Corpus", "CorpusError", "CorpusStats", "GenerationInfo", "Manifest",
    "TeacherInfo", "arrow_schema", "as_student_view", "binary_values", "check_complete", "check_shards", "copy_tokenizer",
    "corpus_dictionary", "corpus_stats", "decode", "decode_inputs", "encode", "history_entry", "iter_batches", "iter_records", "leaves", "load_dataset",
    "logprob_tolerance", "read_manifest", "read_shard", "read_stored", "read_table", "records_of", "records_to_table", "shard_batches", "stored_batches",
    "shard_encoding", "shard_index", "shard_paths", "shard_stats", "store_tokenizer", "teacher_tokenizer",
    "tokenizer_fingerprint", "unreadable", "validate", "write_manifest", "write_shard",
]
