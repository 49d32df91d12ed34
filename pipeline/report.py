"""A job's report: one self-contained HTML file (plots inlined as PNG) built from its Parquet rows."""

from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")  # no display where jobs run
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from pipeline.summary import Summary  # noqa: E402


def render(table: pa.Table, summary: Summary) -> str:
    """The report page: the summary table, then one figure per question a reader asks.
    `table`: result rows, at least schemas.SUMMARY_COLUMNS."""
    ok = table.filter(pc.is_null(table.column("error"))).to_pydict()
    figures = [
        ("How much of each image is kept", _keep_ratio_histogram(ok)),
        ("Kept tokens against image size", _kept_against_size(ok)),
        ("Where the engine time and money go", _time_and_cost(ok, summary)),
        ("Pruned against unpruned", _pruned_against_unpruned(ok, summary)),
    ]
    rows = "\n".join(
        f"<tr><th>{html.escape(name)}</th><td>{html.escape(value)}</td></tr>" for name, value in _table_rows(summary)
    )
    plots = "\n".join(
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{png}"><figcaption>'
        f"{html.escape(title)}</figcaption></figure>"
        for title, png in figures
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>glimpse-batch report: {html.escape(summary.output)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
th, td {{ text-align: left; padding: 0.3em 1em; border-bottom: 1px solid #ddd; vertical-align: top; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; }}
img {{ width: 560px; }}
</style></head>
<body>
<h1>glimpse-batch report</h1>
<table>
{rows}
</table>
{plots}
</body></html>
"""


def _table_rows(summary: Summary) -> list[tuple[str, str]]:
    """The printed summary's lines, split into name and value."""
    return [tuple(part.strip() for part in line.split("  ", 1)) for line in summary.lines()]


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _keep_ratio_histogram(ok: dict) -> str:
    ratios = [k / n for k, n in zip(ok["n_visual_kept"], ok["n_visual_tokens"]) if n]
    figure, ax = plt.subplots(figsize=(5.6, 3.6))
    ax.hist(ratios, bins=20, range=(0, 1), color="#3b7dd8")
    ax.set_xlabel("visual tokens kept / visual tokens")
    ax.set_ylabel("rows")
    return _png(figure)


def _kept_against_size(ok: dict) -> str:
    figure, ax = plt.subplots(figsize=(5.6, 3.6))
    ax.scatter(ok["n_visual_tokens"], ok["n_visual_kept"], s=12, alpha=0.6, color="#3b7dd8", label="rows")
    most = max(ok["n_visual_tokens"], default=1)
    ax.plot([0, most], [0, most], color="#999", linestyle="--", label="nothing pruned")
    ax.set_xlabel("visual tokens of the image(s)")
    ax.set_ylabel("visual tokens kept")
    ax.legend()
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
    decodes = [summary.engine_s - run_prefill, summary.engine_s_unpruned_estimate - est_prefill]
    figure, ax = plt.subplots(figsize=(5.6, 3.6))
    ax.bar(labels, prefills, color="#3b7dd8", label="prefill")
    ax.bar(labels, decodes, bottom=prefills, color="#f0a030", label="decode")
    ax.set_ylabel("engine seconds")
    if summary.usd_per_1000_images is not None:
        costs = [summary.usd_per_1000_images, summary.usd_per_1000_images_unpruned_estimate]
        for x, (total, cost) in enumerate(zip([summary.engine_s, summary.engine_s_unpruned_estimate], costs)):
            ax.annotate(f"${cost:.4f} / 1000 images", (x, total), ha="center", va="bottom")
    ax.legend()
    return _png(figure)


def _pruned_against_unpruned(ok: dict, summary: Summary) -> str:
    """Each quantity as run, in percent of its unpruned value; measured engine time on control rows."""
    pairs = {
        "prefill FLOPs": (sum(ok["prefill_flops"]), sum(ok["prefill_flops_unpruned"])),
        "decode FLOPs": (sum(ok["decode_flops"]), sum(ok["decode_flops_unpruned"])),
        "KV cache bytes": (sum(ok["kv_cache_bytes"]), sum(ok["kv_cache_bytes_unpruned"])),
        "engine s (est.)": (summary.engine_s, summary.engine_s_unpruned_estimate),
    }
    if summary.control_rows:
        pairs["engine s (control)"] = (summary.control_engine_s_pruned, summary.control_engine_s_unpruned)
    labels = list(pairs)
    shares = [100 * run / unpruned if unpruned else 0.0 for run, unpruned in pairs.values()]
    figure, ax = plt.subplots(figsize=(5.6, 3.6))
    ax.barh(labels, [100] * len(labels), color="#ddd", label="unpruned")
    ax.barh(labels, shares, color="#3b7dd8", label="pruned")
    for y, share in enumerate(shares):
        ax.annotate(f"{share:.0f}%", (share, y), va="center", xytext=(3, 0), textcoords="offset points")
    ax.set_xlabel("% of unpruned")
    ax.set_xlim(0, max(110, *(share + 15 for share in shares)))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    return _png(figure)
