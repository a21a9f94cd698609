"""A batch's overview page: every concept of the run on one self-contained HTML page, as `report-batch` writes
it (shown in the KFP dashboard beside the run; `oneword batch` prints its path).

A person reviews a night's batch here: which concepts registered, under which alias and why, their scores, and
each one's sample grid (read back from the run that registered it, so the page shows what the registry holds).
Without it, that review was one MLflow page per concept.

The KFP dashboard shows an HTML artifact in a sandboxed frame that opens no other window and resolves `#name`
links against the dashboard's own address: the page links nothing outside itself, and moves within itself by
script.
"""

from __future__ import annotations

import html
import logging
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# pictures embedded: a batch of hundreds of concepts would make a page too heavy for the KFP viewer (tens of MB);
# past these, the table still lists every concept, and its registry holds the rest
MAX_PICTURES = 100
PICTURE_WIDTH = 640  # px, shrunk as JPEG where wider: about 50 KB a concept
GRID_ARTIFACT = "evaluation/grid.png"
MAX_FAILED_PICTURES = 3  # a store that fails these in a row fails the rest too: the exit handler stops asking


def overview_page(report: dict, out: Path, tracking_uri: str | None = None, state: str = "") -> Path:
    """Write the overview of a batch's `batch_report` (or `final_report`) dict to `out`.

    Args:
        report: the batch's report.
        out: the HTML file to write.
        tracking_uri: the registry the report came from (its sample grids are read from the registering runs).
        state: the run's final state, as the exit handler got it.

    Returns:
        `out`. A picture that cannot be read is said in its place: the page is written whatever the registry
        answers.
    """
    from oneword import tracking
    from oneword.evaluation.report import PAGE_STYLE

    rows = report.get("concepts", [])
    counts = ", ".join(f"{report.get(k, 0)} {k}" for k in ("registered", "unchanged", "failed", "deferred"))
    batch = html.escape(str(report.get("batch_id", "")))
    head = [
        f'<!doctype html><html><head><meta charset="utf-8"><title>oneword batch {batch}</title>',
        # a concept's name and token are read whole (a narrow column broke them at their hyphens)
        f"<style>{PAGE_STYLE}td.n{{text-align:right}}.failed{{color:#b00}}.note{{color:#666}}"
        "td:nth-child(-n+2){white-space:nowrap}</style></head><body>",
        f"<h1>batch {batch}</h1>",
        f"<p>{counts}{_ended(state, report)}.</p>",
    ]
    uri = tracking.resolve(tracking_uri)
    head.append(f'<p class="note">registry: <code>{html.escape(tracking.shown(uri))}</code></p>')
    if report.get("error"):
        head.append(f'<p class="failed">{html.escape(report["error"])}</p>')
    if made := report.get("bundle"):
        from oneword.batch import bundle_said

        head.append(f'<p class="{"failed" if made.get("error") else "note"}">{html.escape(bundle_said(made))}</p>')
    with tracking.briefly():  # a store that does not answer costs seconds a picture, not MLflow's minutes
        body = [_table(rows), *_pictures(rows, uri), *_left(report)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([*head, *body, "</body></html>"]), encoding="utf-8")
    return out


SUCCEEDED = ("COMPLETE", "SUCCEEDED")


def _ended(state: str | None, report: dict) -> str:
    """How the run ended, said after the counts: a failed concept is recorded and the others go on, so a run with
    failed concepts succeeds."""
    if not state:
        return ""
    # a cluster says COMPLETE (ML Metadata's word, KFP's driver resolve.go), kfp.local SUCCEEDED
    why = " (its failed concepts were recorded, and the others went on)" if state in SUCCEEDED and report.get(
        "failed") else ""
    return f"; the run ended {html.escape(state)}{why}"


def _table(rows: list[dict]) -> str:
    from oneword.batch import alias_reason

    header = "".join(
        f"<th>{h}</th>"
        for h in ("concept", "token", "status", "version", "alias", "reconstruction", "editability", "why")
    )
    lines = []
    for c in rows:
        name = html.escape(str(c.get("name")))
        if c.get("version") and c["status"] in ("registered", "unchanged"):
            jump = f"document.getElementById('{_anchor(c)}').scrollIntoView();return false"
            name = f'<a href="#" onclick="{jump}">{name}</a>'
            why = alias_reason(c)
        else:
            why = ": ".join(str(x) for x in (c.get("stage"), c.get("error")) if x)
            why += f" (fix: {c['hint']})" if c.get("hint") else ""  # as the terminal's table says it
        version = html.escape(str(c.get("version") or ""))
        status = html.escape(c["status"])
        status = f'<span class="failed">{status}</span>' if c["status"] == "failed" else status
        lines.append(
            f"<tr><td>{name}</td><td><code>{html.escape(str(c.get('token') or ''))}</code></td><td>{status}</td>"
            f"<td class=n>{version}</td><td>{html.escape(c.get('alias') or '')}</td>"
            f"<td class=n>{_score(c.get('reconstruction'))}</td><td class=n>{_score(c.get('editability'))}</td>"
            f"<td>{html.escape(why or '')}</td></tr>"
        )
    return f"<table><tr>{header}</tr>{''.join(lines)}</table>" if rows else "<p>The batch planned no concept.</p>"


def _pictures(rows: list[dict], tracking_uri: str | None) -> list[str]:
    """Each version's sample grid, from the run that registered it."""
    from oneword.evaluation.report import img_tag

    shown = [c for c in rows if c.get("run_id") and c["status"] in ("registered", "unchanged")]
    if not shown:
        return []
    out = ["<h2>Samples (first row: the photos; then a row per prompt, a column per seed)</h2>"]
    failed = 0
    with tempfile.TemporaryDirectory(prefix="oneword-overview-") as d:
        for i, c in enumerate(shown[:MAX_PICTURES]):
            title = html.escape(f"{c['name']}/{c['version']}" + (f" @{c['alias']}" if c.get("alias") else ""))
            out.append(f'<h3 id="{_anchor(c)}">{title} <code>{html.escape(str(c.get("token") or ""))}</code></h3>')
            if failed >= MAX_FAILED_PICTURES:
                out.append(f'<p class="note">not read: the {failed} before it could not be</p>')
                continue
            try:
                grid = _download(c["run_id"], GRID_ARTIFACT, tracking_uri, Path(d) / str(i))
                out.append(img_tag(grid, f"samples of {c['name']}", PICTURE_WIDTH, quality=85))
                failed = 0
            except Exception as e:  # a page without one picture beats no page: the exit handler writes it
                failed += 1
                log.warning("no sample grid for %s/%s: %s", c["name"], c["version"], e)
                out.append(f'<p class="note">its sample grid could not be read: {html.escape(str(e)[:300])}</p>')
    if len(shown) > MAX_PICTURES:
        more = len(shown) - MAX_PICTURES
        out.append(f'<p class="note">{more} more concept{"s" * (more != 1)} registered: see their grids in the '
                   "registry's runs (<code>evaluation/grid.png</code>).</p>")  # fmt: skip
    return out


def _left(report: dict) -> list[str]:
    left = report.get("left") or []
    if not left:
        return []
    items = "".join(
        f"<li>{html.escape(c['name'])}: "
        + html.escape(", ".join(f"@{a} v{v}" for a, v in sorted((c.get("aliases") or {}).items())))
        + "</li>"
        for c in left
    )
    return ["<h2>Left the manifest since its last run, still holding an alias</h2>", f"<ul>{items}</ul>"]


def _download(run_id: str, artifact: str, tracking_uri: str | None, into: Path) -> Path:
    import os
    from unittest.mock import patch

    import mlflow

    from oneword import tracking

    into.mkdir(parents=True)
    uri = tracking.ensure_store(tracking_uri)
    bar = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # a bar a picture, in the step's log
    with patch.dict(os.environ, {} if bar in os.environ else {bar: "false"}):
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(into),
                                                        tracking_uri=uri))  # fmt: skip


def _anchor(c: dict) -> str:
    return html.escape(f"v-{c['name']}-{c['version']}")


def _score(value) -> str:
    return "" if value is None else f"{float(value):.3f}"
