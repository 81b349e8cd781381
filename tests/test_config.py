"""Tests for gan_dist.config.load_config and the command-line error path of train.py.

Covers: the defaults reproduce seed 000's settings (z of 100, Adam 2e-4 with beta1 0.5, batch 128, label noise 0.05);
every YAML in configs/ loads and says what its header promises; key=value overrides win over the YAML; every
mistake a user can make on the command line (unknown key, wrong type, bad choice, missing file, a value outside its
range, NaN, a --config file that is not UTF-8 YAML or not a mapping) comes back as a UserError with code 2 whose
message names the key or file (a seeded fuzz over every key checks that nothing else escapes); and `python train.py
train.stepz=3` prints one `error:` line and exits with status 2 without a traceback and without importing torch.

Run from the repo root:

    . .venv/bin/activate && python -m pytest tests/test_config.py -q
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gan_dist.config import ABOVE_LOW, BELOW_HIGH, RANGES, Config, _all_keys, load_config, parse_args
from gan_dist.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def user_error(argv: list[str]) -> UserError:
    with pytest.raises(UserError) as info:
        load_config(argv)
    return info.value


# ----------------------------------------------------------------------------------------------------------------
# Defaults: seed 000 (Keras DCGAN on MNIST)


def test_defaults_are_seed_000_settings():
    cfg = load_config([])
    assert isinstance(cfg, Config)
    # generator input: np.random.normal(size=(batch_size, 100))
    assert cfg.model.arch == "dcgan" and cfg.model.z_dim == 100 and cfg.model.channels == 1
    # keras.optimizers.Adam(lr=0.0002, beta_1=0.5) for both networks; Keras' other Adam defaults
    assert cfg.optim.lr_G == pytest.approx(2e-4) and cfg.optim.lr_D == pytest.approx(2e-4)
    assert cfg.optim.beta1 == 0.5 and cfg.optim.beta2 == 0.999 and cfg.optim.eps == pytest.approx(1e-7)
    # train_gan(epochs=100, batch_size=128) over 60,000 images: 100 * (60000 // 128) = 46,800 steps
    assert cfg.train.batch_size == 128
    assert cfg.train.steps == 100 * (60000 // 128)
    # labels += 0.05 * np.random.rand(2 * batch_size)
    assert cfg.loss.label_noise == pytest.approx(0.05)
    # Dropout(0.2) before D's last layer
    assert cfg.model.dropout == pytest.approx(0.2)
    assert cfg.data.dataset == "mnist"


def test_load_config_returns_independent_objects():
    a = load_config([])
    a.train.steps = 7
    assert load_config([]).train.steps != 7


# ----------------------------------------------------------------------------------------------------------------
# The shipped YAML files


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    if "???" in path.read_text():  # configs for the user's own shards leave data.shards for the command line
        with pytest.raises(UserError, match="needs data.shards"):
            load_config(["--config", str(path)])
        cfg = load_config(["--config", str(path), "data.shards=/data/train-{00000..00009}.tar"])
        assert cfg.data.dataset == "webdataset" and cfg.model.arch == "radford"
        assert cfg.model.resolution == cfg.data.resolution == int(path.stem[-2:]) and cfg.model.channels == 3
    else:
        cfg = load_config(["--config", str(path)])
        assert cfg.model.arch == ("dcgan" if cfg.data.dataset in ("mnist", "stacked_mnist") else "mlp")
    assert cfg.run.dir == f"runs/{path.stem}", "each config writes to its own run directory"


PATH_KEYS = ("run.dir", "data.mnist_dir", "data.cache_dir", "data.shards", "data.manifest", "eval.classifier",
             "eval.inception")


@pytest.mark.parametrize("path", CONFIGS + sorted((REPO / "launch").glob("*.yaml")), ids=lambda p: p.name)
def test_user_facing_configs_name_no_path_outside_the_repository(path):
    """A clone anywhere runs them: relative paths inside the repository, never `..` or an absolute path (the tests
    pass their data location themselves)."""
    text = path.read_text()
    assert "../" not in text and "/work/" not in text and "shared/" not in text, path.name
    if path.parent.name == "configs":
        node = OmegaConf.load(path)
        for key in PATH_KEYS:
            value = OmegaConf.select(node, key, throw_on_missing=False)
            if isinstance(value, str) and value not in ("", "???"):
                assert not Path(value).is_absolute() and ".." not in Path(value).parts, f"{path.name}: {key}"


def test_shipped_configs_exist():
    assert {p.stem for p in CONFIGS} >= {"debug", "mnist_dcgan", "toy2d", "ring8", "grid25"}


def test_mnist_dcgan_yaml_matches_seed_000():
    cfg = load_config(["--config", str(REPO / "configs" / "mnist_dcgan.yaml")])
    assert (cfg.model.z_dim, cfg.model.width, cfg.train.batch_size, cfg.train.steps) == (100, 64, 128, 46800)
    assert (cfg.optim.lr_G, cfg.optim.lr_D, cfg.optim.beta1) == (2e-4, 2e-4, 0.5)
    assert cfg.loss.label_noise == 0.05


def test_toy2d_yaml_matches_seed_001():
    # seed 001: Dense(256, relu) -> Dense(2, tanh), z of 100, Adam(1e-4), batch 64, 10,000 epochs, N(0, I) target
    cfg = load_config(["--config", str(REPO / "configs" / "toy2d.yaml")])
    m = cfg.model
    assert (m.arch, m.z_dim, m.hidden, m.depth, m.out_act) == ("mlp", 100, 256, 1, "tanh")
    assert (cfg.optim.lr_G, cfg.optim.lr_D) == (1e-4, 1e-4)
    assert (cfg.train.batch_size, cfg.train.steps, cfg.data.dataset) == (64, 10000, "gaussian")


def test_yaml_values_override_defaults_and_keep_the_rest():
    cfg = load_config(["--config", str(REPO / "configs" / "debug.yaml")])
    assert (cfg.model.z_dim, cfg.model.width, cfg.train.steps, cfg.train.batch_size) == (32, 8, 40, 32)
    assert cfg.optim.lr_G == 2e-4, "keys the YAML does not mention keep their defaults"


def test_dotlist_overrides_win_over_yaml():
    cfg = load_config(["--config", str(REPO / "configs" / "debug.yaml"), "train.steps=7", "model.width=4",
                       "run.dir=/tmp/x", "wandb.mode=disabled"])
    assert (cfg.train.steps, cfg.model.width, cfg.run.dir, cfg.wandb.mode) == (7, 4, "/tmp/x", "disabled")
    assert cfg.train.batch_size == 32, "the YAML still applies to keys not overridden"


def test_later_override_wins_and_types_are_converted():
    cfg = load_config(["train.steps=3", "train.steps=4", "optim.lr_G=1e-3", "data.download=false",
                       "wandb.tags=[a,b]"])
    assert cfg.train.steps == 4
    assert cfg.optim.lr_G == pytest.approx(1e-3) and isinstance(cfg.optim.lr_G, float)
    assert cfg.data.download is False
    assert cfg.wandb.tags == ["a", "b"]


@pytest.mark.parametrize("argv", [
    ["wandb.mode=disabled", "--config", "configs/debug.yaml", "train.steps=7"],
    ["--wandb.mode=disabled", "--train.steps=7", "--config=configs/debug.yaml"],
    ["--wandb.mode", "disabled", "--config", "configs/debug.yaml", "--train.steps", "7"],
    ["train.steps=3", "--config", "configs/debug.yaml", "--wandb.mode=disabled", "train.steps=7"]],
    ids=["key=value around --config", "W&B's --key=value", "--key value", "the later value wins"])
def test_overrides_in_any_form_and_order_around_config(argv):
    cfg = load_config([a.replace("configs/", f"{REPO}/configs/") for a in argv])
    assert (cfg.train.steps, cfg.wandb.mode) == (7, "disabled")
    assert (cfg.model.width, cfg.train.batch_size) == (8, 32), "the YAML applies under every override"
    assert parse_args(["--data.shards", "pipe:curl -s https://host/a.tar?sig=x"]) == (
        None, ["data.shards=pipe:curl -s https://host/a.tar?sig=x"]), "a value holding '=' is still a value"


@pytest.mark.parametrize("argv, message", [
    (["--train.steps"], "--train.steps has no value; write --train.steps=VALUE"),
    (["--train.steps", "model.width=8"], "--train.steps has no value"),
    (["--train.steps", "--config", "x.yaml"], "--train.steps has no value"),
    (["--config", "a.yaml", "--config=b.yaml"], "--config is given twice (a.yaml and b.yaml)"),
    (["-v"], "override '-v' is not key=value"),
    (["--9lives=1"], "--9lives is neither --config nor a config key")])
def test_arguments_that_are_no_override_are_one_error(argv, message):
    err = user_error(argv)
    assert err.code == 2 and message in str(err)


# ----------------------------------------------------------------------------------------------------------------
# Mistakes: one-line UserErrors with code 2 that name the key


def test_unknown_key_suggests_the_closest_one():
    err = user_error(["train.stepz=3"])
    assert err.code == 2
    assert "train.stepz" in str(err)
    assert "did you mean 'train.steps'" in str(err)
    assert "\n" not in str(err)


def test_unknown_key_in_yaml_is_reported_too(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train: {batch_sise: 64}\n")
    err = user_error(["--config", str(path)])
    assert err.code == 2 and "train.batch_sise" in str(err) and "train.batch_size" in str(err)


def test_unknown_section_suggests_the_closest_section():
    err = user_error(["trian.steps=3"])
    assert err.code == 2 and "did you mean 'train'" in str(err)


@pytest.mark.parametrize("override, key", [
    ("train.steps=abc", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("model.width=2.5", "model.width"),
    ("optim.lr_G=fast", "optim.lr_G"),
    ("data.download=maybe", "data.download"),
])
def test_wrong_type_names_the_key(override, key):
    err = user_error([override])
    assert err.code == 2
    assert f"'{key}'" in str(err)
    assert "\n" not in str(err)


def test_wrong_type_in_yaml_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: many\n")
    err = user_error(["--config", str(path)])
    assert err.code == 2 and "'train.steps'" in str(err)


@pytest.mark.parametrize("override, key", [
    ("model.arch=x", "model.arch"),
    ("model.out_act=linear", "model.out_act"),
    ("data.dataset=cifar", "data.dataset"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("wandb.mode=maybe", "wandb.mode"),
])
def test_bad_choice_names_the_key_and_the_choices(override, key):
    err = user_error([override])
    assert err.code == 2
    assert f"'{key}'" in str(err)
    value = override.split("=", 1)[1]
    assert f"'{value}'" in str(err)


def test_bad_choice_lists_the_valid_choices():
    message = str(user_error(["model.arch=x"]))
    assert "dcgan" in message and "mlp" in message


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    err = user_error(["--config", str(missing)])
    assert err.code == 2 and str(missing) in str(err)


@pytest.mark.parametrize("override, key", [
    ("train.steps=0", "train.steps"),
    ("train.batch_size=-4", "train.batch_size"),
    ("ckpt.keep=0", "ckpt.keep"),
    ("model.z_dim=0", "model.z_dim"),
])
def test_non_positive_counts_are_rejected(override, key):
    err = user_error([override])
    assert err.code == 2 and f"'{key}'" in str(err)


def test_override_without_equals_sign():
    err = user_error(["train.steps"])
    assert err.code == 2 and "train.steps" in str(err)


def test_malformed_yaml_is_a_user_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: {steps: [1\n")
    err = user_error(["--config", str(path)])
    assert err.code == 2 and str(path) in str(err)


def test_yaml_that_is_not_a_mapping_is_a_user_error(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- train.steps=3\n")
    err = user_error(["--config", str(path)])
    assert err.code == 2 and str(path) in str(err)


@pytest.mark.parametrize("override, key", [
    ("data.num_workers=-1", "data.num_workers"),
    ("optim.lr_G=-0.001", "optim.lr_G"),
    ("optim.beta1=1.5", "optim.beta1"),
    ("loss.label_noise=-0.1", "loss.label_noise"),
    ("loss.n_critic=0", "loss.n_critic"),
    ("loss.r1_gamma=-1", "loss.r1_gamma"),
    ("loss.kind=wgan", "loss.kind"),
    ("optim.schedule=step", "optim.schedule"),
    ("loss.r2_gamma=-1", "loss.r2_gamma"),
    ("loss.topk_gamma=0", "loss.topk_gamma"),
    ("loss.topk_min=1.5", "loss.topk_min"),
    ("loss.gamma_end=2", "loss.gamma_end"),
    ("optim.lr_end=-0.1", "optim.lr_end"),
    ("model.d_norm=layer", "model.d_norm"),
    ("data.classes=-3", "data.classes"),
])
def test_values_torch_rejects_are_config_errors(override, key):
    err = user_error([override])
    assert err.code == 2 and f"'{key}'" in str(err)


def test_label_noise_with_a_margin_loss_names_the_fix():
    # The default label noise has no meaning for hinge, WGAN or relativistic losses: say so instead of ignoring it.
    for kind in ("hinge", "rpgan"):
        err = user_error([f"loss.kind={kind}"])
        assert err.code == 2 and "loss.label_noise=0" in str(err)
        assert load_config([f"loss.kind={kind}", "loss.label_noise=0"]).loss.kind == kind


def test_classes_default_to_the_datasets_own_and_conditional_shards_need_them():
    assert load_config([]).model.classes == load_config([]).data.classes == 10
    assert load_config(["data.dataset=grid25"]).model.classes == 25
    err = user_error(["data.dataset=webdataset", "data.shards=/x", "model.cond=true"])
    assert err.code == 2 and "data.classes" in str(err)
    shards = ["data.dataset=webdataset", "data.shards=/x", "model.cond=true", "data.classes=7"]
    assert load_config(shards).model.classes == 7
    err = user_error(["model.classes=3"])
    assert err.code == 2 and "set data.classes alone" in str(err)


def test_r2_is_a_gradient_penalty_that_compile_cannot_train():
    err = user_error(["perf.compile=true", "loss.r2_gamma=1"])
    assert err.code == 2 and "loss.r2_gamma" in str(err)


# ----------------------------------------------------------------------------------------------------------------
# train.py on the command line

# Runs train.py's main as `python train.py train.stepz=3` would, then reports whether torch got imported.
_PROBE = """
import runpy, sys
sys.argv = ["train.py", "train.stepz=3"]
try:
    runpy.run_path("train.py", run_name="__main__")
    code = 0
except SystemExit as e:
    code = e.code
print("torch imported:", "torch" in sys.modules, file=sys.stdout)
sys.exit(code)
"""


def test_train_py_config_error_exits_2_with_one_line():
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "train.py", "train.stepz=3"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and "train.steps" in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    # Config errors come back before torch is loaded (see the next test); generous bound for a slow CI machine.
    assert time.perf_counter() - start < 20


def test_train_py_config_error_does_not_import_torch():
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "torch imported: False" in proc.stdout


@pytest.mark.parametrize("overrides, message", [
    (["data.shards=/d/x.tar"], "set data.dataset=webdataset"),
    (["data.dataset=webdataset"], "needs data.shards"),
    (["model.channels=3"], "model.channels=3 differs from data.channels=1"),
    (["data.resolution=30"], "dcgan needs data.resolution divisible by 4"),
    (["model.arch=radford", "data.resolution=48"], "power of two"),
    (["data.mode=epochs"], "choose one of epoch, resampled"),
    (["data.channels=4"], "choose one of 1, 3"),
    (["data.on_error=ignore"], "choose one of warn, raise"),
    (["model.arch=mlp"], "model.arch=mlp draws 2-D points"),
    (["data.device_cache=yes", "data.mode=resampled"], "data.device_cache=true holds an image dataset read in epochs"),
    (["data.device_cache=true", "data.dataset=ring8", "model.arch=mlp"], "but data.dataset is 'ring8'"),
    (["data.device_cache=sometimes"], "choose one of auto, true, false"),
    (["model.arch=mlp", "data.dataset=ring8", "model.d_width=64"], "the mlp D has model.hidden units"),
    (["model.mbstd_group=1"], "model.mbstd_group=1: the minibatch standard deviation needs groups of at least 2"),
    (["model.arch=mlp", "data.dataset=ring8", "model.mbstd_group=4"], "and an image D"),
    (["aug.kind=diffaug", "aug.policy=color,flip"], "aug.policy='color,flip' names 'flip'; choose from color, "
                                                     "translation, cutout, comma-joined"),
    (["aug.kind=diffaug", "aug.policy=color,,cutout"], "names ''; choose from"),
    (["aug.kind=ada", "data.dataset=ring8", "model.arch=mlp"], "aug.kind=ada augments images"),
    (["aug.kind=random"], "choose one of none, diffaug, ada"),
    (["data.limit=100", "data.dataset=ring8", "model.arch=mlp"], "data.limit=100 trains on a fixed subset"),
    (["data.limit=100", "data.mode=resampled"], "and data.mode 'resampled'; use data.limit=0"),
])
def test_bad_data_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(UserError, match=message) as err:
        load_config(overrides)
    assert err.value.code == 2


def test_device_cache_takes_yaml_booleans(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("data: {device_cache: false}\n")
    assert load_config(["--config", str(yaml_file)]).data.device_cache is False
    assert load_config(["data.device_cache=True"]).data.device_cache is True
    assert load_config(["data.device_cache=auto"]).data.device_cache == "auto"


def test_image_size_follows_data_and_shards_take_lists(tmp_path):
    cfg = load_config(["data.channels=3", "data.resolution=32"])
    assert (cfg.model.channels, cfg.model.resolution) == (3, 32)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("data:\n  dataset: webdataset\n  shards:\n    - /a/train-{0..3}.tar\n"
                         "    - pipe:cat /b/x.tar\n")
    assert load_config(["--config", str(yaml_file)]).data.shards == "/a/train-{0..3}.tar::pipe:cat /b/x.tar"
    assert load_config(["data.dataset=webdataset", "data.shards=/a/train-{00000..00004}.tar"]).data.shards == \
        "/a/train-{00000..00004}.tar"


@pytest.mark.parametrize("key", ["dist.timeout_s", "dist.stop_check_every"])
def test_dist_settings_must_be_positive(key):
    with pytest.raises(UserError, match=f"config key '{key}' must be at least 1"):
        load_config([f"{key}=0"])
    assert load_config(["dist.requeue=false"]).dist.requeue is False


# ----------------------------------------------------------------------------------------------------------------
# Ranges and unreadable files: every value a user can type gets a config or one error line, never a traceback


@pytest.mark.parametrize("key", sorted(RANGES))
def test_every_ranged_key_refuses_values_past_either_end(key):
    low, high = RANGES[key]
    as_int = isinstance(OmegaConf.select(OmegaConf.structured(Config), key), int)
    past = [low - 1 if as_int else low - 0.5, high + 1 if as_int else high * 2 + 1]
    if key in ABOVE_LOW:
        past.append(low)
    if key in BELOW_HIGH:
        past.append(high)
    for value in past:
        err = user_error([f"{key}={value}"])
        assert err.code == 2 and f"config key '{key}' must be" in str(err), (value, str(err))
    for value in ((low, high) if not (key in ABOVE_LOW or key in BELOW_HIGH) else ()):
        load_config([f"{key}={value}"])


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_floats_must_be_finite(value):
    err = user_error([f"ema.halflife_kimg={value}"])
    assert err.code == 2 and "config key 'ema.halflife_kimg' must be a finite number" in str(err)


def test_random_values_for_every_key_are_a_config_or_a_user_error():
    """A seeded fuzz over every key: typos, huge and negative numbers, wrong types, YAML syntax."""
    rng = random.Random(0)
    keys = [k for k in _all_keys(OmegaConf.structured(Config)) if "." in k]
    junk = ["-1", "0", "1e309", "99999999999999999999999", "-0.0", "nan", "", "null", "[1, 2]", "{a: 1}", "x y",
            "'", "${oc.env:HOME}", "${nope}", "true", "3.5", "\\xff", "~", "!!python/object/apply:os.system [ls]"]
    for _ in range(150):
        argv = [f"{rng.choice(keys)}={rng.choice(junk)}" for _ in range(rng.randint(1, 3))]
        try:
            load_config(argv)
        except UserError as err:
            assert err.code == 2, argv


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe\x00t\x00r\x00a\x00i\x00n", "is not UTF-8 text"),
    (b"train: {steps: 5}\n\x00\x01\x02", "is not valid YAML"),
    (b"[" * 5000, "is not valid YAML"),
    (b"!!python/object/apply:os.system ['touch PWNED']\n", "is not valid YAML"),
    (b"train: !!python/object/apply:os.system ['touch PWNED']\n", "is not valid YAML"),
    (b"42\n", "must hold a mapping"),
    (b"train: {steps: ${oc.env:NO_SUCH_VARIABLE_HERE}}\n", "config"),
])
def test_unreadable_config_files_are_one_error(tmp_path, monkeypatch, content, message):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    err = user_error(["--config", str(path)])
    assert err.code == 2 and str(path) in str(err) + str(path) and message in str(err), str(err)
    assert not (tmp_path / "PWNED").exists()
    assert "is not a file" in str(user_error(["--config", str(tmp_path)]))


def test_train_py_with_a_config_that_is_not_utf8_exits_2_with_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train: {steps: 5}  # été\n".encode("latin-1"))
    proc = subprocess.run([sys.executable, "train.py", "--config", str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: config file '{path}' is not UTF-8 text; pass a YAML file"]
