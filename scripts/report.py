"""Write a self-contained offline HTML report of one or several training runs, for clusters without W&B access.

Usage (from the repo root):

    python scripts/report.py runs/mnist_dcgan                       # -> runs/mnist_dcgan/report.html
    python scripts/report.py runs/a runs/b --out /tmp/compare.html  # several runs overlaid in every plot

It reads what a run directory holds: `metrics.jsonl` (required), `config.yaml`, `samples/samples_<kind>_<step>.png`,
`final/metrics.json` and `best/metrics.json`. The page has a summary table (one column per run), one plot per metric
against kimg with every run overlaid (a dashed floor line where `eval/<name>_real` is logged; evaluation metrics in
the order, and under the labels, of `gan_dist/metric_names.py`), the sample-grid progression of each run, and each
run's config. Everything is in the one file: plots are inline SVG drawn here, images are base64 data URIs, there is
no script and no external URL, so it opens anywhere, offline, and can be mailed or copied off a cluster. Any metric
may be missing; unknown metrics are plotted too.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import html
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gan_dist.metric_names import BY_KEY, METRICS
from gan_dist.rundir import config_text, metrics_file, read_metrics, sample_grids

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]
MAX_GRIDS = 12  # sample grids shown per run, evenly spaced over the run
THUMB_PX = 180  # displayed width of one sample grid; the PNG keeps its full resolution inside the page
TRAIN = ["train/loss_d", "train/loss_g", "train/d_real", "train/d_fake"]  # one row of four plots
PERF = ["perf/img_per_sec", "perf/data_wait_frac"]
AXES = ("train/step", "train/kimg")
METRIC_RANK = {m.key: i for i, m in enumerate(METRICS)}  # evaluation plots and summary rows in the list's order


class ReportError(Exception):
    """A mistake the user can fix (a path that is not a run directory); printed as one line, exit code 2."""


@dataclass
class Run:
    path: Path
    name: str
    rows: list[dict]
    config_text: str | None = None
    config: dict = field(default_factory=dict)
    final: dict | None = None
    best: dict | None = None
    samples: dict[str, dict[int, Path]] = field(default_factory=dict)  # kind (ema, G) -> step -> png


# ---------------------------------------------------------------- reading a run

def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing or half-written (the run may still be writing it): the report goes on without it
    return data if isinstance(data, dict) else None


def load_run(path: Path) -> Run:
    if not metrics_file(path).is_file():
        raise ReportError(f"{path}: not a run directory (no metrics.jsonl)")
    run = Run(path, path.resolve().name, read_metrics(path), config_text(path), samples=sample_grids(path),
              final=_read_json(path / "final" / "metrics.json"), best=_read_json(path / "best" / "metrics.json"))
    if run.config_text is not None:
        try:
            cfg = yaml.safe_load(run.config_text)
        except yaml.YAMLError:
            cfg = None  # still shown verbatim below; only the summary fields go missing
        run.config = cfg if isinstance(cfg, dict) else {}
    return run


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None  # NaN/inf from a diverged run would wreck the axes; such points are left out
    return float(v)


def series(run: Run, key: str, xkey: str) -> list[tuple[float, float]]:
    """(x, value) of every row holding `key`, sorted by x; a step logged twice keeps its last value."""
    pts = {}
    for row in run.rows:
        x, y = _num(row.get(xkey)), _num(row.get(key))
        if x is not None and y is not None:
            pts[x] = y
    return sorted(pts.items())


def last(run: Run, key: str):
    return next((row[key] for row in reversed(run.rows) if row.get(key) is not None), None)


def cfg_get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# ---------------------------------------------------------------- SVG line plot

def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values (1, 2, 2.5, 5 x 10^k apart) covering [lo, hi]; the axis ends on the outer two."""
    if hi - lo <= 1e-12 * max(abs(lo), abs(hi), 1.0):  # a flat series: open a window around its value
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * 0.999)
    first, count = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [i * step + 0.0 for i in range(first, count + 1)]  # + 0.0 turns -0.0 into 0.0


def fmt_tick(v: float, step: float) -> str:
    if abs(v) >= 1e4:
        return f"{v / 1e3:g}k"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if round(step / 10 ** -decimals, 6) % 1:  # a 2.5 step needs one more decimal
        decimals += 1
    return f"{v:.{decimals}f}"


def svg_plot(key: str, title: str, lines: list[dict], xlabel: str, xrange: tuple[float, float] | None = None,
             width: int = 318, height: int = 210) -> str:
    """An inline SVG line plot of the logged `key`, headed `title`. Each line: {label, color, points [(x, y)]}, or a
    floor {label, color, y}, drawn dashed across the whole x range. `xrange` gives every plot of a page the same x
    axis, so they line up by eye. The legend sits below the axis label, one entry a row, so it never covers data or
    ticks however many runs there are."""
    left, right, top, bottom = 52, 12, 26, 34
    curves = [ln for ln in lines if ln.get("points")]
    floors = [ln for ln in lines if "y" in ln]
    xs = [x for ln in curves for x, _ in ln["points"]]
    ys = [y for ln in curves for _, y in ln["points"]] + [ln["y"] for ln in floors]
    xt, yt = nice_ticks(*(xrange or (min(xs), max(xs))), n=4), nice_ticks(min(ys), max(ys))
    total_h = height + 15 * len(lines) + 4
    pw, ph = width - left - right, height - top - bottom

    def sx(x):
        return left + (x - xt[0]) / (xt[-1] - xt[0]) * pw

    def sy(y):
        return top + ph - (y - yt[0]) / (yt[-1] - yt[0]) * ph

    out = [(f'<svg class="plot" data-metric="{html.escape(key)}" width="{width}" height="{total_h}" '
            f'viewBox="0 0 {width} {total_h}" role="img">'),
           f'<text x="{width / 2}" y="16" text-anchor="middle" class="title">{html.escape(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>']
    for v in yt:
        y = sy(v)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{fmt_tick(v, yt[1] - yt[0])}</text>')
    for v in xt:
        x = sx(v)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + ph}" class="grid"/>'
                   f'<text x="{x:.1f}" y="{top + ph + 15}" text-anchor="middle">{fmt_tick(v, xt[1] - xt[0])}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{top + ph + 29}" text-anchor="middle" class="axis">{xlabel}</text>')
    for ln in floors:
        y = sy(ln["y"])
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="{ln["color"]}" '
                   f'class="floor"/>')
    sparse = max(len(ln["points"]) for ln in curves) <= 25  # eval every N steps, or one point: mark the points
    for ln in curves:
        pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in ln["points"])
        out.append(f'<polyline points="{pts}" fill="none" stroke="{ln["color"]}" stroke-width="1.6"/>')
        if sparse:
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{ln["color"]}"/>'
                    for x, y in ln["points"]]
    for i, ln in enumerate(lines):
        lx, ly = left, height + 15 * i + 12
        dash = ' stroke-dasharray="5 4"' if "y" in ln else ""
        out.append(f'<line x1="{lx:.0f}" x2="{lx + 18:.0f}" y1="{ly - 4}" y2="{ly - 4}" stroke="{ln["color"]}" '
                   f'stroke-width="2"{dash}/><text x="{lx + 23:.0f}" y="{ly}">{html.escape(ln["label"])}</text>')
    out.append("</svg>")
    return "".join(out)


# ---------------------------------------------------------------- page sections

def metric_plot(runs: list[Run], key: str, xkey: str, xrange: tuple[float, float] | None = None) -> str | None:
    """One plot of `key` with a line per run that logged it, plus each run's floor (`<key>_real`) when logged."""
    lines, floors = [], []
    for i, run in enumerate(runs):
        color = COLORS[i % len(COLORS)]
        if pts := series(run, key, xkey):
            lines.append({"label": run.name, "color": color, "points": pts})
        floor = _num(last(run, key + "_real"))
        if floor is None and run.final:
            floor = _num(run.final.get(key + "_real"))
        if floor is not None and pts:
            floors.append({"label": f"{run.name} floor (real data)", "color": color, "y": floor})
    if floors and all(math.isclose(f["y"], floors[0]["y"], rel_tol=1e-6) for f in floors):
        floors = [{"label": "floor (real data)", "color": "#555" if len(lines) > 1 else lines[0]["color"],
                   "y": floors[0]["y"]}]  # runs on the same data share one floor: draw it once
    return svg_plot(key, plot_title(key), lines + floors, xkey.split("/")[-1], xrange) if lines else None


def plot_section(runs: list[Run], title: str, keys: list[str], xkey: str, xrange, empty: str, note: str = "") -> str:
    plots = [p for k in keys if (p := metric_plot(runs, k, xkey, xrange))]
    body = f'{note}<div class="plots">{"".join(plots)}</div>' if plots else f'<p class="none">{empty}</p>'
    return f"<h2>{title}</h2>{body}"


def all_keys(runs: list[Run]) -> list[str]:
    seen = {}
    for run in runs:
        for row in run.rows:
            seen.update(dict.fromkeys(k for k, v in row.items() if _num(v) is not None))
    return list(seen)


def metric_rank(key: str) -> int:
    """Where `eval/<name>` or `<name>` (as in metrics.json) stands in the metric list; other keys after it."""
    return METRIC_RANK.get(key.removeprefix("eval/"), len(METRIC_RANK))


def eval_keys(keys: list[str]) -> list[str]:
    ev = [k for k in keys if k.startswith("eval/")]
    ev = [k for k in ev if not (k.endswith("_real") and k[:-5] in ev)]  # floors go into their metric's plot
    return sorted(ev, key=lambda k: (metric_rank(k), k))


def plot_title(key: str) -> str:
    """A listed metric's label and which way is better (as papers mark FID↓); any other key as logged."""
    m = BY_KEY.get(key.removeprefix("eval/")) if key.startswith("eval/") else None
    return key if m is None else f"{m.label} {'↓' if m.lower_is_better else '↑'}"


def fmt(v) -> str:
    if v is None:
        return "&mdash;"
    if isinstance(v, float):  # 4 significant digits, but never 1.851e+04 for a throughput
        return (f"{v:.0f}" if abs(v) >= 1e4 else f"{v:.4g}") if math.isfinite(v) else str(v)
    return html.escape(str(v))


def summary_table(runs: list[Run]) -> str:
    def model(r):
        m = r.config.get("model") or {}
        return ", ".join(f"{k} {m[k]}" for k in ("arch", "z_dim", "width", "hidden", "depth") if k in m) or None

    def data(r):
        d = r.config.get("data") or {}
        if "dataset" not in d:
            return None
        shape = f" {d['resolution']}px x{d.get('channels', 1)}" if d["dataset"] in ("mnist", "webdataset") else ""
        return f"{d['dataset']}{shape}"

    def steps(r):
        done, planned = last(r, "train/step"), cfg_get(r.config, "train.steps")
        return f"{done} / {planned}" if done is not None and planned is not None else done

    def world(r):
        return next((v for k in ("world_size", "dist.world_size", "accelerate.num_processes")
                     if (v := cfg_get(r.config, k)) is not None), None)

    rows = [("folder", lambda r: str(r.path)), ("W&B name", lambda r: cfg_get(r.config, "wandb.name")),
            ("git commit", lambda r: cfg_get(r.config, "git_commit")),
            ("last logged", lambda r: datetime.datetime.fromtimestamp(
                metrics_file(r.path).stat().st_mtime).strftime("%Y-%m-%d %H:%M")),
            ("steps (done / planned)", steps), ("kimg", lambda r: last(r, "train/kimg")), ("world size", world),
            ("batch size", lambda r: cfg_get(r.config, "train.batch_size")), ("model", model), ("data", data)]
    rows += [(f"last {k.split('/')[-1]}", lambda r, k=k: last(r, k))
             for k in ("train/loss_d", "train/loss_g", "train/d_real", "train/d_fake", "perf/img_per_sec")]
    def with_floor(scores: dict | None, key: str) -> str | None:
        # One row per metric: the real-data floor rides beside its value instead of taking a row of its own.
        value, floor = (scores or {}).get(key), (scores or {}).get(f"{key}_real")
        return None if value is None else fmt(value) + ("" if floor is None else f" (real data {fmt(floor)})")

    for label, attr in (("final", "final"), ("best", "best")):
        keys = sorted(dict.fromkeys(k for r in runs for k in (getattr(r, attr) or {})
                                    if k not in ("step", "kimg") and not k.endswith("_real")), key=metric_rank)
        if any(getattr(r, attr) for r in runs):
            if attr == "best":
                rows.append(("best step", lambda r: (r.best or {}).get("step")))
            rows += [(f"{label} {k}", lambda r, k=k, a=attr: with_floor(getattr(r, a), k)) for k in keys]
        else:
            rows.append((f"{label} metrics", lambda r, a=attr: f"no {a}/metrics.json"))
    head = "".join(f'<th><span class="swatch" style="background:{COLORS[i % len(COLORS)]}"></span>'
                   f"{html.escape(r.name)}</th>" for i, r in enumerate(runs))
    body = "".join(f"<tr><th>{html.escape(label)}</th>{''.join(f'<td>{fmt(get(r))}</td>' for r in runs)}</tr>"
                   for label, get in rows if any(get(r) is not None for r in runs))
    return f'<table class="summary"><tr><th></th>{head}</tr>{body}</table>'


def pick_evenly(items: list, k: int) -> list:
    """At most k items, evenly spaced, always including the first and the last."""
    if len(items) <= k:
        return list(items)
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def png_width(png: Path) -> int:
    head = png.read_bytes()[:24]  # the IHDR chunk: width is the big-endian int at bytes 16..20
    return int.from_bytes(head[16:20], "big") if head[:8] == b"\x89PNG\r\n\x1a\n" else 0


def samples_section(run: Run) -> str:
    if not run.samples:
        return f'<h3>{html.escape(run.name)}</h3><p class="none">no sample grids logged (no samples/*.png)</p>'
    kinds = sorted(run.samples, key=lambda k: (k != "ema", k != "G", k))  # G_ema first: it is the one to judge
    steps = pick_evenly(sorted({s for k in kinds for s in run.samples[k]}), MAX_GRIDS)
    figs = []
    for step in steps:
        imgs = []
        for kind in kinds:
            if png := run.samples[kind].get(step):
                # small grids are scaled up, so keep their pixels crisp instead of blurred
                crisp = ' class="crisp"' if png_width(png) < THUMB_PX else ""
                label = "G_ema" if kind == "ema" else kind
                imgs.append(f'<div class="kind">{html.escape(label)}</div><img{crisp} width="{THUMB_PX}" '
                            f'src="{data_uri(png)}" alt="{html.escape(label)} step {step}">')
        figs.append(f'<figure><figcaption>step {step}</figcaption>{"".join(imgs)}</figure>')
    total = len({s for k in kinds for s in run.samples[k]})
    note = f" ({len(steps)} of {total} grids, evenly spaced)" if total > len(steps) else ""
    model = run.config.get("model") if isinstance(run.config.get("model"), dict) else {}
    if model.get("cond"):
        note += "; class-conditional: column k of each grid is class k"
    return f'<h3>{html.escape(run.name)}{note}</h3><div class="grids">{"".join(figs)}</div>'


def config_section(run: Run) -> str:
    text = html.escape(run.config_text) if run.config_text is not None else "no config.yaml"
    return f"<details><summary>{html.escape(run.name)}: config.yaml</summary><pre>{text}</pre></details>"


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1320px;
 padding:0 16px;color:#222}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
h3{font-size:15px;margin:16px 0 6px}.meta{color:#666;font-size:13px}.none{color:#888;font-style:italic}
table.summary{border-collapse:collapse;font-size:13px}
table.summary th,table.summary td{border:1px solid #ddd;padding:3px 10px;text-align:left;vertical-align:top}
table.summary td{font-variant-numeric:tabular-nums}table.summary tr>th:first-child{background:#f6f6f6;font-weight:600}
.swatch{display:inline-block;width:10px;height:10px;margin-right:6px;border-radius:2px}
.plots{display:flex;flex-wrap:wrap;gap:10px}
svg.plot{font-family:inherit;font-size:11px;background:#fff;border:1px solid #eee}
svg.plot text{fill:#333}svg.plot .title{font-size:13px;font-weight:600}svg.plot .axis{fill:#666}
svg.plot .frame{fill:none;stroke:#999}svg.plot .grid{stroke:#eee}
svg.plot .floor{stroke-dasharray:5 4;stroke-width:1.4}
.grids{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;padding:6px;border:1px solid #e4e4e4;border-radius:4px;background:#fafafa}
figcaption{font-size:13px;font-weight:600;margin-bottom:4px}.kind{font-size:11px;color:#666;margin-top:2px}
img{display:block;height:auto}img.crisp{image-rendering:pixelated}
pre{background:#f6f6f6;padding:8px 12px;font-size:12px;overflow-x:auto;max-height:500px}
details{margin:6px 0}summary{cursor:pointer;font-weight:600;font-size:14px}
"""


def build_report(runs: list[Run]) -> str:
    keys = all_keys(runs)
    # kimg is the axis that compares runs of different batch sizes; step only if a (foreign) log has no kimg
    xkey = "train/kimg" if "train/kimg" in keys else "train/step"
    shown = set(TRAIN) | set(PERF) | set(AXES)
    ev = eval_keys(keys)
    other = [k for k in keys if k not in shown and not k.startswith("eval/")]
    xs = [x for r in runs for row in r.rows if (x := _num(row.get(xkey))) is not None]
    xrange = (min(0.0, *xs), max(xs)) if xs else None  # from 0: where training started, even if logged later
    parts = [plot_section(runs, "Losses and D outputs (probabilities)", TRAIN, xkey, xrange,
                          "no train/loss_* or train/d_* logged"),
             plot_section(runs, "Evaluation", ev, xkey, xrange, "no eval/* metrics logged",
                          '<p class="meta">↓ lower is better, ↑ higher is better; dashed: the same metric of held-out '
                          "real data (the floor)</p>"),
             plot_section(runs, "Throughput", PERF, xkey, xrange, "no perf/img_per_sec logged")]
    if other:  # whatever else was logged (data/skipped, data/epoch, keys added later), folded away
        plots = "".join(p for k in other if (p := metric_plot(runs, k, xkey, xrange)))
        parts.append(f'<details><summary>Other logged metrics ({len(other)})</summary><div class="plots">{plots}'
                     "</div></details>")
    names = ", ".join(html.escape(r.name) for r in runs)
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>GAN report: {names}</title>'
            f"<style>{CSS}</style></head><body><h1>GAN training report: {names}</h1>"
            f'<div class="meta">generated {now} by scripts/report.py</div>'
            f"<h2>Summary</h2>{summary_table(runs)}{''.join(parts)}"
            f"<h2>Samples (fixed noise)</h2>{''.join(samples_section(r) for r in runs)}"
            f"<h2>Config</h2>{''.join(config_section(r) for r in runs)}</body></html>\n")


def unique_names(runs: list[Run]) -> None:
    """Folder names label the runs; two runs named alike (runs/a/seed0, runs/b/seed0) get their parent too."""
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = f"{r.path.resolve().parent.name}/{r.name}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a self-contained offline HTML report of GAN runs.")
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories (with metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="output HTML file (default: RUN/report.html of the first RUN)")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(p) for p in args.runs]
        unique_names(runs)
        out = args.out or args.runs[0] / "report.html"
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(build_report(runs), encoding="utf-8")
        except OSError as e:
            raise ReportError(f"{out}: cannot write the report ({e.strerror})") from e
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
