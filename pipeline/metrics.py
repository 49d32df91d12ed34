"""Ray metrics from the answering actors (`ray.util.metrics`): rows done and failed, visual tokens
kept and saved, engine seconds. Ray exports them with its own (Prometheus, the dashboard,
Grafana), so a running job's throughput and savings show beside Ray Data's operator metrics.
Names carry the `glimpse_batch_` prefix; Ray adds `ray_` in front when exporting.
"""

from __future__ import annotations

from ray.util.metrics import Counter


class JobMetrics:
    """The counters of one actor; Ray sums them over actors and nodes."""

    def __init__(self) -> None:
        self.rows = Counter(
            "glimpse_batch_rows", description="result rows written, by status (ok, failed)", tag_keys=("status",)
        )
        self.visual_tokens = Counter(
            "glimpse_batch_visual_tokens",
            description="visual tokens of answered rows, by fate (kept, saved: pruned away)",
            tag_keys=("fate",),
        )
        self.engine_seconds = Counter("glimpse_batch_engine_seconds", description="seconds spent inside the engine")

    def record(self, counts: dict[str, int], engine_s: float) -> None:
        """One finished batch (progress.batch_counts)."""
        for value, counter, tags in (
            (counts["rows"] - counts["failed"], self.rows, {"status": "ok"}),
            (counts["failed"], self.rows, {"status": "failed"}),
            (counts["visual_kept"], self.visual_tokens, {"fate": "kept"}),
            (counts["visual_tokens"] - counts["visual_kept"], self.visual_tokens, {"fate": "saved"}),
            (engine_s, self.engine_seconds, None),
        ):
            if value > 0:  # a Counter only goes up
                counter.inc(value, tags=tags)
