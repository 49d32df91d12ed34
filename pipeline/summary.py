"""A job's totals, read back from its Parquet: what was answered, what pruning saved, what it cost.

Written as `_summary.json` beside the output, printed at the end of a job, and shown by the report.
Engine seconds are GPU seconds (CPU seconds where there is no GPU) spent in the engine; the
unpruned time is estimated per row from its FLOPs ratio, and measured on the control rows, with
95% intervals: a paired bootstrap for savings and score differences (seeded, so the report
recomputes the same figures), the exact binomial interval for answer agreement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.intervals import Estimate, clopper_pearson, mean_difference, paired_bootstrap, ratio_saving

SUMMARY_FILE = "_summary.json"


MIN_CONTROL_ROWS = 30  # below this many control rows, the summary says they are too few to conclude


@dataclass
class Control:
    """The control rows: the same rows run pruned and unpruned, in batches of the same shape."""

    rows: int
    enough: bool  # at least MIN_CONTROL_ROWS rows
    engine_s_pruned: float
    engine_s_unpruned: float
    saving: Estimate  # measured engine-seconds saving, 1 − Σ pruned / Σ unpruned (paired bootstrap)
    saving_estimated: float | None  # the same rows' saving from pruning, predicted from their FLOPs
    agreement: Estimate  # share of rows whose pruned answer equals the unpruned one (Clopper–Pearson)
    scored_rows: int
    score_pruned: float | None
    score_unpruned: float | None
    score_difference: Estimate  # pruned − unpruned mean score (paired bootstrap)


@dataclass
class KeepQuartile:
    """Scores among the rows whose keep ratio falls in one quartile of the job's keep ratios."""

    keep_low: float | None  # the lowest and highest keep ratio in it; None when it is empty
    keep_high: float | None
    rows: int  # pruned rows in the quartile
    scored_rows: int
    score_mean: float | None
    control_rows: int
    agreement: Estimate
    score_pruned: float | None
    score_unpruned: float | None
    score_difference: Estimate


@dataclass
class Summary:
    output: str
    rows: int
    rows_ok: int
    rows_failed: int
    errors: dict[str, int]  # failed rows per error code
    visual_tokens: int
    visual_tokens_kept: int
    visual_tokens_saved: int
    prompt_tokens: int
    prompt_tokens_kept: int
    generated_tokens: int
    keep_ratio_mean: float | None
    keep_ratio_p50: float | None
    keep_ratio_p90: float | None
    keep_ratio_p99: float | None
    flops: float
    flops_unpruned: float
    flops_saved: float
    flops_unshared: float  # as run, had no row shared an image prefix: flops_unshared − flops is sharing's saving
    rows_sharing_prefix: int  # rows that prefilled an image prefix together with others
    images_encoded: int | None  # runs of the vision tower on an image, counted by the engines; None: not known
    kv_cache_bytes: int
    kv_cache_bytes_unpruned: int
    kv_cache_bytes_saved: int
    wall_s: float
    rows_per_s: float
    engine_s: float
    engine_busy_fraction: float | None  # engine seconds / (actors × their span of batches)
    engine_s_unpruned_estimate: float  # without pruning and without sharing image prefixes: the baseline
    engine_s_unshared_estimate: float  # pruned, without sharing: pruning's estimated saving is against this
    device: str  # what the answering actors ran on: "GPU" or "CPU"
    devices: float  # GPUs the answering actors held (GPU runs), or their CPUs (CPU runs)
    hourly_usd: float | None  # the price of one device for an hour
    billed_usd: float | None  # wall time × devices × price: what the machines cost
    engine_usd: float | None  # engine seconds × price: the share spent answering
    usd_per_1000_rows: float | None  # engine time's cost, per 1,000 answered rows
    usd_per_1000_rows_unpruned_estimate: float | None
    scored_rows: int  # answered rows with references
    metrics: dict[str, int]  # scored rows per metric
    score_mean: float | None
    control: Control | None
    keep_quartiles: list[KeepQuartile]

    def headline(self) -> list[str]:
        """Two lines for a reader in a hurry: what pruning saved, then whether it changed the answers."""
        return [_savings_line(self), _answers_line(self)]

    def lines(self) -> list[str]:
        """The summary as an aligned two-column table."""
        rows = [
            ("rows", f"{self.rows} ({self.rows_ok} answered, {self.rows_failed} failed)"),
            *([("errors", ", ".join(f"{code} {n}" for code, n in self.errors.items()))] if self.errors else []),
            ("visual tokens", f"{self.visual_tokens:,} → {self.visual_tokens_kept:,} kept"),
            ("keep ratio", _ratio_line(self)),
            ("prompt tokens", f"{self.prompt_tokens:,} → {self.prompt_tokens_kept:,} kept"),
            ("generated tokens", f"{self.generated_tokens:,}"),
            ("FLOPs", _flops_line(self)),
            *([("shared prefixes", _sharing_line(self))] if self.rows_sharing_prefix or self.images_encoded else []),
            (
                "KV cache",
                f"{_bytes(self.kv_cache_bytes)} (unpruned {_bytes(self.kv_cache_bytes_unpruned)}, "
                f"saved {_share(self.kv_cache_bytes_saved, self.kv_cache_bytes_unpruned)})",
            ),
            (
                "engine seconds",
                f"{self.engine_s:.3g} {self.device} seconds "
                f"(unpruned, estimated: {self.engine_s_unpruned_estimate:.3g})",
            ),
            ("wall time", f"{self.wall_s:.1f}s, {self.rows_per_s:.2f} rows/s"),
        ]
        if self.engine_busy_fraction is not None:
            rows.append(("engine busy", f"{self.engine_busy_fraction:.0%} of the answering actors' time"))
        if self.hourly_usd is not None:
            rows.append(("cost", _cost_line(self)))
        if self.control is not None:
            rows.append(("control", _control_line(self.control)))
        if self.scored_rows:
            rows.append(("score", _score_line(self)))
        rows.append(("output", self.output))
        width = max(len(name) for name, _ in rows)
        return [f"{name:<{width}}  {value}" for name, value in rows]


def summarize(
    table: pa.Table,
    output: str,
    wall_s: float,
    hourly_usd: float | None = None,
    engine_busy_fraction: float | None = None,
    device: str = "CPU",
    devices: float = 1.0,
    images_encoded: int | None = None,
) -> Summary:
    """Totals over result rows (RESULT_SCHEMA, at least SUMMARY_COLUMNS). What is measured while
    the job runs and is not in the rows: the engines' busy fraction (None when not known), the
    devices the answering actors held, for the billed cost, and the images their vision towers encoded."""
    ok = table.filter(pc.is_null(table.column("error")))

    def total(name, rows=ok):
        return pc.sum(rows.column(name)).as_py() or 0

    flops = total("prefill_flops") + total("decode_flops")
    flops_unpruned = total("prefill_flops_unpruned") + total("decode_flops_unpruned")
    engine_s = total("engine_s")
    unpruned_estimate = _scaled_seconds(ok, _row_flops(ok, "_unpruned"))
    pruned = pruned_rows(ok)
    ratios = keep_ratios(pruned).to_numpy()
    scored = ok.filter(pc.is_valid(ok.column("score")))
    price = hourly_usd
    return Summary(
        output=output,
        rows=table.num_rows,
        rows_ok=ok.num_rows,
        rows_failed=table.num_rows - ok.num_rows,
        errors=_error_counts(table),
        visual_tokens=total("n_visual_tokens"),
        visual_tokens_kept=total("n_visual_kept"),
        visual_tokens_saved=total("n_visual_tokens") - total("n_visual_kept"),
        prompt_tokens=total("n_prompt_tokens"),
        prompt_tokens_kept=total("n_prompt_tokens_kept"),
        generated_tokens=total("n_generated_tokens"),
        keep_ratio_mean=float(ratios.mean()) if ratios.size else None,
        keep_ratio_p50=_percentile(ratios, 50),
        keep_ratio_p90=_percentile(ratios, 90),
        keep_ratio_p99=_percentile(ratios, 99),
        flops=flops,
        flops_unpruned=flops_unpruned,
        flops_saved=flops_unpruned - flops,
        flops_unshared=flops - total("prefill_flops") + _total(_unshared_prefill(ok)),
        rows_sharing_prefix=ok.filter(pc.greater(ok.column("prefix_shared_by").fill_null(1), 1)).num_rows,
        images_encoded=images_encoded,
        kv_cache_bytes=total("kv_cache_bytes"),
        kv_cache_bytes_unpruned=total("kv_cache_bytes_unpruned"),
        kv_cache_bytes_saved=total("kv_cache_bytes_unpruned") - total("kv_cache_bytes"),
        wall_s=wall_s,
        rows_per_s=table.num_rows / wall_s if wall_s else 0.0,
        engine_s=engine_s,
        engine_busy_fraction=engine_busy_fraction,
        engine_s_unpruned_estimate=unpruned_estimate,
        engine_s_unshared_estimate=_scaled_seconds(ok, _unshared_flops(ok)),
        device=device,
        devices=devices,
        hourly_usd=price,
        billed_usd=wall_s / 3600 * devices * price if price is not None else None,
        engine_usd=engine_s / 3600 * price if price is not None else None,
        usd_per_1000_rows=_usd_per_1000(engine_s, ok.num_rows, price),
        usd_per_1000_rows_unpruned_estimate=_usd_per_1000(unpruned_estimate, ok.num_rows, price),
        scored_rows=scored.num_rows,
        metrics=_counts(scored.column("metric")),
        score_mean=pc.mean(scored.column("score")).as_py() if scored.num_rows else None,
        control=_control(_control_rows(ok)),
        keep_quartiles=_keep_quartiles(pruned, ratios),
    )


def resummarize(table: pa.Table, output: str, written: dict, hourly_usd: float | None = None) -> Summary:
    """A finished job's summary recomputed from its rows (scores as they are now), with what only
    the run measured taken from its `_summary.json` (`written`); `hourly_usd` replaces its price."""
    return summarize(
        table,
        output,
        written.get("wall_s", 0.0),
        hourly_usd if hourly_usd is not None else written.get("hourly_usd"),
        written.get("engine_busy_fraction"),
        written.get("device", "CPU"),
        written.get("devices", 1.0),
        written.get("images_encoded"),
    )


def _control_rows(ok: pa.Table) -> pa.Table:
    return ok.filter(pc.is_valid(ok.column("control_unpruned_engine_s")))


def _control(control: pa.Table) -> Control | None:
    if not control.num_rows:
        return None
    pruned_s = control.column("control_pruned_engine_s").to_numpy()
    unpruned_s = control.column("control_unpruned_engine_s").to_numpy()
    unpruned_flops = _total_flops(control, "_unpruned")
    comparison = _score_comparison(control)
    return Control(
        rows=control.num_rows,
        enough=control.num_rows >= MIN_CONTROL_ROWS,
        engine_s_pruned=float(pruned_s.sum()),
        engine_s_unpruned=float(unpruned_s.sum()),
        saving=paired_bootstrap(pruned_s, unpruned_s, ratio_saving),
        saving_estimated=1 - _total(_unshared_flops(control)) / unpruned_flops if unpruned_flops else None,
        agreement=_agreement(control),
        scored_rows=comparison["score_difference"].n,
        **comparison,
    )


def _score_comparison(control: pa.Table) -> dict:
    """The control rows scored both ways: their mean pruned and unpruned scores, and the difference
    with its paired-bootstrap interval, whose n is how many such rows there are (Control's and
    KeepQuartile's score fields)."""
    both = control.filter(
        pc.and_(pc.is_valid(control.column("score")), pc.is_valid(control.column("control_unpruned_score")))
    )
    pruned, unpruned = both.column("score").to_numpy(), both.column("control_unpruned_score").to_numpy()
    return {
        "score_pruned": float(pruned.mean()) if len(pruned) else None,
        "score_unpruned": float(unpruned.mean()) if len(unpruned) else None,
        "score_difference": paired_bootstrap(pruned, unpruned, mean_difference),
    }


def _agreement(control: pa.Table) -> Estimate:
    """Control rows whose pruned answer equals the unpruned one, word for word, with its exact interval."""
    same = pc.equal(control.column("answer"), control.column("control_unpruned_answer"))
    return clopper_pearson(pc.sum(same.cast(pa.int64())).as_py() or 0, control.num_rows)


def _keep_quartiles(pruned: pa.Table, ratios: np.ndarray) -> list[KeepQuartile]:
    """Scores and control comparisons per quartile of the pruned rows by keep ratio (`ratios`, theirs):
    does pruning hurt more where it keeps less? Quartiles by rank (a quarter of the rows each, ties
    in ratio split by order), so equal ratios do not pile into one; with under 4 rows some are empty."""
    if not ratios.size:
        return []
    rank = np.empty(len(ratios), dtype=np.int64)
    rank[np.argsort(ratios, kind="stable")] = np.arange(len(ratios))
    quartile = rank * 4 // len(ratios)
    quartiles = []
    for q in range(4):
        members = quartile == q
        rows = pruned.filter(pa.array(members))
        scored = rows.filter(pc.is_valid(rows.column("score")))
        control = _control_rows(rows)
        quartiles.append(
            KeepQuartile(
                keep_low=float(ratios[members].min()) if members.any() else None,
                keep_high=float(ratios[members].max()) if members.any() else None,
                rows=rows.num_rows,
                scored_rows=scored.num_rows,
                score_mean=pc.mean(scored.column("score")).as_py() if scored.num_rows else None,
                control_rows=control.num_rows,
                agreement=_agreement(control),
                **_score_comparison(control),
            )
        )
    return quartiles


def _error_counts(table: pa.Table) -> dict[str, int]:
    """Failed rows per error code, most frequent first."""
    return _counts(table.filter(pc.is_valid(table.column("error"))).column("error_code").fill_null("unknown"))


def _counts(values: pa.ChunkedArray) -> dict[str, int]:
    """Rows per value, most frequent first."""
    counts = {c["values"]: c["counts"] for c in pc.value_counts(values).to_pylist()}
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _usd_per_1000(engine_s: float, rows: int, hourly_usd: float | None) -> float | None:
    """Engine seconds per answered image at the device's hourly price (idle time is not in engine seconds)."""
    if hourly_usd is None or not rows:
        return None
    return engine_s / 3600 * hourly_usd / rows * 1000


def pruned_rows(table: pa.Table) -> pa.Table:
    """Answered rows that pruning saw: they have visual tokens, and so a keep ratio."""
    answered = pc.and_(pc.is_null(table.column("error")), pc.equal(table.column("pruned"), True))
    return table.filter(pc.and_(answered, pc.greater(table.column("n_visual_tokens"), 0)))


def keep_ratios(pruned: pa.Table) -> pa.ChunkedArray:
    """Kept share of visual tokens of each of `pruned_rows`."""
    return pc.divide(pruned.column("n_visual_kept").cast(pa.float64()), pruned.column("n_visual_tokens"))


def _scaled_seconds(ok: pa.Table, flops) -> float:
    """Σ engine_s × (`flops` / FLOPs as run): each row's time scaled by what it would have computed."""
    if not ok.num_rows:
        return 0.0
    as_run = _row_flops(ok, "")
    # A row that cost nothing (none does, but a hand-made table may) keeps its seconds.
    ratio = pc.if_else(pc.greater(as_run, 0), pc.divide(flops, as_run), 1.0)
    return pc.sum(pc.multiply(ok.column("engine_s"), ratio)).as_py() or 0.0


def _unshared_flops(rows: pa.Table):
    """Each row's FLOPs had it not shared its image prefix: what pruning alone is measured against."""
    return pc.add(_unshared_prefill(rows), rows.column("decode_flops"))


def _row_flops(rows: pa.Table, suffix: str):
    return pc.add(rows.column(f"prefill_flops{suffix}"), rows.column(f"decode_flops{suffix}"))


def _unshared_prefill(rows: pa.Table):
    """Each row's prefill FLOPs had it not shared its image prefix (as run, in outputs that predate sharing)."""
    return pc.coalesce(rows.column("prefill_flops_unshared"), rows.column("prefill_flops"))


def _total(values) -> float:
    return pc.sum(values).as_py() or 0.0


def _total_flops(rows: pa.Table, suffix: str) -> float:
    return _total(_row_flops(rows, suffix))


def _percentile(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if values.size else None


def _ratio_line(s: Summary) -> str:
    if s.keep_ratio_mean is None:
        return "n/a (nothing pruned)"
    quantiles = f"p50 {s.keep_ratio_p50:.1%}, p90 {s.keep_ratio_p90:.1%}, p99 {s.keep_ratio_p99:.1%}"
    return f"mean {s.keep_ratio_mean:.1%}, {quantiles}"


def _share(part: float, whole: float) -> str:
    return f"{part / whole:.1%}" if whole else "n/a"


def _pct(value: float | None) -> str:
    return f"{value:.1%}" if value is not None else "n/a"


def _bytes(n: float) -> str:
    units = ["B", "KiB", "MiB", "GiB"]
    while n >= 1024 and len(units) > 1:
        n /= 1024
        units.pop(0)
    return f"{n:.1f} {units[0]}"


def _flops_line(s: Summary) -> str:
    saved = f"saved {_share(s.flops_saved, s.flops_unpruned)}"
    if s.flops_unshared != s.flops:
        pruning = _share(s.flops_unpruned - s.flops_unshared, s.flops_unpruned)
        sharing = _share(s.flops_unshared - s.flops, s.flops_unpruned)
        saved += f": pruning {pruning}, shared image prefixes {sharing}"
    return f"{s.flops:.3g} (unpruned {s.flops_unpruned:.3g}, {saved})"


def _sharing_line(s: Summary) -> str:
    encoded = f"; the last run encoded {s.images_encoded} images" if s.images_encoded is not None else ""
    return f"{s.rows_sharing_prefix} of {s.rows_ok} rows shared an image prefix with others{encoded}"


def _savings_line(s: Summary) -> str:
    if not s.rows_ok:
        return f"{_n(s.rows, 'row')}, none answered: nothing was pruned or compared"
    if s.keep_ratio_mean is None:
        return f"{_n(s.rows, 'row')}: nothing was pruned"
    head = f"{_n(s.rows, 'row')}: pruning kept {_share(s.visual_tokens_kept, s.visual_tokens)} of visual tokens"
    c = s.control
    if c is not None and c.saving.value is not None:
        measured = "measured on " + _n(c.rows, "control row")
        line = f"{head} and {_engine_time(c.saving, measured=measured)}"
        return line + ("" if c.enough else f"; too few control rows to conclude (under {MIN_CONTROL_ROWS})")
    why = "control rows measured no engine time" if c is not None else "no control rows measured it"
    if not s.engine_s_unpruned_estimate:
        return f"{head}; no engine time was measured"
    estimate = 1 - s.engine_s_unshared_estimate / s.engine_s_unpruned_estimate  # pruning's part, not sharing's
    estimated = _engine_time(Estimate(estimate, None, None, 0), "an estimated ", f"from FLOPs; {why}")
    return f"{head} and {estimated}"


def _engine_time(saving: Estimate, estimated: str = "", measured: str = "") -> str:
    """A saving of engine time in words, then in brackets what it was measured on and its interval,
    in the same direction: a negative saving is a cost, and the interval given is the cost's."""
    if saving.value >= 0:
        value, low, high, effect = saving.value, saving.low, saving.high, "saved {}{} of engine time"
    else:
        value, effect = -saving.value, "cost {}{} more engine time"
        low, high = (-saving.high, -saving.low) if saving.low is not None else (None, None)
    notes = [measured] if measured else []
    if low is not None:
        notes.append(f"±{max(value - low, high - value):.1%}, 95% CI {low:.1%} to {high:.1%}")
    return effect.format(estimated, f"{value:.1%}") + (f" ({', '.join(notes)})" if notes else "")


def _answers_line(s: Summary) -> str:
    c = s.control
    if c is None:
        changed = "no control rows, so answers were not compared with unpruned ones"
    else:
        changed = (
            f"answers changed on {1 - c.agreement.value:.1%} of {_n(c.rows, 'control row')} "
            f"({_interval(c.agreement, flip=True)})"
        )
    if not s.scored_rows:
        return f"{changed}; no scores (no answered row has reference answers)"
    metrics = ", ".join(s.metrics)
    if c is None or not c.scored_rows:
        return f"{changed}; score {s.score_mean:.3f} over {_n(s.scored_rows, 'row')} ({metrics})"
    return (
        f"{changed}; score pruned {c.score_pruned:.3f} vs unpruned {c.score_unpruned:.3f} on "
        f"{_n(c.scored_rows, 'scored control row')} (difference {_difference(c.score_difference)}; {metrics})"
    )


def _control_line(c: Control) -> str:
    verdict = "" if c.enough else f"; too few to conclude (under {MIN_CONTROL_ROWS})"
    saving = _engine_time(c.saving) if c.saving.value is not None else "no engine time measured"
    if c.saving_estimated is not None:
        estimate = _engine_time(Estimate(c.saving_estimated, None, None, 0), "an estimated ")
        saving += f"; from FLOPs alone, pruning {estimate}"
    return f"{_n(c.rows, 'row')}: {saving}; answers agree {_pct(c.agreement.value)} ({_interval(c.agreement)}){verdict}"


def _score_line(s: Summary) -> str:
    return f"mean {s.score_mean:.3f} over {_n(s.scored_rows, 'row')} ({_metric_names(s)})"


def _cost_line(s: Summary) -> str:
    unit = f"${s.hourly_usd:g}/{s.device}-hour"
    per_image = (
        f", ${s.usd_per_1000_rows:.4f} per 1000 rows (unpruned, estimated: "
        f"${s.usd_per_1000_rows_unpruned_estimate:.4f})"
        if s.usd_per_1000_rows is not None
        else ""
    )
    return (
        f"${s.billed_usd:.4f} billed ({s.wall_s:.1f}s × {_n(s.devices, s.device)} at {unit}); "
        f"${s.engine_usd:.4f} of engine time{per_image}"
    )


def _metric_names(s: Summary) -> str:
    return ", ".join(f"{name} on {n}" if len(s.metrics) > 1 else name for name, n in s.metrics.items())


def _difference(e: Estimate) -> str:
    if e.value is None:
        return "n/a"
    interval = f"95% CI {e.low:+.3f} to {e.high:+.3f}" if e.low is not None else "no interval from one row"
    return f"{e.value:+.3f}, {interval}"


def _n(count: float, noun: str) -> str:
    """`1 row`, `2 rows`, `0.5 GPUs`."""
    return f"{count:g} {noun}" + ("" if count == 1 else "s")


def _interval(e: Estimate, flip: bool = False) -> str:
    """An exact interval for a share, or for its complement (`flip`)."""
    if e.low is None:
        return "no interval"
    low, high = (1 - e.high, 1 - e.low) if flip else (e.low, e.high)
    return f"95% CI {low:.1%} to {high:.1%}"
