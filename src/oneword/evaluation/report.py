"""Pictures of an evaluation: the distortion-editability scatter (the paper's Fig. 10) and an HTML report.

The HTML embeds its pictures (base64), so the one file shows in the KFP UI and as an MLflow artifact.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def scatter(series: Sequence[dict], out: Path, title: str = "distortion vs editability") -> Path:
    """Plot concepts' checkpoint curves and baselines on one distortion-editability chart.

    Args:
        series: one dict per run: `label`, `curve` ([{step, reconstruction, editability}]), optional
            `chosen` (step), `final` ({reconstruction, editability}) and `baselines`
            ({image_only, prompt_only}).
        out: PNG path.

    Returns:
        `out`.
    """
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    for i, s in enumerate(series):
        colour = f"C{i % 10}"
        curve = sorted(s.get("curve") or [], key=lambda p: p["step"])
        if curve:
            xs, ys = [p["editability"] for p in curve], [p["reconstruction"] for p in curve]
            ax.plot(xs, ys, "-o", color=colour, ms=3, label=s["label"])
            for k in (0, -1):  # beside the point, where the chosen step's star does not cover it
                ax.annotate(str(curve[k]["step"]), (xs[k], ys[k]), fontsize=6, color=colour, xytext=(7, -10),
                            textcoords="offset points")  # fmt: skip
            chosen = [p for p in curve if p["step"] == s.get("chosen")]
            if chosen:
                ax.plot(
                    chosen[0]["editability"],
                    chosen[0]["reconstruction"],
                    "*",
                    color=colour,
                    ms=13,
                    markeredgecolor="black",
                )
        final = s.get("final")
        if final:
            ax.plot(
                final["editability"],
                final["reconstruction"],
                "D",
                color=colour,
                ms=6,
                markeredgecolor="black",
                label=None if curve else s["label"],
            )
        base = s.get("baselines") or {}
        points = base.get("points") or {}
        for key, marker in (("image_only", "s"), ("prompt_only", "^")):
            if key in points:  # the paper's reference points, both coordinates
                xy = (points[key]["editability"], points[key]["reconstruction"])
                ax.plot(*xy, marker, color=colour, ms=7, mfc="none")
                label = key.replace("_", "-")
                ax.annotate(label, xy, fontsize=6, color=colour, xytext=(4, 4), textcoords="offset points")
        if not points and base.get("image_only") is not None:  # recorded before the points: one coordinate each
            ax.axhline(base["image_only"], color=colour, ls=":", lw=1)
        if not points and base.get("prompt_only") is not None:
            ax.axvline(base["prompt_only"], color=colour, ls="--", lw=1)
    ax.set_xlabel("editability: text similarity (CLIP)")
    ax.set_ylabel("reconstruction: image similarity (CLIP)")
    ax.set_title(
        f"{title}\nline: checkpoints scored on a few images, to choose one; star: the one chosen\n"
        "diamond: its score on the full evaluation (other seeds); square, triangle: image-only, prompt-only",
        fontsize=7,
    )
    ax.margins(x=0.15, y=0.1)  # room inside the axes for the labels of the outermost points
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


PAGE_WIDTH = 1100  # px, the page's max-width
EMBED_WIDTH = 2 * PAGE_WIDTH  # sharp on a high-density screen; wider pictures are embedded shrunk, as JPEG
PAGE_STYLE = (
    f"body{{font-family:sans-serif;max-width:{PAGE_WIDTH}px;margin:auto}}td,th{{padding:2px 8px;text-align:left}}"
    "table{border-collapse:collapse}tr:nth-child(even){background:#f3f3f3}pre{white-space:pre-wrap;overflow-wrap:anywhere}"
)


def img_tag(path: Path, alt: str, width: int = EMBED_WIDTH, quality: int = 90) -> str:
    """An `<img>` of the picture at `path`, embedded (the page is one file), shrunk to `width` px as JPEG where
    wider."""
    from PIL import Image

    with Image.open(path) as im:
        if im.width <= width:
            data, kind = path.read_bytes(), "png"
        else:  # a grid of large samples: tens of MB as base64 PNG, too heavy for the KFP and MLflow viewers
            f = width / im.width
            small = im.convert("RGB").resize((width, round(im.height * f)), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            small.save(buf, "JPEG", quality=quality)
            data, kind = buf.getvalue(), "jpeg"
        # small pictures (the toy world's 32 px samples) are shown twice their size, pixelated to stay crisp;
        # larger ones at most page-wide, smoothly (pixelated, shrunk photos look jagged)
        enlarge = im.width * 2 <= PAGE_WIDTH
        # at most as wide as the window (the KFP dashboard's panel is narrower than a page)
        style = f"width:{im.width * 2}px;max-width:100%;image-rendering:pixelated" if enlarge else "max-width:100%"
    encoded = base64.b64encode(data).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/{kind};base64,{encoded}" style="{style}">'


def _score(value: float | None, se: float | None = None) -> str:
    """A score for the page, with its standard error where one was measured."""
    if value is None:
        return "-"
    return f"{value:.4f}" if se is None or se != se else f"{value:.4f} ± {se:.4f}"


def _reference_note(reference: dict | None) -> str:
    """A warning when reconstruction was measured against other images than the training's."""
    if not reference or reference.get("training_images", True):
        return ""
    return (
        f"<p><strong>Measured against {reference['n']} images that are not the ones the concept was trained on"
        f"</strong> (<code>{html.escape(reference['folder'])}</code>): these scores compare only with evaluations "
        "against the same images.</p>"
    )


def html_report(metrics: dict, grid: Path, scatter_png: Path, out: Path) -> Path:
    """Write a self-contained HTML page: headline scores, per-prompt scores, sample grid, scatter, settings."""
    ev = metrics.get("evaluator", {})
    rows = "".join(
        f"<tr><td>{html.escape(p['prompt'])}</td><td>{html.escape(p['text_target'])}</td>"
        f"<td>{p['editability']:.4f}</td><td>{p.get('prompt_only', float('nan')):.4f}</td></tr>"
        for p in metrics.get("per_prompt", [])
    )
    base = metrics.get("baselines", {})
    headline = [
        ("reconstruction (image similarity)", metrics.get("reconstruction"), metrics.get("reconstruction_se")),
        ("editability (text similarity)", metrics.get("editability"), metrics.get("editability_se")),
        ("DINO subject fidelity" + ("" if metrics.get("dino") is not None else " (not measured: --dino-model)"),
         metrics.get("dino")),
        ("reference: the training images (reconstruction, self-pairs left out)", base.get("image_only")),
        ("reference: the prompts alone (editability)", base.get("prompt_only")),
    ]
    db = metrics.get("dreambench")
    if db:
        headline += [
            ("DreamBench DINO (all prompts' images)", db.get("dino")),
            ("DreamBench CLIP-I (all prompts' images)", db.get("clip_i")),
            ("DreamBench CLIP-T (class noun kept)", db.get("clip_t")),
        ]
    head_rows = "".join(f"<tr><td>{row[0]}</td><td>{_score(*row[1:])}</td></tr>" for row in headline)
    token = html.escape(metrics.get("token", ""))
    sel = html.escape(metrics.get("selection", {}).get("criterion", "final step"))
    sampler = metrics.get("sampler", {})
    name, fp = html.escape(str(ev.get("name"))), html.escape(str(ev.get("fingerprint", ""))[:19])
    evaluator = f"<code>{name}</code> <code>{fp}…</code>"
    header = "<tr><th>prompt</th><th>text target</th><th>editability</th><th>prompt only</th></tr>"
    doc = "\n".join(
        [
            f'<!doctype html><html><head><meta charset="utf-8"><title>oneword evaluation: {token}</title>',
            f"<style>{PAGE_STYLE}</style></head><body>",
            f"<h1>{token}</h1>",
            f"<p>step {metrics.get('step')} ({sel}); evaluator {evaluator};",
            f"{metrics.get('n_images')} images per prompt,",
            f"{sampler.get('steps')} DDIM steps, guidance {sampler.get('guidance_scale')}.</p>",
            f"<table>{head_rows}</table>",
            _reference_note(metrics.get("reference_images")),
            f"<p>DreamBench numbers are comparable to {html.escape(db['comparable_to'])}.</p>" if db else "",
            f"<h2>Samples (first row: the photos; then a row per prompt, a column per seed)</h2>"
            f"{img_tag(grid, 'sample grid')}",
            f"<h2>Distortion vs editability</h2>{img_tag(scatter_png, 'scatter')}",
            f"<h2>Per prompt</h2><table>{header}{rows}</table>",
            f"<h2>All metrics</h2><pre>{html.escape(json.dumps(metrics, indent=2))}</pre>",
            "</body></html>",
        ]
    )
    out.write_text(doc, encoding="utf-8")
    return out
