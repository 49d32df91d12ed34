"""A job's report: one self-contained HTML page (plots and pictures inlined as PNG) built from its
Parquet rows and `_summary.json`, to answer first what pruning saved and whether it changed the answers.

The page is a jinja2 template (pipeline/templates/report.html.j2, autoescaped); this module turns
the summary, the lineage and the rows into the strings and tables it shows.
"""

from __future__ import annotations

import base64
import functools
import io
import os
import re
import uuid
from pathlib import Path

import jinja2
import matplotlib

matplotlib.use("Agg")  # no display where jobs run
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pipeline.gallery import DIM, Limits, build_gallery  # noqa: E402
from pipeline.intervals import Estimate  # noqa: E402
from pipeline.storage import StorageOptions  # noqa: E402
from pipeline.summary import MIN_CONTROL_ROWS, Summary  # noqa: E402

DATA_COLOUR = "#3b7dd8"  # every plot's data, so a test can find it
SECOND_COLOUR = "#f0a030"
FIGSIZE = (5.6, 3.4)
NOT_AVAILABLE = "–"
PAGE = "report.html"
# Control characters HTML text must not hold (C0 but tab and newline, DEL, C1): a model can emit them.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
PLOT_COLUMNS = [
    "pruned",
    "n_visual_tokens",
    "n_visual_kept",
    "prefill_flops",
    "prefill_flops_unpruned",
    "decode_flops",
    "decode_flops_unpruned",
    "kv_cache_bytes",
    "kv_cache_bytes_unpruned",
]


def render(
    table: pa.Table, summary: Summary, lineage: dict | None, storage: StorageOptions, gallery_size: int = 8
) -> str:
    """The report page. `table`: result rows, at least schemas.REPORT_COLUMNS; `lineage`: the
    `_summary.json`'s, None for a job that recorded none; `storage`: to read the gallery's images back."""
    ok = table.filter(pc.is_null(table.column("error"))).select(PLOT_COLUMNS).to_pydict()
    config = (lineage or {}).get("config", {})
    return _template().render(
        title=summary.output,
        headline=summary.headline(),
        run=run_metadata(lineage),
        options=[(name, _option(value)) for name, value in config.items() if name != "storage"],
        money=money(summary),
        summary_rows=_table_rows(summary),
        control=control_verdict(summary),
        quartiles=quartile_rows(summary),
        gallery=build_gallery(table, storage, gallery_size, _limits(config)),
        dim=DIM,
        figures=[
            ("How much of each image is kept: rows per keep ratio", _keep_ratio_histogram(ok)),
            ("Kept visual tokens against the image's visual tokens", _kept_against_size(ok)),
            ("Where the engine time and money go, as run and unpruned (estimated)", _time_and_cost(ok, summary)),
            ("Pruned against unpruned, in % of the unpruned value", _pruned_against_unpruned(ok, summary)),
        ],
    )


def write(page: str, directory: Path) -> Path:
    """Writes the page as `directory`/report.html (making the folder), whole or not at all: beside,
    then moved over, so a link at report.html is replaced rather than followed (its target stays)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / PAGE
    temporary = directory / f".{PAGE}.{uuid.uuid4().hex}"
    try:
        temporary.write_text(page, encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def printable(value):
    """Text with its control characters shown as U+FFFD: raw, they are invalid in the page."""
    return CONTROL_CHARACTERS.sub("\ufffd", value) if isinstance(value, str) else value


@functools.cache
def _template() -> jinja2.Template:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("pipeline", "templates"),
        autoescape=jinja2.select_autoescape(["html.j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,  # a name the template misspells fails the report, not the reader
        finalize=printable,  # every value the page shows: answers, questions, ids, URIs, lineage
    )
    return environment.get_template("report.html.j2")


def run_metadata(lineage: dict | None) -> list[tuple[str, str]]:
    """What ran, on what, when: the lineage the job recorded in `_summary.json`."""
    if not lineage:
        return [("lineage", "not recorded (the job's _summary.json holds none)")]
    config = lineage.get("config", {})
    return [
        ("model", _checkpoint(lineage.get("model"))),
        ("glimpse modules", _checkpoint(lineage.get("glimpse_modules"))),
        ("input", _input(config)),
        ("started", lineage.get("started_at")),
        ("finished", lineage.get("finished_at")),
        ("package", f"{lineage.get('package', 'glimpse-batch')} {lineage.get('version', 'unknown')}"),
        ("run id", lineage.get("run_id")),
        ("output", lineage.get("output")),
    ]


def _checkpoint(checkpoint: dict | None) -> str:
    """A model's or modules' location, kind and version; no modules is the unpruned baseline."""
    if not checkpoint:
        return "none: baseline"
    revision = f", revision {checkpoint['revision']}" if checkpoint.get("revision") else ""
    return f"{checkpoint.get('location')} ({checkpoint.get('kind')}{revision}, version {checkpoint.get('version')})"


def _input(config: dict) -> str:
    for name, label in (("manifest", "manifest"), ("images", "images under"), ("dataset", "dataset")):
        if config.get(name):
            return f"{label} {config[name]}"
    return "the bundled samples"


def _option(value) -> str:
    return "none" if value is None else str(value)


def _limits(config: dict) -> Limits:
    """The job's own limits on what an image may be, so the report reads what the job read."""
    default = Limits()
    return Limits(
        max_bytes=config.get("max_image_bytes") or default.max_bytes,
        max_pixels=config.get("max_image_pixels") or default.max_pixels,
    )


def money(s: Summary) -> list[tuple[str, str, str]] | None:
    """(what, cost, how it is reckoned): the machines billed beside the engine time they spent;
    None when no price was given."""
    if s.hourly_usd is None:
        return None
    unit = f"${s.hourly_usd:g} per {s.device}-hour"
    plural = "" if s.devices == 1 else "s"
    return [
        ("billed", _usd(s.billed_usd), f"{s.wall_s:.1f} s wall time × {s.devices:g} {s.device}{plural} at {unit}"),
        ("engine time", _usd(s.engine_usd), f"{s.engine_s:.3g} {s.device} seconds inside the engine at {unit}"),
        (
            "per 1,000 rows",
            _usd(s.usd_per_1000_rows),
            f"engine time; unpruned, estimated from FLOPs: {_usd(s.usd_per_1000_rows_unpruned_estimate)}"
            if s.usd_per_1000_rows is not None
            else "no answered rows to share the engine time",
        ),
    ]


def _usd(value: float | None) -> str:
    """A price, or NOT_AVAILABLE where there is none (no answered rows to divide it among)."""
    return NOT_AVAILABLE if value is None else f"${value:.4f}"


def control_verdict(s: Summary) -> str | None:
    """Why the control rows cannot settle the question; None when there are enough of them. More
    control rows are advised only where they could have been run: pruned rows were answered."""
    advice = f"Rerun the job with --control-rows {MIN_CONTROL_ROWS} or more."
    if not s.rows_ok:
        return "No row was answered, so there is nothing to compare."
    if s.keep_ratio_mean is None:
        return (
            "Nothing was pruned (a --no-prune run, or one without glimpse modules), so there is no pruned answer "
            "to compare with an unpruned one."
        )
    if s.control is None:
        return f"No control rows: no row was also run unpruned, so nothing was measured. {advice}"
    if not s.control.enough:
        return (
            f"Too few control rows to conclude: {s.control.rows} rows were run unpruned, under "
            f"{MIN_CONTROL_ROWS}, so the measured saving and the agreement are too uncertain to act on. {advice}"
        )
    return None


def quartile_rows(s: Summary) -> list[list[str]]:
    """One row of the per-quartile table per keep-ratio quartile that holds rows (with fewer than 4
    pruned rows some hold none): does pruning hurt more where it keeps less?"""
    return [
        [
            f"{q.keep_low:.1%} – {q.keep_high:.1%}",
            str(q.rows),
            str(q.scored_rows),
            _score(q.score_mean),
            str(q.control_rows),
            _share_with_interval(q.agreement),
            f"{_score(q.score_pruned)} vs {_score(q.score_unpruned)}" if q.score_pruned is not None else NOT_AVAILABLE,
            _difference(q.score_difference),
        ]
        for q in s.keep_quartiles
        if q.rows
    ]


def _score(value: float | None) -> str:
    return NOT_AVAILABLE if value is None else f"{value:.3f}"


def _share_with_interval(e: Estimate) -> str:
    if e.value is None:
        return NOT_AVAILABLE
    interval = f" (95% CI {e.low:.0%} – {e.high:.0%})" if e.low is not None else ""
    return f"{e.value:.0%}{interval}"


def _difference(e: Estimate) -> str:
    if e.value is None:
        return NOT_AVAILABLE
    interval = f" (95% CI {e.low:+.3f} – {e.high:+.3f})" if e.low is not None else ""
    return f"{e.value:+.3f}{interval}"


def _table_rows(summary: Summary) -> list[tuple[str, str]]:
    """The printed summary's lines, split into name and value."""
    return [tuple(part.strip() for part in line.split("  ", 1)) for line in summary.lines()]


def _figure():
    """A plot whose labels and legend stay inside the picture (constrained layout)."""
    return plt.subplots(figsize=FIGSIZE, layout="constrained")


def _legend_above(figure, columns: int) -> None:
    """The legend above the axes, off the data."""
    figure.legend(loc="outside upper center", ncol=columns, frameon=False)


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight", pad_inches=0.15)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _keep_ratio_histogram(ok: dict) -> str:
    ratios = [k / n for k, n, p in zip(ok["n_visual_kept"], ok["n_visual_tokens"], ok["pruned"]) if n and p]
    figure, ax = _figure()
    ax.hist(ratios, bins=20, range=(0, 1), color=DATA_COLOUR)
    ax.set_xlabel("visual tokens kept / visual tokens")
    ax.set_ylabel("rows")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(figure)


def _kept_against_size(ok: dict) -> str:
    figure, ax = _figure()
    ax.scatter(ok["n_visual_tokens"], ok["n_visual_kept"], s=14, alpha=0.7, color=DATA_COLOUR, label="rows")
    most = max(ok["n_visual_tokens"], default=1)
    ax.plot([0, most], [0, most], color="#999", linestyle="--", label="nothing pruned")
    ax.set_xlabel("visual tokens of the image(s)")
    ax.set_ylabel("visual tokens kept")
    _legend_above(figure, 2)
    return _png(figure)


def _time_and_cost(ok: dict, summary: Summary) -> str:
    """Engine seconds split into prefill and decode by FLOPs, as run and (estimated) unpruned."""
    prefill, decode = sum(ok["prefill_flops"]), sum(ok["decode_flops"])
    run_prefill = summary.engine_s * prefill / (prefill + decode) if prefill + decode else 0.0
    unpruned_prefill, unpruned_decode = sum(ok["prefill_flops_unpruned"]), sum(ok["decode_flops_unpruned"])
    total_unpruned = unpruned_prefill + unpruned_decode
    est_prefill = summary.engine_s_unpruned_estimate * unpruned_prefill / total_unpruned if total_unpruned else 0.0
    labels = ["as run", "unpruned (est.)"]
    prefills = [run_prefill, est_prefill]
    totals = [summary.engine_s, summary.engine_s_unpruned_estimate]
    figure, ax = _figure()
    ax.bar(labels, prefills, color=DATA_COLOUR, label="prefill")
    ax.bar(labels, [t - p for t, p in zip(totals, prefills)], bottom=prefills, color=SECOND_COLOUR, label="decode")
    ax.set_ylabel(f"engine seconds ({summary.device})")
    if summary.usd_per_1000_rows is not None:
        costs = [summary.usd_per_1000_rows, summary.usd_per_1000_rows_unpruned_estimate]
        for x, (total, cost) in enumerate(zip(totals, costs)):
            ax.annotate(
                f"${cost:.4f} / 1000 rows",
                (x, total),
                ha="center",
                va="bottom",
                xytext=(0, 3),
                textcoords="offset points",
            )
        ax.set_ylim(top=max(totals, default=0) * 1.15 or None)
    _legend_above(figure, 2)
    return _png(figure)


def _pruned_against_unpruned(ok: dict, summary: Summary) -> str:
    """Each quantity as run, in percent of its unpruned value; measured engine time on control rows."""
    pairs = {
        "prefill FLOPs": (sum(ok["prefill_flops"]), sum(ok["prefill_flops_unpruned"])),
        "decode FLOPs": (sum(ok["decode_flops"]), sum(ok["decode_flops_unpruned"])),
        "KV cache bytes": (sum(ok["kv_cache_bytes"]), sum(ok["kv_cache_bytes_unpruned"])),
        "engine s (est.)": (summary.engine_s, summary.engine_s_unpruned_estimate),
    }
    if summary.control is not None:
        pairs["engine s (control)"] = (summary.control.engine_s_pruned, summary.control.engine_s_unpruned)
    labels = list(pairs)
    shares = [100 * run / unpruned if unpruned else 0.0 for run, unpruned in pairs.values()]
    figure, ax = _figure()
    ax.barh(labels, [100] * len(labels), color="#ddd", label="unpruned")
    ax.barh(labels, shares, color=DATA_COLOUR, label="pruned")
    for y, share in enumerate(shares):
        ax.annotate(f"{share:.0f}%", (share, y), va="center", xytext=(3, 0), textcoords="offset points")
    ax.invert_yaxis()  # read top to bottom, in the order above
    ax.set_xlabel("% of unpruned")
    ax.set_xlim(0, max(115, *(share + 18 for share in shares)))
    _legend_above(figure, 2)
    return _png(figure)
