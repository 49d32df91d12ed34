"""Score a finished job's answers against references: `python -m jobs.score OUTPUT --references MANIFEST`.

Joins the output's rows with the manifest's `answers` / `answer_ref` by id, scores each answer
(and each control row's unpruned answer) with --metric, writes OUTPUT/_scores.pq (Parquet), updates
OUTPUT/_summary.json, and prints the summary. The report then shows these scores.
Exit status: 0 scored; 2 refused (not a finished job output, an unreadable manifest, no row with a reference).
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
    from pipeline.sources import ManifestError
    from pipeline.storage import StorageOptions, UnsupportedURI
    from pipeline.summary import resummarize
    from schemas import SUMMARY_COLUMNS

    storage = StorageOptions(**storage_overrides(args))
    try:
        output = OutputDir(args.output, storage)
        output.require_finished()
        table = output.read_results([*SUMMARY_COLUMNS, "id", "references"], scored=False)
        written = output.read_summary()
    except (OutputError, UnsupportedURI) as e:
        return error(str(e))
    except Exception as e:  # storage: no credentials, unreachable, a listed file gone
        return error(f"cannot read {args.output}: {type(e).__name__}: {e}")
    try:
        references = reference_map(args.references, storage)
    except (ManifestError, UnsupportedURI) as e:
        return error(str(e))
    except Exception as e:
        return error(f"cannot read {args.references}: {type(e).__name__}: {e}")
    ids = table.column("id").to_pylist()
    referenced = {i for i in ids if references.get(i)}
    if not referenced:
        return error(f"no row of {args.output} has a reference (`answers` or `answer_ref`) in {args.references}")
    losing = sum(1 for i, s in zip(ids, table.column("score").to_pylist()) if s is not None and i not in referenced)
    table = rescored(table, references, args.metric)
    try:
        output.write_scores(scores_table(table))
    except OutputError as e:
        return error(str(e))
    summary = resummarize(table, args.output, written)
    output.write_summary({**written, **asdict(summary)})
    unknown = len(set(references) - set(ids))
    missing = len(ids) - len(referenced)
    print(
        f"scored {summary.scored_rows} of {summary.rows} rows against {args.references}: "
        f"{missing} {'row has' if missing == 1 else 'rows have'} no reference there"
        + (f" ({losing} of them lose the score the job gave them)" if losing else "")
        + (f"; {unknown} of its ids are not rows of the output" if unknown else "")
    )
    print("\n".join([*summary.headline(), *summary.lines()]))
    return 0


def reference_map(uri: str, storage) -> dict[str, list[str] | None]:
    """id → references of a manifest. Only its `id`, `answers` and `answer_ref` matter: a row
    without an id, a repeated id or a malformed reference refuses the scoring (a silent skip would
    bias the mean); an image or question the job could not use does not."""
    from pipeline.sources import InvalidRow, ManifestError, manifest_records, reference_list

    references: dict[str, list[str] | None] = {}
    for row in manifest_records(uri, storage, ("answers", "answer_ref")):
        if not row["id"]:
            raise ManifestError(f"{uri}: a row has no id" + (f" ({row['error']})" if row["error"] else ""))
        if row["id"] in references:
            raise ManifestError(f"{uri}: the id {row['id']!r} repeats")
        try:
            references[row["id"]] = reference_list(row["answers"], row["answer_ref"])
        except InvalidRow as e:
            raise ManifestError(f"{uri}: row {row['id']}: {e}") from None
    return references


if __name__ == "__main__":
    sys.exit(main())
