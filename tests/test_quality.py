"""scripts/quality.py on short ring8 runs: the markdown holds every seed's numbers from its metrics.jsonl and its
rejection-sampling scores, the command and the hardware; a failing training stops it with an error naming its
log; rewriting one suite's section keeps the rest of the results file byte for byte.

Run: python -m pytest tests/test_quality.py -q   (about 30 s on 2 cores)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("quality", REPO / "scripts" / "quality.py")
quality = sys.modules["quality"] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up
_spec.loader.exec_module(quality)

SHORT = ("--set", "train.steps=300", "--set", "eval.every=300", "--set", "log.every=100", "--set", "model.hidden=32")


def run_quality(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "scripts/quality.py", "--suite", "2d", "--configs", "configs/ring8.yaml",
           "--out", str(tmp / "results.md"), "--runs", str(tmp / "runs"), *args]
    return subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("quality")
    proc = run_quality(tmp, "--seeds", "2", "--jobs", "2", *SHORT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp, proc.stdout


def table_row(markdown: str, first: str) -> list[str]:
    (line,) = [x for x in markdown.splitlines() if x.startswith(f"| {first} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def printed(cell: str, value: float) -> bool:
    """Whether `cell` is `value` rounded to the digits it shows."""
    return abs(Decimal(cell) - Decimal(value)) <= Decimal(5).scaleb(Decimal(cell).as_tuple().exponent - 1)


def test_table_holds_each_seeds_last_evaluation(two_seeds):
    tmp, stdout = two_seeds
    markdown = (tmp / "results.md").read_text()
    hq, drs_hq = [], []
    for seed in (0, 1):
        run = tmp / "runs" / "ring8" / f"seed{seed}"
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in rows if "eval/hq" in r][-1]
        hq.append(last["eval/hq"])
        cells = table_row(markdown, str(seed))
        assert int(cells[1]) == last["train/step"] == 300
        for cell, key in zip(cells[2:5], ("eval/modes", "eval/hq", "eval/reverse_kl")):
            assert printed(cell, last[key]), (seed, key, cell, last[key])
        assert cells[5].endswith(" s") and (run / "train.log").is_file()
        # Rejection sampling's numbers are columns of their own, from scripts/evaluate.py --sampler drs.
        drs = json.loads((run / "drs.json").read_text())
        assert drs["sampler"] == "drs" and printed(cells[6], drs["modes"]) and printed(cells[7], drs["hq"])
        drs_hq.append(drs["hq"])
    mean_hq = table_row(markdown, "mean ± std (worst)")[3].split()[0]
    assert printed(mean_hq, sum(hq) / 2)
    # A missed goal names its seeds and how far the worst is (and the modes it lacks, where it lacks any).
    goal = markdown.split("at least 98% high quality: **not met** (seeds 0, 1; the worst by ")[1]
    assert goal.split(")")[0].endswith(f"{98 - min(hq):.2f} points")
    drs_goal = markdown.split("every seed 8/8 modes and at least 99.5%: **not met** (seeds 0, 1; the worst by ")[1]
    assert drs_goal.split(")")[0].endswith(f"{99.5 - min(drs_hq):.2f} points")
    assert "| PacGAN4 | 7.8 / 95.9 | 24.8 / 93.6 |" in markdown

    # The section states how it was made, and the same text went to stdout.
    assert f"- command: `python scripts/quality.py --suite 2d --configs configs/ring8.yaml --out {tmp}/results.md" in \
        markdown
    (hardware,) = [x for x in markdown.splitlines() if x.startswith("- hardware: ")]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    assert f"{os.cpu_count()} cores; {gpu}; torch {torch.__version__}" in hardware
    assert "- seeds: 0, 1;" in markdown and "2 at a time, OMP_NUM_THREADS=" in markdown
    assert (REPO / "configs" / "ring8.yaml").read_text().strip() in markdown
    section = markdown.split("<!-- quality:2d:begin -->\n")[1].split("\n<!-- quality:2d:end -->")[0]
    assert section in stdout and markdown.startswith("# Results\n")


def test_failing_training_names_its_log(tmp_path):
    stale = tmp_path / "runs" / "ring8" / "seed0" / "stale.txt"
    stale.parent.mkdir(parents=True)
    stale.write_text("from an earlier run")
    proc = run_quality(tmp_path, "--seeds", "1", "--set", "train.steps=0")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training configs/ring8.yaml seed 0 failed") and \
        last.endswith(str(stale.parent / "train.log"))
    assert "config key 'train.steps' must be at least 1" in proc.stderr, "the log's last lines are shown"
    assert not stale.exists() and not (tmp_path / "results.md").exists()


def test_one_suite_replaces_only_its_own_section():
    both = quality.replace_section(quality.replace_section(quality.INTRO, "2d", "old 2d"), "mnist", "mnist text\n")
    new = quality.replace_section(both, "2d", "new 2d\n| table |")
    assert new.split("<!-- quality:2d:begin -->")[0] == both.split("<!-- quality:2d:begin -->")[0]
    assert new.split("<!-- quality:2d:end -->")[1] == both.split("<!-- quality:2d:end -->")[1]
    assert "new 2d\n| table |" in new and "old 2d" not in new
    # A missing section goes before the sections of later suites, whichever suite ran first.
    only_mnist = quality.replace_section(quality.INTRO, "mnist", "mnist text")
    added = quality.replace_section(only_mnist, "2d", "2d text")
    assert added.index("quality:2d:end") < added.index("quality:mnist:begin")
    assert added.split("<!-- quality:mnist:begin -->")[1] == only_mnist.split("<!-- quality:mnist:begin -->")[1]


def test_each_config_shows_the_final_g_emas_samples_beside_its_table(two_seeds, tmp_path):
    tmp, _ = two_seeds
    markdown, picture = (tmp / "results.md").read_text(), tmp / "images" / "ring8.png"
    assert "![ring8: samples of the final G_ema](images/ring8.png)" in markdown
    # The picture is the first seed's final G_ema, drawn as scripts/sample.py draws it: 2,500 points over the modes.
    again = tmp_path / "again.png"
    subprocess.run([sys.executable, "scripts/sample.py", "--run", str(tmp / "runs" / "ring8" / "seed0"), "--num",
                    "2500", "--out", str(again), "--seed", "0"], cwd=REPO, check=True, capture_output=True)
    assert picture.read_bytes() == again.read_bytes()
    other = tmp_path / "seed1.png"
    subprocess.run([sys.executable, "scripts/sample.py", "--run", str(tmp / "runs" / "ring8" / "seed1"), "--num",
                    "2500", "--out", str(other), "--seed", "0"], cwd=REPO, check=True, capture_output=True)
    assert picture.read_bytes() != other.read_bytes()


def _mnist_row(step: int, **metrics: float) -> dict:
    real = {"fcd": 0.14, "kid": 0.001, "is": 9.7, "class_min": 0.09, "class_max": 0.11, "precision": 0.89,
            "recall": 0.86, "class_acc": 0.993, "fcd_class_mean": 0.42}
    row = {"train/step": step, "train/kimg": step * 0.064, "wall_s": step / 5}
    for key, value in real.items():
        row[f"eval/{key}_real"] = value
        row[f"eval/{key}"] = metrics.get(key, 2 * value)
    return row


@pytest.mark.parametrize("wall, recall, met", [(1700, 0.85, True), (1700, 0.79, False), (1900, 0.85, False)])
def test_conditional_rows_judge_the_goals_on_the_worst_seed(tmp_path, wall, recall, met):
    config = REPO / "configs" / "mnist_cond_cpu.yaml"
    good = dict(fcd=0.2, precision=0.9, recall=0.86, class_acc=0.99)
    jobs = [quality.Job(config, seed, tmp_path / str(seed), wall=1000,
                        rows=[_mnist_row(1500), _mnist_row(3000, **good)])
            for seed in (0, 2)]
    jobs.insert(1, quality.Job(config, 1, tmp_path / "1", wall=wall, rows=[
        _mnist_row(1500), _mnist_row(3000, **(good | {"recall": recall, "fcd": 0.25}))]))
    text = quality.summary_mnist(config, jobs)
    goals = text.split("Goals on every seed")[1]
    assert "FCD ≤ 2 × floor (0.28): **met**" in goals and "read as their label (0.98): **met**" in goals
    missed = "**not met** (seeds 1; the worst by {})"
    assert f"recall ≥ 0.8 (0.8): {'**met**' if recall >= 0.8 else missed.format('0.01')}" in goals
    assert f"training ≤ 30 minutes: {'**met**' if wall <= 1800 else missed.format('100 s')}" in goals
    assert ("not met" not in goals) == met
    assert table_row(text, "1")[1] == "0.25" and table_row(text, "mean ± std (worst)")[1].endswith("(max 0.25)")
    assert table_row(text, "mean ± std (worst)")[7].endswith(f"(min {min(recall, 0.86):.3f})")
    assert "| 3000 | 192.0 | 3.20 | 10.0 | 0.2 |" in quality.table_mnist(jobs[0])  # step, kimg, epochs, minute, FCD


@pytest.mark.parametrize("page", ["README.md", "docs/results.md"])
def test_every_picture_a_page_shows_is_in_the_repository(page):
    path = REPO / page
    links = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", path.read_text())
    missing = [link for link in links if not (path.parent / link).is_file()]
    assert not missing, f"{page} shows pictures that are not in the repository: {missing}"


def test_the_results_file_and_its_pictures_do_not_make_the_checkout_dirty(tmp_path, monkeypatch):
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results.md").write_text("old\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.setattr(quality, "REPO", tmp_path)
    out = tmp_path / "docs" / "results.md"
    out.write_text("new\n")
    (tmp_path / "docs" / "images").mkdir()
    (tmp_path / "docs" / "images" / "ring8.png").write_bytes(b"png")
    assert not quality.commit(out).endswith("(dirty)")
    (tmp_path / "docs" / "notes.md").write_text("an edit")
    assert quality.commit(out).endswith("(dirty)")


def _limited_job(tmp_path: Path, n: int, kind: str, fcd: float, recall: float, p: list[float], seed: int = 0,
                 keys: tuple[str, ...] = quality.SELF_COND) -> "quality.Job":
    return quality.Job(config=REPO / quality.LIMITED_CONFIG, seed=seed, dir=tmp_path, wall=600,
                       overrides=(f"data.limit={n % quality.MNIST_IMAGES}", f"aug.kind={kind}", *keys),
                       rows=[_mnist_row(9000, fcd=fcd, recall=recall)], aug_p=p)


@pytest.mark.parametrize("ada_small, failing", [
    ((5.0, 0.6), False),  # half the FCD with more recall
    ((6.5, 0.6), True),  # above 0.6x the unaugmented FCD at 1,000 images
])
def test_limited_table_shows_every_variant_over_seeds_and_judges_ada_seed_by_seed(tmp_path, ada_small, failing):
    jobs = []
    for seed in (0, 1):
        bad = seed == 1  # the second seed carries the failure under test
        jobs += [_limited_job(tmp_path, 1000, "none", 10.0, 0.5, [], seed),
                 _limited_job(tmp_path, 1000, "ada", *(ada_small if bad else (4.0, 0.6)), [0.1, 0.4 + 0.2 * seed],
                              seed),
                 _limited_job(tmp_path, 1000, "none", 20.0 + seed, 0.4, [], seed, quality.PLAIN)]
    text = quality.table_limited(REPO / quality.LIMITED_CONFIG, jobs)
    rows = {tuple(cells[:3]): cells for line in text.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    # Each cell is the mean over seeds and, in brackets, the worst seed's.
    assert rows["1,000", "none", "true"][3:5] == ["2", "10 (10)"]
    assert rows["1,000", "none", "false"][4] == "20.5 (21)"
    assert rows["1,000", "ada", "true"][11] == "0.500 (0.600)" and rows["1,000", "none", "true"][11] == "–"
    goals = text.split("Goals at the last evaluation, every seed:")[1]
    small = "**not met** (seeds 1)" if failing else "**met**"
    worst = ada_small[0] / 10 if failing else 0.5
    assert f"self_cond=true: at 1,000 images ADA's FCD ≤ 0.6 × unaugmented's (mean " \
           f"{(0.4 + worst) / 2:.2f}x, worst {max(0.4, worst):.2f}x) {small}" in goals
    assert "its recall above unaugmented's **met**" in goals
    assert "self-conditioning's FCD is 0.49x the plain model's (worst seed 0.50x)" in goals
    assert "self_cond=false: at" not in goals, "the plain model ran without ADA here"


def test_the_header_names_rejection_sampling_only_where_the_suite_ran_it(tmp_path):
    args = argparse.Namespace(runs=tmp_path / "runs", set=[], out=tmp_path / "results.md", no_drs=False)
    job = quality.Job(config=REPO / quality.LIMITED_CONFIG, seed=0, dir=tmp_path,
                      overrides=("data.limit=1000", "aug.kind=ada"))
    limited = quality.header("Small datasets", [job], [job.config], 2, 60.0, args, drs=False)
    assert "rejection sampling" not in limited and \
        "wandb.mode=disabled data.limit=N aug.kind=KIND [with ada: aug.target=0.4 aug.speed_kimg=100] " \
        "model.self_cond=S model.cond_norm=S`" in limited
    assert "rejection sampling" in quality.header("MNIST", [job], [job.config], 2, 60.0, args, drs=True)


def test_the_stacked_table_holds_each_seed_its_mean_and_worst_and_the_goal():
    config = REPO / "configs/stacked_mnist_cpu.yaml"
    scores = [(1000, 0.031, 11), (998, 0.072, 9), (1000, 0.045, 12)]
    jobs = [quality.Job(config, seed, Path(f"/runs/seed{seed}"), wall=600.0 * (seed + 1), rows=[
        {"train/step": 18000, "eval/modes": m, "eval/kl": kl, "eval/modes_real": 1000, "eval/kl_real": 0.024,
         "eval/clusters": c}]) for seed, (m, kl, c) in enumerate(scores)]
    markdown = quality.table_stacked(config, jobs, "PICTURE")
    for seed, (modes, kl, clusters) in enumerate(scores):
        assert table_row(markdown, str(seed))[2:] == [str(modes), f"{kl:.4f}", f"{10 * (seed + 1):.1f} min",
                                                      str(clusters)]
    mean = table_row(markdown, "mean ± std (worst)")
    assert mean[2].startswith("999.3") and mean[2].endswith("(min 998.0)")
    assert mean[3].startswith("0.0493") and mean[3].endswith("(max 0.0720)")
    assert table_row(markdown, "real digit triples")[2:4] == ["1000", "0.0240"]
    assert "KL ≤ 0.05: **not met** (seeds 1; the worst by 2 modes, KL 0.0220)" in markdown
    assert "≤ 60 minutes: **met**" in markdown
    assert "| PacDCGAN2 | 1000 | 0.06 |" in markdown and "PICTURE" in markdown


def test_resume_reads_finished_trainings_back(two_seeds):
    tmp, _ = two_seeds
    before = (tmp / "results.md").read_text()
    logs = {seed: (tmp / "runs" / "ring8" / f"seed{seed}" / "train.log").read_bytes() for seed in (0, 1)}
    proc = run_quality(tmp, "--seeds", "2", "--jobs", "2", *SHORT, "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ring8 seed 0: " in proc.stdout and "(read back)" in proc.stdout
    # Nothing trained or scored again: the same logs, the same rows, DRS columns and wall times in the table.
    assert all((tmp / "runs" / "ring8" / f"seed{seed}" / "train.log").read_bytes() == logs[seed] for seed in (0, 1))
    after = (tmp / "results.md").read_text()
    for first in ("0", "1", "mean ± std (worst)"):
        assert table_row(after, first) == table_row(before, first)
    # This call trained nothing; the header still says what the trainings took, every attempt added up.
    walls = sum(json.loads((tmp / "runs" / "ring8" / f"seed{s}" / quality.STATE).read_text())["wall"] for s in (0, 1))
    assert (f"in this call (`--resume`); the trainings' own, every attempt added up: {quality._duration(walls)} in all"
            in after)


def test_sigterm_stops_at_a_checkpoint_and_resume_goes_on(tmp_path):
    long = ("--set", "train.steps=2000", "--set", "eval.every=2000", "--set", "log.every=50", "--set",
            "model.hidden=32", "--no-drs")
    cmd = [sys.executable, "scripts/quality.py", "--suite", "2d", "--configs", "configs/ring8.yaml", "--seeds", "1",
           "--out", str(tmp_path / "results.md"), "--runs", str(tmp_path / "runs"), *long]
    run = tmp_path / "runs" / "ring8" / "seed0"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").is_file() and time.monotonic() < deadline:  # the training has begun
        time.sleep(0.05)
    proc.terminate()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and stderr.strip().splitlines()[-1].startswith("error: stopped by SIGTERM; each "
                                                                               "training saved a checkpoint")
    state = json.loads((run / quality.STATE).read_text())
    assert not state["done"] and state["wall"] > 0 and not (tmp_path / "results.md").exists()
    stopped = max(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    assert 0 < stopped < 2000

    again = subprocess.run(cmd + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    log = (run / "train.log").read_text()
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped:08d}'} (step {stopped}," in log
    assert table_row((tmp_path / "results.md").read_text(), "0")[1] == "2000"
    assert json.loads((run / quality.STATE).read_text())["wall"] > state["wall"]


def test_resume_trusts_only_a_state_of_the_same_command_and_config(tmp_path):
    job = quality.Job(config=REPO / "configs" / "ring8.yaml", seed=0, dir=tmp_path)
    command, config = ["train.py", "--config", str(job.config), "seed=0"], "abc"
    assert quality._resumable(job, command, config) == (None, "")  # nothing to resume, nothing to say
    good = {"command": command, "config": config, "wall": 12.5, "rows": [{"eval/hq": 90.0, "wall_s": 3.0}],
            "done": True, "drs": None}
    for state, why in [(good, ""), (good | {"config": "other"}, "configs/ring8.yaml's settings changed since"),
                       (good | {"command": command[:-1]}, "another command trained it"),
                       (good | {"wall": "12"}, "not one quality.py wrote"),
                       (good | {"rows": [{"eval/hq": 1}]}, "not one quality.py wrote"), ([good], "not one quality.py"),
                       ({k: v for k, v in good.items() if k != "done"}, "not one quality.py wrote"),
                       ('{"command": ', "does not parse")]:  # a torn file: a fresh training, no traceback
        (tmp_path / quality.STATE).write_text(state if isinstance(state, str) else json.dumps(state))
        kept, reason = quality._resumable(job, command, config)
        assert (kept == state if not why else kept is None and why in reason), (state, reason)


def test_resume_keeps_a_run_it_cannot_continue_aside(tmp_path, capsys):
    config = tmp_path / "ring8.yaml"
    config.write_text((REPO / "configs" / "ring8.yaml").read_text())
    job = quality.Job(config=config, seed=0, dir=tmp_path / "runs" / "seed0")
    job.dir.mkdir(parents=True)
    sets = ["train.steps=100", "eval.every=100", "model.hidden=8"]
    # A finished training of this very command, whose config was edited since.
    quality._save_state(job, quality._command(job, sets), quality._settings(config), done=True)
    earlier = '{"train/step": 9000, "eval/hq": 97.0}\n'
    (job.dir / "metrics.jsonl").write_text(earlier)
    config.write_text(config.read_text().replace("halflife_kimg: 5.0", "halflife_kimg: 10.0"))
    quality.train(job, sets, 1, threading.Event(), resume=True)
    # The edited config trains afresh, and the finished run it replaces is kept, with a line saying where and why.
    assert job.code == 0 and job.rows[-1]["train/step"] == 100 and not job.resumed
    assert (tmp_path / "runs" / "seed0.replaced" / "metrics.jsonl").read_text() == earlier
    assert (f"trains afresh ({config}'s settings changed since); the earlier run is kept in {job.dir}.replaced"
            in capsys.readouterr().out)


def test_a_config_comment_keeps_a_finished_training_and_a_changed_value_does_not(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("# pilot: 0.59\ntrain: {steps: 6000}\n")
    before = quality._settings(config)
    config.write_text("# pilot: 0.586 at step 6,000\ntrain:\n  steps: 6000\n")
    assert quality._settings(config) == before
    config.write_text("train: {steps: 6001}\n")
    assert quality._settings(config) != before
