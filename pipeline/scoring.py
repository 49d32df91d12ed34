"""Each row's answer scored against its references: in the job as rows are answered, and
offline over a finished output (`python -m jobs.score`). The metrics are pipeline.quality's."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.quality import default_metric, score

SCORE_COLUMNS = ("references", "metric", "score", "control_unpruned_score")


def score_columns(
    references: list[str] | None, answer: str | None, control_unpruned_answer: str | None, metric: str | None
) -> dict:
    """The row's metric, its answer's score and, on a control row, the unpruned answer's score.
    Nulls where there is nothing to score (no references, or no answer). No metric given: the
    default for the row's references (vqa for 3 or more, else exact)."""
    if not references or answer is None:
        return {"metric": None, "score": None, "control_unpruned_score": None}
    name = metric or default_metric(references)
    unpruned = score(name, control_unpruned_answer, references) if control_unpruned_answer is not None else None
    return {"metric": name, "score": score(name, answer, references), "control_unpruned_score": unpruned}


def rescored(results: pa.Table, references: dict[str, list[str] | None], metric: str | None) -> pa.Table:
    """`results` with SCORE_COLUMNS recomputed against `references` (by id): a row whose id has
    no reference there gets none. `results` needs id, answer, control_unpruned_answer and
    SCORE_COLUMNS; only SCORE_COLUMNS change."""
    ids = results.column("id").to_pylist()
    refs = [references.get(i) for i in ids]
    scores = [
        score_columns(r, a, c, metric)
        for r, a, c in zip(
            refs, results.column("answer").to_pylist(), results.column("control_unpruned_answer").to_pylist()
        )
    ]
    new = {"references": pa.array(refs, results.schema.field("references").type)}
    for name in ("metric", "score", "control_unpruned_score"):
        new[name] = pa.array([s[name] for s in scores], results.schema.field(name).type)
    for name, column in new.items():
        results = results.set_column(results.schema.get_field_index(name), name, column)
    return results


def scores_table(results: pa.Table) -> pa.Table:
    """The id and SCORE_COLUMNS of every row: what `jobs.score` writes beside an output."""
    return results.select(["id", *SCORE_COLUMNS])


def with_scores(results: pa.Table, scores: pa.Table) -> pa.Table:
    """`results` with its SCORE_COLUMNS (those it has) taken from `scores` (by id): an offline
    scoring replaces the job's own; a row `scores` lacks keeps its own. `results` needs its id."""
    where = pc.index_in(results.column("id"), value_set=scores.column("id"))
    for name in SCORE_COLUMNS:
        if name in results.column_names:
            own = results.column(name)
            column = pc.if_else(pc.is_valid(where), scores.column(name).take(where).cast(own.type), own)
            results = results.set_column(results.schema.get_field_index(name), name, column)
    return results
