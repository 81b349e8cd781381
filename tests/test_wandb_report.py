"""scripts/wandb_report.py: the report's panels and keys (every metric of gan_dist/metric_names.py in the section of
its kind of data, beside its floor), the run-group filter, and the CLI (--dry-run, and the one-line error when saving
is impossible), all offline."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("wandb_workspaces.reports.v2",
                    reason="wandb-workspaces is not installed (pip install wandb-workspaces); it builds W&B Reports")
import wandb_workspaces.reports.v2 as wr  # noqa: E402
from wandb_workspaces import expr  # noqa: E402

from gan_dist.metric_names import KINDS, METRICS  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "wandb_report.py"
LINES = {  # y keys of each LinePlot outside the evaluation sections, all over train/kimg
    ("train/loss_d", "train/loss_g"), ("train/d_real", "train/d_fake"), ("train/rt", "aug/rt"), ("aug/p",),
    ("perf/img_per_sec",), ("perf/data_wait_frac",),
}
MEDIA = {"samples/ema", "samples/G"}
EVAL = {f"eval/{key}" for m in METRICS for key in (m.key, m.floor) if key}
ALL_KEYS = {"train/kimg", *MEDIA, *(key for keys in LINES for key in keys), *EVAL}


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("wandb_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def grids(report):
    return [block for block in report.blocks if isinstance(block, wr.PanelGrid)]


def panels(report, kind):
    return [panel for grid in grids(report) for panel in grid.panels if isinstance(panel, kind)]


def eval_sections(report) -> dict[str, list[str]]:
    """Heading -> the y keys of the panel grid under it, for each H3 section (the evaluation part)."""
    return {head.text: [key for panel in grid.panels for key in panel.y]
            for head, grid in zip(report.blocks, report.blocks[1:])
            if isinstance(head, wr.H3) and isinstance(grid, wr.PanelGrid)}


def parsed_filters(runset):
    """The filter leaves W&B receives on save (the package parses the string the same way there)."""
    return expr.filters_tree_to_v2(expr.expr_to_filters(runset.filters))["filters"]


def test_panels_and_keys(script, monkeypatch):
    import wandb

    def no_network(*args, **kwargs):
        raise AssertionError("build_report must not contact W&B")

    monkeypatch.setattr(wandb, "Api", no_network)
    report = script.build_report("gan-dist", entity="me")
    assert (report.project, report.entity) == ("gan-dist", "me")

    lines = panels(report, wr.LinePlot)
    sections = eval_sections(report)
    outside = [tuple(p.y) for p in lines if not set(p.y) <= EVAL]
    assert sorted(outside) == sorted(LINES)  # each set of keys exactly once
    assert {p.x for p in lines} == {"train/kimg"}
    # Every listed metric, with its floor, once, in the section of its kind of data (class metrics apart).
    for kind, name in KINDS.items():
        for cond, heading in ((False, name), (True, f"{name}, class-conditional G")):
            listed = [f"eval/{key}" for m in METRICS if kind in m.kinds and m.conditional == cond and not m.self_cond
                      for key in (m.key, m.floor) if key]
            assert sorted(sections.get(heading, [])) == sorted(listed), heading
    assert sorted(sections["Self-conditioned G"]) == sorted(f"eval/{m.key}" for m in METRICS if m.self_cond)
    assert {key for keys in sections.values() for key in keys} == EVAL
    assert "eval/fid" in sections["RGB images"] and "eval/reverse_kl" in sections["2-D mixtures"]
    media = panels(report, wr.MediaBrowser)
    assert sorted(key for p in media for key in p.media_keys) == sorted(MEDIA)
    assert len(panels(report, wr.RunComparer)) == 1
    comparison = next(g for g in grids(report) if any(isinstance(p, wr.RunComparer) for p in g.panels))
    assert comparison.runsets[0].pinned_columns == [f"summary:eval/{m.key}" for m in METRICS]
    kinds = {type(p) for g in grids(report) for p in g.panels}
    assert kinds == {wr.LinePlot, wr.MediaBrowser, wr.RunComparer}

    # Every block and panel converts to the package's wire model offline (only runsets need the network), so
    # save() will not fail on a malformed panel. `_to_model` is the package's internal serializer.
    for block in report.blocks:
        for item in block.panels if isinstance(block, wr.PanelGrid) else [block]:
            item._to_model()


def test_entity_placeholder_without_entity(script):
    assert script.build_report("gan-dist").entity == script.ENTITY_PLACEHOLDER


@pytest.mark.parametrize("group", ["mnist-ddp", "lr=2e-4 <a> b>=c", "it's \"quoted\" \\ x"])
def test_group_filter(script, group):
    report = script.build_report("gan-dist", entity="me", group=group)
    for grid in grids(report):
        (runset,) = grid.runsets
        assert parsed_filters(runset) == [
            {"key": {"section": "run", "name": "group"}, "op": "=", "value": group, "disabled": False}]
    assert group in report.title


def test_no_group_no_filter(script):
    report = script.build_report("gan-dist", entity="me")
    for grid in grids(report):
        (runset,) = grid.runsets
        assert runset.filters == "" and parsed_filters(runset) == []


def _run_cli(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    # No key anywhere (HOME holds ~/.netrc) and a dead W&B address: any attempt to reach W&B fails locally.
    env.update(WANDB_MODE="offline", HOME=str(tmp_path), WANDB_BASE_URL="http://127.0.0.1:9")
    return subprocess.run([sys.executable, str(SCRIPT), *args], check=False, env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_cli_dry_run(tmp_path):
    proc = _run_cli(tmp_path, "--project", "gan-dist", "--group", "mnist-ddp", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    for word in [*ALL_KEYS, "LinePlot", "MediaBrowser", "RunComparer", "mnist-ddp", "<your-entity>", "gan-dist"]:
        assert word in proc.stdout, word
    assert "run.group = 'mnist-ddp'" in proc.stdout


def test_cli_save_without_login_fails_in_one_line(tmp_path):
    proc = _run_cli(tmp_path, "--project", "gan-dist")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not save the W&B report ("), proc.stderr
    assert "use --dry-run" in lines[0] and proc.stdout == ""
