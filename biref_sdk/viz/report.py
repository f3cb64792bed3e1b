"""One self-contained HTML page (figures embedded as base64 PNG) with the paper's tables on a data
set: Table 1 (PSNR and SSIM per method and channel), Table 2 (time per volume per method and
engine, measured here), the training loss curve of the model card, comparison figures of a few
samples."""
from __future__ import annotations

import base64
import html
import io
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files import Volume


@dataclass
class Report:
    """What the page shows; :func:`build_report` measures it, :func:`render_html` writes it."""

    dataset: str
    n_samples: int
    summaries: dict[str, dict]
    times_s: dict[str, list[float]]
    engines: dict[str, str]
    figures: list[tuple[str, bytes]] = field(default_factory=list)  # (caption, PNG)
    loss_curve: tuple[str, bytes] | None = None
    host: str = ""


def _png(fig) -> bytes:
    from .slices import pyplot

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    pyplot().close(fig)
    return buffer.getvalue()


def build_report(dataset_path, reconstructors: dict, engines: dict[str, str] | None = None, limit: int | None = 8,
                 n_figures: int = 2, model_card_dir: Path | None = None, progress: bool = False) -> Report:
    """Reconstruct the first ``limit`` samples with each method, score them, draw the first
    ``n_figures`` samples side by side with their truth."""
    from ..evaluation import evaluate
    from .slices import compare_figure

    pending: dict[int, list[tuple[str, Volume]]] = {}

    def keep(index, name, acquisition, volume):
        if index < n_figures:
            pending.setdefault(index, [("truth", acquisition.truth)]).append((name, volume))

    scores: dict = {}
    summaries = evaluate(dataset_path, reconstructors, limit=limit, progress=progress, scores=scores, on_volume=keep)
    figures = [(f"sample {index}: truth and {', '.join(name for name, _ in vols[1:])}",
                _png(compare_figure(vols, title=f"sample {index}"))) for index, vols in sorted(pending.items())]
    loss = None
    if model_card_dir is not None:
        curve = Path(model_card_dir) / "loss_curve.png"
        if curve.is_file():
            loss = (f"training and validation loss of the shipped model ({curve}; {curve.parent / 'MODEL_CARD.md'})",
                    curve.read_bytes())
    n = next(iter(summaries.values()))["n_samples"]
    host = (f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
            f"{time.strftime('%Y-%m-%d %H:%M %Z')}")
    return Report(str(dataset_path), n, summaries, {k: s.seconds for k, s in scores.items()},
                  engines or {k: k for k in reconstructors}, figures, loss, host)


def _number(value, fmt: str) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    if isinstance(value, float) and math.isnan(value):
        return "–"
    return fmt.format(value)


def _table(header: list[str], rows: list[list[str]], caption: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def render_html(report: Report) -> str:
    table1 = _table(
        ["method", "PSNR n_e (dB)", "PSNR n_o (dB)", "SSIM n_e", "SSIM n_o", "RMSE n_e", "RMSE n_o",
         "director error (°)"],
        [[m, *(_number(s[k], f) for k, f in (("psnr_ne", "{:.2f}"), ("psnr_no", "{:.2f}"), ("ssim_ne", "{:.4f}"),
                                              ("ssim_no", "{:.4f}"), ("rmse_ne", "{:.5f}"), ("rmse_no", "{:.5f}"),
                                              ("director_error_deg", "{:.1f}")))]
         for m, s in report.summaries.items()],
        f"Table 1: image quality against the simulated truth, mean over {report.n_samples} samples "
        "(PSNR and SSIM on the paper's 8-bit scale of 1.54–1.57)")
    rows = []
    for method, seconds in report.times_s.items():
        later = seconds[1:] or seconds
        rows.append([method, report.engines.get(method, method), _number(float(np.median(later)), "{:.3f}"),
                     _number(float(np.min(later)), "{:.3f}"), _number(seconds[0], "{:.3f}"), str(len(seconds))])
    table2 = _table(["method", "engine", "median s / volume", "fastest s / volume", "first volume (with set-up) s",
                     "volumes"], rows,
                    f"Table 2: wall time of one reconstruction from an acquisition in memory, measured on {report.host} "
                    "(median and fastest leave out the first volume's one-off set-up)")
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>biref_sdk report: {html.escape(Path(report.dataset).name)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:.3em .6em;"
             "text-align:right}td:first-child,td:nth-child(2){text-align:left}caption{text-align:left;"
             "font-weight:bold;margin-bottom:.4em}img{max-width:100%}figcaption{color:#555}</style></head><body>",
             f"<h1>Reconstruction report: {html.escape(report.dataset)}</h1>",
             f"<p>{report.n_samples} samples; methods: {html.escape(', '.join(report.summaries))}.</p>",
             table1, table2, "<h2>Training</h2>"]
    parts.append(_image(report.loss_curve[1], report.loss_curve[0]) if report.loss_curve
                 else "<p>No model card loss curve found.</p>")
    parts.append("<h2>Samples</h2>")
    parts.extend(_image(png, caption) for caption, png in report.figures)
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: Report, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")
    return path
