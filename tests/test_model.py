"""STT-UNET: presets, shapes, parameter counts, the discriminator and the losses of Eq. 4."""

import math

import pytest
import torch
from torch import nn

from stt_model.build import build_discriminator, build_model
from stt_model.config import ConfigError, load_config, presets
from stt_model.losses import (
    discriminator_loss,
    fgbg_objective,
    generator_loss,
    segmentation_loss,
    straight_through_binary,
)
from stt_model.nets import InterpolationNet


def _parameters(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name, out", [("mitoem-r", 2), ("mitoem-h", 2), ("lucchi", 1), ("tiny-cpu", 2)])
def test_presets_build_with_the_documented_outputs(name, out):
    cfg = load_config(name)
    assert cfg.name == name and cfg.model.out_channels == out
    model = build_model(name)
    assert len(model.encoder_sst) == 4 and len(model.up) == 3
    sst = [type(m).__name__ for m in [*model.encoder_sst, *model.decoder_sst]]
    expected = sum(cfg.model.sst_levels) + sum(cfg.model.sst_levels[:3])
    assert sst.count("SSTAttention") == expected


def test_paper_settings():
    for name in ("mitoem-r", "mitoem-h", "lucchi"):
        cfg = load_config(name)
        assert cfg.data.patch == [32, 320, 320]
        assert (cfg.train.batch_size, cfg.train.lr, cfg.train.iterations) == (2, 1e-4, 200_000)
        assert cfg.loss.adversarial_weight == 0.5
        assert all(cfg.model.sst_levels) and cfg.model.fusion == "deformable" and cfg.model.order == "split"


def test_parameter_counts_are_stable():
    """Counts pin the architecture: a change to a block shows up here."""
    counts = {name: _parameters(build_model(name)) for name in presets()}
    assert counts["mitoem-r"] == counts["mitoem-h"]
    baseline = build_model({"base": "mitoem-r", "model": {"sst_levels": [False] * 4}})
    assert _parameters(baseline) < counts["mitoem-r"]
    assert counts["tiny-cpu"] < 200_000 < counts["mitoem-r"]


def test_tiny_forward_backward_shapes():
    model = build_model("tiny-cpu")
    x = torch.randn(1, 1, 4, 32, 32)
    logits = model(x)
    assert logits.shape == (1, 2, 4, 32, 32)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_input_downsample_runs_the_unet_on_pooled_input_and_upsamples_its_logits():
    torch.manual_seed(0)
    cfg = {"base": "tiny-cpu", "model": {"input_downsample": [1, 2, 2]}}
    model = build_model(cfg)
    x = torch.rand(2, 1, 4, 32, 48, requires_grad=True)
    logits = model(x)
    assert logits.shape == (2, 2, 4, 32, 48)
    coarse = model._unet(torch.nn.functional.avg_pool3d(x, (1, 2, 2)))
    assert coarse.shape == (2, 2, 4, 16, 24)
    # Bilinear in (H, W) between coarse voxel centres: the fine voxel (2i, 2j) lies a quarter
    # step before coarse (i, j) on both axes, so its weights are 9/16, 3/16, 3/16, 1/16.
    expected = (
        9 * coarse[..., 1:, 1:] + 3 * coarse[..., :-1, 1:] + 3 * coarse[..., 1:, :-1] + coarse[..., :-1, :-1]
    ) / 16
    torch.testing.assert_close(logits[..., 2::2, 2::2], expected)
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_refinement_starts_as_the_identity_then_learns_at_full_resolution():
    torch.manual_seed(0)
    coarse = {"input_downsample": [2, 2, 2], "norm": "group", "interpolation": "none"}
    plain = build_model({"base": "tiny-cpu", "model": coarse})
    refined = build_model({"base": "tiny-cpu", "model": {**coarse, "refine_channels": 5}})
    missing, unexpected = refined.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(key.startswith("refine.") for key in missing)
    x = torch.rand(2, 1, 4, 32, 48)
    torch.testing.assert_close(refined(x), plain(x))
    refined(x).square().sum().backward()
    correction = refined.refine.correction
    assert correction.weight.grad.abs().sum() > 0 and correction.bias.grad.abs().sum() > 0
    with torch.no_grad():
        correction.weight.normal_()
    # Pooling 2x2x2 gives the 8 voxels of a cell one gradient; the refinement tells them apart.
    x = torch.rand(1, 1, 4, 32, 48, requires_grad=True)
    for model, cell_is_one in ((plain, True), (refined, False)):
        (grad,) = torch.autograd.grad(model(x)[0, 0, 1, 17, 21], x)
        cell = grad[0, 0, 0:2, 16:18, 20:22].flatten()
        assert torch.allclose(cell, cell[0].expand(8), rtol=1e-4, atol=1e-7) == cell_is_one


def test_input_size_errors():
    model = build_model("tiny-cpu")
    with pytest.raises(ValueError, match=r"\(T, H, W\) divisible by \(1, 8, 8\); got \(4, 30, 32\)"):
        model(torch.randn(1, 1, 4, 30, 32))
    coarse = build_model({"base": "tiny-cpu", "model": {"input_downsample": [2, 2, 2]}})
    with pytest.raises(ValueError, match=r"divisible by \(2, 16, 16\); got \(4, 32, 24\)"):
        coarse(torch.randn(1, 1, 4, 32, 24))
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        model(torch.randn(1, 4, 32, 32))


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key in train: train.learning_rate"):
        load_config({"base": "tiny-cpu", "train": {"learning_rate": 1}})
    with pytest.raises(ConfigError, match=r"model.heads\[1\] \(5\) must divide model.channels\[1\] \(12\)"):
        load_config({"base": "tiny-cpu", "model": {"heads": [2, 5, 2, 4]}})
    with pytest.raises(ConfigError, match="model.fusion must be one of"):
        load_config({"base": "tiny-cpu", "model": {"fusion": "sum"}})
    with pytest.raises(ConfigError, match=r"data.patch must be divisible by \[1, 8, 8\].*got \[8, 60, 64\]"):
        load_config({"base": "tiny-cpu", "data": {"patch": [8, 60, 64]}})
    with pytest.raises(
        ConfigError, match=r"data.patch must be divisible by \[1, 16, 16\].*input_downsample \[1, 2, 2\]"
    ):
        load_config({"base": "tiny-cpu", "model": {"input_downsample": [1, 2, 2]}, "data": {"patch": [8, 72, 64]}})
    with pytest.raises(ConfigError, match=r"model.input_downsample \(H\) must be >= 1"):
        load_config({"base": "tiny-cpu", "model": {"input_downsample": [1, 0, 2]}})
    with pytest.raises(ConfigError, match=r"model.input_downsample must be \[T, H, W\] factors"):
        load_config({"base": "tiny-cpu", "model": {"input_downsample": [2, 2]}})
    with pytest.raises(ConfigError, match=r"model.refine_channels refines .*\[1, 1, 1\]"):
        load_config({"base": "tiny-cpu", "model": {"refine_channels": 4}})
    with pytest.raises(ConfigError, match="model.refine_channels must be >= 0"):
        load_config({"base": "tiny-cpu", "model": {"input_downsample": [1, 2, 2], "refine_channels": -1}})
    with pytest.raises(ConfigError, match="train.batch_size must be an integer"):
        load_config({"base": "tiny-cpu", "train": {"batch_size": 2.5}})
    path = tmp_path / "mine.yaml"
    path.write_text("base: lucchi\ntrain:\n  iterations: 10\n")
    assert load_config(path).train.iterations == 10
    path.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown config 'tiny'"):
        load_config("tiny")


def test_config_round_trips_through_a_dict():
    cfg = load_config("mitoem-h")
    assert load_config(cfg.to_dict()) == cfg


def test_fgbg_objective_by_hand():
    real, fake = torch.tensor([0.0, 2.0]), torch.tensor([-1.0, 0.0])
    d_real = [0.5, 1 / (1 + math.exp(-2))]
    d_fake = [1 / (1 + math.exp(1)), 0.5]
    expected = (
        sum(math.log(d) for d in d_real) / 2
        + sum(math.log(1 - d) for d in d_fake) / 2
        + 0.3 * (sum(d_real) / 2 - sum(d_fake) / 2)
    )
    assert fgbg_objective(real, fake, 0.3).item() == pytest.approx(expected, rel=1e-6)
    assert discriminator_loss(real, fake, 0.3).item() == pytest.approx(-expected, rel=1e-6)


def test_generator_loss_by_hand():
    real, fake = torch.tensor([0.0, 2.0]), torch.tensor([-1.0, 0.0])
    d_fake = [1 / (1 + math.exp(1)), 0.5]
    expected = -(sum(math.log(d) for d in d_fake) / 2 + 0.3 * sum(d_fake) / 2)
    assert generator_loss(None, fake, 0.3).item() == pytest.approx(expected, rel=1e-6)
    assert generator_loss(real, fake, 0.3, "minimax").item() == pytest.approx(fgbg_objective(real, fake, 0.3).item())
    with pytest.raises(ValueError, match="objective must be 'non_saturating' or 'minimax'; got 'wgan'"):
        generator_loss(real, fake, 0.3, "wgan")


@pytest.mark.parametrize("objective", ["non_saturating", "minimax"])
def test_adversarial_gradient_pushes_predictions_towards_real(objective):
    """Descending the generator loss raises D(F_pr): the segmentation side of the game."""
    fake = torch.tensor([-0.5], requires_grad=True)
    generator_loss(torch.tensor([1.0]), fake, 1.0, objective).backward()
    assert fake.grad.item() < 0


def test_straight_through_binary_is_a_threshold_forward_and_the_identity_backward():
    prob = torch.tensor([0.1, 0.5, 0.49, 0.93], requires_grad=True)
    hard = straight_through_binary(prob)
    assert hard.tolist() == [0.0, 1.0, 0.0, 1.0]
    hard.backward(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    assert prob.grad.tolist() == [1.0, -2.0, 3.0, 0.5]


def test_non_saturating_gradient_fades_once_the_discriminator_is_fooled():
    """Eq. 4's own term keeps growing as D(F_pr) -> 1; the non-saturating one vanishes."""
    grads = {}
    for objective in ("non_saturating", "minimax"):
        fake = torch.tensor([6.0], requires_grad=True)  # D(F_pr) = 0.9975: fooled
        generator_loss(torch.tensor([1.0]), fake, 0.0, objective).backward()
        grads[objective] = fake.grad.abs().item()
    assert grads["non_saturating"] < 0.01 < 0.9 < grads["minimax"]


def test_discriminator_shapes_and_thin_volumes():
    disc = build_discriminator("tiny-cpu")
    image = torch.randn(3, 1, 1, 16, 16)
    assert disc(image, torch.rand_like(image)).shape == (3,)
    assert disc(torch.randn(2, 1, 8, 16, 16), torch.rand(2, 1, 8, 16, 16)).shape == (2,)
    patch = build_discriminator({"base": "tiny-cpu", "loss": {"discriminator_output": "patch"}})
    assert patch(image, torch.rand_like(image)).shape == (3, 1, 4, 4)
    assert patch(torch.randn(2, 1, 7, 17, 16), torch.rand(2, 1, 7, 17, 16)).shape == (2, 2, 5, 4)
    with pytest.raises(ValueError, match="loss.discriminator_output must be one of"):
        build_discriminator({"base": "tiny-cpu", "loss": {"discriminator_output": "pixel"}})


def test_patch_discriminator_judges_locally():
    """A change of the mask at voxel (0, 0, 0) moves only the verdict whose receptive field
    covers it: two stride-2 3x3x3 convolutions map voxel 0 to position 0 alone."""
    torch.manual_seed(0)
    patch = build_discriminator({"base": "tiny-cpu", "loss": {"discriminator_output": "patch"}})
    image, mask = torch.randn(1, 1, 8, 16, 16), (torch.rand(1, 1, 8, 16, 16) > 0.5).float()
    flipped = mask.clone()
    flipped[..., 0, 0, 0] = 1 - flipped[..., 0, 0, 0]
    moved = (patch(image, flipped) - patch(image, mask)).abs()[0] > 0
    assert moved[0, 0, 0] and moved.sum() == 1


def test_segmentation_loss_by_hand():
    logits = torch.zeros(1, 2, 1, 1, 2)
    target = torch.tensor([[[[[1.0, 0.0]]], [[[1.0, 0.0]]]]])
    # BCE at logit 0 is log 2 for either label; the contour positive counts pos_weight times.
    expected = math.log(2) + (3 * math.log(2) + math.log(2)) / 2
    assert segmentation_loss(logits, target, contour_pos_weight=3.0).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="target must have the shape of logits"):
        segmentation_loss(logits, target[:, :1])


def test_interpolation_restores_a_smooth_volume_and_borders():
    net = InterpolationNet(kernel=3, blend=1.0)
    ramp = torch.linspace(0, 1, 5).view(1, 1, 5, 1, 1).expand(1, 1, 5, 6, 6).contiguous()
    # A fresh network averages its neighbourhoods: interior slices of a linear ramp come back.
    restored = net(ramp)
    torch.testing.assert_close(restored[:, :, 1:-1, 1:-1, 1:-1], ramp[:, :, 1:-1, 1:-1, 1:-1], rtol=1e-5, atol=1e-5)
    assert net(torch.randn(2, 1, 1, 8, 8)).shape == (2, 1, 1, 8, 8)
    loss = net.restoration_loss(torch.randn(1, 1, 4, 8, 8))
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())


def test_frozen_interpolation_is_not_trained():
    model = build_model({"base": "tiny-cpu", "model": {"interpolation": "frozen"}})
    model.train()
    assert not model.interpolation.training
    assert not any(p.requires_grad for p in model.interpolation.parameters())


@pytest.mark.parametrize("kernel, stride, padding", [((3, 3, 3), 1, 1), ((1, 3, 3), (1, 2, 2), (0, 1, 1)), (1, 1, 0)])
def test_conv3d_batch_of_one_takes_onednn_and_matches_nn_conv3d(kernel, stride, padding):
    from stt_model.nets.conv import Conv3d

    torch.manual_seed(0)
    ours = Conv3d(5, 7, kernel, stride=stride, padding=padding, bias=True)
    plain = nn.Conv3d(5, 7, kernel, stride=stride, padding=padding, bias=True)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(1, 5, 3, 17, 23).to(memory_format=torch.channels_last_3d).requires_grad_()
    with torch.profiler.profile() as prof:
        y = ours(x)
    if torch.backends.mkldnn.is_available() and kernel != 1:  # PyTorch keeps 1x1 single-threaded off oneDNN
        assert any(e.name == "aten::mkldnn_convolution" for e in prof.events())
    expected = plain(x)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, ours.weight, ours.bias), g)
    want = torch.autograd.grad(expected, (x, plain.weight, plain.bias), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_group_norm_on_channels_last_input_matches_nn_group_norm_and_keeps_the_layout():
    from stt_model.nets.blocks import GroupNorm3d

    torch.manual_seed(0)
    ours, plain = GroupNorm3d(3, 12), nn.GroupNorm(3, 12)
    with torch.no_grad():
        for p in (ours, plain):
            p.weight.copy_(torch.linspace(0.5, 2.0, 12))
            p.bias.copy_(torch.linspace(-1.0, 1.0, 12))
    x = torch.randn(2, 12, 3, 5, 7).contiguous(memory_format=torch.channels_last_3d)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = ours(x1), plain(x2)
    assert y1.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(y1, y2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(ours.weight.grad, plain.weight.grad)
    torch.testing.assert_close(ours.bias.grad, plain.bias.grad)
