"""Tests for example_1_basic_unet/basic_unet_segmentation.py."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from conftest import load_script, run_script
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

SCRIPT = "example_1_basic_unet/basic_unet_segmentation.py"
ex1 = load_script(SCRIPT)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bilinear", [False, True])
@pytest.mark.parametrize("height, width", [(64, 64), (100, 100), (127, 93)])
def test_unet_keeps_any_input_size(height, width, bilinear):
    model = ex1.UNet(base_channels=4, depth=4, bilinear=bilinear).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 3, height, width))
    assert logits.shape == (2, 2, height, width)


def test_unet_rejects_an_input_smaller_than_its_depth_allows():
    with pytest.raises(ValueError, match="too small for depth 4"):
        ex1.UNet(depth=4)(torch.rand(1, 3, 15, 15))  # 15 px cannot be halved 4 times


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = ex1.UNet(base_channels=4, depth=3)
    images, masks = torch.rand(2, 3, 40, 40), torch.randint(0, 2, (2, 40, 40))
    torch.nn.functional.cross_entropy(model(images), masks).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_parameter_count_matches_closed_form():
    # DoubleConv(i, o) = 9*i*o + 2*o (BN) + 9*o*o + 2*o; Up adds a 2x2 transposed conv i -> i/2.
    def double_conv(i, o):
        return 9 * i * o + 9 * o * o + 4 * o

    base, depth = 4, 2  # widths 4, 8, 16
    expected = double_conv(3, 4) + double_conv(4, 8) + double_conv(8, 16)
    expected += (16 * 8 * 4 + 8) + double_conv(16, 8)  # up from 16 to 8
    expected += (8 * 4 * 4 + 4) + double_conv(8, 4)  # up from 8 to 4
    expected += 4 * 2 + 2  # 1x1 classifier
    assert ex1.count_parameters(ex1.UNet(base_channels=base, depth=depth)) == expected


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def test_generator_is_deterministic_and_binary():
    image_a, mask_a = ex1.generate_sample(seed=0, index=7, size=48)
    image_b, mask_b = ex1.generate_sample(seed=0, index=7, size=48)
    assert np.array_equal(image_a, image_b) and np.array_equal(mask_a, mask_b)
    assert image_a.shape == (3, 48, 48) and image_a.dtype == np.float32
    assert mask_a.shape == (48, 48) and mask_a.dtype == np.int64
    assert 0.0 <= image_a.min() and image_a.max() <= 1.0
    masks = np.stack([ex1.generate_sample(0, i, 48)[1] for i in range(20)])
    assert set(np.unique(masks)) == {0, 1}


def test_generator_depends_on_seed_and_index():
    image, mask = ex1.generate_sample(0, 3, 48)
    other_seed, _ = ex1.generate_sample(1, 3, 48)
    other_index, _ = ex1.generate_sample(0, 4, 48)
    assert not np.allclose(image, other_seed)
    assert not np.allclose(image, other_index)


def test_an_impossible_min_contrast_warns_instead_of_drawing_faint_shapes_silently(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default contrast is always met: no warning
        ex1.generate_sample(0, 3, 48)
    monkeypatch.setattr(ex1, "MIN_CONTRAST", 2.0)  # farther than any two RGB colours can be
    with pytest.warns(UserWarning, match="MIN_CONTRAST = 2.0 not met"):
        ex1.generate_sample(0, 3, 48)


def test_split_is_70_15_15_and_disjoint():
    splits = ex1.split_indices(1000, seed=0)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [700, 150, 150]
    every = np.concatenate(list(splits.values()))
    assert sorted(every.tolist()) == list(range(1000))


def _coordinate_image(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose channels hold each pixel's own (x, y), and a checkerboard mask of it."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    image = torch.stack([(x + 0.5) / size, (y + 0.5) / size, torch.ones(size, size)])
    return image.float(), _checker(x, y)


def _checker(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Labels 0 and 2: any interpolation between them (bilinear, say) would show up as a 1."""
    return ((x // 6 + y // 6) % 2 * 2).long()


def _agreement(image: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of pixels whose mask equals the checkerboard at the coordinates the image shows."""
    size = image.shape[-1]
    inside = image[2] > 0.99  # the affine warp fills the corners it uncovers with 0
    x = (image[0] * size - 0.5).round().long().clamp(0, size - 1)
    y = (image[1] * size - 0.5).round().long().clamp(0, size - 1)
    return (mask[inside] == _checker(x, y)[inside]).float().mean().item()


def test_augmentation_moves_the_mask_with_the_image():
    image, mask = _coordinate_image(48)
    transform = ex1.build_train_transform()
    paired, unpaired = [], []
    for seed in range(30):
        torch.manual_seed(seed)
        out_image, out_mask = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        assert out_mask.dtype == torch.int64
        assert set(out_mask.unique().tolist()) <= {0, 2}  # NEAREST: no invented labels
        paired.append(_agreement(out_image, out_mask))
        unpaired.append(_agreement(out_image, mask))  # what you get if only the image moved
    assert min(paired) > 0.97
    assert np.mean(unpaired) < 0.8  # the check above can tell moved from unmoved masks


def test_affine_warp_resamples_the_image_with_nearest_too(isolated):
    # Every output pixel must be a copy of some input pixel (or the 0 fill of uncovered corners):
    # a bilinear warp would blend neighbours into thousands of values the image never had.
    isolated(ex1, AFFINE_PROBABILITY=1.0)
    torch.manual_seed(0)
    image = torch.rand(3, 32, 32)  # all 3 * 32 * 32 values distinct (almost surely)
    mask = (torch.rand(32, 32) > 0.5).long()
    allowed = set(image.flatten().tolist()) | {0.0}
    transform = ex1.build_train_transform()
    for seed in range(5):
        torch.manual_seed(seed)
        out_image, _ = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        new_values = set(out_image.flatten().tolist()) - allowed
        assert not new_values, f"{len(new_values)} interpolated values after the warp"


def test_random_dihedral_draws_all_8_symmetries_of_the_square_evenly_and_paired():
    image = torch.arange(3 * 5 * 5, dtype=torch.float32).reshape(3, 5, 5)  # no symmetry of its own
    mask = torch.arange(5 * 5).reshape(5, 5)
    # the 8 symmetries built another way: optional transpose, then optional flips of rows / columns
    def symmetry(x, k):
        x = x.transpose(-2, -1) if k & 4 else x
        x = x.flip(-1) if k & 1 else x
        return x.flip(-2) if k & 2 else x

    counts = [0] * 8
    torch.manual_seed(0)
    for _ in range(400):
        out_image, out_mask = ex1.RandomDihedral()(tv_tensors.Image(image), tv_tensors.Mask(mask))
        assert type(out_image) is tv_tensors.Image and type(out_mask) is tv_tensors.Mask
        (k,) = [k for k in range(8) if torch.equal(out_image, symmetry(image, k))]
        assert torch.equal(out_mask, symmetry(mask, k))  # the same move for the mask
        counts[k] += 1
    assert min(counts) >= 30 and max(counts) <= 75  # each about 400 / 8 = 50 times


def test_standardize_gives_zero_mean_unit_variance_and_ignores_brightness():
    image = torch.rand(2, 3, 16, 16)
    out = ex1.standardize(image)
    assert torch.allclose(out.mean(dim=(-2, -1)), torch.zeros(2, 3), atol=1e-5)
    assert torch.allclose(out.std(dim=(-2, -1)), torch.ones(2, 3), atol=1e-2)
    # a darker, lower-contrast copy of the same picture looks the same to the network
    assert torch.allclose(ex1.standardize(0.5 * image + 0.2), out, atol=1e-2)


def test_dataset_standardizes_then_transforms_image_and_mask_together():
    flip = v2.RandomHorizontalFlip(p=1.0)
    dataset = ex1.ShapesDataset(np.arange(4), seed=0, size=32, transform=flip)
    image, mask = dataset[1]
    assert type(image) is torch.Tensor and type(mask) is torch.Tensor  # plain, not tv_tensors
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert mask.shape == (32, 32) and mask.dtype == torch.int64
    assert torch.allclose(image, ex1.standardize(dataset.images[1]).flip(-1))
    assert torch.equal(mask, dataset.masks[1].flip(-1))


def test_only_the_training_split_is_augmented_and_shuffled(isolated):
    isolated(ex1, IMAGE_SIZE=16, NUM_IMAGES=40, DEPTH=2)
    loaders = ex1.build_loaders(seed=0)
    assert loaders["train"].dataset.transform is not None
    assert isinstance(loaders["train"].sampler, torch.utils.data.RandomSampler)
    for split in ("val", "test"):
        assert loaders[split].dataset.transform is None
        assert isinstance(loaders[split].sampler, torch.utils.data.SequentialSampler)


def test_too_few_images_for_a_split_is_a_clear_error(isolated):
    isolated(ex1, IMAGE_SIZE=16, NUM_IMAGES=5)
    with pytest.raises(SystemExit, match="test split empty"):
        ex1.build_loaders(seed=0)


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def _metrics(pred, target):
    confusion = ex1.confusion_matrix(torch.tensor(pred), torch.tensor(target), 2)
    return ex1.metrics_from_confusion(confusion)


def test_metrics_perfect_prediction():
    m = _metrics([0, 1, 1, 0], [0, 1, 1, 0])
    assert m["foreground_iou"] == 1.0 and m["iou_per_class"]["background"] == 1.0
    assert m["pixel_accuracy"] == 1.0 and m["mean_iou"] == 1.0


def test_metrics_disjoint_prediction():
    m = _metrics([0, 0, 1, 1], [1, 1, 0, 0])
    assert m["foreground_iou"] == 0.0 and m["iou_per_class"]["background"] == 0.0
    assert m["pixel_accuracy"] == 0.0


def test_metrics_partial_overlap():
    # object: TP 2, FP 1, FN 1 -> 2/4; background: TP 4, FP 1, FN 1 -> 4/6; 6 of 8 pixels right
    m = _metrics([1, 1, 0, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0])
    assert m["foreground_iou"] == pytest.approx(0.5)
    assert m["iou_per_class"]["background"] == pytest.approx(4 / 6)
    assert m["mean_iou"] == pytest.approx((0.5 + 4 / 6) / 2)
    assert m["pixel_accuracy"] == pytest.approx(0.75)


def test_metrics_class_absent_from_prediction_and_truth_is_nan_and_left_out():
    m = _metrics([0, 0, 0], [0, 0, 0])
    assert math.isnan(m["foreground_iou"])
    assert m["mean_iou"] == 1.0  # the mean is over the classes that occur
    assert m["pixel_accuracy"] == 1.0


def test_confusion_matrix_skips_ignore_index_and_adds_over_batches():
    pred = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0]])
    target = torch.tensor([[1, 255, 0, 1], [0, 1, 255, 0]])
    confusion = ex1.confusion_matrix(pred, target, 2)
    assert confusion.tolist() == [[2, 1], [1, 2]]  # rows: truth, columns: prediction
    per_row = sum(ex1.confusion_matrix(pred[i], target[i], 2) for i in range(2))
    assert torch.equal(per_row, confusion)


def test_all_background_predictor_has_high_accuracy_and_zero_iou():
    masks = torch.zeros(2, 10, 10, dtype=torch.long)
    masks[:, :2, :5] = 1  # 10 % object pixels
    confusion = ex1.all_background_confusion([(None, masks)])
    m = ex1.metrics_from_confusion(confusion)
    assert m["pixel_accuracy"] == pytest.approx(0.9)
    assert m["foreground_iou"] == 0.0


# ----------------------------------------------------------------------------------------------
# Training loop behaviour
# ----------------------------------------------------------------------------------------------


_CPU = torch.device("cpu")
_LOSS = torch.nn.CrossEntropyLoss(ignore_index=ex1.IGNORE_INDEX)  # what main() hands to fit


def _tiny_loaders(isolated):
    isolated(ex1, IMAGE_SIZE=24, NUM_IMAGES=40, BASE_CHANNELS=4, DEPTH=2, BATCH_SIZE=8)
    return ex1.build_loaders(seed=0)


def test_evaluate_uses_the_learned_batchnorm_statistics_and_leaves_them_alone(isolated):
    # A model left in training mode (as train_one_epoch leaves it) must still be evaluated with
    # its running statistics: evaluate() switches to eval mode itself, and a second call gives
    # the same numbers because nothing in BatchNorm moved.
    loaders = _tiny_loaders(isolated)
    torch.manual_seed(0)
    model = ex1.UNet(**ex1.model_config())
    for module in model.modules():  # learned statistics far from a batch's own
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1.0, 1.0)
            module.running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    loss, confusion = ex1.evaluate(model, loaders["val"], _LOSS, _CPU)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed during evaluation"
    # the same loss computed independently, in eval mode
    model.eval()
    with torch.no_grad():
        total = sum(_LOSS(model(x), y).item() * len(x) for x, y in loaders["val"])
    assert loss == pytest.approx(total / len(loaders["val"].dataset), rel=1e-5)


def test_nan_loss_stops_with_a_clear_message(isolated):
    loaders = _tiny_loaders(isolated)

    class NaNModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(float("nan")))

        def forward(self, x):
            return self.scale * x[:, :2]

    model = NaNModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with pytest.raises(SystemExit, match="loss became nan.*LEARNING_RATE"):
        ex1.train_one_epoch(
            model, loaders["train"], _LOSS, optimizer, scheduler, scaler, _CPU, epoch=1
        )


def test_ctrl_c_keeps_the_best_checkpoint(isolated, tmp_path, monkeypatch):
    loaders = _tiny_loaders(isolated)
    isolated(ex1, EPOCHS=5)
    real_train = ex1.train_one_epoch
    calls = []

    def train_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(ex1, "train_one_epoch", train_then_interrupt)
    checkpoint = tmp_path / "best.pt"
    history = ex1.fit(ex1.UNet(**ex1.model_config()), loaders, _LOSS, _CPU, checkpoint)
    assert [h["epoch"] for h in history] == [1]
    model, saved = ex1.load_model(checkpoint, _CPU)
    assert saved["epoch"] == 1 and not checkpoint.with_name("best.pt.tmp").exists()


def test_early_stopping_after_patience_epochs(isolated, tmp_path, monkeypatch, capsys):
    loaders = _tiny_loaders(isolated)
    isolated(ex1, EPOCHS=10, PATIENCE=2)
    monkeypatch.setattr(ex1, "train_one_epoch", lambda *args: 0.5)
    flat = torch.tensor([[5, 1], [1, 5]])  # the same validation score every epoch
    monkeypatch.setattr(ex1, "evaluate", lambda *args: (0.5, flat))
    checkpoint = tmp_path / "b.pt"
    history = ex1.fit(ex1.UNet(**ex1.model_config()), loaders, _LOSS, _CPU, checkpoint)
    assert len(history) == 3  # epoch 1 is the best, epochs 2 and 3 do not improve
    assert ex1.load_model(checkpoint, _CPU)[1]["epoch"] == 1
    # one time estimate, after the first epoch, not one per epoch
    assert capsys.readouterr().out.count("estimated time to the end of training") == 1


def test_a_checkpoint_from_an_earlier_run_is_not_reused(isolated, tmp_path, monkeypatch):
    loaders = _tiny_loaders(isolated)
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"an earlier run's model")

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex1, "train_one_epoch", interrupt)
    assert ex1.fit(ex1.UNet(**ex1.model_config()), loaders, _LOSS, _CPU, checkpoint) == []
    assert not checkpoint.exists()


def test_evaluation_without_a_checkpoint_is_a_clear_error(tmp_path):
    # Ctrl-C during the first epoch leaves no checkpoint: one line, not a traceback from torch.load
    with pytest.raises(SystemExit, match="before the first epoch ended"):
        ex1.evaluate_best_checkpoint(tmp_path / "none.pt", [], _LOSS, _CPU)


def test_eta_extrapolates_the_rate_so_far():
    assert ex1.print_eta(30.0, 1, 5) == "estimated time to the end of training: about 2 min"
    assert ex1.print_eta(6.0, 1, 4).endswith("about 0.3 min")  # 18 s left: one decimal
    assert ex1.print_eta(6.0, 4, 4).endswith("about 0.0 min")  # done


def test_metrics_json_is_strict_json_with_null_for_an_undefined_iou(tmp_path):
    metrics = _metrics([0, 0, 0], [0, 0, 0])  # no object anywhere: its IoU is NaN
    ex1.write_json({"test": metrics, "history": [(1, np.float32(0.5))]}, tmp_path / "m.json")
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text  # NaN is not JSON: strict readers (browsers, jq) reject it
    saved = json.loads(text)
    assert saved["test"]["foreground_iou"] is None
    assert saved["test"]["mean_iou"] == 1.0 and saved["history"] == [[1, 0.5]]
    assert not (tmp_path / "m.json.tmp").exists()


def test_parameter_count_includes_frozen_parameters():
    model = ex1.UNet(base_channels=4, depth=2)
    total = ex1.count_parameters(model)
    model.inc.requires_grad_(False)  # freezing a block does not make its weights disappear
    assert ex1.count_parameters(model) == total > 0


def test_short_training_run_learns(isolated, tmp_path):
    isolated(
        ex1, IMAGE_SIZE=32, NUM_IMAGES=600, BASE_CHANNELS=8, DEPTH=3, EPOCHS=8,
        BATCH_SIZE=8, PATIENCE=8,
    )
    metrics = ex1.main([])
    assert metrics["test"]["foreground_iou"] >= 0.8
    saved = json.loads((tmp_path / "outputs" / "metrics.json").read_text())
    assert saved["test"]["foreground_iou"] == pytest.approx(metrics["test"]["foreground_iou"])
    assert saved["all_background_baseline"]["foreground_iou"] == 0.0
    assert saved["test"]["pixel_accuracy"] > saved["all_background_baseline"]["pixel_accuracy"]


# ----------------------------------------------------------------------------------------------
# Prediction on a user's image, and the script end to end
# ----------------------------------------------------------------------------------------------


def test_read_image_handles_16_bit_grayscale_and_rgba(tmp_path):
    ramp = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # a 16-bit PNG, as microscopes write
    deep = ex1.read_image(tmp_path / "deep.png")
    assert deep.shape == (30, 40, 3) and deep.min() == 0.0 and deep.max() == 1.0
    assert np.allclose(deep[..., 0], ramp / 65535, atol=1e-6)  # stretched, not clipped to white
    Image.new("RGBA", (8, 6), (255, 0, 0, 128)).save(tmp_path / "alpha.png")
    rgba = ex1.read_image(tmp_path / "alpha.png")
    assert rgba.shape == (6, 8, 3) and np.allclose(rgba[0, 0], [1.0, 0.0, 0.0])


def test_predict_matches_the_model_on_a_training_sized_image_whatever_its_brightness(
    isolated, tmp_path
):
    # --predict must prepare a photo exactly as training did (standardize per image) and hand
    # back the model's own argmax at the training size; a darker, flatter copy of the photo then
    # gives the same segmentation, because standardization removes brightness and contrast.
    isolated(ex1, IMAGE_SIZE=32, DEPTH=2, BASE_CHANNELS=4)
    torch.manual_seed(0)
    model = ex1.UNet(**ex1.model_config()).eval()
    image, _ = ex1.generate_sample(0, 3, 32)  # (3, 32, 32) in [0, 1]
    inputs = ex1.standardize(torch.from_numpy(image))[None]  # (1, 3, 32, 32)
    with torch.no_grad():  # shift the classifier's bias so that the untrained model splits the
        logits = model(inputs)  # image about half and half: a segmentation worth comparing
        model.outc.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
        expected = model(inputs).argmax(1)[0]  # (32, 32)
    assert 0.2 < expected.float().mean() < 0.8
    checkpoint = tmp_path / "model.pt"
    ex1.save_checkpoint(
        dict(model_state=model.state_dict(), config=ex1.model_config(), image_size=32), checkpoint
    )
    overlays = []
    for name, pixels in (("photo", image), ("dark", 0.4 * image + 0.1)):
        path = tmp_path / f"{name}.png"
        Image.fromarray((pixels.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(path)
        overlay = np.asarray(Image.open(ex1.predict_image(path, checkpoint, _CPU)))
        original = np.asarray(Image.open(path))
        overlays.append(np.any(overlay != original, axis=-1))  # (32, 32): tinted = "object"
    assert overlays[0].shape == (32, 32)
    # the PNG's 8-bit rounding can flip a pixel or two whose two logits are nearly equal
    assert (overlays[0] == (expected == 1).numpy()).mean() > 0.99
    assert (overlays[0] == overlays[1]).mean() > 0.98


def test_predict_without_checkpoint_or_file_gives_clear_errors(isolated, tmp_path):
    isolated(ex1)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (20, 10)).save(photo)
    with pytest.raises(SystemExit, match="no trained model"):
        ex1.main(["--predict", str(photo)])
    with pytest.raises(SystemExit, match="no such image file"):
        ex1.main(["--predict", str(tmp_path / "missing.png")])


def test_script_end_to_end_as_a_user_runs_it(tmp_path):
    result = run_script(SCRIPT, ["--quick"], tmp_path)
    assert result.returncode == 0, result.stderr
    outputs = tmp_path / "example_1_basic_unet" / "outputs" / "quick"  # never a real run's files
    for name in ("best_model.pt", "metrics.json", "training_curves.png", "predictions.png",
                 "augmentation.png"):
        assert (outputs / name).is_file(), name
    metrics = json.loads((outputs / "metrics.json").read_text())
    assert {"foreground_iou", "pixel_accuracy", "iou_per_class"} <= set(metrics["test"])
    assert metrics["device"] == str(ex1.pick_device("auto"))  # a GPU if there is one
    assert metrics["total_seconds"] > 0

    photo = tmp_path / "my photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(photo)
    result = run_script(SCRIPT, ["--quick", "--predict", str(photo)], tmp_path)
    assert result.returncode == 0, result.stderr
    with Image.open(outputs / "my photo_overlay.png") as overlay:
        assert overlay.size == (70, 50)  # same size as the user's image

    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    result = run_script(SCRIPT, ["--predict", str(text_file)], tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0  # one line, no traceback
    assert "is not an image" in result.stderr
