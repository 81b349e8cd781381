"""Tests for gan_dist.classifier (the MNIST feature network of the image metrics) and scripts/train_classifier.py.

Run from the repo root:

    . .venv/bin/activate && python -m pytest tests/test_classifier.py -q

Nothing here trains the full classifier (about a minute on 2 cores): one short run on a 3,000-image subset, shared by
the module, stands in for a trained model, and the script tests replace training with a stub. The evaluation's
cache of reference statistics, keyed by the classifier and the data, is tested here too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from runs import MNIST

from gan_dist import classifier
from gan_dist.classifier import (
    ARCH,
    DEFAULT_PATH,
    FEATURE_DIM,
    MnistNet,
    ensure_classifier,
    load_classifier,
    prepare_images,
    save_classifier,
    train_classifier,
)
from gan_dist.errors import UserError
from gan_dist.mnist import load_mnist

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained() -> tuple[MnistNet, float]:
    """A classifier trained briefly on a subset; what a real one is for these tests, at a few seconds' cost."""
    return train_classifier(MNIST, epochs=2, seed=0, limit=3000, test_limit=2000)


@pytest.fixture(scope="module")
def test_images() -> torch.Tensor:
    images, _ = load_mnist(MNIST)["test"]
    return prepare_images(images[:64])


def _payload_offset(path: Path) -> int:
    """Where tensor data starts in a safetensors file: after the 8-byte header length and the JSON header."""
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + header_len


def _tensor_span(path: Path, key: str) -> tuple[int, int]:
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    start, stop = json.loads(raw[8:8 + header_len])[key]["data_offsets"]
    return 8 + header_len + start, 8 + header_len + stop


def test_short_training_learns_and_leaves_global_rng_alone(trained):
    model, accuracy = trained
    # 2 epochs on 3,000 images: far above chance (0.1), though short of a full run's 99%.
    assert accuracy > 0.8
    assert not model.training

    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    train_classifier(MNIST, epochs=1, seed=5, limit=256, test_limit=100)
    assert torch.equal(torch.rand(3), expected), "training must not reset the caller's global RNG"


def test_training_is_deterministic_per_seed():
    a, acc_a = train_classifier(MNIST, epochs=1, seed=3, limit=512, test_limit=200)
    b, acc_b = train_classifier(MNIST, epochs=1, seed=3, limit=512, test_limit=200)
    c, _ = train_classifier(MNIST, epochs=1, seed=4, limit=512, test_limit=200)
    assert acc_a == acc_b
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["head.weight"], sc["head.weight"])


def test_prepare_images_scales_to_generator_range():
    images = torch.tensor([[[0, 255], [128, 64]]], dtype=torch.uint8)
    x = prepare_images(images.numpy())
    assert x.shape == (1, 1, 2, 2) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0


def test_features_shape_and_independent_of_batching(trained, test_images):
    model, _ = trained
    with torch.no_grad():
        batch = model.features(test_images)
        singles = torch.cat([model.features(test_images[i:i + 1]) for i in range(len(test_images))])
        logits = model(test_images)
    assert batch.shape == (64, FEATURE_DIM) == (64, 128)
    assert logits.shape == (64, 10)
    assert (batch >= 0).all(), "features are taken after the last ReLU"
    assert batch.std(0).gt(0).sum() > FEATURE_DIM // 2, "a trained net uses most feature dimensions"
    torch.testing.assert_close(singles, batch, rtol=0, atol=1e-5)
    # The logits are a function of the features alone (dropout is off in eval mode).
    with torch.no_grad():
        torch.testing.assert_close(model.head(batch), logits, rtol=0, atol=1e-5)
        assert torch.equal(model.features(test_images), batch), "eval mode is deterministic"


def test_save_load_round_trip_is_bit_identical(trained, test_images, tmp_path):
    model, accuracy = trained
    path = tmp_path / "nested" / "clf.safetensors"
    assert save_classifier(model, accuracy, path) == path
    assert [p.name for p in path.parent.iterdir()] == ["clf.safetensors"], "no temp file left behind"

    loaded, loaded_accuracy = load_classifier(path)
    assert isinstance(loaded, MnistNet) and not loaded.training
    assert loaded_accuracy == float(f"{accuracy:.4f}")
    with torch.no_grad():
        assert torch.equal(loaded(test_images), model(test_images))
        assert torch.equal(loaded.features(test_images), model.features(test_images))

    # The metadata follows the documented format: sha256 over the raw tensor bytes in sorted key order.
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        digest = hashlib.sha256()
        for key in sorted(f.keys()):
            digest.update(f.get_tensor(key).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    assert metadata == {"accuracy": f"{accuracy:.4f}", "arch": "MnistNet/1", "sha256_of_weights": digest.hexdigest()}
    # Permissions follow the umask like any file the user writes (safetensors' own save_file makes it 0600).
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def _assert_retrain_message(excinfo, path):
    message = str(excinfo.value)
    assert "\n" not in message
    assert str(path) in message
    assert "delete" in message
    assert "scripts/train_classifier.py" in message
    return message


def test_flipped_weight_byte_is_detected(trained, tmp_path):
    model, accuracy = trained
    path = save_classifier(model, accuracy, tmp_path / "clf.safetensors")
    start, stop = _tensor_span(path, "head.weight")
    raw = bytearray(path.read_bytes())
    raw[(start + stop) // 2] ^= 0x01  # the lowest mantissa bit of one weight: a tiny, silent change
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError) as excinfo:
        load_classifier(path)
    assert "checksum" in _assert_retrain_message(excinfo, path)


def test_wrong_arch_tag_is_refused(trained, tmp_path):
    model, accuracy = trained
    good = save_classifier(model, accuracy, tmp_path / "good.safetensors")
    with safe_open(str(good), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    path = tmp_path / "old.safetensors"
    save_file(tensors, str(path), metadata=metadata | {"arch": "MnistNet/0"})  # checksum still right
    with pytest.raises(UserError) as excinfo:
        load_classifier(path)
    message = _assert_retrain_message(excinfo, path)
    assert "MnistNet/0" in message and ARCH in message


def test_missing_tensor_with_valid_checksum_is_refused(trained, tmp_path):
    model, _ = trained
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != "head.bias"}
    metadata = {"accuracy": "0.9900", "arch": ARCH, "sha256_of_weights": classifier._weights_sha256(tensors)}
    path = tmp_path / "partial.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(UserError) as excinfo:
        load_classifier(path)
    assert "head.bias" in _assert_retrain_message(excinfo, path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_file_is_refused(trained, tmp_path, damage):
    model, accuracy = trained
    path = save_classifier(model, accuracy, tmp_path / "clf.safetensors")
    raw = path.read_bytes()
    path.write_bytes({"truncated": raw[: _payload_offset(path) + 100], "garbage": b"not a model" * 10,
                      "empty": b""}[damage])
    with pytest.raises(UserError) as excinfo:
        load_classifier(path)
    _assert_retrain_message(excinfo, path)


def test_missing_file_says_how_to_train(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(UserError) as excinfo:
        load_classifier(path)
    message = str(excinfo.value)
    assert f"python scripts/train_classifier.py --mnist-dir DIR --out {path}" in message
    assert "does not exist" in message
    with pytest.raises(UserError):
        ensure_classifier(path, MNIST, train_if_missing=False)
    assert not path.exists()


def test_ensure_classifier_loads_existing_without_training(trained, tmp_path, monkeypatch, capsys):
    model, accuracy = trained
    path = save_classifier(model, accuracy, tmp_path / "clf.safetensors")

    def no_training(*args, **kwargs):
        raise AssertionError("ensure_classifier retrained although the file exists")

    monkeypatch.setattr(classifier, "train_classifier", no_training)
    loaded, loaded_accuracy = ensure_classifier(path, MNIST)
    assert loaded_accuracy == float(f"{accuracy:.4f}")
    assert not loaded.training
    assert capsys.readouterr().err == ""


def test_ensure_classifier_trains_and_caches_once(trained, tmp_path, monkeypatch, capsys):
    model, accuracy = trained
    calls = []

    def fake_training(mnist_dir, **kwargs):
        calls.append(Path(mnist_dir))
        return model, accuracy

    monkeypatch.setattr(classifier, "train_classifier", fake_training)
    path = tmp_path / "cache" / "clf.safetensors"
    _, first_accuracy = ensure_classifier(path, MNIST)
    _, second_accuracy = ensure_classifier(path, MNIST)
    assert calls == [MNIST]
    assert path.is_file()
    assert first_accuracy == accuracy and second_accuracy == float(f"{accuracy:.4f}")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "training the evaluation classifier" in lines[0] and str(path) in lines[0]


def test_ensure_classifier_never_replaces_a_damaged_file(tmp_path, monkeypatch):
    path = tmp_path / "clf.safetensors"
    path.write_bytes(b"junk")
    monkeypatch.setattr(classifier, "train_classifier", lambda *a, **k: pytest.fail("must not retrain"))
    with pytest.raises(UserError):
        ensure_classifier(path, MNIST)
    assert path.read_bytes() == b"junk"


def test_default_path():
    assert DEFAULT_PATH == "data/classifier/mnist_cnn.safetensors"


# --- scripts/train_classifier.py ---------------------------------------------------------------------------------


@pytest.fixture
def script():
    spec = importlib.util.spec_from_file_location("train_classifier_script", ROOT / "scripts" / "train_classifier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stub_training(script, monkeypatch, model, accuracy):
    seen = {}

    def fake(mnist_dir, epochs, seed, progress):
        seen.update(mnist_dir=Path(mnist_dir), epochs=epochs, seed=seed)
        return model, accuracy

    monkeypatch.setattr(script, "train_classifier", fake)
    return seen


def test_script_writes_an_accurate_model(script, trained, tmp_path, monkeypatch, capsys):
    model, _ = trained
    seen = _stub_training(script, monkeypatch, model, 0.9934)
    out = tmp_path / "clf.safetensors"
    assert script.main(["--mnist-dir", str(MNIST), "--out", str(out), "--epochs", "4", "--seed", "7"]) == 0
    assert seen == {"mnist_dir": MNIST, "epochs": 4, "seed": 7}
    printed = capsys.readouterr().out
    assert "0.9934" in printed and str(out) in printed
    assert load_classifier(out)[1] == 0.9934


def test_script_refuses_an_inaccurate_model_unless_forced(script, trained, tmp_path, monkeypatch, capsys):
    model, _ = trained
    _stub_training(script, monkeypatch, model, 0.9812)
    out = tmp_path / "clf.safetensors"
    assert script.main(["--mnist-dir", str(MNIST), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "0.9812" in err and "0.99" in err and "--force" in err
    assert not out.exists()

    assert script.main(["--mnist-dir", str(MNIST), "--out", str(out), "--force"]) == 0
    assert load_classifier(out)[1] == 0.9812


def test_script_reports_user_errors_with_exit_code_2(script, tmp_path, capsys):
    missing = tmp_path / "no-mnist-here"
    assert script.main(["--mnist-dir", str(missing), "--out", str(tmp_path / "clf.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and "Traceback" not in err
    assert script.main(["--mnist-dir", str(MNIST), "--epochs", "0", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--epochs" in capsys.readouterr().err


def test_loading_does_not_draw_from_the_global_rng(tmp_path):
    """A run that loads the classifier after restoring its RNG must draw the same noise as one that never does."""
    from gan_dist.classifier import MnistNet, load_classifier, save_classifier

    path = tmp_path / "net.safetensors"
    save_classifier(MnistNet(), 0.5, path)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_classifier(path)
    assert torch.equal(torch.rand(3), expected)


def test_reference_statistics_are_keyed_by_the_classifier_and_the_data(trained, tmp_path, capsys):
    """The cached training-set statistics and floors belong to one classifier file and one MNIST copy: another
    dataset or a retrained classifier gets its own, and a damaged cache is rebuilt with a warning."""
    from test_mnist import make_mnist

    from gan_dist.evaluation import _reference

    model, accuracy = trained
    clf = save_classifier(model, accuracy, tmp_path / "clf.safetensors")
    a, b = tmp_path / "a", tmp_path / "b"
    make_mnist(a, n_train=300, n_test=100, seed=0)
    make_mnist(b, n_train=300, n_test=100, seed=1)
    caches = lambda: sorted(tmp_path.glob("clf.reference-*.safetensors"))  # noqa: E731

    ref_a = _reference(model, clf, str(a), 500)
    (cache_a,) = caches()
    written = cache_a.stat().st_mtime_ns
    assert torch.equal(_reference(model, clf, str(a), 500)["mu"], ref_a["mu"])
    assert cache_a.stat().st_mtime_ns == written, "the cache was reused, not rebuilt"

    ref_b = _reference(model, clf, str(b), 500)
    assert len(caches()) == 2 and not torch.equal(ref_b["mu"], ref_a["mu"]), "other data, other statistics"

    cache_a.write_bytes(cache_a.read_bytes()[:100])
    assert torch.equal(_reference(model, clf, str(a), 500)["mu"], ref_a["mu"])
    assert f"the evaluation cache {cache_a} is damaged or stale; rebuilding it" in capsys.readouterr().err

    retrained, _ = train_classifier(MNIST, epochs=1, seed=1, limit=500, test_limit=200)
    save_classifier(retrained, 0.5, clf)
    ref_new = _reference(retrained, clf, str(a), 500)
    assert len(caches()) == 3 and not torch.equal(ref_new["mu"], ref_a["mu"]), "another classifier, its own cache"
