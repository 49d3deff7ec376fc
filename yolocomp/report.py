"""Tables on screen, markdown and JSON reports, and the AP-vs-cost plot."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """Plain-text table with aligned columns (keys of the first row unless ``columns`` is given)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join([line, sep, *body])


def print_table(rows: Sequence[dict], title: str, columns: Sequence[str] | None = None) -> None:
    print(f"\n{title}\n{format_table(rows, columns)}\n", flush=True)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "_no rows_\n"
    columns = list(columns or rows[0].keys())
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body]) + "\n"


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    tmp.replace(path)
    return path


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def write_report(out_dir: str | Path, report: dict, title: str, rows: Sequence[dict] | None = None) -> tuple[Path, Path]:
    """Write ``report.json`` (everything) and ``report.md`` (title, table of ``rows``, settings)."""
    out_dir = Path(out_dir)
    json_path = write_json(out_dir / "report.json", report)
    md = [f"# {title}\n"]
    if rows:
        md.append(markdown_table(rows))
    settings = report.get("settings")
    if settings:
        md.append("\n## Settings\n\n```json\n" + json.dumps(settings, indent=2, default=_json_default) + "\n```\n")
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(md))
    return json_path, md_path


#: The two panels of the AP-vs-cost plot: row key -> axis label.
PARETO_PANELS = {"latency_ms": "latency p50 (ms, batch 1)", "size_mb": "file size (MB)"}


def pareto_points(rows: Sequence[dict]) -> dict[str, list[tuple[str, float, float]]]:
    """Per panel, the (stage label, cost, AP %) points the plot draws; rows without AP or that cost are left out."""
    return {key: [(str(r.get("stage")), float(r[key]), 100 * float(r["ap"])) for r in rows
                  if r.get(key) is not None and r.get("ap") is not None] for key in PARETO_PANELS}


def pareto_plot(rows: Sequence[dict], path: str | Path, title: str = "AP vs cost") -> Path:
    """Two panels, AP vs latency and AP vs file size; each stage model has its own marker and colour, named once in
    a shared legend (labels next to nearby points would overlap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = pareto_points(rows)
    stages = list(dict.fromkeys(label for panel in points.values() for label, _, _ in panel))
    markers = "osD^vP*Xhp<>"
    colours = plt.get_cmap("tab10")
    style = {s: {"marker": markers[i % len(markers)], "color": colours(i % 10)} for i, s in enumerate(stages)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, label) in zip(axes, PARETO_PANELS.items()):
        for stage, x, y in points[key]:
            ax.scatter([x], [y], s=60, label=stage, **style[stage])
        ax.set_xlabel(label)
        ax.set_ylabel("AP50-95 (%)")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], linestyle="", markersize=8, **style[s]) for s in stages]
    fig.legend(handles, stages, loc="lower center", ncol=min(4, max(1, len(stages))), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(stages) - 1) // 4), 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def path_plot(points: Sequence[tuple[str, float, float]], path: str | Path, xlabel: str, title: str) -> Path:
    """The (label, x, AP %) points in order, joined by a line and labelled: how AP moves along a compression run
    (e.g. GFLOPs of every progressive step, then reconstruction and recovery at the final size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    ax.plot(xs, ys, "-o", color="tab:blue")
    for k, (label, x, y) in enumerate(points):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6 if k % 2 == 0 else -12), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("AP50-95 (%)")
    ax.invert_xaxis()  # compression goes left to right
    ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
