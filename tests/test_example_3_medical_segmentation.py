"""Tests for Example 3 (medical segmentation): Dice, metrics, preprocessing, loaders, training."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script, run_script
from PIL import Image
from scipy import ndimage

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
    """Saturated logits (1, K, H, W) whose softmax is the one-hot of labels (H, W), to rounding."""
    one_hot = np.eye(num_classes, dtype=np.float32)[labels]  # (H, W, K)
    return torch.from_numpy(one_hot).permute(2, 0, 1)[None] * 40.0 - 20.0


def dice_metric(pred: np.ndarray, truth: np.ndarray, num_classes: int = 2) -> np.ndarray:
    return mod.label_metrics(pred, truth, num_classes)["dice"]


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
    isolated(mod, DICE_SMOOTH=1.0)
    empty = np.zeros((4, 4), dtype=np.int64)
    scores = mod.label_metrics(empty, empty, 2)
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
    weight = torch.tensor([0.2, 1.0, 3.0])  # class weights, as make_loss passes them
    expected = torch.nn.functional.cross_entropy(
        logits, target, weight=weight, ignore_index=mod.IGNORE_INDEX
    )
    assert mod.focal_loss(logits, target, weight).item() == pytest.approx(expected.item(), rel=1e-5)


# --- Sensitivity, specificity, precision ------------------------------------------------------


def test_sensitivity_specificity_precision_from_a_known_confusion():
    # 10 pixels: TP = 3, FN = 1, FP = 2, TN = 4 for class 1.
    truth = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    pred = np.array([1, 1, 1, 0, 1, 1, 0, 0, 0, 0])
    confusion = mod.confusion_matrix(torch.as_tensor(pred), torch.as_tensor(truth), 2)
    assert confusion.tolist() == [[4, 2], [1, 3]]  # rows = truth, columns = prediction
    scores = mod.metrics_from_confusion(confusion)
    assert scores["sensitivity"][1] == pytest.approx(3 / 4)
    assert scores["specificity"][1] == pytest.approx(4 / 6)
    assert scores["precision"][1] == pytest.approx(3 / 5)
    assert scores["iou"][1] == pytest.approx(3 / 6)
    assert scores["dice"][1] == pytest.approx(6 / 9)
    # Ignored pixels change nothing.
    padded = [torch.as_tensor(np.append(pred, 1)), torch.as_tensor(np.append(truth, 255))]
    assert (mod.confusion_matrix(*padded, 2) == confusion).all()
    assert mod.label_metrics(pred, truth, 2)["dice"][1] == pytest.approx(6 / 9)  # NumPy in


def test_three_class_scores_are_one_vs_rest():
    truth = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 2, 2, 2])
    scores = mod.label_metrics(pred, truth, 3)
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


# --- Issue 12, item 6: a Student-t interval, none where there is no spread ----------------------


def test_t_interval_matches_the_closed_form_and_ignores_nan():
    # n = 4: mean 0.75, s = sqrt(0.05 / 3) = 0.129099, t(0.975, 3) = 3.182446 (a table value)
    values = np.array([0.6, 0.7, 0.8, 0.9, np.nan])
    half = 3.182446 * np.sqrt(0.05 / 3) / np.sqrt(4)  # 0.205426
    assert mod.t_interval(values, 0.95) == pytest.approx((0.75 - half, 0.75 + half), abs=1e-6)
    # n = 6 (the default run's test patients): t(0.975, 5) = 2.570582, wider than 1.96
    six = np.array([0.93, 0.95, 0.91, 0.97, 0.94, 0.96])
    half = 2.570582 * six.std(ddof=1) / np.sqrt(6)
    assert mod.t_interval(six, 0.95) == pytest.approx((six.mean() - half, six.mean() + half))


def test_no_interval_without_spread():
    assert mod.t_interval(np.array([1.0, 1.0, 1.0]), 0.95) is None  # all equal: nothing to estimate
    assert mod.t_interval(np.array([0.7, np.nan]), 0.95) is None  # one value
    assert mod.interval_text(None) == "[no spread]"
    assert mod.interval_text((0.99971, 0.99979)) == "[width < 0.001]"  # would print [1.000, 1.000]
    assert mod.interval_text((0.5, 0.75)) == "[0.500, 0.750]"


def test_summary_reports_the_t_interval_clipped_and_notes_small_n(isolated, capsys):
    isolated(mod, CONFIDENCE=0.95)
    names = ("background", "lesion")
    dice = [0.6, 0.7, 0.8, 0.9]
    patients = [
        {
            "dice": {"background": 1.0, "lesion": d},
            "iou": {"background": 1.0, "lesion": d / (2 - d)},
            "sensitivity": {"background": 1.0, "lesion": 0.99 + 0.003 * i},  # close to 1
            "specificity": {"background": 1.0, "lesion": 1.0},  # no spread at all
            "precision": {"background": 1.0, "lesion": d},
            "hd95_mm": {"lesion": 2.0 + i},
        }
        for i, d in enumerate(dice)
    ]
    summary = mod.summarize(patients, names)
    half = 3.182446 * np.sqrt(0.05 / 3) / 2
    assert summary["ci95"]["dice"]["lesion"] == pytest.approx((0.75 - half, 0.75 + half), abs=1e-6)
    assert summary["ci95"]["specificity"]["lesion"] is None
    assert summary["ci95"]["sensitivity"]["lesion"][1] == 1.0  # a ratio's interval stops at 1
    assert summary["ci95"]["hd95_mm"]["lesion"][0] < 2.0  # distances are not clipped to [0, 1]
    mod.print_summary("test", summary, names)
    out = capsys.readouterr().out
    assert "note: with n = 4 < 10" in out
    assert "specificity  lesion 1.000 +- 0.000 [no spread]" in out
    assert "[1.000, 1.000]" not in out


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
    assert 0.003 < (a.mask == 2).mean() < 0.025  # lesions: a small share (see the next test)
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


def write_named(root: Path, folder: str, name: str, labels: np.ndarray) -> None:
    """root/folder/name: 0/255 for a mask, an RGB picture of the labels for an image."""
    (root / folder).mkdir(parents=True, exist_ok=True)
    pixels = (labels * 255).astype(np.uint8)
    if folder == "images":
        pixels = np.stack([pixels // 2, pixels, pixels // 3], axis=-1)
    Image.fromarray(pixels).save(root / folder / name)


@pytest.mark.parametrize(
    "image_name, mask_name, fov_name",
    [
        ("21_training.tif", "21_manual1.gif", "21_training_mask.gif"),  # DRIVE as downloaded
        ("Image_01L.jpg", "Image_01L_1stHO.png", None),  # CHASE_DB1
        ("im0001.ppm", "im0001.ah.ppm", None),  # STARE
        ("01_dr.JPG", "01_dr.tif", "01_dr_mask.tif"),  # HRF
    ],
)
def test_folder_loader_pairs_public_retina_datasets_as_named(
    tmp_path, image_name, mask_name, fov_name
):
    rng = np.random.default_rng(0)
    truth = {}
    for number in (1, 2, 3):  # three images, each with its own labels and (maybe) FOV
        image_file, mask_file = (n.replace("1", str(number), 1) for n in (image_name, mask_name))
        labels = (rng.random((12, 14)) > 0.7).astype(np.int64)
        write_named(tmp_path, "images", image_file, labels)
        write_named(tmp_path, "masks", mask_file, labels)
        if fov_name:
            fov = np.ones_like(labels)
            fov[:, :number] = 0  # a different field of view per image
            write_named(tmp_path, "fov", fov_name.replace("1", str(number), 1), fov)
        truth[Path(image_file).stem] = (labels, number)
    cases = mod.load_folder_cases(tmp_path)
    assert sorted(c.case_id for c in cases) == sorted(truth)
    for case in cases:  # every image got its own mask (and FOV), not a neighbour's
        labels, number = truth[case.case_id]
        assert np.array_equal(case.mask[0], labels)
        if fov_name:
            assert case.fov[0].sum() == labels.size - 12 * number


def test_folder_loader_refuses_two_annotators_masks_for_one_image(tmp_path):
    write_pair(tmp_path, "Image_01L", mask_stem="Image_01L_1stHO")
    write_pair(tmp_path, "Image_01L", mask_stem="Image_01L_2ndHO")
    with pytest.raises(SystemExit, match=r"error: Image_01L_1stHO\.png and Image_01L_2ndHO\.png"):
        mod.load_folder_cases(tmp_path)


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
    pred[2, 2:4, 2:4] = True  # 4 of lesion 1's 18 voxels: found
    pred[6:8, 11:13, 11:13] = True  # inside lesion 2
    pred[0, 18:20, 18:20] = True  # a false positive
    counts = mod.count_lesions(pred, truth)
    assert counts == {"true_lesions": 3, "found": 2, "missed": 1, "false_positives": 1}
    grazing = pred.copy()
    grazing[8, 2:20, 2:20] = True  # a big blob over 1 of lesion 3's 2 voxels: lesion 3 found,
    counts = mod.count_lesions(grazing, truth)  # but the blob (joined to lesion 2's prediction)
    assert counts == {"true_lesions": 3, "found": 3, "missed": 0, "false_positives": 2}
    # is 9 lesion voxels in 332: a false positive
    everywhere = mod.count_lesions(np.ones_like(truth), truth)  # "lesion" everywhere
    assert everywhere == {"true_lesions": 3, "found": 3, "missed": 0, "false_positives": 1}


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
    model, history, _ = mod.fit("dice_ce", data, 8, torch.device("cpu"))
    assert history[-1]["train_loss"] < 0.4 * history[0]["train_loss"]
    assert history[0]["val_dice"]["lesion"] < 0.2  # it starts knowing nothing ...
    dice = mod.validation_dice(model, prepared["val"], names, torch.device("cpu"), None)
    assert dice["organ"] > 0.8 and dice["lesion"] > 0.5  # ... and finds organ and lesions in 3D


@pytest.mark.parametrize(
    "ctrl_c_at, main_epochs, message",
    [
        (2, 1, "loss comparison skipped"),  # in the main run's 2nd epoch: no comparison starts
        (3, 2, "loss comparison stopped"),  # in the 1st epoch of the weighted_ce comparison run
    ],
)
def test_ctrl_c_keeps_the_main_runs_best_weights_and_ends_the_comparison(
    isolated, monkeypatch, capsys, tmp_path, ctrl_c_at, main_epochs, message
):
    isolated(mod, **TINY, COMPARE_LOSSES=("weighted_ce", "dice_ce"), LOSS="dice_ce", EPOCHS=2)
    splits, names = mod.load_data()
    prepared = {s: [mod.preprocess(c) for c in cases] for s, cases in splits.items()}
    labels = mod.slice_tensors(prepared["train"])[1].numpy()
    data = dict(train=prepared["train"], val=prepared["val"], class_names=names,
                class_weights=mod.class_weights_from(labels, len(names)))  # fmt: skip
    real_epoch, calls = mod.train_one_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == ctrl_c_at:
            raise KeyboardInterrupt  # the user presses Ctrl-C during this epoch
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(mod, "train_one_epoch", interrupted)
    result = mod.train_and_compare(data, torch.device("cpu"), tmp_path / "best.pt")
    out = capsys.readouterr().out
    assert len(calls) == ctrl_c_at and len(result["history"]) == main_epochs
    assert message in out and "nothing to evaluate" not in out and result["model"] is not None
    assert result["comparison"] == {} and list(result["histories"]) == ["dice_ce (main run)"]
    best_epoch = 1 + int(np.argmax([h["val_score"] for h in result["history"]]))
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == best_epoch


def test_model_size_is_counted_by_hand(isolated, capsys):
    isolated(mod, BASE_CHANNELS=4, DEPTH=1)
    # U-Net widths 4, 8 on 3 input channels, 3 classes (3x3 convolutions have no bias; BatchNorm
    # has a weight and a bias per channel; the 2x2 transposed convolution and the 1x1 have biases)
    inc = 3 * 4 * 9 + 2 * 4 + 4 * 4 * 9 + 2 * 4
    down = 4 * 8 * 9 + 2 * 8 + 8 * 8 * 9 + 2 * 8
    up = (8 * 4 * 4 + 4) + (8 * 4 * 9 + 2 * 4 + 4 * 4 * 9 + 2 * 4)
    head = 4 * 3 + 3
    assert mod.describe_model(3, mod.CT_CLASS_NAMES) == inc + down + up + head == 1759
    assert "1,759 parameters" in capsys.readouterr().out


def test_best_weights_keep_the_best_epoch_in_memory_and_on_disk(tmp_path):
    model = torch.nn.Linear(2, 1)
    path = tmp_path / "run" / "best.pt"
    best = mod.BestWeights(path, {"config": {"width": 2}})
    assert best.update(model, 0.5, epoch=1)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)  # training moves on, but validation gets worse
    assert not best.update(model, 0.4, epoch=2) and best.waited == 1
    assert all(torch.equal(best.state[k], first[k]) for k in first)  # epoch 1 is what is kept
    saved = torch.load(path, weights_only=True)
    assert saved["epoch"] == 1 and saved["val_score"] == 0.5 and saved["config"] == {"width": 2}
    assert torch.equal(saved["model_state"]["weight"], first["weight"])
    assert best.update(model, 0.6, epoch=3) and best.waited == 0
    assert torch.load(path, weights_only=True)["epoch"] == 3
    assert not best.update(model, float("nan"), epoch=4)  # an undefined score is never the best
    assert torch.load(path, weights_only=True)["epoch"] == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.pt"]  # no temporary file left


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
    (tmp_path / "drive" / "training").mkdir(parents=True)  # DRIVE as downloaded: not renamed
    (tmp_path / "drive" / "test").mkdir()
    layouts = r"error: .*drive holds neither images/ \+ masks/ nor train/ \+ test/ .*found: test/"
    with pytest.raises(SystemExit, match=layouts):
        mod.main(["--data-dir", str(tmp_path / "drive")])


# --- Issue 12, item 7: the lesion facts have one source of truth -------------------------------


def test_lesion_facts_agree_between_generator_readme_and_comments(isolated):
    isolated(mod, NATIVE_SIZE=48)
    low, high = mod.LESIONS_DRAWN
    share_text = f"{100 * mod.LESION_SHARE[0]:.1f}-{100 * mod.LESION_SHARE[1]:.1f}%"  # "0.5-1.5%"
    readme = (mod.Path(mod.__file__).parent / "README.md").read_text()
    source = mod.Path(mod.__file__).read_text()
    assert f"{low}-{high} hypodense lesions" in readme
    assert share_text in readme and share_text in source
    for stale in ("0.5-2%", "1-5 hypodense"):
        assert stale not in readme and stale not in source
    structure = np.ones((3, 3, 3), dtype=bool)
    for i in range(4):  # what the generator makes is what the text says
        mask = mod.synthetic_patient(i, "ABC"[i % 3]).mask
        assert mod.LESION_SHARE[0] <= (mask == 2).mean() <= mod.LESION_SHARE[1]
        assert 1 <= ndimage.label(mask == 2, structure=structure)[1] <= high
    # and the constant really drives the generator: one lesion drawn -> one lesion found
    isolated(mod, NATIVE_SIZE=48, LESIONS_DRAWN=(1, 1))
    assert ndimage.label(mod.synthetic_patient(0, "A").mask == 2, structure=structure)[1] == 1


# --- Issue 12, item 17: the pipeline's modes (interpolation, averaging, eval mode) ----------------


def test_preprocess_resamples_masks_by_nearest_neighbour(isolated):
    # A 0 | 2 boundary with no organ between: linear interpolation would put 1s on it. The
    # reference is independent nearest-neighbour resampling: output voxel i of m along an axis
    # of n voxels takes source voxel floor((i + 0.5) * n / m), the one that holds its centre.
    isolated(mod, TARGET_SPACING=(2.0, 2.0, 2.0), IMAGE_SIZE=32, CONTEXT_SLICES=0)
    native = np.zeros((6, 26, 26), dtype=np.int64)
    native[:, :, 13:] = 2
    native[:, 3:8, 3:8] = 1
    native[2:5, 16:24, 4:12] = np.random.default_rng(1).integers(0, 3, size=(3, 8, 8))
    case = mod.Case("x", "A", native[None] * 40.0, native, (1.5, 1.3, 1.3), "ct")
    prepared = mod.preprocess(case)
    shape = prepared.resampled
    assert shape == (4, 17, 17)  # round(6 * 1.5 / 2) = 4, round(26 * 1.3 / 2) = 17
    index = [
        np.floor((np.arange(m) + 0.5) * n / m).astype(int) for n, m in zip(native.shape, shape)
    ]
    reference = native[np.ix_(*index)]
    labels = mod.center_crop_or_pad(prepared.labels, shape[1:], 0)  # undo the pad to 32 x 32
    assert (labels == reference).all()


def test_preprocess_resamples_images_linearly(isolated):
    # A HU ramp along x stays a ramp (linear interpolation); nearest would make a staircase.
    isolated(mod, TARGET_SPACING=(2.0, 2.0, 2.0), IMAGE_SIZE=24, CONTEXT_SLICES=0)
    ramp = np.broadcast_to(np.linspace(-100.0, 200.0, 30)[None, None], (4, 30, 30))
    case = mod.Case(
        "x",
        "A",
        ramp[None].astype(np.float32),
        np.zeros((4, 30, 30), np.int64),
        (2.0, 2.0, 1.3),
        "ct",
    )
    prepared = mod.preprocess(case)
    assert prepared.resampled == (4, 30, 20)
    row = mod.center_crop_or_pad(prepared.inputs[:, 0], (30, 20), 0.0)[1, 5]  # (20,) along x
    steps = np.diff(row[1:-1])
    assert steps.min() > 0 and steps == pytest.approx(np.full_like(steps, steps.mean()), rel=1e-3)


def test_probabilities_are_mapped_back_linearly(isolated):
    # A probability ramp on the coarse grid comes back as a finer ramp on the native grid
    # (linear: every native column its own value), not as pairs of copied values.
    isolated(mod, TARGET_SPACING=(2.0, 2.0, 2.0), IMAGE_SIZE=8, CONTEXT_SLICES=0)
    native = np.zeros((2, 16, 16), dtype=np.int64)
    case = mod.Case("x", "A", np.zeros((1, 2, 16, 16), np.float32), native, (2.0, 1.0, 1.0), "ct")
    prepared = mod.preprocess(case)
    assert prepared.resampled == (2, 8, 8)
    p1 = np.broadcast_to(np.linspace(0.1, 0.8, 8)[None, None], (2, 8, 8))
    back = mod.probabilities_to_native(np.stack([1 - p1, p1]).astype(np.float32), prepared)
    row = back[1, 0, 8, 1:-1]  # (14,) inside the edges
    assert len(np.unique(row.round(6))) == 14
    assert np.diff(row) == pytest.approx(np.full(13, 0.05), abs=1e-6)  # 0.1 per coarse voxel / 2


# --- Your own photos: a stand-in retina, the loaders, sliding windows, metrics ----------------


def retina_standin(rng, height, width):
    """A small fundus-like photo: thin branching dark vessels (1-10 px) on an unevenly lit,
    textured, circular field of view. Returns RGB (H, W, 3), vessel mask and FOV, both 0/255."""
    from PIL import ImageDraw

    yy, xx = np.mgrid[:height, :width]
    cy, cx, radius = (height - 1) / 2, (width - 1) / 2, 0.47 * min(height, width)
    fov = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)

    def branch(y, x, angle, vessel_width, depth):
        points = [(x, y)]
        for _ in range(int(rng.integers(6, 12))):
            angle += rng.normal(0, 0.25)
            y, x = y + 4 * np.sin(angle), x + 4 * np.cos(angle)
            points.append((x, y))
        draw.line(points, fill=255, width=round(vessel_width))
        if depth < 3 and vessel_width > 1:
            for turn in (-0.6, 0.6):
                branch(
                    y, x, angle + turn + rng.normal(0, 0.2), max(1, vessel_width * 0.6), depth + 1
                )

    disc = (cy + rng.uniform(-0.2, 0.2) * radius, cx + rng.uniform(-0.4, 0.4) * radius)
    for angle in rng.uniform(0, 2 * np.pi, size=3):
        branch(*disc, angle, rng.uniform(4, 10), 0)
    vessels = (np.asarray(canvas) > 0) & fov
    light = 0.6 + 0.4 * (xx / width) * np.cos(yy / height)  # uneven illumination
    texture = ndimage.gaussian_filter(rng.normal(0, 1, (height, width)), 2) * 0.5
    base = np.clip(light + 0.1 * texture, 0, None)
    rgb = np.stack([0.8 * base, 0.45 * base, 0.2 * base], axis=-1)  # reddish fundus
    rgb[vessels] *= np.array([0.75, 0.45, 0.6])  # vessels darker, most in green
    rgb = (rgb + rng.normal(0, 0.02, rgb.shape)) * fov[..., None]
    rgb = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
    return rgb, vessels.astype(np.uint8) * 255, fov.astype(np.uint8) * 255


def write_retinas(folder, sizes, seed=0, with_fov=True):
    """Write stand-in photos into folder/images, folder/masks (and folder/fov), named r00, r01..."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks") + (("fov",) if with_fov else ()):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i, (height, width) in enumerate(sizes):
        rgb, vessels, fov = retina_standin(rng, height, width)
        Image.fromarray(rgb).save(folder / "images" / f"r{seed}{i:02d}.png")
        Image.fromarray(vessels).save(folder / "masks" / f"r{seed}{i:02d}.png")
        if with_fov:
            Image.fromarray(fov).save(folder / "fov" / f"r{seed}{i:02d}.png")


RAGGED = [(61, 67), (72, 64), (64, 75), (70, 70), (66, 63), (75, 69)]


def test_standin_retinas_are_thin_vessels_in_a_round_field(tmp_path):
    write_retinas(tmp_path, [(80, 90)])
    vessels = np.asarray(Image.open(tmp_path / "masks" / "r000.png")) > 0
    fov = np.asarray(Image.open(tmp_path / "fov" / "r000.png")) > 0
    assert 0.03 < vessels.mean() < 0.35 and not (vessels & ~fov).any()
    widths = ndimage.distance_transform_edt(vessels)[vessels]
    assert widths.max() <= 6  # half-widths: vessels at most ~10 px wide, and many 1-2 px
    assert (widths <= 1).mean() > 0.2


def test_train_test_layout_with_fov_and_classes_through_the_real_loader(tmp_path, isolated):
    isolated(mod)
    write_retinas(tmp_path / "train", RAGGED[:4], seed=0)
    write_retinas(tmp_path / "test", RAGGED[4:], seed=1)
    (tmp_path / "classes.txt").write_text("background\nvessel\n")
    splits, names = mod.load_folder_splits(tmp_path, seed=0)
    assert names == ("background", "vessel")
    assert [len(splits[s]) for s in ("train", "val", "test")] == [3, 1, 2]
    assert sorted(c.case_id for c in splits["test"]) == ["r100", "r101"]  # test kept as it is
    train_ids = {c.case_id for s in ("train", "val") for c in splits[s]}
    assert train_ids == {"r000", "r001", "r002", "r003"}
    for case in splits["train"] + splits["test"]:
        height, width = case.mask.shape[1:]
        assert (height, width) in RAGGED and case.image.shape == (3, 1, height, width)
        assert case.fov.shape == case.mask.shape and case.fov.dtype == bool
        assert set(np.unique(case.mask)) == {0, 1}
    photo = mod.prepare_photo(splits["test"][0])
    assert (photo.labels[~photo.fov] == mod.IGNORE_INDEX).all()  # no loss outside the FOV
    assert set(np.unique(photo.labels[photo.fov])) == {0, 1}


@pytest.mark.parametrize("count", [1, 2, 3])
def test_folders_of_one_two_three_images(tmp_path, isolated, count):
    isolated(mod)
    write_retinas(tmp_path, RAGGED[:count], with_fov=False)
    if count < 3:
        with pytest.raises(
            SystemExit, match=rf"error: .*images has {count} image\(s\); at least 3"
        ):
            mod.load_folder_splits(tmp_path, seed=0)
    else:
        splits, names = mod.load_folder_splits(tmp_path, seed=0)
        assert [len(splits[s]) for s in ("train", "val", "test")] == [1, 1, 1]
        assert names == ("background", "foreground") and splits["train"][0].fov is None


def test_train_folder_of_one_image_is_one_line_error(tmp_path, isolated):
    isolated(mod)
    write_retinas(tmp_path / "train", RAGGED[:1])
    write_retinas(tmp_path / "test", RAGGED[1:2], seed=1)
    with pytest.raises(SystemExit, match=r"error: .*train has 1 image\(s\); at least 2"):
        mod.load_folder_splits(tmp_path, seed=0)


def test_mask_values_are_read_as_binary_grey_or_class_indices():
    def read(values):
        return mod.mask_to_indices(np.array([values], dtype=np.uint8), Path("m.png"))[0].tolist()

    assert read([0, 255, 0]) == [0, 1, 0]  # binary 0/255
    assert read([0, 128, 0]) == [0, 1, 0]  # binary 0/128
    assert read([0, 1, 2, 253, 254, 255, 3]) == [0, 0, 0, 1, 1, 1, 0]  # JPEG-noisy 0/255
    assert read([0, 1, 2, 5]) == [0, 1, 2, 5]  # class indices stay
    with pytest.raises(SystemExit, match=r"error: mask m\.png holds class indices \[1, 2\] and 2"):
        read([0, 1, 2, 255])


def test_fov_and_classes_errors_name_the_file(tmp_path, isolated):
    isolated(mod)
    write_retinas(tmp_path, RAGGED[:3])
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "fov" / "r001.png")
    with pytest.raises(SystemExit, match=r"error: mask .*fov.r001\.png is 12x10 .* image .*r001"):
        mod.load_folder_splits(tmp_path, seed=0)
    (tmp_path / "fov" / "r001.png").unlink()
    with pytest.raises(SystemExit, match=r"error: no mask in .*fov for image .*r001\.png"):
        mod.load_folder_splits(tmp_path, seed=0)
    (tmp_path / "fov" / "r000.png").unlink()
    (tmp_path / "fov" / "r002.png").unlink()
    (tmp_path / "fov").rmdir()
    mask = np.zeros((61, 67), np.uint8)
    mask[5, 5] = 3  # class 3, but classes.txt names 2 classes
    Image.fromarray(mask).save(tmp_path / "masks" / "r000.png")
    (tmp_path / "classes.txt").write_text("background\nvessel\n")
    with pytest.raises(SystemExit, match=r"error: mask .*r000\.png holds class 3 .* 2 classes"):
        mod.load_folder_splits(tmp_path, seed=0)


def test_patches_are_paired_biased_to_foreground_and_stay_in_the_field(isolated):
    isolated(mod, PATCH_SIZE=16, COLOR_JITTER=0.0)
    rng = np.random.default_rng(0)
    labels = np.zeros((40, 50), dtype=np.int64)
    labels[10:13, 5:45] = 1  # a thin horizontal vessel: 6% of the pixels
    fov = np.ones_like(labels, dtype=bool)
    fov[:, 46:] = False
    image = np.stack([labels.astype(np.float32), rng.normal(size=labels.shape).astype(np.float32)])
    photo = mod.Photo("p", image, np.where(fov, labels, mod.IGNORE_INDEX), fov, 40, 50)
    isolated(mod, PATCH_SIZE=16, COLOR_JITTER=0.0, PATCH_FOREGROUND=1.0)
    sampler = mod.PatchSampler([photo], seed=0)
    seen = set()
    for _ in range(64):
        patch, patch_labels = sampler.patch()
        valid = patch_labels != mod.IGNORE_INDEX
        # channel 0 of the image *is* the label map: the same flip / turn hit both
        assert (patch[0][valid] == patch_labels[valid]).all()
        assert patch_labels.shape == (16, 16) and (patch_labels == 1).any()  # always on a vessel
        seen.add("horizontal" if (patch_labels == 1).all(axis=1).any() else "vertical")
    assert seen == {"horizontal", "vertical"}  # quarter turns happen
    isolated(mod, PATCH_SIZE=16, COLOR_JITTER=0.0, PATCH_FOREGROUND=0.0)
    sampler = mod.PatchSampler([photo], seed=0)
    hits = np.mean([(sampler.patch()[1] == 1).any() for _ in range(200)])
    assert hits < 0.9  # without the bias many patches miss the vessel


def test_window_starts_and_weights_by_hand():
    assert mod.window_starts(37, 16, 0.25) == [0, 12, 21]  # stride 12, the last flush with 37
    assert mod.window_starts(16, 16, 0.25) == [0] and mod.window_starts(9, 16, 0.5) == [0]
    weight = mod.window_weight(5, 7)
    assert weight.shape == (5, 7) and weight[2, 3] == pytest.approx(1.0)
    assert (weight > 0).all() and weight[0, 0] < weight[1, 1] < weight[2, 3]
    assert weight == pytest.approx(weight[::-1, ::-1])  # symmetric


class PixelNet(torch.nn.Module):
    """A model with a 1x1 receptive field (and BatchNorm): any window sees all it needs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 6, 1),
            torch.nn.BatchNorm2d(6),
            torch.nn.ReLU(),
            torch.nn.Conv2d(6, 3, 1),
        )
        self.net[1].running_mean.fill_(0.3)
        self.net[1].running_var.fill_(2.0)

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("window, overlap", [(16, 0.25), (12, 0.5), (64, 0.25)])
def test_sliding_windows_equal_one_whole_image_pass(window, overlap):
    image = np.random.default_rng(0).normal(size=(3, 37, 29)).astype(np.float32)  # odd sizes
    model = PixelNet()
    model.train()  # the function must switch to eval mode itself
    probs = mod.sliding_window_probabilities(model, image, torch.device("cpu"), window, overlap)
    model.eval()
    with torch.no_grad():
        whole = model(torch.from_numpy(image)[None]).softmax(dim=1)[0].numpy()
    assert probs.shape == (3, 37, 29)
    assert probs == pytest.approx(whole, abs=1e-5)


class WindowMean(torch.nn.Module):
    """Logits that depend on the whole window: every pixel gets the window's mean input."""

    def forward(self, x):
        level = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
        ones = torch.ones_like(x[:, :1])
        return torch.cat([0 * ones, level * ones, -level * ones], dim=1) * 10  # (B, 3, h, w)


def test_sliding_windows_average_probabilities_with_the_window_weights():
    # Windows see different means, so their predictions differ where they overlap. The expected
    # map is rebuilt here window by window: sum of softmax(logits) * weight / sum of weights.
    image = np.zeros((3, 30, 23), dtype=np.float32)
    image[:, :, 15:] = 1.0
    image[:, 20:] = -0.5
    probs = mod.sliding_window_probabilities(WindowMean(), image, torch.device("cpu"), 12, 0.5)
    total, norm = np.zeros((3, 30, 23)), np.zeros((30, 23))
    for top in mod.window_starts(30, 12, 0.5):
        for left in mod.window_starts(23, 12, 0.5):
            level = image[:, top : top + 12, left : left + 12].mean()
            logits = np.array([0.0, level, -level]) * 10
            p = np.exp(logits) / np.exp(logits).sum()
            weight = mod.window_weight(12, 12)
            total[:, top : top + 12, left : left + 12] += p[:, None, None] * weight
            norm[top : top + 12, left : left + 12] += weight
    assert probs == pytest.approx(total / norm, abs=1e-5)
    assert probs.sum(axis=0) == pytest.approx(np.ones((30, 23)), abs=1e-5)


def test_photo_metrics_on_a_hand_case_with_fov_and_auc(isolated):
    isolated(mod)
    names = ("background", "vessel")
    truth = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]])
    fov = np.ones_like(truth, dtype=bool)
    fov[2, 2:] = False  # the last two pixels are outside the field of view
    p1 = np.array([[0.9, 0.6, 0.7, 0.2], [0.6, 0.1, 0.1, 0.1], [0.1, 0.1, 0.95, 0.05]])
    photo = mod.Photo("h", np.zeros((3, 3, 4), np.float32), np.where(fov, truth, 255), fov, 3, 4)
    scores, confusion = mod.score_photo(np.stack([1 - p1, p1]), photo, names, threshold=0.5)
    # inside the FOV (10 pixels): predicted vessel at 0.9, 0.6, 0.7, 0.6 -> TP 2, FP 2, FN 0, TN 6
    assert confusion.tolist() == [[6, 2], [0, 2]]
    assert scores["dice"]["vessel"] == pytest.approx(4 / 6)
    assert scores["specificity"]["vessel"] == pytest.approx(6 / 8)
    assert scores["precision"]["vessel"] == pytest.approx(2 / 4)
    # AUC by counting pairs (positive score > negative score, ties half): positives 0.9 and 0.6,
    # negatives 0.7, 0.2, 0.6, 0.1 x 5: 0.9 beats all 8; 0.6 beats 6, ties 1 -> (8 + 6.5) / 16
    assert scores["auc"]["vessel"] == pytest.approx(14.5 / 16)
    pairs = [(a > b) + 0.5 * (a == b) for a in (0.9, 0.6) for b in (0.7, 0.2, 0.6) + (0.1,) * 5]
    assert scores["auc"]["vessel"] == pytest.approx(np.mean(pairs))
    # pooled over two photos: one confusion matrix, not the mean of the Dice values
    summary = mod.evaluate_photos(
        None, [photo, photo], names, None, 0.5, [np.stack([1 - p1, p1])] * 2
    )
    assert summary["pooled"]["dice"]["vessel"] == pytest.approx(8 / 12)
    perfect = np.stack([1 - truth, truth]).astype(np.float64)
    mixed = mod.evaluate_photos(
        None, [photo, photo], names, None, 0.5, [perfect, np.stack([1 - p1, p1])]
    )
    assert mixed["dice"]["vessel"] == pytest.approx((1 + 4 / 6) / 2)
    assert mixed["pooled"]["dice"]["vessel"] == pytest.approx(2 * 4 / (2 * 4 + 2))


def test_warn_if_collapsed_says_so_in_one_line(capsys):
    names = ("background", "vessel")
    line = mod.warn_if_collapsed([1000, 0], 0.4, names)
    assert line.startswith("Warning: the model predicts only 'background' everywhere")
    assert "0/255" in line and "optimizer steps" in line and "\n" not in line
    assert mod.warn_if_collapsed([900, 100], 0.0, names).startswith(
        "Warning: the validation score stayed at 0"
    )
    assert mod.warn_if_collapsed([900, 100], 0.5, names) is None
    assert capsys.readouterr().out.count("Warning:") == 2


def test_print_eta_and_pick_num_workers(capsys, monkeypatch):
    assert mod.print_eta(60.0, 100, 1100) == "estimated time to the end of training: about 10 min"
    assert "about 10 min" in capsys.readouterr().out
    assert mod.pick_num_workers(3) == 3 and mod.pick_num_workers("2") == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert mod.pick_num_workers("auto") == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mod.os, "cpu_count", lambda: 16)
    assert mod.pick_num_workers("auto") == 8
    monkeypatch.setattr(mod.os, "cpu_count", lambda: 2)
    assert mod.pick_num_workers("auto") == 1


PHOTO_TINY = {  # a photo run small enough to train in seconds
    "PATCH_SIZE": 32,
    "PHOTO_BATCH": 8,
    "PHOTO_BASE_CHANNELS": 8,
    "PHOTO_DEPTH": 2,
    "WINDOW_SIZE": 48,
    "VAL_EVERY": 40,
    "PHOTO_PATIENCE": 10,
    "LEARNING_RATE": 1e-2,
    "NUM_THREADS": 1,
}


def test_a_short_patch_training_run_learns_the_vessels(tmp_path, isolated):
    isolated(mod, **PHOTO_TINY, PHOTO_STEPS=120)
    write_retinas(tmp_path / "train", RAGGED[:4])
    write_retinas(tmp_path / "test", RAGGED[4:5], seed=1)
    splits, names = mod.load_folder_splits(tmp_path, seed=0)
    photos = {s: [mod.prepare_photo(c) for c in cases] for s, cases in splits.items()}
    labels = np.concatenate([p.labels.ravel() for p in photos["train"]])
    data = {
        "train": photos["train"],
        "val": photos["val"],
        "class_names": names,
        "class_weights": mod.class_weights_from(labels, 2),
    }
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    untrained = mod.UNet(**mod.photo_model_config(2))
    before = mod.evaluate_photos(untrained, photos["test"], names, cpu, 0.5)["dice"]["foreground"]
    model, history = mod.fit_photos(data, cpu)
    assert history[-1]["train_loss"] < 0.6 * history[0]["train_loss"]
    test = mod.evaluate_photos(model, photos["test"], names, cpu, 0.5)
    assert before < 0.5  # it starts knowing nothing ...
    assert test["dice"]["foreground"] > 0.8 and test["auc"]["foreground"] > 0.95  # ... and learns


def test_main_with_data_dir_end_to_end_then_predict(tmp_path, isolated, capsys):
    isolated(mod, **PHOTO_TINY, PHOTO_STEPS=40)
    data = tmp_path / "retina"
    write_retinas(data / "train", RAGGED[:4])
    write_retinas(data / "test", RAGGED[4:], seed=1)
    (data / "classes.txt").write_text("background\nvessel\n")
    metrics = mod.main(["--data-dir", str(data)])
    out = capsys.readouterr().out
    assert "estimated time to the end of training" in out
    saved = json.loads((tmp_path / "outputs" / "metrics.json").read_text())
    assert saved["data"]["images"] == {"train": 3, "val": 1, "test": 2}
    for key in ("dice", "iou", "sensitivity", "specificity", "precision", "auc"):
        assert 0.0 <= saved["test"][key]["vessel"] <= 1.0
    assert 0.0 <= saved["test"]["pooled"]["dice"]["vessel"] <= 1.0
    assert saved["test"]["n_patients"] == 2 and len(saved["test"]["per_patient"]) == 2
    assert saved["validation"]["threshold"] in mod.PHOTO_THRESHOLDS
    assert metrics["test"]["dice"]["vessel"] == saved["test"]["dice"]["vessel"]
    for name in (
        "best_model.pt",
        "training_curves.png",
        "test_predictions.png",
        "per_image_dice.png",
    ):
        assert (tmp_path / "outputs" / name).is_file(), name
    photo = data / "test" / "images" / "r100.png"
    result = mod.main(["--predict", str(photo)])
    overlay = Image.open(result["overlay"])
    assert overlay.size == Image.open(photo).size  # the prediction comes back at the photo's size
    tiny = tmp_path / "tiny.png"  # smaller than a training patch: padded, as in training
    Image.fromarray(np.array(Image.open(photo).convert("RGB"))[:3, :40]).save(tiny)
    assert Image.open(mod.main(["--predict", str(tiny)])["overlay"]).size == (40, 3)
