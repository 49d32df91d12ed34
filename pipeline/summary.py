"""A job's totals, read back from its Parquet: what was answered, what pruning saved, what it cost.

Written as `_summary.json` beside the output, printed at the end of a job, and shown by the report.
Engine seconds are GPU seconds (CPU seconds where there is no GPU) spent in the engine; the
unpruned time is estimated per row from its FLOPs ratio, and measured on the control rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SUMMARY_FILE = "_summary.json"


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
    kv_cache_bytes: int
    kv_cache_bytes_unpruned: int
    kv_cache_bytes_saved: int
    wall_s: float
    rows_per_s: float
    engine_s: float
    engine_busy_fraction: float | None  # engine seconds / (actors × their span of batches)
    engine_s_unpruned_estimate: float
    gpu_hourly_usd: float | None
    usd_per_1000_images: float | None
    usd_per_1000_images_unpruned_estimate: float | None
    control_rows: int
    control_engine_s_pruned: float | None
    control_engine_s_unpruned: float | None
    control_saving_measured: float | None
    control_saving_estimated: float | None
    control_answer_agreement: float | None

    def lines(self) -> list[str]:
        """The summary as an aligned two-column table."""
        rows = [
            ("rows", f"{self.rows} ({self.rows_ok} answered, {self.rows_failed} failed)"),
            *([("errors", ", ".join(f"{code} {n}" for code, n in self.errors.items()))] if self.errors else []),
            ("visual tokens", f"{self.visual_tokens:,} → {self.visual_tokens_kept:,} kept"),
            ("keep ratio", _ratio_line(self)),
            ("prompt tokens", f"{self.prompt_tokens:,} → {self.prompt_tokens_kept:,} kept"),
            ("generated tokens", f"{self.generated_tokens:,}"),
            (
                "FLOPs",
                f"{self.flops:.3g} (unpruned {self.flops_unpruned:.3g}, "
                f"saved {_share(self.flops_saved, self.flops_unpruned)})",
            ),
            (
                "KV cache",
                f"{_bytes(self.kv_cache_bytes)} (unpruned {_bytes(self.kv_cache_bytes_unpruned)}, "
                f"saved {_share(self.kv_cache_bytes_saved, self.kv_cache_bytes_unpruned)})",
            ),
            ("engine seconds", f"{self.engine_s:.3g} (unpruned, estimated: {self.engine_s_unpruned_estimate:.3g})"),
            ("wall time", f"{self.wall_s:.1f}s, {self.rows_per_s:.2f} rows/s"),
        ]
        if self.engine_busy_fraction is not None:
            rows.append(("engine busy", f"{self.engine_busy_fraction:.0%} of the answering actors' time"))
        if self.usd_per_1000_images is not None:
            rows.append(
                (
                    "cost / 1000 images",
                    f"${self.usd_per_1000_images:.4f} (unpruned, estimated: "
                    f"${self.usd_per_1000_images_unpruned_estimate:.4f}) at ${self.gpu_hourly_usd}/GPU-hour",
                )
            )
        if self.control_rows:
            rows.append(
                (
                    "control",
                    f"{self.control_rows} rows: measured saving {_pct(self.control_saving_measured)} "
                    f"(estimated {_pct(self.control_saving_estimated)}), "
                    f"answers agree {_pct(self.control_answer_agreement)}",
                )
            )
        rows.append(("output", self.output))
        width = max(len(name) for name, _ in rows)
        return [f"{name:<{width}}  {value}" for name, value in rows]


def summarize(
    table: pa.Table,
    output: str,
    wall_s: float,
    gpu_hourly_usd: float | None = None,
    engine_busy_fraction: float | None = None,
) -> Summary:
    """Totals over result rows (RESULT_SCHEMA, at least SUMMARY_COLUMNS). The engines' busy fraction is
    measured while the job runs (not in the rows); None when not known."""
    ok = table.filter(pc.is_null(table.column("error")))

    def total(name, rows=ok):
        return pc.sum(rows.column(name)).as_py() or 0

    flops = total("prefill_flops") + total("decode_flops")
    flops_unpruned = total("prefill_flops_unpruned") + total("decode_flops_unpruned")
    engine_s = total("engine_s")
    unpruned_estimate = _unpruned_seconds(ok)
    ratios = _keep_ratios(ok)
    control = ok.filter(pc.is_valid(ok.column("control_unpruned_engine_s")))
    control_pruned, control_unpruned = (
        total("control_pruned_engine_s", control),
        total("control_unpruned_engine_s", control),
    )
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
        kv_cache_bytes=total("kv_cache_bytes"),
        kv_cache_bytes_unpruned=total("kv_cache_bytes_unpruned"),
        kv_cache_bytes_saved=total("kv_cache_bytes_unpruned") - total("kv_cache_bytes"),
        wall_s=wall_s,
        rows_per_s=table.num_rows / wall_s if wall_s else 0.0,
        engine_s=engine_s,
        engine_busy_fraction=engine_busy_fraction,
        engine_s_unpruned_estimate=unpruned_estimate,
        gpu_hourly_usd=gpu_hourly_usd,
        usd_per_1000_images=_usd_per_1000(engine_s, table.num_rows, gpu_hourly_usd),
        usd_per_1000_images_unpruned_estimate=_usd_per_1000(unpruned_estimate, table.num_rows, gpu_hourly_usd),
        control_rows=control.num_rows,
        control_engine_s_pruned=control_pruned if control.num_rows else None,
        control_engine_s_unpruned=control_unpruned if control.num_rows else None,
        control_saving_measured=1 - control_pruned / control_unpruned if control_unpruned else None,
        control_saving_estimated=1 - _total_flops(control, "") / _total_flops(control, "_unpruned")
        if control.num_rows
        else None,
        control_answer_agreement=_agreement(control) if control.num_rows else None,
    )


def _error_counts(table: pa.Table) -> dict[str, int]:
    """Failed rows per error code, most frequent first."""
    codes = table.filter(pc.is_valid(table.column("error"))).column("error_code").fill_null("unknown")
    counts = {c["values"]: c["counts"] for c in pc.value_counts(codes).to_pylist()}
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _usd_per_1000(engine_s: float, rows: int, gpu_hourly_usd: float | None) -> float | None:
    """Engine seconds per image at the GPU's hourly price (idle GPU time is not in engine seconds)."""
    if gpu_hourly_usd is None or not rows:
        return None
    return engine_s / 3600 * gpu_hourly_usd / rows * 1000


def _agreement(control: pa.Table) -> float:
    """Share of control rows whose pruned answer equals the unpruned one, word for word."""
    same = pc.equal(control.column("answer"), control.column("control_unpruned_answer"))
    return pc.mean(same.cast(pa.float64())).as_py()


def _keep_ratios(ok: pa.Table) -> np.ndarray:
    """Kept share of visual tokens, one per pruned row that had any."""
    pruned = ok.filter(pc.and_(pc.equal(ok.column("pruned"), True), pc.greater(ok.column("n_visual_tokens"), 0)))
    return pc.divide(pruned.column("n_visual_kept").cast(pa.float64()), pruned.column("n_visual_tokens")).to_numpy()


def _unpruned_seconds(ok: pa.Table) -> float:
    """Σ engine_s × (unpruned FLOPs / FLOPs as run): each row's time scaled by what it would have computed."""
    if not ok.num_rows:
        return 0.0
    ratio = pc.divide(_row_flops(ok, "_unpruned"), _row_flops(ok, ""))
    return pc.sum(pc.multiply(ok.column("engine_s"), ratio)).as_py() or 0.0


def _row_flops(rows: pa.Table, suffix: str):
    return pc.add(rows.column(f"prefill_flops{suffix}"), rows.column(f"decode_flops{suffix}"))


def _total_flops(rows: pa.Table, suffix: str) -> float:
    return pc.sum(_row_flops(rows, suffix)).as_py() or 0.0


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
