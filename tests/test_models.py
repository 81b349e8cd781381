"""Tests for gan_dist.models: the DCGAN of seed 000 (Keras, MNIST), the MLP GAN of seed 001 (2-D points), and
Radford et al.'s DCGAN for 32x32 and 64x64 RGB.

Covers: shapes and ranges (G: (B, z) -> (B, 1, 28, 28) in [-1, 1]; D: images -> (B,) logits); trainable and
non-trainable parameter counts equal those of the seed's Keras models, computed here from the seed's layer list;
the intermediate feature-map sizes of Keras' 'same'-padded 5x5 (transposed) convolutions; Keras BatchNorm semantics
(eps 1e-3, moving average keeping 99% of the old value); LeakyReLU(0.2), Dropout(0.2) and D's conv -> LeakyReLU ->
BatchNorm order; glorot-uniform kernels with zero biases; `width` scaling the channel counts; the MLP's sizes and its
tanh / linear output.

Run from the repo root:

    . .venv/bin/activate && python -m pytest tests/test_models.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gan_dist.config import ModelConfig
from gan_dist.errors import UserError
from gan_dist.models import (
    ClassBatchNorm,
    DCGANDiscriminator,
    DCGANGenerator,
    MLPDiscriminator,
    MLPGenerator,
    MinibatchStd,
    build_models,
)

# ----------------------------------------------------------------------------------------------------------------
# Keras parameter counts, by hand from the layer lists of the seeds.


def dense(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def conv(k: int, c_in: int, c_out: int, bias: bool) -> int:  # Conv2D and Conv2DTranspose alike
    return k * k * c_in * c_out + (c_out if bias else 0)


def bn_trainable(c: int) -> int:  # gamma and beta; moving_mean / moving_variance are not trainable
    return 2 * c


def keras_dcgan_counts(z: int = 100, width: int = 64, channels: int = 1) -> dict[str, int]:
    """Seed 000's create_generator / create_discriminator, with 256/128/64 = 4w/2w/w and D's 64/128 = w/2w."""
    c = 4 * width
    g_trainable = (
        dense(z, 7 * 7 * c, bias=False)  # Dense(7*7*256, use_bias=False, input_shape=(100,))
        + bn_trainable(7 * 7 * c)  # BatchNormalization()
        + conv(5, c, c // 2, bias=False)  # Conv2DTranspose(128, (5, 5), strides 1, use_bias=False)
        + bn_trainable(c // 2)
        + conv(5, c // 2, c // 4, bias=False)  # Conv2DTranspose(64, (5, 5), strides 2, use_bias=False)
        + bn_trainable(c // 4)
        + conv(5, c // 4, channels, bias=False)  # Conv2DTranspose(1, (5, 5), strides 2, use_bias=False, tanh)
    )
    g_moving = 2 * (7 * 7 * c + c // 2 + c // 4)
    d_trainable = (
        conv(5, channels, width, bias=True)  # Conv2D(64, (5, 5), strides 2, input_shape=(28, 28, 1))
        + bn_trainable(width)
        + conv(5, width, 2 * width, bias=True)  # Conv2D(128, (5, 5), strides 2)
        + bn_trainable(2 * width)
        + dense(7 * 7 * 2 * width, 1)  # Flatten, Dropout(0.2), Dense(1, sigmoid)
    )
    d_moving = 2 * (width + 2 * width)
    return {"g": g_trainable, "g_moving": g_moving, "d": d_trainable, "d_moving": d_moving}


def trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def moving_stats(module: nn.Module) -> int:
    return sum(m.running_mean.numel() + m.running_var.numel() for m in module.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))


def dcgan(**kw) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="dcgan", **kw)
    return DCGANGenerator(cfg), DCGANDiscriminator(cfg)


# ----------------------------------------------------------------------------------------------------------------
# DCGAN


def test_keras_counts_of_the_seed_by_hand():
    # The familiar numbers of model.summary() for this architecture, as a check on the helper itself.
    counts = keras_dcgan_counts()
    assert counts["g"] == 1_254_400 + 25_088 + 819_200 + 256 + 204_800 + 128 + 1_600 == 2_305_472
    assert counts["d"] == 1_664 + 128 + 204_928 + 256 + 6_273 == 213_249


def test_dcgan_parameter_counts_equal_the_seed_keras_model():
    G, D = dcgan()
    counts = keras_dcgan_counts()
    assert trainable(G) == counts["g"]
    assert trainable(D) == counts["d"]
    assert moving_stats(G) == counts["g_moving"]
    assert moving_stats(D) == counts["d_moving"]


@pytest.mark.parametrize("width, z_dim, channels", [(8, 32, 1), (16, 100, 1), (4, 10, 3)])
def test_width_z_and_channels_scale_the_dcgan(width, z_dim, channels):
    G, D = dcgan(width=width, z_dim=z_dim, channels=channels)
    counts = keras_dcgan_counts(z=z_dim, width=width, channels=channels)
    assert trainable(G) == counts["g"] and trainable(D) == counts["d"]
    G_convs = [m for m in G.modules() if isinstance(m, (nn.ConvTranspose2d,))]
    D_convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in G_convs] == [2 * width, width, channels]
    assert G_convs[0].in_channels == 4 * width
    assert [m.out_channels for m in D_convs] == [width, 2 * width]
    z = torch.randn(3, z_dim)
    x = G(z)
    assert x.shape == (3, channels, 28, 28)
    assert D(x).shape == (3,)


@pytest.mark.parametrize("arch, side", [("dcgan", 28), ("radford", 32)])
def test_d_width_widens_d_alone(arch, side):
    G0, D0 = build_models(ModelConfig(arch=arch, width=8, resolution=side))
    G, D = build_models(ModelConfig(arch=arch, width=8, d_width=16, resolution=side))
    assert [p.shape for p in G.parameters()] == [p.shape for p in G0.parameters()]
    convs = [m.out_channels for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert convs[:2] == [16, 32] and trainable(D) > trainable(D0)
    assert D(G(torch.randn(3, 100))).shape == (3,)


def test_generator_maps_noise_to_images_in_range():
    G, _ = dcgan()
    for mode in (G.train, G.eval):
        mode()
        x = G(10 * torch.randn(4, 100))  # large noise: outputs saturate but must stay in [-1, 1]
        assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        assert x.std() > 0


def test_feature_map_sizes_follow_keras_same_padding():
    G, D = dcgan()
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
             for m in list(G.modules()) + list(D.modules()) if isinstance(m, (nn.ConvTranspose2d, nn.Conv2d))]
    x = G(torch.randn(2, 100))
    D(x)
    for h in hooks:
        h.remove()
    # G: Reshape((7, 7, 256)) -> 7x7x128 (stride 1) -> 14x14x64 -> 28x28x1; D: 14x14x64 -> 7x7x128
    assert shapes == [(128, 7, 7), (64, 14, 14), (1, 28, 28), (64, 14, 14), (128, 7, 7)]


def test_discriminator_returns_logits_of_shape_batch():
    _, D = dcgan()
    last = [m for m in D.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(3.0)
    out = D(torch.rand(5, 1, 28, 28) * 2 - 1)
    assert out.shape == (5,)
    # A sigmoid in the model would give 0.95; the seed's sigmoid lives in the loss instead.
    assert torch.allclose(out, torch.full((5,), 3.0))


def test_batchnorm_uses_keras_defaults():
    G, D = dcgan()
    bns = [m for m in list(G.modules()) + list(D.modules()) if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 5  # three in G, two in D, as in the seed
    for bn in bns:
        assert bn.eps == pytest.approx(1e-3)
        assert bn.momentum == pytest.approx(0.01)  # Keras momentum=0.99 is the weight of the OLD value
        assert bn.affine and bn.track_running_stats


def test_batchnorm_moving_average_keeps_99_percent_of_the_old_value():
    _, D = dcgan()
    bn = [m for m in D.modules() if isinstance(m, nn.BatchNorm2d)][0]
    seen = {}
    bn.register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0].detach().clone()))
    with torch.no_grad():
        bn.running_mean.fill_(1.0)
        D.train()(torch.randn(8, 1, 28, 28))
    batch_mean = seen["x"].mean(dim=(0, 2, 3))
    # Keras: moving_mean = moving_mean * 0.99 + batch_mean * 0.01
    assert torch.allclose(bn.running_mean, 0.99 * 1.0 + 0.01 * batch_mean, atol=1e-6)


def test_activations_dropout_and_discriminator_layer_order():
    G, D = dcgan()
    for module in (G, D):
        slopes = {m.negative_slope for m in module.modules() if isinstance(m, nn.LeakyReLU)}
        assert slopes == {0.2}
    dropouts = [m for m in D.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 1 and dropouts[0].p == pytest.approx(0.2)
    # Seed 000's D: Conv2D, LeakyReLU, BatchNormalization (activation before the norm), twice; Flatten, Dropout,
    # Dense. Compare the order of the layers that carry meaning.
    kinds = (nn.Conv2d, nn.LeakyReLU, nn.BatchNorm2d, nn.Flatten, nn.Dropout, nn.Linear)
    order = [type(m) for m in D.modules() if isinstance(m, kinds)]
    assert order == [nn.Conv2d, nn.LeakyReLU, nn.BatchNorm2d, nn.Conv2d, nn.LeakyReLU, nn.BatchNorm2d,
                     nn.Flatten, nn.Dropout, nn.Linear]
    # G ends in tanh (the seed's last Conv2DTranspose has activation='tanh')
    assert isinstance(list(G.modules())[-1], nn.Tanh)


def test_dropout_is_active_in_training_only():
    _, D = dcgan()
    x = torch.randn(4, 1, 28, 28)
    D.eval()
    assert torch.equal(D(x), D(x))
    D.train()
    torch.manual_seed(1)
    a = D(x)
    torch.manual_seed(2)
    b = D(x)
    assert not torch.allclose(a, b)


def _fans(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    k = m.kernel_size[0] * m.kernel_size[1]
    return k * m.in_channels, k * m.out_channels


@pytest.mark.parametrize("arch", ["dcgan", "mlp"])
def test_glorot_uniform_kernels_and_zero_biases(arch):
    torch.manual_seed(0)
    G, D = build_models(ModelConfig(arch=arch))
    layers = [m for net in (G, D) for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))]
    assert layers
    for m in layers:
        fan_in, fan_out = _fans(m)
        bound = math.sqrt(6 / (fan_in + fan_out))  # Keras glorot_uniform
        w = m.weight.detach().abs()
        assert w.max() <= bound * (1 + 1e-6)
        if w.numel() >= 100:  # enough draws to come close to the bound: not a different (narrower) initialiser
            assert w.max() > 0.9 * bound
        if m.bias is not None:
            assert torch.count_nonzero(m.bias) == 0


def test_build_models_dispatches_on_arch():
    G, D = build_models(ModelConfig(arch="dcgan", width=4, z_dim=8))
    assert isinstance(G, DCGANGenerator) and isinstance(D, DCGANDiscriminator)
    G, D = build_models(ModelConfig(arch="mlp", hidden=8, z_dim=8))
    assert isinstance(G, MLPGenerator) and isinstance(D, MLPDiscriminator)


# ----------------------------------------------------------------------------------------------------------------
# MLP (seed 001)


def test_mlp_sizes_equal_seed_001():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="mlp")
    G, D = MLPGenerator(cfg), MLPDiscriminator(cfg)
    # Generator: Dense(256, relu, input_shape=(100,)), Dense(2, tanh)
    assert [(m.in_features, m.out_features) for m in G.modules() if isinstance(m, nn.Linear)] == [(100, 256), (256, 2)]
    assert trainable(G) == dense(100, 256) + dense(256, 2)
    # Discriminator: Dense(256, relu, input_shape=(2,)), Dense(1, sigmoid) -> logits here
    assert [(m.in_features, m.out_features) for m in D.modules() if isinstance(m, nn.Linear)] == [(2, 256), (256, 1)]
    assert trainable(D) == dense(2, 256) + dense(256, 1)
    assert sum(isinstance(m, nn.ReLU) for m in G.modules()) == 1
    assert sum(isinstance(m, nn.ReLU) for m in D.modules()) == 1
    x = G(torch.randn(6, 100))
    assert x.shape == (6, 2)
    assert D(x).shape == (6,)


def test_mlp_depth_adds_hidden_layers():
    cfg = ModelConfig(arch="mlp", hidden=16, depth=3, z_dim=5)
    sizes = [(m.in_features, m.out_features) for m in MLPGenerator(cfg).modules() if isinstance(m, nn.Linear)]
    assert sizes == [(5, 16), (16, 16), (16, 16), (16, 2)]
    sizes = [(m.in_features, m.out_features) for m in MLPDiscriminator(cfg).modules() if isinstance(m, nn.Linear)]
    assert sizes == [(2, 16), (16, 16), (16, 16), (16, 1)]


def _force_output(G: nn.Module, value: float) -> None:
    last = [m for m in G.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(value)


def test_mlp_tanh_bounds_the_output():
    torch.manual_seed(0)
    G = MLPGenerator(ModelConfig(arch="mlp", out_act="tanh"))
    x = G(100 * torch.randn(64, 100))
    assert x.abs().max() <= 1
    _force_output(G, 5.0)
    assert torch.allclose(G(torch.randn(3, 100)), torch.full((3, 2), math.tanh(5.0)))


def test_mlp_linear_output_reaches_outside_unit_square():
    torch.manual_seed(0)
    G = MLPGenerator(ModelConfig(arch="mlp", out_act="none"))
    _force_output(G, 5.0)
    assert torch.allclose(G(torch.randn(3, 100)), torch.full((3, 2), 5.0))
    _force_output(G, -3.0)
    assert torch.allclose(G(torch.randn(3, 100)), torch.full((3, 2), -3.0))


def test_mlp_discriminator_returns_logits():
    D = MLPDiscriminator(ModelConfig(arch="mlp"))
    _force_output(D, -4.0)
    assert torch.allclose(D(torch.randn(7, 2)), torch.full((7,), -4.0))


# ----------------------------------------------------------------------------------------------------------------
# Image sizes beyond MNIST: the seed DCGAN at other sides, Radford et al.'s DCGAN at 32x32 and 64x64 RGB


@pytest.mark.parametrize("arch, side, channels", [("dcgan", 32, 3), ("dcgan", 64, 3), ("radford", 32, 3),
                                                  ("radford", 64, 3), ("radford", 16, 1)])
def test_image_models_follow_resolution_and_channels(arch, side, channels):
    G, D = build_models(ModelConfig(arch=arch, z_dim=16, width=8, resolution=side, channels=channels))
    fake = G(torch.randn(3, 16))
    assert fake.shape == (3, channels, side, side)
    assert fake.abs().max() <= 1
    assert D(fake).shape == (3,)


def test_radford_dcgan_64_has_the_published_layers_and_size():
    G, D = build_models(ModelConfig(arch="radford", z_dim=100, width=64, resolution=64, channels=3))
    # The sizes of the reference PyTorch DCGAN (ngf = ndf = 64, nz = 100, nc = 3).
    assert sum(p.numel() for p in G.parameters()) == 3_576_704
    assert sum(p.numel() for p in D.parameters()) == 2_765_568
    g_convs = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [m.out_channels for m in g_convs] == [512, 256, 128, 64, 3]
    assert all(m.kernel_size == (4, 4) for m in g_convs)
    d_convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in d_convs] == [64, 128, 256, 512, 1]
    # No BatchNorm on D's first layer; N(0, 0.02) conv weights.
    assert not isinstance(list(D.net)[1], nn.BatchNorm2d) and isinstance(list(D.net)[3], nn.BatchNorm2d)
    assert d_convs[1].weight.detach().std().item() == pytest.approx(0.02, rel=0.05)


# Class-conditional networks (model.cond) and a BatchNorm-free D (model.d_norm=none)


@pytest.mark.parametrize("arch, side", [("dcgan", 28), ("radford", 32), ("mlp", 28)])
def test_conditional_g_follows_its_label_and_d_adds_the_class_projection(arch, side):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, z_dim=8, width=8, resolution=side, hidden=16, cond=True, classes=4, dropout=0.0)
    G, D = build_models(cfg)
    G.eval(), D.eval()
    z = torch.randn(3, 8).repeat(2, 1)
    c = torch.tensor([0, 1, 2, 3, 3, 3])
    x = G(z, c)
    assert not torch.allclose(x[:3], x[3:])  # the same noise drawn for different classes differs
    with torch.no_grad():
        D.embed.weight.zero_()
    assert torch.equal(D(x, c), D(x))  # a zero class embedding leaves the unconditional logit
    with torch.no_grad():
        D.embed.weight[3].fill_(0.1)
    h = D.net[:-D.head](x).flatten(1)
    assert torch.allclose(D(x, c) - D(x), 0.1 * h.sum(1) * (c == 3), atol=1e-5)



@pytest.mark.parametrize("arch, side", [("dcgan", 28), ("radford", 32)])
def test_class_batchnorm_starts_as_batchnorm_and_then_scales_and_shifts_each_class_its_own_way(arch, side):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, z_dim=8, width=8, resolution=side, cond=True, cond_norm=True, classes=4)
    G, _ = build_models(cfg)
    norms = [m for m in G.modules() if isinstance(m, ClassBatchNorm)]
    assert norms and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine for m in G.modules())
    assert "embed.weight" not in G.state_dict()  # z alone is G's input: the label acts through the norms
    norm = norms[0]
    dims = 2 if isinstance(norm.bn, nn.BatchNorm1d) else 4
    x = torch.randn(6, norm.bn.num_features, *[3] * (dims - 2))
    c = torch.tensor([0, 1, 2, 3, 3, 3])
    plain = norm.bn(x)
    assert torch.allclose(norm(x, c), plain)  # untrained: the plain BatchNorm
    with torch.no_grad():
        norm.gain.weight[3].fill_(1.0)
        norm.bias.weight[1].fill_(0.5)
    out, shape = norm(x, c), (-1,) + (1,) * (dims - 1)
    want = plain * (1 + (c == 3).float().view(shape)) + 0.5 * (c == 1).float().view(shape)
    assert torch.allclose(out, want, atol=1e-6)
    G.eval()
    z = torch.randn(3, 8).repeat(2, 1)
    x = G(z, torch.tensor([1, 1, 1, 3, 3, 3]))
    assert not torch.allclose(x[:3], x[3:])  # through the first norm, the label now changes G's images

def test_conditional_g_counts_labels_into_class_frequencies():
    G, _ = build_models(ModelConfig(arch="mlp", z_dim=4, cond=True, classes=3))
    assert torch.allclose(G.class_freqs(), torch.full((3,), 1 / 3))
    G.count(torch.tensor([0, 2, 2, 2]))
    assert G.class_counts.tolist() == [1, 0, 3] and torch.allclose(G.class_freqs(), torch.tensor([0.25, 0, 0.75]))


@pytest.mark.parametrize("arch, side", [("dcgan", 28), ("radford", 32)])
def test_d_norm_none_leaves_no_batchnorm_and_keeps_each_logit_its_own(arch, side):
    torch.manual_seed(0)
    _, D = build_models(ModelConfig(arch=arch, width=8, resolution=side, d_norm="none", dropout=0.0))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in D.modules())
    x = torch.randn(4, 1, side, side)
    assert torch.allclose(D(x)[:1], D(x[:1]), atol=1e-6)  # no batch statistics couple the samples


@pytest.mark.parametrize("arch, side", [("dcgan", 28), ("radford", 32)])
def test_minibatch_std_lets_d_tell_a_varied_group_from_copies_of_one_image(arch, side):
    torch.manual_seed(0)
    _, D = build_models(ModelConfig(arch=arch, width=8, resolution=side, d_norm="none", dropout=0.0, mbstd_group=4))
    layer = next(m for m in D.modules() if isinstance(m, MinibatchStd))
    feats = []
    layer.register_forward_hook(lambda m, inp, out: feats.append(out[:, -1]))
    varied, copies = torch.randn(8, 1, side, side), torch.randn(1, 1, side, side).expand(8, -1, -1, -1)
    D(torch.cat([varied, copies]))
    std = feats[-1].flatten(1)
    assert (std[8:] < 1.01e-4).all()  # copies of one image: sqrt of the guard 1e-8 alone
    assert std[:8].min() > 5 * std[8:].max()  # a varied group stands out
    assert torch.equal(std, std[:, :1].expand_as(std))  # one value per sample, the same at every pixel
    assert torch.equal(std[:4, 0], std[:1, 0].expand(4)) and not torch.equal(std[0], std[4])  # one per group of 4
    # groups are consecutive samples: D's logits for a batch are those of its halves, however it is split
    x = torch.randn(8, 1, side, side)
    assert torch.allclose(D(x), torch.cat([D(x[:4]), D(x[4:])]), atol=1e-6)
    assert D(x[:3]).shape == (3,) and D(x[:1]).shape == (1,)  # a batch the group does not divide still works


def test_unconditional_weights_keep_their_names():
    # Exports and checkpoints written before model.cond load into the same unconditional networks.
    G, D = build_models(ModelConfig())
    assert "fc.0.weight" in G.state_dict() and "net.0.weight" in D.state_dict() and "embed.weight" not in D.state_dict()


def test_mlp_d_with_fourier_features_reads_sines_and_cosines_of_fixed_projections():
    torch.manual_seed(0)
    _, D = build_models(ModelConfig(arch="mlp", hidden=16, fourier_features=8, fourier_scale=10.0))
    freqs = D.state_dict()["inputs.freqs"]
    assert freqs.shape == (2, 8) and D.net[0].in_features == 16 and 5 < freqs.std().item() < 20
    x = torch.randn(4, 2)
    h = x @ freqs
    assert torch.allclose(D(x), D.net(torch.cat([h.sin(), h.cos()], 1)).squeeze(1))
    # Features of scale 10 vary over a few hundredths: a shift of 0.05 (one std of grid25's modes) is seen.
    assert not torch.allclose(D(x), D(x + 0.05), atol=1e-3)


def test_truncated_latents_are_the_normal_within_psi_redrawn_not_clipped():
    from gan_dist.models import latents

    psi = 0.7
    z = latents(200_000, 2, psi, torch.Generator().manual_seed(0)).double()
    assert z.abs().max() < psi and (z.abs() > 0.99 * psi).double().mean() < 0.01, "no mass piled up at +-psi"
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    mass = 2 * phi(psi) - 1
    var = 1 - 2 * psi * math.exp(-psi ** 2 / 2) / math.sqrt(2 * math.pi) / mass  # the truncated normal's variance
    assert abs(float(z.mean())) < 0.005 and abs(float(z.var()) - var) < 0.005
    inner = (2 * phi(psi / 2) - 1) / mass  # the share within psi / 2
    assert abs(float((z.abs() < psi / 2).double().mean()) - inner) < 0.005
    assert torch.equal(latents(5, 3, None, torch.Generator().manual_seed(1)),
                       torch.randn(5, 3, generator=torch.Generator().manual_seed(1))), "no truncation: plain randn"
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(UserError, match="must be a positive number of standard deviations"):
            latents(2, 2, bad)
