"""The report as CSV (the configuration table) and as a server-rendered HTML page."""

import csv
import io
import json
from html import escape
from typing import Any

AGGREGATES = (
    "best_val_accuracy",
    "final_val_accuracy",
    "final_val_loss",
    "generalization_gap_final",
    "generalization_gap_at_best",
    "epochs_to_target",
    "step_loss_roughness",
    "seconds_per_epoch",
)
COUNTS = ("jobs", "succeeded", "diverged", "pending", "packed")
EFFECT_METRICS = ("epochs_to_target", "best_val_accuracy", "generalization_gap")


def _axes(report: dict[str, Any]) -> list[str]:
    return [axis for axis in report["axes"] if axis != "seed"]


def csv_table(report: dict[str, Any]) -> str:
    """One row per configuration: its axis values, counts, and mean, std, n of each figure."""
    out = io.StringIO()
    writer = csv.writer(out)
    axes = _axes(report)
    writer.writerow(
        [
            *axes,
            *COUNTS,
            *(f"{name}_{part}" for name in AGGREGATES for part in ("mean", "std", "n")),
        ]
    )
    for row in report["configurations"]:
        writer.writerow(
            [
                *(_axis_value(row["configuration"][axis]) for axis in axes),
                *(row[name] for name in COUNTS),
                *(_cell(row[name][part]) for name in AGGREGATES for part in ("mean", "std", "n")),
            ]
        )
    return out.getvalue()


# A spreadsheet runs a cell that starts with one of these as a formula: a grid's text value
# such as =HYPERLINK(...) would, on opening the CSV (OWASP's CSV injection). Such text gets a
# leading apostrophe, which spreadsheets show as text; numbers (a -0.5) are left alone.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return str(value)


def _axis_value(value: Any) -> str:
    """A grid value as the spec spells it: null, true and false as in JSON, where an empty
    cell (a null's) read as a missing value and True as Python's."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return _cell(value)


def _number(value: Any) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.4g}"
    return escape(str(value))


def _mean_sd(aggregate: dict[str, Any]) -> str:
    if aggregate["mean"] is None:
        return "&ndash;"
    sd = f" ± {aggregate['std']:.3g}" if aggregate["std"] is not None else ""
    return f"{aggregate['mean']:.4g}{sd} <small>(n={aggregate['n']})</small>"


def html_page(report: dict[str, Any], plots: dict[str, str]) -> str:
    """The report as one page: escaped throughout, the plots as images."""
    title = escape(report.get("name") or f"study {report['study_id']}")
    axes = _axes(report)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{title}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th{background:#f4f4f4}</style></head><body>",
        f"<h1>{title}</h1>",
        f"<p>Jobs by status: {escape(json.dumps(report['counts']))}</p>",
    ]
    if report.get("note"):
        parts.append(f"<p><strong>{escape(report['note'])}</strong></p>")
    if report.get("seconds_note"):
        parts.append(f"<p>{escape(report['seconds_note'])}</p>")
    target = report["target"]["val_accuracy"]
    parts.append(
        f"<p>Target validation accuracy: {_number(target)} "
        f"({escape(report['target']['source'])})</p>"
    )
    parts.append("<h2>Configurations</h2><table><tr>")
    headers = [*axes, *COUNTS, *AGGREGATES]
    parts.extend(f"<th>{escape(header)}</th>" for header in headers)
    parts.append("</tr>")
    for row in report["configurations"]:
        cells = [escape(_axis_value(row["configuration"][axis])) for axis in axes]
        cells += [_number(row[name]) for name in COUNTS]
        cells += [_mean_sd(row[name]) for name in AGGREGATES]
        parts.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    parts.append("</table>")
    if report["effects"]:
        parts.append("<h2>Effects (paired, bootstrap 95% intervals)</h2><ul>")
        for effect in report["effects"]:
            for metric in EFFECT_METRICS:
                parts.append(f"<li>{escape(effect[metric]['reading'])}</li>")
        parts.append("</ul>")
    stable = report.get("max_stable_lr")
    if stable:
        parts.append("<h2>Largest stable learning rate</h2><ul>")
        for row in stable["configurations"]:
            parts.append(
                f"<li>{escape(json.dumps(row['configuration']))}: "
                f"{_number(row['max_stable_lr'])}</li>"
            )
        parts.append("</ul>")
    if plots:
        parts.append("<h2>Plots</h2>")
        for name, url in plots.items():
            parts.append(f"<p><img src='{escape(url)}' alt='{escape(name)}'></p>")
    parts.append("</body></html>")
    return "".join(parts)
