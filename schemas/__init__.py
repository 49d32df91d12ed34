"""Arrow schemas of manifests and results: the one place columns are named and typed.

Manifest (what a job reads; `image` or `images` names the inputs):
    id              string, required   unique key of the row; output rows carry it
    images          list<string>       image URIs (s3://, gs://, file://, or local paths), in prompt order
    question        string, nullable   the question; null → the job's prompt (captioning)
    max_new_tokens  int32, nullable    per-row answer length; null → the job's default
    references      list<string>, nullable  reference answers to score against: the manifest's `answers`
                                       (a list, e.g. VQAv2's 10) or `answer_ref` (one)
    image_bytes     list<binary>, nullable  inline image bytes (the `datasets` input); `images` then only names them
    error_code, error  string, nullable  set by the reader when the row itself is malformed (invalid_row)

Result (one row per manifest row; in each file's metadata the schema version under
`glimpse_batch.schema` and the job's lineage under `glimpse_batch.lineage`, see pipeline.lineage):
    id, images, question      as in the manifest (question as asked, after defaulting)
    references                as in the manifest: the reference answers, null when there are none
    answer                    string, null when the row failed
    error_code                string, null when the row succeeded: a code of pipeline.failures.ERROR_CODES
    error                     string, null when the row succeeded: why there is no answer
    model, glimpse_modules    what answered (glimpse_modules null for the baseline)
    pruned                    bool, whether GlimpsePrune pruned this row
    n_visual_tokens           visual tokens before pruning
    n_visual_kept             visual tokens after pruning (= n_visual_tokens unpruned)
    n_prompt_tokens           prompt tokens before pruning
    n_prompt_tokens_kept      prompt tokens after pruning
    n_generated_tokens        new tokens
    finish_reason             "stop" | "length", null when the row failed
    batch_prefill_s, batch_decode_s  seconds of the whole batch the row ran in (decode until the row
                              finished); shared by the batch's rows, so never sum them: sum engine_s
    engine_s                  this row's share of its batch's engine (GPU) seconds
    prefill_flops, decode_flops                  FLOPs as run (analytic, pipeline.glimpse.accounting)
    prefill_flops_unpruned, decode_flops_unpruned  the same request without pruning
    prefill_flops_unshared    as run, had the row not shared its image prefix with other rows
    prefix_shared_by          rows that prefilled this row's image prefix (its images and the text
                              before its question) together, itself included; 1 when alone
    kv_cache_bytes, kv_cache_bytes_unpruned      KV cache the row held after prefill and decode
    control_*                 only for control rows (--control-fraction), measured on the same rows
                              in two batches of the same shape: pruned and unpruned engine seconds,
                              the unpruned answer and its length
    metric, score             on rows with references: the metric (pipeline.quality) and the answer's score
    control_unpruned_score    on scored control rows: the unpruned answer's score
    kept_mask                 with --keep-masks, on pruned rows: 1 bit per visual token, 1 = kept, in the
                              engine's order (each image's merged patch grid in raster order), packed
                              most significant bit first (numpy.packbits); pipeline.keep_masks reads it
    image_grid_thw            with --keep-masks: each image's patch grid (t, h, w), flattened; the
                              mask's grid per image is (t, h / 2, w / 2)
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "5"  # 3: prefill_s, decode_s renamed batch_prefill_s, batch_decode_s; 4: scores, keep masks;
# 5: shared image prefixes (prefill_flops_unshared, prefix_shared_by)
SCHEMA_METADATA_KEY = b"glimpse_batch.schema"
LINEAGE_METADATA_KEY = b"glimpse_batch.lineage"  # JSON: pipeline.lineage

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("images", pa.list_(pa.string()), nullable=False),
        pa.field("question", pa.string()),
        pa.field("max_new_tokens", pa.int32()),
        pa.field("references", pa.list_(pa.string())),
        pa.field("image_bytes", pa.list_(pa.binary())),
        pa.field("error_code", pa.string()),  # set by the reader on a malformed row: invalid_row
        pa.field("error", pa.string()),
    ]
)

# Between the CPU and GPU stages: the manifest row (question and max_new_tokens defaulted) plus model inputs.
PREPARED_SCHEMA = pa.schema(
    [
        *[f for f in MANIFEST_SCHEMA if f.name != "image_bytes"],
        pa.field("input_ids", pa.list_(pa.int64())),
        pa.field("pixel_values", pa.large_binary()),  # [P, C·t·p·p] in pixel_dtype, row-major
        pa.field("pixel_dtype", pa.string()),  # the model's dtype: float32, bfloat16 or float16
        pa.field("image_grid_thw", pa.list_(pa.int64())),  # [n_images × 3], flattened
    ]
)

RESULT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("images", pa.list_(pa.string())),
        pa.field("question", pa.string()),
        pa.field("references", pa.list_(pa.string())),
        pa.field("answer", pa.string()),
        pa.field("error_code", pa.string()),
        pa.field("error", pa.string()),
        pa.field("model", pa.string()),
        pa.field("glimpse_modules", pa.string()),
        pa.field("pruned", pa.bool_()),
        pa.field("n_visual_tokens", pa.int32()),
        pa.field("n_visual_kept", pa.int32()),
        pa.field("n_prompt_tokens", pa.int32()),
        pa.field("n_prompt_tokens_kept", pa.int32()),
        pa.field("n_generated_tokens", pa.int32()),
        pa.field("finish_reason", pa.string()),
        pa.field("batch_prefill_s", pa.float64()),
        pa.field("batch_decode_s", pa.float64()),
        pa.field("engine_s", pa.float64()),
        pa.field("prefill_flops", pa.float64()),
        pa.field("prefill_flops_unpruned", pa.float64()),
        pa.field("prefill_flops_unshared", pa.float64()),
        pa.field("prefix_shared_by", pa.int32()),
        pa.field("decode_flops", pa.float64()),
        pa.field("decode_flops_unpruned", pa.float64()),
        pa.field("kv_cache_bytes", pa.int64()),
        pa.field("kv_cache_bytes_unpruned", pa.int64()),
        pa.field("control_pruned_engine_s", pa.float64()),
        pa.field("control_unpruned_engine_s", pa.float64()),
        pa.field("control_unpruned_answer", pa.string()),
        pa.field("control_unpruned_generated_tokens", pa.int32()),
        pa.field("metric", pa.string()),
        pa.field("score", pa.float64()),
        pa.field("control_unpruned_score", pa.float64()),
        pa.field("kept_mask", pa.binary()),
        pa.field("image_grid_thw", pa.list_(pa.int32())),
    ],
    metadata={SCHEMA_METADATA_KEY: SCHEMA_VERSION.encode()},
)


# The result columns a job's totals are computed from (pipeline.summary).
SUMMARY_COLUMNS = [
    "error",
    "error_code",
    "pruned",
    "answer",
    "n_visual_tokens",
    "n_visual_kept",
    "n_prompt_tokens",
    "n_prompt_tokens_kept",
    "n_generated_tokens",
    "engine_s",
    "prefill_flops",
    "prefill_flops_unpruned",
    "prefill_flops_unshared",
    "prefix_shared_by",
    "decode_flops",
    "decode_flops_unpruned",
    "kv_cache_bytes",
    "kv_cache_bytes_unpruned",
    "control_pruned_engine_s",
    "control_unpruned_engine_s",
    "control_unpruned_answer",
    "metric",
    "score",
    "control_unpruned_score",
]
# What the report adds to them: the rows its gallery shows.
REPORT_COLUMNS = [*SUMMARY_COLUMNS, "id", "images", "question", "references", "kept_mask", "image_grid_thw"]
# Result columns carried over from the prepared row as they are.
CARRIED_COLUMNS = ["id", "images", "question", "references", "error_code", "error"]


def align(rows: list[dict] | pa.Table, schema: pa.Schema) -> pa.Table:
    """Rows or a table → a table of exactly `schema`'s columns, cast safely (overflow raises).
    Rows are read by the schema's names, so a column missing from some rows is null there."""
    if not isinstance(rows, pa.Table):
        required = [f.name for f in schema if not f.nullable]
        missing = sorted({name for row in rows for name in required if row.get(name) is None})
        if missing:
            raise ValueError(f"required columns {missing} are missing from some rows")
        return pa.Table.from_pylist(rows, schema=schema)
    missing = [f.name for f in schema if f.name not in rows.column_names and not f.nullable]
    if missing:
        raise ValueError(f"required columns {missing} are missing; present: {rows.column_names}")
    columns = [
        rows.column(f.name).cast(f.type, safe=True) if f.name in rows.column_names else pa.nulls(rows.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)
