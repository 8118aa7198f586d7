"""Tests for Example 4: attention, receptive fields, TTA, dense CRF, losses, morphology, export, main().

Each test checks behaviour against an independent truth: shapes and identities that hold by
construction, hand-computed loss values, closed-form receptive fields measured by gradients, an
exact N x N CRF, and a real end-to-end run that writes only under tmp_path.
"""

import json
import math
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
    """Run torch on one thread (CPU_THREADS = 1: faster when a CI CPU is shared), then restore."""
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


def test_model_receptive_field_matches_gradient(mod):
    model = mod.SegNet(width=8)
    specs = model.layer_specs()
    assert mod.receptive_field(specs) == 83
    assert mod.extent(mod.gradient_receptive_field(specs, size=161)) == 83


def test_gridding_leaves_holes_that_hybrid_rates_fill(mod):
    def holes(rates):
        grad = mod.gradient_receptive_field([(3, 1, r) for r in rates], size=41)
        rf = mod.receptive_field([(3, 1, r) for r in rates])
        box = grad[20 - rf // 2 : 20 + rf // 2 + 1, 20 - rf // 2 : 20 + rf // 2 + 1]
        return int((box == 0).sum())

    assert holes((2, 2, 2)) > 0  # only even offsets are ever reached
    assert holes((1, 2, 5)) == 0


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
    assert mod.lovasz_softmax(logits, torch.tensor([[[0, 0]]])).item() == pytest.approx(0.3, abs=1e-5)
    # a 255 pixel changes nothing
    logits3 = logits_from_probs(torch.tensor([[0.8, 0.6, 0.01], [0.2, 0.4, 0.99]])[None, :, None, :]).float()
    assert mod.lovasz_softmax(logits3, torch.tensor([[[0, 0, 255]]])).item() == pytest.approx(0.3, abs=1e-5)


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
    assert mod.ohem_cross_entropy(logits2, target, 0.3, 40).item() == pytest.approx(loss.item(), rel=1e-6)


def test_boundary_weighted_ce_with_unit_weights_is_cross_entropy(mod):
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 5)
    target = torch.randint(0, 4, (2, 5, 5))
    target[0, 0] = 255
    expected = F.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(mod.boundary_weighted_ce(logits, target, torch.ones(2, 5, 5)), expected, atol=1e-6)
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
    iou = mod.iou_from_confusion(mod.confusion_matrix(pred, target, 3))
    assert iou[0].item() == pytest.approx(1 / 2) and iou[1].item() == pytest.approx(1 / 2)
    assert math.isnan(iou[2].item())
    assert torch.nanmean(iou).item() == pytest.approx(0.5)


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
    model = mod.SegNet(width=8, attention=True).eval()
    for h, w in ((32, 32), (37, 50)):
        assert model(torch.rand(2, 3, h, w)).shape == (2, 6, h, w)


def test_gradient_checkpointing_same_gradients_less_saved_memory(mod):
    images, masks = torch.rand(4, 3, 32, 32), torch.randint(0, 6, (4, 32, 32))
    grads, saved = [], []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = mod.SegNet(width=8, attention=True, grad_checkpoint=enabled).train()
        saved.append(mod.saved_activation_bytes(model, images, masks))
        F.cross_entropy(model(images), masks).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
    assert saved[1] < 0.8 * saved[0]


def test_mixed_loss_training_learns_one_batch(mod, isolated):
    isolated(mod, SPLIT_SIZES=(8, 2, 2), OHEM_MIN_KEPT=256)
    data = mod.make_split("train", 32, seed=0)
    torch.manual_seed(0)
    model = mod.SegNet(width=8)
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
    model = mod.SegNet(width=8, attention=True).eval()
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
    result = mod.check_export(mod.SegNet(width=8).eval(), torch.rand(2, 3, 32, 32), path)
    assert result == {"error": "RuntimeError: Constraints violated (width)!"}
    assert not path.exists()


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
