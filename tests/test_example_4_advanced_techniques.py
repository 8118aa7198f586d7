"""Tests for Example 4: attention, receptive fields, TTA, dense CRF, losses, morphology, export,
main().

Each test checks behaviour against an independent truth: shapes and identities that hold by
construction, hand-computed loss values, closed-form receptive fields measured by gradients, an
exact N x N CRF, and a real end-to-end run that writes only under tmp_path.
"""

import copy
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import load_script, run_script
from PIL import Image

SCRIPT = "example_4_advanced_techniques/advanced_segmentation.py"


@pytest.fixture(scope="module")
def mod():
    return load_script(SCRIPT)


@pytest.fixture(autouse=True)
def one_thread():
    """Run torch on one thread (faster when a CI CPU is shared), then restore its count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def logits_from_probs(probs):
    """Logits whose softmax is exactly `probs` (N, C, H, W)."""
    return torch.log(torch.as_tensor(probs, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


def test_cbam_and_position_attention_keep_shapes(mod):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 7, 9)
    assert mod.CBAM(16, 4)(x).shape == x.shape
    assert mod.ChannelAttention(16, 4)(x).shape == (2, 16, 1, 1)
    assert mod.SpatialAttention()(x).shape == (2, 1, 7, 9)
    block = mod.PositionAttention(16, 8)
    assert block(x).shape == x.shape
    attention = block.attention_map(x)
    assert attention.shape == (2, 63, 63)
    assert torch.allclose(attention.sum(-1), torch.ones(2, 63), atol=1e-5)  # rows are softmaxes


def test_position_attention_with_gamma_zero_is_identity(mod):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 6, 5)
    block = mod.PositionAttention(16, 8)
    assert block.gamma.item() == 0.0  # initialised at 0, as in DANet
    assert torch.equal(block(x), x)
    with torch.no_grad():
        block.gamma.fill_(0.5)
    assert not torch.allclose(block(x), x)  # and it does something once gamma moves


def test_cbam_channel_attention_uses_shared_mlp_on_avg_and_max(mod):
    torch.manual_seed(0)
    x = torch.randn(1, 8, 5, 5)
    channel = mod.ChannelAttention(8, 2)
    expected = torch.sigmoid(
        channel.mlp(x.mean((2, 3), keepdim=True)) + channel.mlp(x.amax((2, 3), keepdim=True))
    )
    assert torch.allclose(channel(x), expected)


# ----------------------------------------------------------------------------------------------
# Receptive field
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layers, expected",
    [
        ([(3, 1, 1)] * 3, 7),
        ([(3, 1, 2)] * 3, 13),
        ([(3, 1, 1), (3, 1, 2), (3, 1, 5)], 17),
        ([(3, 2, 1), (3, 1, 1), (3, 2, 1), (3, 1, 2)], 27),
        ([(7, 2, 1), (3, 1, 3), (5, 1, 1)], 27),
    ],
)
def test_receptive_field_formula_matches_gradient(mod, layers, expected):
    assert mod.receptive_field(layers) == expected  # hand-computed
    grad = mod.gradient_receptive_field(layers, size=97)
    assert mod.extent(grad) == expected
    assert mod.extent(grad.T) == expected  # square in both directions


@pytest.mark.parametrize(
    "layers",
    [
        [(3, 1, 1)] * 3,
        [(3, 1, 1), (3, 1, 2), (3, 1, 5)],
        [(3, 2, 1), (3, 1, 1), (3, 2, 1), (3, 1, 2)],
    ],
)
def test_walking_a_conv_stack_backwards_gives_the_formula(mod, layers):
    path = [("conv", k, s, d, d * (k - 1) // 2) for k, s, d in layers]
    low, high = mod.receptive_interval(path, 10)
    assert high - low + 1 == mod.receptive_field(layers)
    grad = mod.gradient_receptive_field(layers, size=97)  # output 48 (stride 1) or 12 (stride 4)
    columns = np.flatnonzero(grad.sum(0) > 0)
    out_index = 97 // 2 if all(s == 1 for _, s, _ in layers) else (97 // 4) // 2
    assert (columns[0], columns[-1]) == mod.receptive_interval(path, out_index)


def test_real_model_receptive_field_is_its_measured_gradient_extent(mod):
    """Encoder and decoder, walked along the model's own modules, against the real gradient."""
    torch.manual_seed(0)
    for dilations, widths in (((1, 2, 5), {95, 99}), ((1, 1, 1), {55, 59})):
        model = mod.DilatedAttentionNet(width=4, dilations=dilations)
        walked, measured = [], []
        for index in range(64, 68):  # four phases of the two bilinear x2 upsamplings
            walked.append(mod.receptive_interval(model.layer_path(), index))
            measured.append(mod.measured_receptive_interval(model, 128, index))
        assert walked == measured
        assert {high - low + 1 for low, high in measured} == widths
    # the encoder alone is the old, too small "83 px"
    result = mod.model_receptive_field(mod.DilatedAttentionNet(width=4))
    assert result["encoder_formula_px"] == 83 and result["walked_px"] == [95, 99]
    assert result["walked_equals_measured"] and not result["whole_image"]


def input_pixels_reaching_the_centre(model):
    """(128, 128) bool: input pixels with a gradient on output pixel (64, 64), conv weights made
    positive averages and a positive input: no ReLU, cancellation or saturated sigmoid hides one."""
    with torch.no_grad():
        for conv in [m for m in model.modules() if isinstance(m, nn.Conv2d)]:
            conv.weight.abs_().div_(conv.weight.sum(dim=(1, 2, 3), keepdim=True))
    x = (torch.rand(1, 3, 128, 128) + 0.1).requires_grad_(True)
    model.eval()(x)[0, :, 64, 64].sum().backward()
    return (x.grad[0].abs().sum(0) > 0).numpy()


@pytest.mark.parametrize("attention", [dict(cbam=True), dict(position_attention=True)])
def test_attention_makes_every_input_pixel_reach_every_output(mod, attention):
    torch.manual_seed(0)
    model = mod.DilatedAttentionNet(width=4, **attention)
    if "position_attention" in attention:
        with torch.no_grad():
            model.position.gamma.fill_(1.0)  # at gamma = 0 the block is the identity
    assert mod.receptive_interval(model.layer_path(), 64) is None  # "global"
    assert input_pixels_reaching_the_centre(model).all()  # the corners too, 64 px away
    plain = input_pixels_reaching_the_centre(mod.DilatedAttentionNet(width=4))
    assert not plain[0, 0] and plain[64, 64]  # without attention the corner is out of reach


def test_gridding_leaves_holes_that_hybrid_rates_fill(mod):
    def holes(rates):
        grad = mod.gradient_receptive_field([(3, 1, r) for r in rates], size=41)
        rf = mod.receptive_field([(3, 1, r) for r in rates])
        box = grad[20 - rf // 2 : 20 + rf // 2 + 1, 20 - rf // 2 : 20 + rf // 2 + 1]
        return int((box == 0).sum())

    assert holes((2, 2, 2)) > 0  # only even offsets are ever reached
    assert holes((1, 2, 5)) == 0


def test_gridding_report_counts_the_holes_of_each_dilation_schedule(mod, capsys):
    results = mod.gridding_report()
    assert {name: r["formula"] for name, r in results.items()} == {
        "rates 1,1,1": 7,  # 1 + 3 * 2
        "rates 2,2,2 (gridding)": 13,  # 1 + 3 * 4
        "rates 1,2,5 (hybrid)": 17,  # 1 + 2 * (1 + 2 + 5)
    }
    assert all(r["measured"] == r["formula"] for r in results.values())
    # rates 2, 2, 2 reach only even offsets: of the 13 x 13 square, 13^2 - 7^2 = 120 pixels
    assert results["rates 2,2,2 (gridding)"]["holes_inside_rf"] == 13**2 - 7**2
    assert results["rates 1,2,5 (hybrid)"]["holes_inside_rf"] == 0
    assert "120 holes" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Test-time augmentation
# ----------------------------------------------------------------------------------------------


def symmetric_conv(channels_in=3, classes=4):
    """A 3x3 conv whose kernels are invariant under flips and quarter turns: commutes with them."""
    torch.manual_seed(0)
    conv = nn.Conv2d(channels_in, classes, 3, padding=1)
    a, b, c = torch.randn(3, classes, channels_in)
    kernel = torch.empty(classes, channels_in, 3, 3)
    kernel[:, :, 1, 1] = a
    kernel[:, :, [0, 1, 1, 2], [1, 0, 2, 1]] = b[..., None]  # the four edge neighbours
    kernel[:, :, [0, 0, 2, 2], [0, 2, 0, 2]] = c[..., None]  # the four corners
    with torch.no_grad():
        conv.weight.copy_(kernel)
    return conv


@pytest.mark.parametrize("shape", [(2, 3, 12, 12), (1, 3, 10, 17)])
def test_tta_equals_plain_prediction_for_a_symmetric_model(mod, shape):
    model = symmetric_conv()
    images = torch.rand(*shape)
    plain = model(images).softmax(1)
    tta = mod.tta_predict(model, images, scales=(1.0,), flips=True, rot90=True)
    assert tta.shape == plain.shape
    assert torch.allclose(tta, plain, atol=1e-6)


def test_tta_differs_for_a_model_that_is_not_symmetric(mod):
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 3, padding=1)  # random kernels: not flip invariant
    images = torch.rand(1, 3, 12, 12)
    tta = mod.tta_predict(model, images, scales=(1.0,))
    assert not torch.allclose(tta, model(images).softmax(1), atol=1e-3)


def test_each_tta_transform_is_inverted_exactly(mod):
    x = torch.randn(2, 4, 5, 7)  # not square: rotations change the shape
    transforms = mod.tta_transforms(flips=True, rot90=True)
    assert len(transforms) == 8 and len(set(transforms)) == 8
    for k, flip in transforms:
        y = mod.apply_transform(x, k, flip)
        assert torch.equal(mod.invert_transform(y, k, flip), x)
    outputs = {mod.apply_transform(x, k, f).flatten().numpy().tobytes() for k, f in transforms}
    assert len(outputs) == 8  # and they are 8 different transforms


def test_tta_multiscale_returns_input_size_probabilities(mod):
    model = symmetric_conv()
    images = torch.rand(2, 3, 15, 22)
    probs = mod.tta_predict(model, images, scales=(0.75, 1.0, 1.25))
    assert probs.shape == (2, 4, 15, 22)
    assert torch.allclose(probs.sum(1), torch.ones(2, 15, 22), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Dense CRF
# ----------------------------------------------------------------------------------------------


def two_region_problem(seed=0, size=32, correct_p=0.6, flip_fraction=0.3):
    """Left half dark, right half bright (a clean edge); labels 0 / 1; a noisy unary."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), dtype=np.int64)
    labels[:, size // 2 :] = 1
    image = np.where(labels[None] == 1, 0.8, 0.2) * np.ones((3, size, size))
    image = image + rng.normal(0, 0.02, image.shape)
    p_true = np.where(rng.random((size, size)) < flip_fraction, 1 - correct_p, correct_p)
    p1 = np.where(labels == 1, p_true, 1 - p_true)
    probs = torch.from_numpy(np.stack([1 - p1, p1])).float()  # (2, H, W)
    return probs, torch.from_numpy(image).float(), torch.from_numpy(labels)


def test_crf_with_zero_pairwise_weight_returns_the_unary_softmax(mod):
    probs, image, _ = two_region_problem()
    params = dict(mod.CRF_PARAMS, smooth_weight=0.0, app_weight=0.0)
    assert torch.allclose(mod.dense_crf(probs, image, params), probs, atol=1e-6)
    assert torch.allclose(mod.dense_crf_exact(probs, image, params), probs, atol=1e-6)


def test_crf_cleans_a_noisy_unary_along_a_clean_edge(mod):
    probs, image, labels = two_region_problem()
    before = mod.score_labels(probs.argmax(0)[None], labels[None])["miou"]
    after_q = mod.dense_crf(probs, image, mod.CRF_PARAMS)
    after = mod.score_labels(after_q.argmax(0)[None], labels[None])["miou"]
    assert before < 0.6
    assert after > 0.95
    assert torch.allclose(after_q.sum(0), torch.ones(32, 32), atol=1e-5)


def test_lattice_filter_is_close_to_the_exact_gaussian_filter(mod):
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 255, (6, 8, 3)).repeat(5, 0).repeat(5, 1)  # 30 x 40 blocks of colour
    values = rng.random((30 * 40, 3)).astype(np.float32)
    for features in (mod.crf_features(image, 3.0), mod.crf_features(image, 8.0, 13.0)):
        lattice = mod.permutohedral_lattice(features)
        f = torch.from_numpy(features)
        kernel = torch.exp(-torch.cdist(f, f).square() / 2).numpy()
        ones = np.ones((len(values), 1), np.float32)
        approx = mod.lattice_filter(lattice, values) / mod.lattice_filter(lattice, ones)
        exact = (kernel @ values) / (kernel @ ones)
        assert np.abs(approx - exact).mean() / np.abs(exact).mean() < 0.03  # normalised: ~1% off


def test_lattice_crf_agrees_with_exact_crf(mod):
    probs, image, _ = two_region_problem(seed=3, size=24, correct_p=0.55)
    params = dict(smooth_sxy=2.0, smooth_weight=2.0, app_sxy=6.0, app_srgb=20.0, app_weight=3.0)
    exact = mod.dense_crf_exact(probs, image, params)
    approx = mod.dense_crf(probs, image, params)
    assert (exact.argmax(0) == approx.argmax(0)).float().mean() > 0.97
    assert (exact - approx).abs().mean() < 0.05


# ----------------------------------------------------------------------------------------------
# Losses and metrics
# ----------------------------------------------------------------------------------------------


def test_focal_with_gamma_zero_equals_cross_entropy_ignoring_255(mod):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 6, 7)
    target = torch.randint(0, 5, (2, 6, 7))
    target[0, :2] = 255
    expected = F.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(mod.focal_loss(logits, target, gamma=0.0), expected, atol=1e-6)
    assert mod.focal_loss(logits, target, gamma=2.0) < expected  # easy pixels are down-weighted


def test_focal_hand_case(mod):
    logits = logits_from_probs([[[[0.8]], [[0.2]]]]).float()  # one pixel, p(class 0) = 0.8
    target = torch.zeros(1, 1, 1, dtype=torch.long)
    assert mod.focal_loss(logits, target, gamma=2.0).item() == pytest.approx(
        -(0.2**2) * math.log(0.8), rel=1e-5
    )
    alpha = torch.tensor([0.25, 0.75])
    assert mod.focal_loss(logits, target, gamma=2.0, alpha=alpha).item() == pytest.approx(
        -0.25 * 0.2**2 * math.log(0.8), rel=1e-5
    )


def test_dice_and_lovasz_are_zero_on_a_perfect_prediction(mod):
    target = torch.randint(0, 3, (2, 8, 8))
    target[1, 0] = 255
    logits = 50.0 * F.one_hot(torch.where(target == 255, 0, target), 3).permute(0, 3, 1, 2).float()
    assert mod.soft_dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)
    assert mod.lovasz_softmax(logits, target).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_and_lovasz_hand_cases(mod):
    # two pixels, labels [0, 1]; p(class 0) = [0.9, 0.3], p(class 1) = [0.1, 0.7]
    probs = torch.tensor([[0.9, 0.3], [0.1, 0.7]])[None, :, None, :]  # (1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    logits = logits_from_probs(probs).float()
    # Dice: class 0: 2 * 0.9 / (1.2 + 1) ; class 1: 2 * 0.7 / (0.8 + 1)
    expected_dice = 1 - (1.8 / 2.2 + 1.4 / 1.8) / 2
    assert mod.soft_dice_loss(logits, target).item() == pytest.approx(expected_dice, abs=1e-5)
    # Lovasz (worked by hand): class 0 -> 0.2, class 1 -> 0.3, mean 0.25
    assert mod.lovasz_softmax(logits, target).item() == pytest.approx(0.25, abs=1e-5)
    # one class only, errors 0.2 and 0.4: the Lovasz extension is their mean, 0.3
    logits = logits_from_probs(torch.tensor([[0.8, 0.6], [0.2, 0.4]])[None, :, None, :]).float()
    assert mod.lovasz_softmax(logits, torch.tensor([[[0, 0]]])).item() == pytest.approx(
        0.3, abs=1e-5
    )
    # a 255 pixel changes nothing
    logits3 = logits_from_probs(
        torch.tensor([[0.8, 0.6, 0.01], [0.2, 0.4, 0.99]])[None, :, None, :]
    ).float()
    assert mod.lovasz_softmax(logits3, torch.tensor([[[0, 0, 255]]])).item() == pytest.approx(
        0.3, abs=1e-5
    )


def test_losses_with_only_ignored_pixels_still_backpropagate(mod):
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), 255)
    weights = torch.ones(1, 4, 4)
    loss = mod.mixed_loss(
        logits, target, weights, dict(ohem=1.0, boundary_ce=1.0, dice=1.0, lovasz=1.0, focal=1.0)
    )
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_ohem_keeps_hard_pixels_at_least_min_kept_and_never_255(mod):
    # 100 pixels: p(true) = 0.01, 0.02, ..., 1.00 (class 0 of 2); 10 of the hardest are 255
    p = torch.linspace(0.01, 1.0, 100).view(1, 1, 10, 10)
    logits = logits_from_probs(torch.cat([p, 1 - p], 1).clamp(min=1e-6)).float()
    target = torch.zeros(1, 10, 10, dtype=torch.long)
    target.view(-1)[:10] = 255  # the 10 hardest pixels are ignored
    keep = mod.ohem_mask(logits, target, threshold=0.7, min_kept=5)
    assert not keep.view(-1)[:10].any()
    assert keep.sum() == 60  # p in 0.11 .. 0.70: under the threshold
    keep = mod.ohem_mask(logits, target, threshold=0.3, min_kept=40)
    assert keep.sum() == 40  # only 20 under 0.3, so the 40 hardest valid pixels
    assert keep.view(-1)[10:50].all()
    # the loss is the mean cross-entropy over the kept pixels, whatever the logits at 255 pixels
    ce = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    expected = ce.view(-1)[10:50].mean()
    loss = mod.ohem_cross_entropy(logits, target, threshold=0.3, min_kept=40)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    logits2 = logits.clone()
    logits2.view(1, 2, -1)[:, :, :10] = torch.tensor([[-9.0], [9.0]])
    assert mod.ohem_cross_entropy(logits2, target, 0.3, 40).item() == pytest.approx(
        loss.item(), rel=1e-6
    )


def test_boundary_weighted_ce_with_unit_weights_is_cross_entropy(mod):
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 5)
    target = torch.randint(0, 4, (2, 5, 5))
    target[0, 0] = 255
    expected = F.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(
        mod.boundary_weighted_ce(logits, target, torch.ones(2, 5, 5)), expected, atol=1e-6
    )
    doubled = mod.boundary_weighted_ce(logits, target, torch.full((2, 5, 5), 2.0))
    assert torch.allclose(doubled, 2 * expected, atol=1e-6)


def test_unet_weight_map_is_high_between_close_objects(mod, isolated):
    isolated(mod, UNET_W0=10.0, UNET_SIGMA=5.0)
    labels = np.zeros((20, 30), dtype=np.int64)
    labels[5:15, 5:12] = 1
    labels[5:15, 14:21] = 2  # a 2-px gap at columns 12, 13
    weights = mod.unet_weight_map(labels, np.ones(3))
    gap, far = weights[10, 12], weights[10, 28]
    assert gap == pytest.approx(1 + 10 * math.exp(-((1 + 2) ** 2) / 50), rel=1e-4)  # d1 = 1, d2 = 2
    assert far < gap and weights[10, 8] == 1.0  # object pixels keep their class weight


def test_iou_nan_rule_and_mean(mod):
    # class 2 is absent from prediction and truth: NaN, left out of the mean
    pred = torch.tensor([0, 0, 1, 1])
    target = torch.tensor([0, 1, 1, 255])
    metrics = mod.metrics_from_confusion(mod.confusion_matrix(pred, target, 3))
    iou = metrics["iou"]
    assert iou[0].item() == pytest.approx(1 / 2) and iou[1].item() == pytest.approx(1 / 2)
    assert math.isnan(iou[2].item())
    assert metrics["miou"] == pytest.approx(0.5)


def test_boundary_f1(mod, isolated):
    isolated(mod, BOUNDARY_TOLERANCE=2)
    target = np.zeros((30, 30), dtype=np.int64)
    target[8:22, 8:22] = 1
    same = mod.boundary_f1(mod.boundary_counts(target, target, 2))
    assert np.allclose(same[1], 1.0)
    shifted = np.roll(target, 1, axis=1)  # one pixel off: within the tolerance
    assert np.allclose(mod.boundary_f1(mod.boundary_counts(shifted, target, 2))[1], 1.0)
    far = np.roll(target, 6, axis=1)
    assert mod.boundary_f1(mod.boundary_counts(far, target, 2))[1] < 0.6
    empty = mod.boundary_f1(mod.boundary_counts(np.zeros_like(target), np.zeros_like(target), 2))
    assert np.isnan(empty).all()  # no boundary of any class anywhere: undefined


# ----------------------------------------------------------------------------------------------
# Morphology
# ----------------------------------------------------------------------------------------------


def test_morphology_removes_small_components_and_keeps_the_rest(mod):
    labels = np.zeros((20, 20), dtype=np.int64)
    labels[2:4, 2:4] = 2  # 4 px: under the limit
    labels[10:15, 10:15] = 2  # 25 px: kept
    labels[0, 10:20] = 3  # another class: untouched
    cleaned = mod.morphological_cleanup(labels, {2: dict(min_size=5)})
    assert (cleaned[2:4, 2:4] == 0).all()  # takes the surrounding label
    assert (cleaned[10:15, 10:15] == 2).all()
    assert (cleaned[0, 10:20] == 3).all()
    assert (cleaned == 2).sum() == 25


def test_morphology_opening_and_hole_filling(mod):
    labels = np.zeros((20, 20), dtype=np.int64)
    labels[3:13, 3:13] = 1
    labels[7, 7] = 0  # a hole
    labels[15, 0:20] = 1  # a 1-px line: an opening of radius 1 deletes it
    cleaned = mod.morphological_cleanup(labels, {1: dict(open=1, fill_holes=True)})
    assert cleaned[7, 7] == 1
    assert (cleaned[15] == 0).all()
    assert cleaned[8, 8] == 1


def test_morphology_grows_only_into_background(mod):
    labels = np.zeros((20, 20), dtype=np.int64)
    labels[3:17, 3:17] = 1  # a field ...
    labels[10, :] = 3  # ... crossed by a 1-px wire
    labels[6, 6] = 5  # ... with a 1-px gem lying on it
    labels[13, 13] = 0  # and a real 1-px hole
    cleaned = mod.morphological_cleanup(labels, {1: dict(close=1, fill_holes=True)})
    assert (cleaned[10] == 3).all() and cleaned[6, 6] == 5
    assert cleaned[13, 13] == 1


def test_morphology_leaves_a_region_on_the_image_edge_whole(mod):
    labels = np.zeros((20, 20), dtype=np.int64)
    labels[:, :8] = 1  # a field that fills the left edge (and the top and bottom rows)
    labels[5, 3] = 0  # with a 1-px hole
    cleaned = mod.morphological_cleanup(labels, {1: dict(open=1, close=1)})
    expected = labels.copy()
    expected[5, 3] = 1  # the closing fills the hole ...
    assert np.array_equal(cleaned, expected)  # ... and the edge pixels stay (border_value=1)


def test_morphology_opening_removes_a_spur_for_good(mod):
    """Pixels the opening takes from class 1 go to other classes, never back to class 1."""
    labels = np.zeros((20, 24), dtype=np.int64)
    labels[5:15, 5:15] = 1  # a square ...
    labels[9, 15:20] = 1  # ... with a 1-px spur sticking out to the right
    labels[12:18, 15:20] = 3  # and a region of class 3 near the spur's lower side
    cleaned = mod.morphological_cleanup(labels, {1: dict(open=1)})
    # the opening keeps the spur's first pixel (9, 15) (the square's edge dilated back) and
    # cuts off the rest; the nearest pixel that kept its label is class 1 (the old rule's
    # choice, which grew the spur straight back), the nearest of another class is background
    assert (cleaned[9, 16:20] == 0).all()
    assert (cleaned[12:18, 15:20] == 3).all()  # the other class is untouched
    assert (cleaned[6:14, 6:14] == 1).all()  # the square's inside stays
    assert cleaned[5, 5] == 0 and labels[5, 5] == 1  # the opening rounds the square's corners
    corner = labels.copy()
    corner[0:5, :], corner[:, 0:5] = 4, 4  # class 4 along the square's top and left sides
    assert mod.morphological_cleanup(corner, {1: dict(open=1)})[5, 5] == 4  # nearest other class


def blob_centroid_offset(mod, scale):
    """Mean (over 64 sub-positions) of mask centroid - image centroid after rescale_batch, in
    source pixels, for a 9 x 7 box drawn into both the image and the mask (label 2)."""
    offsets = []
    for top in range(4, 12):
        for left in range(4, 12):
            mask = torch.zeros(1, 40, 40, dtype=torch.long)
            mask[:, top : top + 9, left : left + 7] = 2
            image = (mask == 2).float()[:, None].expand(1, 3, 40, 40)
            image, mask, weights = mod.rescale_batch(image, mask, mask.float() * 1.5, scale)
            assert set(mask.unique().tolist()) <= {0, 2}  # labels are never interpolated ...
            assert torch.equal(weights, mask.float() * 1.5)  # ... and weights travel with them
            intensity, region = image[0, 0], (mask[0] == 2).float()
            yy, xx = torch.meshgrid(
                torch.arange(mask.shape[-2]).float(), torch.arange(mask.shape[-1]).float(),
                indexing="ij",
            )  # fmt: skip
            for grid in (yy, xx):
                centre_image = (intensity * grid).sum() / intensity.sum()
                centre_mask = (region * grid).sum() / region.sum()
                offsets.append(float(centre_mask - centre_image) / scale)
    return float(np.mean(offsets))


@pytest.mark.parametrize("scale", [0.75, 1.25])
def test_rescale_batch_keeps_masks_on_their_images(mod, scale):
    # legacy mode="nearest" puts the mask 0.5 (x0.75) or 0.3 (x1.25) source px off the image;
    # nearest-exact only by how ties at exact pixel centres fall (at most 1/6 px here)
    assert abs(blob_centroid_offset(mod, scale)) < 0.2


def test_rescale_batch_antialiases_when_it_shrinks(mod):
    stripes = torch.zeros(1, 3, 40, 40)
    stripes[:, :, ::2] = 1.0  # 1-px stripes: pure aliasing when sampled at 0.75 without a filter
    masks, weights = torch.zeros(1, 40, 40, dtype=torch.long), torch.ones(1, 40, 40)
    small = mod.rescale_batch(stripes, masks, weights, 0.75)[0]
    assert small.shape == (1, 3, 30, 30)
    assert small.std() < 0.15  # averaged towards grey (without antialias: std 0.27)
    large = mod.rescale_batch(stripes, masks, weights, 1.5)[0]
    assert large.shape == (1, 3, 60, 60) and large.max() == 1.0  # enlarging: plain bilinear


def test_every_loss_term_ignores_pixels_labelled_255(mod, isolated):
    isolated(mod, OHEM_MIN_KEPT=8)
    torch.manual_seed(0)
    target = torch.randint(0, 4, (2, 6, 6))
    target[0, :3] = 255
    ignored = (target == 255)[:, None].expand(2, 4, 6, 6)
    weights = torch.rand(2, 6, 6) + 0.5
    for term in ("ce", "ohem", "boundary_ce", "dice", "lovasz", "focal"):
        logits = torch.randn(2, 4, 6, 6, requires_grad=True)
        loss = mod.mixed_loss(logits, target, weights, {term: 1.0})
        loss.backward()
        assert (logits.grad[ignored] == 0).all(), term  # no gradient reaches an ignored pixel
        changed = logits.detach().clone()
        changed[ignored] = 20 * torch.randn(int(ignored.sum()))
        again = mod.mixed_loss(changed, target, weights, {term: 1.0})
        assert again.item() == pytest.approx(loss.item(), rel=1e-6), term


def test_miou_ignores_predictions_on_pixels_labelled_255(mod):
    torch.manual_seed(0)
    masks = torch.randint(0, 6, (3, 16, 16))
    masks[:, :5] = 255
    preds = torch.randint(0, 6, (3, 16, 16))
    other = preds.clone()
    other[:, :5] = (other[:, :5] + 1) % 6  # different predictions where the label is 255 only
    assert mod.score_labels(preds, masks)["miou"] == mod.score_labels(other, masks)["miou"]


class BatchNormNet(nn.Module):
    """conv -> BatchNorm -> 1x1 conv: its output in training mode depends on the batch."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)))


def test_prediction_and_tta_run_the_model_in_eval_mode(mod):
    torch.manual_seed(0)
    model = BatchNormNet()
    with torch.no_grad():
        model.norm.running_mean.fill_(0.3)  # statistics unlike any batch's own
        model.norm.running_var.fill_(2.0)
    images = torch.rand(4, 3, 8, 8)
    expected = copy.deepcopy(model).eval()(images).detach()
    for predict in (
        lambda: mod.predict_logits(model, images, torch.device("cpu")),
        lambda: mod.tta_predict(model, images, scales=(1.0,), flips=False, rot90=False).log(),
    ):
        model.train()  # as fit() leaves it
        out = predict()
        assert torch.allclose(out.log_softmax(1), expected.log_softmax(1), atol=1e-5)
        assert model.norm.running_mean.eq(0.3).all() and int(model.norm.num_batches_tracked) == 0


def dihedral_numpy(x, k, flip):
    """The k-th quarter turn (then a left-right flip) of (..., H, W), written with numpy."""
    y = np.rot90(x, k, axes=(-2, -1))
    return np.flip(y, axis=-1) if flip else y


def test_tta_averages_the_probabilities_of_each_undone_pass(mod):
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 3, padding=1)  # not symmetric: every pass differs
    with torch.no_grad():
        model.weight.mul_(6)  # confident, so that averaging logits would give other numbers
    images = torch.rand(2, 3, 9, 11)
    probs = []
    for k in range(4):
        for flip in (False, True):
            seen = torch.from_numpy(dihedral_numpy(images.numpy(), k, flip).copy())
            out = model(seen).detach().numpy()
            undone = np.rot90(np.flip(out, axis=-1) if flip else out, -k, axes=(-2, -1))  # undo
            probs.append(torch.from_numpy(undone.copy()).softmax(1))
    expected = torch.stack(probs).mean(0)
    tta = mod.tta_predict(model, images, scales=(1.0,), flips=True, rot90=True)
    assert torch.allclose(tta, expected, atol=1e-6)
    logits_mean = torch.stack([p.log() for p in probs]).mean(0).softmax(1)
    assert not torch.allclose(logits_mean, expected, atol=1e-3)  # the test can tell them apart


def test_fit_trains_in_training_mode_every_epoch(mod, isolated):
    """Validation puts the model in eval mode; each epoch must switch BatchNorm back to training."""
    isolated(mod, SPLIT_SIZES=(16, 4, 4), BATCH_SIZE=8, EPOCHS=2, PATIENCE=5, OHEM_MIN_KEPT=64)
    data = {split: mod.make_split(split, 16, 0) for split in ("train", "val", "test")}
    data["train"]["weights"] = torch.ones(16, 16, 16)
    torch.manual_seed(0)
    model = mod.DilatedAttentionNet(width=4)
    row = mod.ablation_row("test", False, False, dict(ce=1.0), None)
    history = mod.fit(model, data, row, torch.device("cpu"), mod.OUTPUT_DIR / "row.pt", seed=0)
    assert len(history) == 2
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(int(m.num_batches_tracked) == 2 * 2 for m in norms)  # 2 epochs x 2 batches


def test_each_ablation_claim_has_its_own_row(mod, isolated):
    rows = {row["name"]: row for row in mod.ABLATION_ROWS}
    keys = ("cbam", "position", "loss", "multiscale")

    def changes(row):
        return {k for k in keys if row[k] != rows[row["against"]][k]}

    for row in mod.ABLATION_ROWS:
        assert row["against"] is None or row["against"] in rows
    single = [row for row in rows.values() if row["against"] and len(changes(row)) == 1]
    assert {"cbam", "position", "loss", "multiscale"} == {k for r in single for k in changes(r)}
    assert any(r["cbam"] and not r["position"] for r in single)  # CBAM alone
    assert any(r["position"] and not r["cbam"] for r in single)  # position attention alone
    alone = [r["loss"] for r in single if changes(r) == {"loss"}]
    for term, weight in mod.LOSS_WEIGHTS.items():
        if weight:
            assert {term: 1.0} in alone, term  # every loss of the mixed loss, alone
    assert "mixed" in alone
    assert [r["name"] for r in mod.ABLATION_ROWS if r["default"]] == [
        r["name"] for r in mod.TRAINING_ROWS
    ]


def test_summarize_seeds_hand_case(mod):
    def seed(base, cbam, tta, before):
        return dict(rows=[
            dict(name="baseline", miou=base, val_miou=base, boundary=0.5,
                 iou_per_class={c: base for c in mod.CLASS_NAMES}),
            dict(name="+ CBAM", miou=cbam, val_miou=cbam, boundary=0.5,
                 iou_per_class={c: cbam for c in mod.CLASS_NAMES}),
            dict(name="+ TTA: flips and rotations", miou=tta, val_miou=tta, boundary=0.5,
                 iou_per_class={c: tta for c in mod.CLASS_NAMES}, kept=tta > before,
                 test_miou_before=before),
        ])  # fmt: skip

    summary = mod.summarize_seeds(
        [seed(0.50, 0.55, 0.60, 0.55), seed(0.40, 0.38, 0.42, 0.40), seed(0.60, 0.66, 0.61, 0.66)]
    )
    base, cbam, tta = summary
    assert base["test_miou_mean"] == pytest.approx(0.5) and base["change_per_seed"] is None
    assert base["test_miou_std"] == pytest.approx(0.1)  # sample standard deviation of .5 .4 .6
    assert cbam["against"] == "baseline"
    assert cbam["change_per_seed"] == pytest.approx([0.05, -0.02, 0.06])
    assert cbam["same_sign_in_every_seed"] is False  # one seed disagrees: no claim
    assert tta["change_per_seed"] == pytest.approx([0.05, 0.02, -0.05]) and tta["kept"] == 2


def test_seed_ablation_end_to_end_on_tiny_settings(mod, isolated, capsys):
    rows = mod.ABLATION_ROWS
    tiny = dict(SPLIT_SIZES=(16, 8, 8), IMAGE_SIZE=16, WIDTH=4, TTA_SCALES=(1.0,))
    isolated(mod, **dict(mod.QUICK, **tiny), ABLATION_ROWS=(rows[0], rows[1]))  # baseline, + CBAM
    metrics = mod.main(["--seeds", "3", "4"])
    saved = json.loads((mod.OUTPUT_DIR / "seeds" / "metrics.json").read_text())
    assert saved["seeds"] == [3, 4] and len(saved["per_seed"]) == 2
    names = [r["name"] for r in saved["summary"]]
    assert names[:2] == ["baseline", "+ CBAM"] and len(names) == 2 + 4  # + 4 inference rows
    cbam = saved["summary"][1]
    per_seed = [{r["name"]: r["miou"] for r in s["rows"]} for s in saved["per_seed"]]
    assert cbam["change_per_seed"] == pytest.approx(
        [round(s["+ CBAM"] - s["baseline"], 4) for s in per_seed], abs=1e-4
    )
    assert metrics["summary"] == saved["summary"]
    assert not (mod.OUTPUT_DIR / "metrics.json").exists()  # the default run's file is untouched
    capsys.readouterr()
    again = mod.main(["--seeds", "3", "4"])  # finished seeds are reused, not trained again
    assert capsys.readouterr().out.count("reused") == 2 and again["summary"] == saved["summary"]


# ----------------------------------------------------------------------------------------------
# Data, model, memory, training, export, main
# ----------------------------------------------------------------------------------------------


def test_data_is_deterministic_and_has_all_classes(mod, isolated):
    isolated(mod, SPLIT_SIZES=(12, 4, 4), RARE_CLASS_PROBABILITY=0.5)
    a, b = mod.make_split("train", 32, seed=0), mod.make_split("train", 32, seed=0)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["masks"], b["masks"])
    assert not torch.equal(a["images"], mod.make_split("train", 32, seed=1)["images"])
    assert a["images"].shape == (12, 3, 32, 32) and a["images"].dtype == torch.float32
    assert a["masks"].dtype == torch.int64
    assert set(a["masks"].unique().tolist()) == set(range(6))


def test_model_output_shape_at_odd_sizes(mod):
    model = mod.DilatedAttentionNet(width=8, cbam=True, position_attention=True).eval()
    for h, w in ((32, 32), (37, 50)):
        assert model(torch.rand(2, 3, h, w)).shape == (2, 6, h, w)


def test_a_checkpointed_step_is_the_same_step_batchnorm_included(mod):
    """Same gradients, same BatchNorm running statistics, updated once, and less saved memory."""
    images, masks = torch.rand(4, 3, 32, 32), torch.randint(0, 6, (4, 32, 32))
    grads, stats, saved = [], [], []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = mod.DilatedAttentionNet(
            width=8, cbam=True, position_attention=True, grad_checkpoint=enabled
        ).train()
        saved.append(mod.saved_activation_bytes(model, images, masks))  # one step (no update)
        torch.manual_seed(0)
        model = mod.DilatedAttentionNet(
            width=8, cbam=True, position_attention=True, grad_checkpoint=enabled
        ).train()
        F.cross_entropy(model(images), masks).backward()  # one training step's forward+backward
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert [int(m.num_batches_tracked) for m in norms] == [1] * len(norms)  # not 2
        stats.append(torch.cat([torch.cat([m.running_mean, m.running_var]) for m in norms]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
    assert torch.allclose(stats[0], stats[1], atol=1e-6)
    assert saved[1] < 0.8 * saved[0]
    result = mod.measure_checkpointing(
        dict(mod.model_config(True, True), width=8), images, masks, torch.device("cpu")
    )
    assert result["checkpointing"]["batchnorm_updates_per_step"] == 1


def test_mixed_loss_training_learns_one_batch(mod, isolated):
    isolated(mod, SPLIT_SIZES=(8, 2, 2), OHEM_MIN_KEPT=256)
    data = mod.make_split("train", 32, seed=0)
    torch.manual_seed(0)
    model = mod.DilatedAttentionNet(width=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    weights = torch.ones(8, 32, 32)
    losses = []
    for _ in range(40):
        loss = mod.mixed_loss(model(data["images"]), data["masks"], weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_exported_model_matches_eager(mod, tmp_path):
    torch.manual_seed(0)
    model = mod.DilatedAttentionNet(width=8, cbam=True, position_attention=True).eval()
    with torch.no_grad():
        model.position.gamma.fill_(0.7)  # make the attention path count
    images = torch.rand(3, 3, 32, 32)
    result = mod.check_export(model, images, tmp_path / "model.pt2")
    assert (tmp_path / "model.pt2").is_file()
    assert result["max_abs_diff"] < 1e-4 and result["max_abs_diff_other_size"] < 1e-4
    assert result["labels_agree"] == 1.0


def test_a_failing_export_is_reported_and_leaves_no_stale_program(mod, tmp_path, monkeypatch):
    path = tmp_path / "model.pt2"
    path.write_bytes(b"an earlier run's program")

    def failing_export(model, example, path):
        raise RuntimeError("Constraints violated (width)!\nmore detail")

    monkeypatch.setattr(mod, "export_model", failing_export)
    result = mod.check_export(
        mod.DilatedAttentionNet(width=8).eval(), torch.rand(2, 3, 32, 32), path
    )
    assert result == {"error": "RuntimeError: Constraints violated (width)!"}
    assert not path.exists()


def test_onnx_without_the_optional_packages_is_one_line(mod, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now fails (installed or not)
    note = mod.import_onnx_runtime()
    assert note.startswith("onnx is not installed") and "\n" not in note
    for name in ("onnx", "onnxscript"):  # these two present (stand-ins), only onnxruntime missing
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    note = mod.import_onnx_runtime()
    assert isinstance(note, str) and "\n" not in note
    assert note.startswith("onnxruntime is not installed") and "pip install" in note
    result = mod.check_onnx(
        mod.DilatedAttentionNet(width=4), torch.rand(2, 3, 16, 16), tmp_path / "m.onnx"
    )
    assert result == {"skipped": note} and not (tmp_path / "m.onnx").exists()


def test_onnx_export_runs_in_onnxruntime_like_eager(mod, tmp_path):
    for name in mod.ONNX_PACKAGES:
        pytest.importorskip(name, reason=f"optional: {name} is not installed (pip install {name})")
    torch.manual_seed(0)
    model = mod.DilatedAttentionNet(width=8, cbam=True, position_attention=True).eval()
    with torch.no_grad():
        model.position.gamma.fill_(0.7)  # make the attention path count
    images = torch.rand(3, 3, 32, 32)
    result = mod.check_onnx(model, images, tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx").is_file()
    assert result["max_abs_diff"] < 1e-4 and result["max_abs_diff_other_size"] < 1e-4
    assert result["labels_agree"] == 1.0
    assert result["ms_per_image_onnxruntime"] > 0 and result["ms_per_image_eager"] > 0


def snapshot(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


def test_main_quick_end_to_end_writes_only_under_tmp_path(mod, isolated, tmp_path):
    isolated(mod)
    script_dir = Path(mod.__file__).parent
    before = snapshot(script_dir)
    metrics = mod.main(["--quick"])
    out = tmp_path / "outputs" / "quick"  # a set-up check never touches a real run's files
    assert snapshot(script_dir) == before  # nothing written beside the script
    saved = json.loads((out / "metrics.json").read_text())
    names = [row["name"] for row in saved["ablation"]]
    assert len(names) == 8 and names[0] == "baseline"
    for row in saved["ablation"]:
        assert set(row) >= {"name", "miou", "boundary", "seconds"}
        assert 0.0 <= row["miou"] <= 1.0 and 0.0 <= row["boundary"] <= 1.0
    assert saved["total_seconds"] > 0 and saved["device"] == str(mod.pick_device(mod.DEVICE))
    assert saved["export"]["max_abs_diff"] < 1e-4
    assert metrics["ablation"] == saved["ablation"]
    for name in (
        "model.pt",
        "model.pt2",
        "receptive_field.png",
        "attention_maps.png",
        "predictions.png",
        "ablation.png",
    ):
        assert (out / name).is_file(), name
    # --predict on an image the test writes, with the checkpoint just trained: main(["--quick"])
    # set OUTPUT_DIR to outputs/quick/ for the rest of this test (isolated() restores it), so
    # --predict finds the quick model there, as `--quick --predict` does in a shell
    image = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    result = mod.main(["--predict", str(tmp_path / "photo.png")])
    assert Path(result["segmentation"]).is_file()
    assert Image.open(result["segmentation"]).size == (100, 40)  # photo and labels side by side
    state = torch.load(out / "model.pt", weights_only=True)  # CRF and morphology on, as if kept
    state["pipeline"].update(crf_params=dict(mod.CRF_PARAMS), morphology=True)
    torch.save(state, out / "model.pt")
    big = (np.random.default_rng(1).random((600, 1000, 3)) * 255).astype(np.uint8)
    Image.fromarray(big).save(tmp_path / "big.png")  # CRF and morphology run at training size
    assert Image.open(mod.main(["--predict", str(tmp_path / "big.png")])["segmentation"]).size == (
        2000, 600
    )
    with pytest.raises(SystemExit, match="error: no such image file"):
        mod.main(["--predict", str(tmp_path / "missing.png")])
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(SystemExit, match="not an image"):
        mod.main(["--predict", str(tmp_path / "notes.png")])


def test_predict_without_a_checkpoint_is_one_clear_line(tmp_path):
    (tmp_path / "photo.png").write_bytes(b"")
    result = run_script(SCRIPT, ["--predict", str(tmp_path / "photo.png")], tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no trained model"), result.stderr
