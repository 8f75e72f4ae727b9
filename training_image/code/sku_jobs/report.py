"""The evaluation job's HTML report: ``report.html`` + ``plots/*.png`` + ``examples/*.jpg``.

All links are relative, so the folder works opened locally or copied to S3. The page is
self-contained otherwise (inline CSS, no JavaScript, no CDN). Torch-free.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
EXAMPLES_DIR = "examples"
THUMB_SIZE = 128
GOOD, BAD, NEUTRAL = "#1a7f37", "#cf222e", "#6e7781"
CHALLENGER_COLOUR, CHAMPION_COLOUR, NEW_COLOUR = "#0969da", "#8c959f", "#bf8700"
# A delta smaller than this prints grey: 0.00004 is noise, not a change worth a colour.
DELTA_EPSILON = 0.0005
CHANGED_SKUS = 10


@dataclass(frozen=True)
class Example:
    """One test image shown in the report."""

    image_path: Path
    true_sku: str
    predicted_sku: str
    confidence: float | None = None

    @property
    def correct(self) -> bool:
        return self.true_sku == self.predicted_sku


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _pct(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def _delta_html(delta: float | None) -> str:
    if delta is None:
        return '<span class="na">n/a</span>'
    colour = GOOD if delta > DELTA_EPSILON else BAD if delta < -DELTA_EPSILON else NEUTRAL
    return f'<span class="delta" style="color:{colour}">{100 * delta:+.2f} pp</span>'


# --------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")  # no display in a training container
    from matplotlib.figure import Figure

    # Figure without pyplot: no global state, nothing kept alive between plots.
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_accuracy_histogram(doc: Mapping, path: Path) -> Path:
    """Per-SKU top-1 accuracy distribution: challenger (old / new SKUs stacked), champion outline."""
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    chal = doc["challenger"]
    new = set(doc.get("new_sku_ids") or ())
    old_acc = [v["accuracy"] for s, v in chal["per_sku"].items() if s not in new]
    new_acc = [v["accuracy"] for s, v in chal["per_sku"].items() if s in new]
    bins = [i / 20 for i in range(21)]
    fig = _figure(7.5, 3.6)
    ax = fig.subplots()
    groups = [(acc, f"challenger, {kind} SKUs ({len(acc)})", colour)
              for acc, kind, colour in ((old_acc, "old", CHALLENGER_COLOUR), (new_acc, "new", NEW_COLOUR)) if acc]
    if groups:
        ax.hist([g[0] for g in groups], bins=bins, stacked=True, label=[g[1] for g in groups],
                color=[g[2] for g in groups], edgecolor="white", linewidth=0.5)
    champ = doc.get("champion")
    if champ and champ["per_sku"]:
        ax.hist([v["accuracy"] for v in champ["per_sku"].values()], bins=bins, histtype="step", linewidth=2,
                color="#24292f", linestyle="--", label=f"champion ({len(champ['per_sku'])} SKUs)")
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # a count of SKUs
    ax.set_xlabel("per-SKU top-1 accuracy on the test split")
    ax.set_ylabel("number of SKUs")
    ax.set_title("How accuracy is spread over SKUs")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_headline(doc: Mapping, path: Path) -> Path:
    """Grouped bars: challenger vs champion on the headline metrics (same images where compared)."""
    from matplotlib.ticker import PercentFormatter

    chal, champ, comp = doc["challenger"], doc.get("champion"), doc.get("comparison") or {}
    rows = [
        ("top-1\n(all)", chal["top1"], None),
        ("top-1\n(champion's SKUs)", comp.get("challenger_top1_on_known"), champ and champ["top1"]),
        ("top-5\n(champion's SKUs)", comp.get("challenger_top5_on_known"), champ and champ["top5"]),
        ("old-SKU\ntop-1", chal["old_sku_top1"], champ and champ["old_sku_top1"]),
        ("new-SKU\ntop-1", chal["new_sku_top1"], None),
        ("macro\naccuracy", chal["macro_accuracy"], None),
    ]
    if not champ:
        rows = [r for r in rows if "champion" not in r[0]]
    fig = _figure(7.5, 3.2)
    ax = fig.subplots()
    width = 0.38 if champ else 0.6
    labelled: set[str] = set()

    def bar(x: float, value: float, colour: str, label: str) -> None:
        ax.bar(x, value, width, color=colour, label=None if label in labelled else label)
        ax.text(x, value + 0.01, f"{100 * value:.1f}%", ha="center", va="bottom", fontsize=8)
        labelled.add(label)

    for i, (_label, c, p) in enumerate(rows):
        paired = champ is not None and p is not None  # side by side only where both were scored
        if c is not None:
            bar(i - width / 2 if paired else i, c, CHALLENGER_COLOUR, "challenger")
        if paired:
            bar(i + width / 2, p, CHAMPION_COLOUR, "champion")
    ax.set_xticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel("accuracy")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# --------------------------------------------------------------------------- thumbnails


def write_thumbnail(source: Path, target: Path, size: int = THUMB_SIZE) -> bool:
    """A small JPEG of ``source``; False when the image cannot be read (it is then left out)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(source) as img:
            if img.format == "JPEG":
                img.draft("RGB", (size, size))
            img = ImageOps.exif_transpose(img).convert("RGB")  # shown upright, as it was scored
            img.thumbnail((size, size))
            target.parent.mkdir(parents=True, exist_ok=True)
            img.save(target, "JPEG", quality=85)
        return True
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return False


def _figure_html(out_dir: Path, example: Example, name: str) -> str:
    rel = f"{EXAMPLES_DIR}/{name}.jpg"
    if not write_thumbnail(example.image_path, out_dir / rel):
        return ""
    ok = example.correct
    conf = "" if example.confidence is None else f" ({100 * example.confidence:.0f}%)"
    caption = ("&#10003; " if ok else "&#10007; ") + f"{_e(example.predicted_sku)}{conf}"
    return (
        f'<figure class="{"ok" if ok else "bad"}"><img src="{_e(rel)}" alt="{_e(example.true_sku)}" '
        f'loading="lazy"><figcaption title="predicted {_e(example.predicted_sku)}">{caption}</figcaption></figure>'
    )


# --------------------------------------------------------------------------- page

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f6f8fa;color:#24292f}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px} h2{font-size:18px;margin:32px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.sub{color:#57606a;font-size:13px} .sub code{font-size:12px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-top:16px}
.card{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px 16px;min-width:150px}
.card .label{font-size:12px;color:#57606a;text-transform:uppercase;letter-spacing:.03em}
.card .value{font-size:28px;font-weight:600} .card .note{font-size:12px}
table{border-collapse:collapse;background:#fff;border:1px solid #d0d7de;font-size:14px}
th,td{padding:6px 12px;border-bottom:1px solid #eaeef2;text-align:left;vertical-align:middle}
th{background:#f6f8fa;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
.delta{font-weight:600} .na{color:#8c959f}
.bar{display:inline-block;height:8px;background:#eaeef2;width:100px;border-radius:4px;vertical-align:middle}
.bar span{display:block;height:8px;border-radius:4px}
figure{display:inline-block;margin:0 6px 0 0;text-align:center;width:132px;vertical-align:top}
figure img{border:3px solid #d0d7de;border-radius:4px;max-width:128px;max-height:128px}
figure.bad img{border-color:#cf222e} figure.ok img{border-color:#1a7f37}
figcaption{font-size:11px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
figure.bad figcaption{color:#cf222e} figure.ok figcaption{color:#1a7f37}
img.plot{max-width:100%;background:#fff;border:1px solid #d0d7de;border-radius:8px}
footer{margin-top:40px;color:#57606a;font-size:12px}
"""


def _card(label: str, value: float | None, note: str = "") -> str:
    return (f'<div class="card"><div class="label">{_e(label)}</div><div class="value">{_pct(value, 1)}</div>'
            f'<div class="note">{note}</div></div>')


def _acc_bar(acc: float) -> str:
    colour = GOOD if acc >= 0.9 else "#bf8700" if acc >= 0.6 else BAD
    return f'<span class="bar"><span style="width:{100 * acc:.0f}%;background:{colour}"></span></span>'


def _model_line(metrics: Mapping) -> str:
    m = metrics.get("model") or {}
    parts = [str(m[k]) for k in ("arch",) if m.get(k)]
    if m.get("image_size"):
        parts.append(f"{m['image_size']} px")
    parts.append(f"{metrics['num_classes']} classes")
    return ", ".join(parts)


def _comparison_table(doc: Mapping) -> str:
    chal, champ, comp = doc["challenger"], doc.get("champion"), doc.get("comparison")
    if not champ or not comp:
        return ('<p class="sub">No champion: this is the first model, so there is nothing to compare with. '
                f"Challenger: {_e(_model_line(chal))}.</p>")
    known = comp["num_known_images"]
    rows = [
        ("Top-1, old SKUs", chal["old_sku_top1"], champ["old_sku_top1"], comp["old_sku_top1_delta"]),
        (f"Top-1, champion's SKUs ({known} images)", comp["challenger_top1_on_known"], champ["top1"],
         comp["top1_delta_on_known"]),
        (f"Top-{champ['top5_k']}, champion's SKUs", comp["challenger_top5_on_known"], champ["top5"],
         comp["top5_delta_on_known"]),
        ("Macro accuracy, champion's SKUs", comp["challenger_macro_accuracy_on_known"], champ["macro_accuracy"],
         comp["macro_accuracy_delta_on_known"]),
        ("Top-1, new SKUs", chal["new_sku_top1"], champ["new_sku_top1"], None),
        ("Top-1, all test images", chal["top1"], None, None),
    ]
    body = "".join(
        f"<tr><td>{_e(name)}</td><td class='num'>{_pct(c)}</td><td class='num'>{_pct(p)}</td>"
        f"<td class='num'>{_delta_html(d)}</td></tr>"
        for name, c, p, d in rows
    )
    models = (f"<tr><td>Model</td><td>{_e(_model_line(chal))}</td><td>{_e(_model_line(champ))}</td><td></td></tr>"
              f"<tr><td>Images scored</td><td class='num'>{chal['num_images']}</td>"
              f"<td class='num'>{champ['num_images']}</td><td></td></tr>")
    return (f"<table><tr><th>metric</th><th>challenger</th><th>champion</th><th>change</th></tr>{body}{models}"
            "</table><p class='sub'>The champion only knows the old SKUs, so it is scored on their test images "
            "only; the deltas compare both models on those same images.</p>")


def _changed_skus(doc: Mapping, limit: int = CHANGED_SKUS) -> str:
    champ = doc.get("champion")
    if not champ:
        return ""
    chal_per = doc["challenger"]["per_sku"]
    deltas = sorted(
        ((chal_per[s]["accuracy"] - v["accuracy"], s, v["accuracy"], chal_per[s]["accuracy"], v["n"])
         for s, v in champ["per_sku"].items() if s in chal_per),
        key=lambda r: (r[0], r[1]),
    )
    worse = [r for r in deltas if r[0] < -DELTA_EPSILON][:limit]
    if not worse:
        return "<h2>Per-SKU regressions</h2><p class='sub'>No old SKU got worse than under the champion.</p>"
    body = "".join(
        f"<tr><td><code>{_e(s)}</code></td><td class='num'>{n}</td><td class='num'>{_pct(p, 1)}</td>"
        f"<td class='num'>{_pct(c, 1)}</td><td class='num'>{_delta_html(d)}</td></tr>"
        for d, s, p, c, n in worse
    )
    return ("<h2>Per-SKU regressions</h2><p class='sub'>Old SKUs whose accuracy dropped the most against the "
            f"champion (up to {limit}).</p><table><tr><th>SKU</th><th>test images</th><th>champion</th>"
            f"<th>challenger</th><th>change</th></tr>{body}</table>")


def write_report(
    out_dir: Path,
    doc: Mapping,
    *,
    worst_examples: Mapping[str, Sequence[Example]] | None = None,
    pair_examples: Mapping[tuple[str, str], Example] | None = None,
    skipped_paths: Sequence[str] = (),
    title: str = "SKU model evaluation",
) -> Path:
    """Write ``report.html`` (and its plots and thumbnails) into ``out_dir``; return its path.

    ``doc`` is the evaluation document (ideally the rounded one written to evaluation.json, so
    page and file show the same numbers).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    worst_examples = worst_examples or {}
    pair_examples = pair_examples or {}
    chal, champ, comp = doc["challenger"], doc.get("champion"), doc.get("comparison") or {}
    hist = plot_accuracy_histogram(doc, out_dir / PLOTS_DIR / "per_sku_accuracy.png")
    bars = plot_headline(doc, out_dir / PLOTS_DIR / "headline.png")

    new_ids = doc.get("new_sku_ids") or []
    skipped = chal.get("num_skipped", 0)
    cards = [
        _card("Top-1", chal["top1"], f"{chal['num_images']} images"),
        _card(f"Top-{chal['top5_k']}", chal["top5"]),
        _card("New-SKU top-1", chal["new_sku_top1"], f"{len(new_ids)} new SKUs"),
        _card("Old-SKU top-1", chal["old_sku_top1"],
              _delta_html(comp.get("old_sku_top1_delta")) + " vs champion" if champ else "no champion"),
        _card("Macro accuracy", chal["macro_accuracy"], f"mean over {len(chal['per_sku'])} SKUs"),
    ]

    worst_rows = []
    for rank, item in enumerate(chal["worst_skus"]):
        sku = item["sku_id"]
        figs = "".join(
            _figure_html(out_dir, ex, f"worst-{rank:03d}-{j}") for j, ex in enumerate(worst_examples.get(sku, ()))
        )
        worst_rows.append(
            f"<tr><td class='num'>{rank + 1}</td><td><code>{_e(sku)}</code>"
            f"{' <span class=sub>(new)</span>' if sku in new_ids else ''}</td>"
            f"<td class='num'>{_pct(item['accuracy'], 1)} {_acc_bar(item['accuracy'])}</td>"
            f"<td class='num'>{item['n']}</td><td>{figs}</td></tr>"
        )
    pair_rows = []
    for rank, pair in enumerate(chal["confused_pairs"]):
        ex = pair_examples.get((pair["true"], pair["predicted"]))
        fig = _figure_html(out_dir, ex, f"pair-{rank:03d}") if ex else ""
        pair_rows.append(
            f"<tr><td><code>{_e(pair['true'])}</code></td><td><code>{_e(pair['predicted'])}</code></td>"
            f"<td class='num'>{pair['count']}</td><td>{fig}</td></tr>"
        )

    skipped_html = ""
    if skipped_paths:
        items = "".join(f"<li><code>{_e(p)}</code></li>" for p in list(skipped_paths)[:50])
        more = f"<li>... and {len(skipped_paths) - 50} more</li>" if len(skipped_paths) > 50 else ""
        skipped_html = f"<h2>Unreadable test images ({len(skipped_paths)})</h2><ul class='sub'>{items}{more}</ul>"

    def rel(p: Path) -> str:
        return _e(Path(os.path.relpath(p, out_dir)).as_posix())

    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{_e(title)}</title><style>{CSS}</style></head>
<body><main>
<h1>{_e(title)}</h1>
<div class="sub">Snapshot <code>{_e(doc.get('snapshot_id') or 'n/a')}</code> &middot;
{doc['num_test_images']} test images ({skipped} unreadable, skipped) &middot; {doc['num_classes']} SKUs,
{len(new_ids)} new &middot; test manifest <code>{_e(str(doc['test_manifest_sha256'])[:12])}</code></div>
<div class="cards">{''.join(cards)}</div>
<h2>Challenger vs champion</h2>
{_comparison_table(doc)}
<p><img class="plot" src="{rel(bars)}" alt="headline metrics, challenger vs champion"></p>
<h2>Per-SKU accuracy</h2>
<p><img class="plot" src="{rel(hist)}" alt="histogram of per-SKU accuracy"></p>
{_changed_skus(doc)}
<h2>Worst SKUs</h2>
<p class="sub">Lowest challenger accuracy first. Examples: misclassified test images first, captioned with the
predicted SKU (and its softmax probability).</p>
<table><tr><th>#</th><th>SKU</th><th>accuracy</th><th>test images</th><th>examples</th></tr>
{''.join(worst_rows) or '<tr><td colspan=5>none</td></tr>'}</table>
<h2>Most confused pairs</h2>
<table><tr><th>true SKU</th><th>predicted as</th><th>images</th><th>example</th></tr>
{''.join(pair_rows) or '<tr><td colspan=4>No misclassified test image.</td></tr>'}</table>
{skipped_html}
<footer>{_e(doc.get('format', ''))} &middot; all numbers are also in <a href="evaluation.json">evaluation.json</a></footer>
</main></body></html>
"""
    path = out_dir / REPORT_FILE
    path.write_text(page, encoding="utf-8")
    return path
