"""Build a W&B Report of gan-dist training runs: losses, D probabilities, eval metrics, throughput, samples
and a run comparison, for a whole project or one run group. The eval metrics are those of
`gan_dist/metric_names.py`, a section per kind of data, each metric beside its real-data floor.

Usage (from the repo root; needs `pip install wandb-workspaces`):

    python scripts/wandb_report.py --project gan-dist --dry-run          # print the layout; no network
    python scripts/wandb_report.py --project gan-dist --group mnist-ddp  # save it to W&B and print its URL
    python scripts/wandb_report.py --project P --entity E --group G

Saving needs a W&B login (WANDB_API_KEY or `wandb login`); --entity defaults to the login's default entity.
--dry-run builds the same report object and prints its blocks and panels without contacting W&B.
"""

from __future__ import annotations

import argparse
import sys

import wandb

from gan_dist.metric_names import KINDS, METRICS, Metric

try:
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr
except ModuleNotFoundError:  # an optional extra: only this script needs it
    sys.exit("error: scripts/wandb_report.py needs wandb-workspaces: pip install wandb-workspaces")

ENTITY_PLACEHOLDER = "<your-entity>"
KIMG = "train/kimg"  # every curve is drawn over images seen, so runs with different batch sizes line up
LOSSES = ["train/loss_d", "train/loss_g"]
D_PROBS = ["train/d_real", "train/d_fake"]
OVERFITTING = ["train/rt", "aug/rt"]  # ADA's heuristic r_t: every run's per log interval, and the one p moved on
AUG_P = ["aug/p"]  # ADA's augmentation probability


def eval_plots(metrics: list[Metric]) -> list[tuple[str, list[str]]]:
    """(title, keys) of one plot per metric, beside its floor; metrics on one scale (the same `plot`) share one."""
    plots: dict[str, list[str]] = {}
    for m in metrics:
        plots.setdefault(m.plot or m.label, []).extend(f"eval/{key}" for key in (m.key, m.floor) if key)
    return list(plots.items())


# (heading, plots): a section per kind of data, one for a class-conditional G's class metrics, and one for a
# self-conditioned G's clusters (of any kind of data).
EVAL_SECTIONS = [(name + (", class-conditional G" if cond else ""), eval_plots(metrics))
                 for kind, name in KINDS.items() for cond in (False, True)
                 if (metrics := [m for m in METRICS if kind in m.kinds and m.conditional == cond and not m.self_cond])
                 ] + [("Self-conditioned G", eval_plots([m for m in METRICS if m.self_cond]))]
EVAL_KEYS = [f"eval/{m.key}" for m in METRICS]
PERF_PLOTS = [("Throughput (img/s)", ["perf/img_per_sec"]), ("Data wait fraction", ["perf/data_wait_frac"])]
MEDIA = [("Samples from G_ema", "samples/ema"), ("Samples from G", "samples/G")]


def group_filter(group: str) -> str:
    """The runset filter `run group == group`.

    wandb-workspaces parses this string with regexes that rewrite '=' to '==' and '<'/'>' to '<='/'>=' even inside
    string literals, so those characters are written as \\x escapes that only the final Python parse decodes.
    """
    literal = repr(group).replace("=", "\\x3d").replace("<", "\\x3c").replace(">", "\\x3e")
    return f"Metric('Group') == {literal}"


def _runset(entity: str, project: str, group: str | None, **columns) -> wr.Runset:
    # One runset per panel grid: each grid in a report owns its run selection.
    return wr.Runset(entity=entity, project=project, name=f"group {group}" if group else "all runs",
                     filters=group_filter(group) if group else "", **columns)


def _line(title: str, keys: list[str]) -> wr.LinePlot:
    return wr.LinePlot(title=title, x=KIMG, y=list(keys))


def build_report(project: str, entity: str | None = None, group: str | None = None) -> wr.Report:
    """The report object; no network (the package only contacts W&B on save())."""
    entity = entity or ENTITY_PLACEHOLDER  # Report() would otherwise ask the W&B API for the default entity

    def grid(panels: list, **columns) -> wr.PanelGrid:
        return wr.PanelGrid(runsets=[_runset(entity, project, group, **columns)], panels=panels)

    scope = f"run group `{group}`" if group else "all runs"
    return wr.Report(
        project=project,
        entity=entity,
        title=(f"gan-dist: {project}" + (f" / {group}" if group else ""))[:128],  # the API's length limit
        description=f"Training curves, evaluation metrics, throughput and samples of {scope} in {project}.",
        width="fluid",
        blocks=[
            wr.P(f"Runs: {scope}. All curves are plotted over thousands of real images shown to D (train/kimg)."),
            wr.H2("Training"),
            grid([_line("D and G losses", LOSSES), _line("D probabilities (real, fake)", D_PROBS),
                  _line("D's overfitting r_t", OVERFITTING), _line("ADA's augmentation probability p", AUG_P)]),
            wr.H2("Evaluation"),
            wr.P("Each run logs the metrics of its kind of data; `_real` is the same metric of held-out real data "
                 "(the floor a generator approaches)."),
            *(block for heading, plots in EVAL_SECTIONS
              for block in (wr.H3(heading), grid([_line(title, keys) for title, keys in plots]))),
            wr.H2("Throughput"),
            grid([_line(title, keys) for title, keys in PERF_PLOTS]),
            wr.H2("Samples"),
            grid([wr.MediaBrowser(title=title, media_keys=[key], layout=wr.Layout(w=12, h=10))
                  for title, key in MEDIA]),
            wr.H2("Run comparison"),
            # RunComparer lists every config and summary value side by side; the pinned columns put the summary
            # eval metrics (as the trainer's define_metric sets them) first in the grid's runs table.
            grid([wr.RunComparer(diff_only="split", layout=wr.Layout(w=24, h=12))],
                 pinned_columns=[f"summary:{key}" for key in EVAL_KEYS]),
        ],
    )


def _filter_text(runset: wr.Runset) -> str:
    """The runset's filter as W&B will receive it (parsed by the package, so escapes are decoded)."""
    leaves = expr.filters_tree_to_v2(expr.expr_to_filters(runset.filters))["filters"]
    return " and ".join(f"{f['key']['section']}.{f['key']['name']} {f['op']} {f['value']!r}" for f in leaves) or "none"


def describe(report: wr.Report) -> str:
    """Readable text of the report's blocks and panels. The package's own model JSON (`report._spec`) cannot be
    built offline: it looks up the project's internal id on W&B."""
    out = [f"title: {report.title}", f"entity: {report.entity}  project: {report.project}",
           f"description: {report.description}", "blocks:"]
    for block in report.blocks:
        if not isinstance(block, wr.PanelGrid):
            out.append(f"  {type(block).__name__}: {block.text}")
            continue
        for runset in block.runsets:
            pinned = f"; pinned columns: {', '.join(runset.pinned_columns)}" if runset.pinned_columns else ""
            out.append(f"  PanelGrid (runs filter: {_filter_text(runset)}{pinned})")
        for panel in block.panels:
            if isinstance(panel, wr.LinePlot):
                out.append(f"    LinePlot      {panel.title!r}  x={panel.x}  y={', '.join(panel.y)}")
            elif isinstance(panel, wr.MediaBrowser):
                out.append(f"    MediaBrowser  {panel.title!r}  media_keys={', '.join(panel.media_keys)}")
            elif isinstance(panel, wr.RunComparer):
                out.append(f"    RunComparer   diff_only={panel.diff_only}  (config and summary of every run)")
            else:
                out.append(f"    {type(panel).__name__}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a W&B Report of gan-dist runs (wandb-workspaces).")
    parser.add_argument("--project", required=True, help="W&B project holding the runs")
    parser.add_argument("--entity", help="W&B entity (default: the logged-in user's default entity)")
    parser.add_argument("--group", help="only runs of this W&B run group (wandb.group in the config)")
    parser.add_argument("--dry-run", action="store_true", help="print the report's layout; do not contact W&B")
    args = parser.parse_args(argv)

    if args.dry_run:
        print(describe(build_report(args.project, args.entity, args.group)))
        return 0
    try:
        entity = args.entity or wandb.Api().default_entity
        if not entity:
            raise RuntimeError("the W&B login has no default entity; pass --entity")
        report = build_report(args.project, entity, args.group).save()
        print(report.url)
    except Exception as err:  # noqa: BLE001  (no key, no network, unknown project: the package raises many types)
        reason = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
        print(f"error: could not save the W&B report ({reason}); check WANDB_API_KEY / network, or use --dry-run",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
