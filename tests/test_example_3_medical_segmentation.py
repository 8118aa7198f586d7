"""Tests for Example 3 (medical segmentation): Dice, metrics, preprocessing, loaders, 3D, training."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_script, run_script

SCRIPT = "example_3_medical_segmentation/medical_segmentation.py"
mod = load_script(SCRIPT)

# A cohort small enough to simulate and train on in seconds (same shape as --quick).
TINY = dict(
    PATIENTS_PER_SCANNER=3,
    OOD_PATIENTS=1,
    NATIVE_SIZE=48,
    TARGET_SPACING=(10.0, 8.0, 8.0),
    IMAGE_SIZE=32,
    BASE_CHANNELS=8,
    DEPTH=2,
    BOOTSTRAP_SAMPLES=50,
)


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Run torch on one thread: on a CPU shared with other jobs, two threads that wait for each
    other are many times slower. The previous setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def logits_from_labels(labels: np.ndarray, num_classes: int = 2) -> torch.Tensor:
    """Saturated logits (1, K, H, W) whose softmax is the one-hot of labels (H, W), to float precision."""
    one_hot = np.eye(num_classes, dtype=np.float32)[labels]  # (H, W, K)
    return torch.from_numpy(one_hot).permute(2, 0, 1)[None] * 40.0 - 20.0


def dice_metric(pred: np.ndarray, truth: np.ndarray, num_classes: int = 2) -> np.ndarray:
    return mod.scores_from_confusion(mod.confusion_matrix(pred, truth, num_classes))["dice"]


# --- Dice loss and Dice coefficient on hand cases ---------------------------------------------

TRUTH = np.zeros((4, 4), dtype=np.int64)
TRUTH[0, :] = 1  # 4 foreground pixels in the top row
HALF = np.zeros((4, 4), dtype=np.int64)
HALF[0, :2] = 1
HALF[1, :2] = 1  # 4 predicted pixels, 2 of them on the truth
DISJOINT = np.zeros((4, 4), dtype=np.int64)
DISJOINT[3, :] = 1


@pytest.mark.parametrize(
    "pred, intersection, predicted",
    [(TRUTH, 4, 4), (DISJOINT, 0, 4), (HALF, 2, 4)],
    ids=["perfect", "disjoint", "half-overlap"],
)
def test_dice_coefficient_and_soft_dice_loss_on_hand_cases(isolated, pred, intersection, predicted):
    isolated(mod, DICE_SMOOTH=1.0)
    expected = 2 * intersection / (predicted + 4)  # 4 true pixels
    assert dice_metric(pred, TRUTH)[1] == pytest.approx(expected)
    loss = mod.soft_dice_loss(logits_from_labels(pred), torch.from_numpy(TRUTH)[None])
    # loss = 1 - (2 I + s) / (P + G + s) with the smoothing s = 1, foreground class only
    assert loss.item() == pytest.approx(1 - (2 * intersection + 1) / (predicted + 4 + 1), abs=1e-5)


def test_empty_empty_rule_metric_nan_loss_zero_and_excluded_from_means(isolated):
    isolated(mod, DICE_SMOOTH=1.0, BOOTSTRAP_SAMPLES=50)
    empty = np.zeros((4, 4), dtype=np.int64)
    scores = mod.scores_from_confusion(mod.confusion_matrix(empty, empty, 2))
    assert np.isnan(scores["dice"][1]) and np.isnan(scores["iou"][1])  # 0 / 0: undefined
    assert scores["dice"][0] == 1.0  # background itself is perfect
    assert mod.soft_dice_loss(logits_from_labels(empty), torch.from_numpy(empty)[None]).item() == (
        pytest.approx(0.0, abs=1e-6)
    )  # smoothed: s / s = 1, nothing to fix
    # A class absent from the truth but predicted is a false alarm: Dice 0, not NaN.
    assert dice_metric(TRUTH, empty)[1] == 0.0
    # The NaN patient is left out of the mean over patients.
    names = ("background", "lesion")
    patients = [
        mod.score_patient(empty[None], empty[None], (1.0, 1.0, 1.0), names),
        mod.score_patient(HALF[None], TRUTH[None], (1.0, 1.0, 1.0), names),
    ]
    summary = mod.summarize(patients, names)
    assert summary["dice"]["lesion"] == pytest.approx(0.5)


def test_dice_loss_gradient_is_finite_when_target_is_all_background(isolated):
    isolated(mod, DICE_SMOOTH=1.0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = mod.soft_dice_loss(logits, torch.zeros(2, 8, 8, dtype=torch.long))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0  # predicted foreground is penalized
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_dice_loss_skips_ignored_pixels(isolated):
    isolated(mod, DICE_SMOOTH=1.0)
    target = torch.from_numpy(TRUTH.copy())[None]
    target[0, 3, :] = mod.IGNORE_INDEX  # the disjoint row is "don't care"
    pred = TRUTH.copy()
    pred[3, :] = 1  # wrong only where the label is ignored
    assert mod.soft_dice_loss(logits_from_labels(pred), target).item() == pytest.approx(
        0.0, abs=1e-5
    )


def test_focal_loss_with_gamma_zero_is_cross_entropy(isolated):
    isolated(mod, FOCAL_GAMMA=0.0)
    logits = torch.randn(2, 3, 5, 5)
    target = torch.randint(0, 3, (2, 5, 5))
    target[0, 0, 0] = mod.IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits, target, ignore_index=mod.IGNORE_INDEX)
    assert mod.focal_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


# --- Sensitivity, specificity, precision ------------------------------------------------------


def test_sensitivity_specificity_precision_from_a_known_confusion():
    # 10 pixels: TP = 3, FN = 1, FP = 2, TN = 4 for class 1.
    truth = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    pred = np.array([1, 1, 1, 0, 1, 1, 0, 0, 0, 0])
    confusion = mod.confusion_matrix(pred, truth, 2)
    assert confusion.tolist() == [[4, 2], [1, 3]]  # rows = truth, columns = prediction
    scores = mod.scores_from_confusion(confusion)
    assert scores["sensitivity"][1] == pytest.approx(3 / 4)
    assert scores["specificity"][1] == pytest.approx(4 / 6)
    assert scores["precision"][1] == pytest.approx(3 / 5)
    assert scores["iou"][1] == pytest.approx(3 / 6)
    assert scores["dice"][1] == pytest.approx(6 / 9)
    # Ignored pixels change nothing.
    assert (mod.confusion_matrix(np.append(pred, 1), np.append(truth, 255), 2) == confusion).all()


def test_three_class_scores_are_one_vs_rest():
    truth = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 2, 2, 2])
    scores = mod.scores_from_confusion(mod.confusion_matrix(pred, truth, 3))
    # class 2: TP = 2, FP = 1 (a true 1), FN = 0, TN = 3
    assert scores["sensitivity"][2] == pytest.approx(1.0)
    assert scores["precision"][2] == pytest.approx(2 / 3)
    assert scores["specificity"][2] == pytest.approx(3 / 4)


def test_hd95_uses_the_voxel_spacing_per_axis():
    a = np.zeros((6, 6, 6), dtype=bool)
    b = np.zeros_like(a)
    a[1, 3, 1] = True
    b[3, 3, 1] = True  # 2 slices apart
    assert mod.hd95(a, b, (3.0, 1.0, 1.0)) == pytest.approx(6.0)  # 2 x 3 mm slices
    b[:] = False
    b[1, 3, 3] = True  # 2 columns apart
    assert mod.hd95(a, b, (3.0, 0.5, 0.5)) == pytest.approx(1.0)
    assert np.isnan(mod.hd95(a, np.zeros_like(a), (1.0, 1.0, 1.0)))


def test_bootstrap_interval_brackets_the_mean_and_ignores_nan():
    values = np.array([0.6, 0.7, 0.8, 0.9, np.nan])
    low, high = mod.bootstrap_ci(values, 500, seed=0)
    assert 0.6 <= low < 0.75 < high <= 0.9
    assert mod.bootstrap_ci(np.array([0.5, 0.5, 0.5]), 100, seed=0) == (0.5, 0.5)


# --- Windowing and resampling -----------------------------------------------------------------


def test_window_clips_and_scales_hounsfield_units():
    hu = np.array([-1000.0, -150.0, 50.0, 250.0, 3000.0])
    assert mod.window_hu(hu, 50.0, 400.0).tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])


def test_spacing_arithmetic():
    assert mod.resampled_shape((40, 128, 128), (3.0, 2.0, 2.0), (5.0, 4.0, 4.0)) == (24, 64, 64)
    assert mod.resampled_shape((33, 100, 90), (2.5, 0.8, 0.8), (5.0, 4.0, 4.0)) == (16, 20, 18)
    # the physical extent is kept to within half a new voxel
    shape = mod.resampled_shape((37, 111, 111), (3.3, 2.1, 2.1), (5.0, 4.0, 4.0))
    for n, old, new, target in zip((37, 111, 111), (3.3, 2.1, 2.1), (5.0, 4.0, 4.0), shape):
        assert abs(target * new - n * old) <= new / 2


def test_resampling_keeps_mask_labels_exactly():
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 3, size=(6, 10, 10))
    for shape in [(15, 23, 7), (3, 4, 4), (6, 20, 20)]:
        out = mod.resample(mask, shape, order=0)
        assert out.shape == shape and out.dtype == mask.dtype
        assert set(np.unique(out)) <= {0, 1, 2}
    # upsampling by an integer factor and back recovers every label
    up = mod.resample(mask, (12, 30, 30), order=0)
    assert (mod.resample(up, mask.shape, order=0) == mask).all()


def test_linear_resampling_lines_up_voxel_edges():
    # A ramp whose value is the physical centre (mm) of each voxel, spacing 1 mm along x.
    ramp = np.broadcast_to((np.arange(16) + 0.5)[None, None, :], (2, 2, 16)).astype(np.float64)
    half = mod.resample(ramp, (2, 2, 8), order=1)  # 2 mm voxels: centres at 1, 3, 5, ...
    assert half[0, 0, 1:-1] == pytest.approx((np.arange(8) * 2 + 1.0)[1:-1])


def test_preprocess_uses_nearest_for_masks_and_the_target_grid(isolated):
    isolated(mod, **TINY)
    case = mod.synthetic_patient(0, "A")
    prepared = mod.preprocess(case)
    shape = mod.resampled_shape(case.mask.shape, case.spacing, mod.TARGET_SPACING)
    assert prepared.resampled == shape
    assert prepared.inputs.shape == (shape[0], 3, 32, 32)  # 2.5D: 3 slices as channels
    assert prepared.labels.shape == (shape[0], 32, 32)
    assert set(np.unique(prepared.labels)) == {0, 1, 2}


# --- Synthetic cohort -------------------------------------------------------------------------


def test_synthetic_patient_is_deterministic_and_imbalanced(isolated):
    isolated(mod, NATIVE_SIZE=64)
    a, b = mod.synthetic_patient(3, "B"), mod.synthetic_patient(3, "B")
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    other = mod.synthetic_patient(4, "B")
    assert a.spacing != other.spacing and a.spacing[0] > a.spacing[1]  # anisotropic, per patient
    assert 0.003 < (a.mask == 2).mean() < 0.025  # lesions: about 0.5-2% of the voxels
    organ_hu = np.median(a.image[0][a.mask == 1])
    lesion_hu = np.median(a.image[0][a.mask == 2])
    assert 60 < organ_hu < 200 and lesion_hu < organ_hu - 20  # HU-like, hypodense lesions


# --- Patient-level split ----------------------------------------------------------------------


def test_patient_split_puts_no_patient_in_two_splits(isolated):
    isolated(mod, NATIVE_SIZE=16)
    cases = [mod.synthetic_patient(i, "A") for i in range(12)]
    splits = mod.split_patients(cases, seed=0)
    ids = {name: {c.case_id for c in split} for name, split in splits.items()}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"]
    assert not ids["val"] & ids["test"]
    assert ids["train"] | ids["val"] | ids["test"] == {c.case_id for c in cases}
    assert min(len(v) for v in ids.values()) >= 1


# --- Folder loader ----------------------------------------------------------------------------


def write_pair(root, stem, size=(20, 16), image_ext=".png", mask_value=255, mask_stem=None):
    """Write images/<stem><ext> (RGB) and masks/<mask_stem>.png with a foreground square."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    image = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    image[4:10, 4:10] = 200
    Image.fromarray(image).save(root / "images" / f"{stem}{image_ext}")
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[4:10, 4:10] = mask_value
    Image.fromarray(mask).save(root / "masks" / f"{mask_stem or stem}.png")


def test_folder_loader_reads_matched_pairs_and_maps_255_to_1(tmp_path):
    write_pair(tmp_path, "a")
    write_pair(tmp_path, "b", image_ext=".jpg", mask_stem="b_segmentation")  # ISIC naming
    write_pair(tmp_path, "c", image_ext=".tif", mask_value=1)  # indices already
    cases = mod.load_folder_cases(tmp_path)
    assert [c.case_id for c in cases] == ["a", "b", "c"]
    for case in cases:
        assert case.image.shape == (3, 1, 16, 20) and case.mask.shape == (1, 16, 20)
        assert set(np.unique(case.mask)) == {0, 1}
        assert case.mask.sum() == 36
    assert mod.class_names_for(cases) == ("background", "foreground")


def test_folder_loader_names_an_unmatched_image(tmp_path):
    write_pair(tmp_path, "a")
    write_pair(tmp_path, "lonely")
    (tmp_path / "masks" / "lonely.png").unlink()
    with pytest.raises(SystemExit, match=r"error: no mask .*lonely\.png"):
        mod.load_folder_cases(tmp_path)


def test_folder_loader_names_an_unmatched_mask(tmp_path):
    write_pair(tmp_path, "a")
    write_pair(tmp_path, "orphan")
    (tmp_path / "images" / "orphan.png").unlink()
    with pytest.raises(SystemExit, match=r"error: no image .*orphan\.png"):
        mod.load_folder_cases(tmp_path)


def test_folder_loader_names_a_corrupt_image(tmp_path):
    write_pair(tmp_path, "a")
    write_pair(tmp_path, "broken")
    (tmp_path / "images" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(SystemExit, match=r"error: cannot read .*broken\.png"):
        mod.load_folder_cases(tmp_path)


def test_folder_loader_names_a_size_mismatch(tmp_path):
    write_pair(tmp_path, "a")
    write_pair(tmp_path, "odd")
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(tmp_path / "masks" / "odd.png")
    with pytest.raises(
        SystemExit, match=r"error: mask .*odd\.png is 10x10 .* image .*odd\.png is 20x16"
    ):
        mod.load_folder_cases(tmp_path)


def test_folder_loader_needs_images_and_masks_folders(tmp_path):
    with pytest.raises(SystemExit, match="error: .*images"):
        mod.load_folder_cases(tmp_path)


# --- 3D: reassembly and lesion counting -------------------------------------------------------


def test_context_stacking_gives_neighbours_as_channels():
    volume = np.arange(4, dtype=np.float32)[None, :, None, None] * np.ones(
        (1, 4, 2, 2)
    )  # (1, D, H, W)
    stacked = mod.stack_context(volume, 1)  # (D, 3, H, W)
    assert stacked.shape == (4, 3, 2, 2)
    assert stacked[:, :, 0, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]


class LabelEcho(torch.nn.Module):
    """A fake "model": logits that make the class written in the middle input channel certain."""

    def forward(self, x):
        labels = x[:, x.shape[1] // 2].round().long()  # (N, H, W)
        return torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 20.0


def test_3d_reassembly_round_trip(isolated):
    # Native spacing = target spacing, and slices smaller than IMAGE_SIZE: the way to the network's
    # grid (resample, pad, 2.5D slices) and back (reassemble, un-pad, resample) must be exact.
    isolated(mod, TARGET_SPACING=(2.0, 2.0, 2.0), IMAGE_SIZE=16, CONTEXT_SLICES=1)
    native = np.random.default_rng(0).integers(0, 3, size=(5, 12, 14))
    case = mod.Case("x", "A", native[None].astype(np.float32), native, (2.0, 2.0, 2.0), "ct")
    prepared = mod.preprocess(case)
    assert prepared.resampled == (5, 12, 14) and prepared.labels.shape == (5, 16, 16)
    # Labels as the "image": the echo model predicts each slice's own labels; batches of 2 slices
    # must come back in slice order.
    prepared.inputs = mod.stack_context(prepared.labels[None].astype(np.float32), 1)
    probs = mod.predict_probabilities(
        LabelEcho(), prepared.inputs, torch.device("cpu"), batch_size=2
    )
    assert probs.shape == (3, 5, 16, 16)
    assert (probs.argmax(0) == prepared.labels).all()
    back = mod.probabilities_to_native(probs, prepared)  # (3, 5, 12, 14) on the original grid
    assert back.shape == (3, 5, 12, 14)
    assert (back.argmax(0) == native).all()
    assert back.sum(axis=0) == pytest.approx(np.ones(native.shape), abs=1e-5)  # still probabilities


def test_probabilities_map_back_to_a_finer_native_grid(isolated):
    # Native voxels half the size of the grid's: a large lesion block comes back where it was.
    isolated(mod, TARGET_SPACING=(2.0, 2.0, 2.0), IMAGE_SIZE=16, CONTEXT_SLICES=0)
    native = np.zeros((8, 24, 24), dtype=np.int64)
    native[2:6, 4:20, 4:20] = 1
    native[2:6, 8:12, 8:12] = 2
    case = mod.Case("x", "A", native[None].astype(np.float32), native, (1.0, 1.0, 1.0), "ct")
    prepared = mod.preprocess(case)
    assert prepared.resampled == (4, 12, 12) and set(np.unique(prepared.labels)) == {0, 1, 2}
    one_hot = np.eye(3, dtype=np.float32)[prepared.labels].transpose(3, 0, 1, 2)  # (K, D', S, S)
    back = mod.probabilities_to_native(one_hot, prepared).argmax(0)
    assert back.shape == native.shape
    assert (back == native).mean() > 0.97  # only corner voxels of the blocks may differ
    assert dice_metric(back, native, 3)[2] > 0.9


def test_crop_or_pad_is_its_own_inverse():
    array = np.arange(2 * 7 * 5).reshape(2, 7, 5)
    padded = mod.center_crop_or_pad(array, (10, 9), -1)
    assert (mod.center_crop_or_pad(padded, (7, 5), -1) == array).all()
    cropped = mod.center_crop_or_pad(array, (3, 3), -1)
    assert (cropped == array[:, 2:5, 1:4]).all()


def test_lesion_counting_on_a_constructed_volume():
    truth = np.zeros((10, 20, 20), dtype=bool)
    truth[1:3, 1:4, 1:4] = True  # lesion 1
    truth[5:8, 10:14, 10:14] = True  # lesion 2
    truth[8, 2, 2] = truth[9, 3, 3] = True  # lesion 3: two voxels touching only at a corner
    pred = np.zeros_like(truth)
    pred[2, 2, 2] = True  # touches lesion 1
    pred[6:8, 11:13, 11:13] = True  # inside lesion 2
    pred[0, 18:20, 18:20] = True  # a false positive
    counts = mod.count_lesions(pred, truth)
    assert counts == {"true_lesions": 3, "found": 2, "missed": 1, "false_positives": 1}


# --- Training and the whole script ------------------------------------------------------------


def test_a_short_training_run_learns(isolated):
    isolated(
        mod, **dict(TINY, PATIENTS_PER_SCANNER=4), BATCH_SIZE=8, PATIENCE=10, LEARNING_RATE=1e-2
    )
    mod.seed_everything(0)
    splits, names = mod.load_data()
    prepared = {s: [mod.preprocess(c) for c in cases] for s, cases in splits.items()}
    labels = mod.slice_tensors(prepared["train"])[1].numpy()
    data = dict(
        train=prepared["train"],
        val=prepared["val"],
        class_names=names,
        class_weights=mod.class_weights_from(labels, len(names)),
    )
    model, history = mod.fit("dice_ce", data, 8, torch.device("cpu"))
    assert history[-1]["train_loss"] < 0.4 * history[0]["train_loss"]
    assert history[0]["val_dice"]["lesion"] < 0.2  # it starts knowing nothing ...
    dice = mod.validation_dice(model, prepared["val"], names, torch.device("cpu"), None)
    assert dice["organ"] > 0.8 and dice["lesion"] > 0.5  # ... and finds organ and lesions in 3D


def test_main_quick_end_to_end_then_predict(isolated, tmp_path):
    isolated(mod, NUM_THREADS=1)
    script_outputs = mod.Path(mod.__file__).resolve().parent / "outputs"
    before = sorted(script_outputs.rglob("*")) if script_outputs.exists() else None
    metrics = mod.main(["--quick"])
    out = tmp_path / "outputs" / "quick"  # a set-up check never touches a real run's files
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("organ", "lesion"):
        assert 0.0 <= saved["test"]["dice"][key] <= 1.0
        assert set(saved["test"]["sensitivity"]) >= {"organ", "lesion"}
        assert set(saved["test"]["specificity"]) >= {"organ", "lesion"}
    assert len(saved["test"]["per_patient"]) == saved["test"]["n_patients"] >= 1
    assert saved["total_seconds"] > 0 and saved["device"] == str(mod.pick_device(mod.DEVICE))
    assert saved["test_ood"]["n_patients"] == 2
    assert set(saved["loss_comparison"]) == set(mod.COMPARE_LOSSES)
    assert metrics["test"]["dice"]["organ"] == saved["test"]["dice"]["organ"]
    for name in (
        "best_model.pt",
        "preprocessing.png",
        "training_curves.png",
        "three_views.png",
        "per_patient_dice.png",
        "example_slice.png",
    ):
        assert (out / name).is_file(), name
    # main(["--quick"]) set OUTPUT_DIR to outputs/quick/ for the rest of this test (isolated()
    # restores it): --predict now finds the quick model, as `--quick --predict` does in a shell
    result = mod.main(["--predict", str(out / "example_slice.png")])
    assert mod.Path(result["overlay"]).is_file() and mod.Path(result["overlay"]).parent == out
    after = sorted(script_outputs.rglob("*")) if script_outputs.exists() else None
    assert before == after  # nothing written beside the real script


def test_user_errors_exit_with_one_clear_line(isolated, tmp_path, monkeypatch):
    # As a user sees it: a one-line message on stderr, a non-zero exit status, no traceback.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = run_script(SCRIPT, ["--predict", "no_such_image.png"], tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip() == "error: no such image file: no_such_image.png"
    # The other user errors raise the same kind of SystemExit (checked in-process: faster).
    isolated(mod)
    (tmp_path / "slice.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(SystemExit, match="error: no trained model at .*best_model.pt"):
        mod.main(["--predict", str(tmp_path / "slice.png")])
    with pytest.raises(SystemExit, match="error: .*nowhere.* is not a folder"):
        mod.main(["--data-dir", str(tmp_path / "nowhere")])
