"""Score a finished job's answers against references: `python -m jobs.score OUTPUT --references MANIFEST`.

Joins the output's rows with the manifest's `answers` / `answer_ref` by id, scores each answer
(and each control row's unpruned answer) with --metric, writes OUTPUT/_scores.parquet, updates
OUTPUT/_summary.json, and prints the summary. The report then shows these scores.
Exit status: 0 scored; 2 refused (not a finished job output, an unreadable manifest, no id in common).
"""

from __future__ import annotations

import sys
from dataclasses import asdict

from jobs.cli import JobArgumentParser, add_storage_options, error, storage_overrides

METRICS = ("vqa", "exact", "anls", "contains")  # pipeline.quality.METRICS, without importing it for --help


def main(argv: list[str] | None = None) -> int:
    parser = JobArgumentParser(prog="python -m jobs.score", description=__doc__.split("\n")[0])
    parser.add_argument("output", help="the job's output directory (local path or URI)")
    parser.add_argument(
        "--references",
        required=True,
        metavar="MANIFEST",
        help="a manifest (Parquet, JSONL or CSV, local or URI) with `id` and `answers` (a list) or `answer_ref`",
    )
    parser.add_argument(
        "--metric", choices=METRICS, help="how answers are scored (default: vqa with 3+ references, else exact)"
    )
    add_storage_options(parser)
    args = parser.parse_args(argv)

    from pipeline.output import OutputDir, OutputError
    from pipeline.scoring import rescored, scores_table
    from pipeline.sources import ManifestError, manifest_records
    from pipeline.storage import StorageOptions, UnsupportedURI
    from pipeline.summary import summarize
    from schemas import SUMMARY_COLUMNS

    storage = StorageOptions(**storage_overrides(args))
    output = OutputDir(args.output, storage)
    try:
        table = output.read_results([*SUMMARY_COLUMNS, "id", "references"])
        written = output.read_summary()
        references = reference_map(manifest_records(args.references, storage, ()), args.references)
    except (OutputError, ManifestError, UnsupportedURI) as e:
        return error(str(e))
    except OSError as e:
        return error(f"cannot read {args.references}: {type(e).__name__}: {e}")
    ids = set(table.column("id").to_pylist())
    matched = ids & set(references)
    if not matched:
        return error(f"none of the {len(references)} ids in {args.references} is a row of {args.output}")
    table = rescored(table, references, args.metric)
    try:
        output.write_scores(scores_table(table))
    except OutputError as e:
        return error(str(e))
    summary = summarize(
        table,
        args.output,
        written.get("wall_s", 0.0),
        written.get("hourly_usd"),
        written.get("engine_busy_fraction"),
        written.get("device", "CPU"),
        written.get("devices", 1.0),
        written.get("images_encoded"),
    )
    output.write_summary({**written, **asdict(summary)})
    print(
        f"scored {summary.scored_rows} of {summary.rows} rows against {args.references} "
        f"({len(ids - matched)} rows have no reference there, {len(set(references) - ids)} references match no row)"
    )
    print("\n".join([*summary.headline(), *summary.lines()]))
    return 0


def reference_map(rows: list[dict], uri: str) -> dict[str, list[str] | None]:
    """id → references from manifest rows; a row without an id, a repeated id or a malformed
    reference refuses the scoring (a silent skip would bias the mean)."""
    from pipeline.sources import ManifestError

    references: dict[str, list[str] | None] = {}
    for row in rows:
        if row["error"]:
            raise ManifestError(f"{uri}: row {row['id'] or '(no id)'}: {row['error']}")
        if not row["id"]:
            raise ManifestError(f"{uri}: a row has no id")
        if row["id"] in references:
            raise ManifestError(f"{uri}: the id {row['id']!r} repeats")
        references[row["id"]] = row["references"]
    return references


if __name__ == "__main__":
    sys.exit(main())
