"""Tests for Example 2: pretrained encoders, DeepLabV3 / FPN decoders, VOC data, metrics, DDP.

Run from the repository root: python -m pytest -q tests/test_example_2_pretrained_encoders.py
"""

import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import REPO_ROOT, load_script
from PIL import Image

SCRIPT = "example_2_pretrained_encoders/pretrained_segmentation.py"
ARCHITECTURES = ("deeplabv3", "deeplabv3plus", "fpn")
ENCODERS = ("resnet18", "resnet34", "resnet50", "vgg16_bn")


@pytest.fixture
def mod(isolated, tmp_path):
    """The script module with its constants restored after the test and all paths in tmp_path."""
    return isolated(load_script(SCRIPT), DATA_ROOT=tmp_path / "data")


def offline(*args, **kwargs):
    """Stand-in for any download: fails the way it does without internet."""
    raise urllib.error.URLError("no network in this test")


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


def write_tiny_vocdevkit(root: Path, palette: np.ndarray) -> dict[str, tuple[np.ndarray, int]]:
    """VOCdevkit/VOC2012 with 3 train + 2 val images; returns {name: (mask, object class)}."""
    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    splits = {"train": ["2007_000032", "2007_000033", "2007_000039"], "val": ["2007_000042", "2007_000061"]}
    for names in splits.values():
        for number, name in enumerate(names):
            height, width = 30 + 4 * number, 40 + 6 * number  # different sizes, like VOC
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
                voc / "JPEGImages" / f"{name}.jpg"
            )
            label = int(rng.integers(1, 21))
            mask = np.zeros((height, width), dtype=np.uint8)
            mask[5:20, 8:30] = 255  # outline ...
            mask[7:18, 10:28] = label  # ... around the object, like VOC's
            png = Image.fromarray(mask, mode="P")
            png.putpalette(palette.flatten().tolist())
            png.save(voc / "SegmentationClass" / f"{name}.png")
            written[name] = (mask.astype(np.int64), label)
    for split, names in splits.items():
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return written


def test_voc_palette_matches_the_official_colours(mod):
    palette = mod.voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[1].tolist() == [128, 0, 0]  # aeroplane
    assert palette[15].tolist() == [192, 128, 128]  # person
    assert palette[255].tolist() == [224, 224, 192]  # the "void" outline colour


def test_voc_loader_reads_a_tiny_vocdevkit(mod, isolated, tmp_path):
    isolated(mod, DATA_ROOT=tmp_path, DATASET="voc", VAL_FRACTION=0.34, IMAGE_SIZE=24)
    written = write_tiny_vocdevkit(tmp_path, mod.voc_palette())
    datasets, name = mod.load_datasets()
    assert name == "voc"
    assert (len(datasets["train"]), len(datasets["val"]), len(datasets["test"])) == (2, 1, 2)

    # test split = VOC val, untransformed: exactly the files' pixels and class ids
    voc_root = tmp_path / "VOCdevkit" / "VOC2012"
    for index, file_name in enumerate(["2007_000042", "2007_000061"]):
        image, mask = datasets["test"][index]
        expected_mask, label = written[file_name]
        decoded = np.asarray(Image.open(voc_root / "JPEGImages" / f"{file_name}.jpg"), dtype=np.float32) / 255
        assert image.dtype == torch.float32 and mask.dtype == torch.int64
        assert image.shape == (3, *expected_mask.shape)
        assert torch.equal(image, torch.from_numpy(decoded).permute(2, 0, 1))
        assert torch.equal(mask, torch.from_numpy(expected_mask))
        assert set(mask.unique().tolist()) == {0, label, 255}

    # training items are augmented crops with labels from the same set
    torch.manual_seed(0)
    for index in range(len(datasets["train"])):
        image, mask = datasets["train"][index]
        assert image.shape == (3, 24, 24) and mask.shape == (24, 24)
        assert image.dtype == torch.float32 and mask.dtype == torch.int64
        assert 0 <= image.min() and image.max() <= 1
        assert set(mask.unique().tolist()) <= {0, 255} | {label for _, label in written.values()}


def test_a_broken_voc_folder_is_one_clear_error(mod, isolated, tmp_path):
    isolated(mod, DATA_ROOT=tmp_path, DATASET="voc")
    (tmp_path / "VOCdevkit" / "VOC2012").mkdir(parents=True)  # present, but no ImageSets lists
    with pytest.raises(SystemExit, match="^error: .*not a complete VOC 2012 folder"):
        mod.load_datasets()


def test_train_transform_keeps_image_and_mask_aligned_and_255_intact(mod, isolated):
    isolated(mod, JITTER=0.0, IMAGE_SIZE=48, SCALE_RANGE=(0.6, 1.5))
    # a blocky label map; each label gets a colour that is no mix of the others (nor of black)
    colours = {0: (0.2, 0.7, 0.3), 3: (1.0, 0.0, 0.0), 15: (0.0, 0.0, 1.0), 255: (1.0, 1.0, 1.0)}
    labels = np.array(list(colours))
    blocks = np.random.default_rng(0).integers(0, len(labels), (5, 7))
    mask = torch.from_numpy(labels[np.kron(blocks, np.ones((8, 8), dtype=int))])  # 40 x 56
    palette = torch.tensor([colours[int(label)] for label in labels])
    image = (
        palette[torch.from_numpy(np.kron(blocks, np.ones((8, 8), dtype=int)))].permute(2, 0, 1).contiguous()
    )

    for trial in range(30):
        torch.manual_seed(trial)
        out_image, out_mask = mod.train_transform(image, mask)
        assert out_image.shape == (3, 48, 48) and out_mask.shape == (48, 48) and out_mask.dtype == torch.int64
        assert set(out_mask.unique().tolist()) <= set(colours)  # no invented labels, 255 stays 255
        matched = torch.zeros(48, 48, dtype=torch.bool)
        for label, colour in colours.items():
            # a pixel that still shows a label's exact colour must carry exactly that label
            exact = (out_image - torch.tensor(colour)[:, None, None]).abs().amax(dim=0) < 1e-4
            assert (out_mask[exact] == label).all(), f"trial {trial}: label {label} misaligned"
            matched |= exact
        padding = out_image.abs().amax(dim=0) == 0  # black = padding: ignored, never background
        assert (out_mask[padding] == 255).all()
        assert (matched | padding).float().mean() > 0.6  # the check covers most pixels


def test_synthetic_dataset_is_deterministic_and_voc_like(mod, isolated):
    isolated(mod, IMAGE_SIZE=64)
    data = mod.SyntheticVOC(split=1, length=8)
    image, mask = data[3]
    again_image, again_mask = mod.SyntheticVOC(split=1, length=8)[3]
    assert torch.equal(image, again_image) and torch.equal(mask, again_mask)
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and mask.dtype == torch.int64
    labels = torch.cat([data[i][1].flatten() for i in range(8)]).unique().tolist()
    assert 0 in labels and 255 in labels and len(labels) >= 5  # background, outlines, objects
    assert set(labels) <= set(range(21)) | {255}
    assert not torch.equal(mask, mod.SyntheticVOC(split=2, length=8)[3][1])  # splits differ


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, output_stride, sizes",
    [
        ("resnet18", 32, [(16, 24), (8, 12), (4, 6), (2, 3)]),
        ("resnet34", 16, [(16, 24), (8, 12), (4, 6), (4, 6)]),  # dilated by hand (BasicBlock)
        ("resnet18", 8, [(16, 24), (8, 12), (8, 12), (8, 12)]),
        ("resnet50", 8, [(16, 24), (8, 12), (8, 12), (8, 12)]),  # replace_stride_with_dilation
        ("vgg16_bn", 32, [(16, 24), (8, 12), (4, 6), (2, 3)]),
        ("vgg16_bn", 16, [(16, 24), (8, 12), (4, 6), (4, 6)]),
    ],
)
def test_encoder_feature_strides(mod, name, output_stride, sizes):
    extractor, channels, mean, std, loaded = mod.build_encoder(name, output_stride, pretrained=False)
    with torch.no_grad():
        features = extractor.eval()(torch.zeros(1, 3, 64, 96))
    assert list(features) == ["c2", "c3", "c4", "c5"]
    assert [tuple(f.shape[-2:]) for f in features.values()] == sizes
    assert [f.shape[1] for f in features.values()] == list(channels.values())
    assert (mean, std) == (
        [0.485, 0.456, 0.406],
        [0.229, 0.224, 0.225],
    )  # ImageNet, from the weights' metadata
    assert loaded is False


def test_hand_dilation_keeps_resnet18_weights_shapes_and_dilates_layer4(mod):
    extractor, *_ = mod.build_encoder("resnet18", 16, pretrained=False)
    plain = torchvision.models.resnet18()
    shapes = {k: v.shape for k, v in extractor.state_dict().items()}
    assert shapes == {k: v.shape for k, v in plain.state_dict().items() if not k.startswith("fc.")}
    conv = extractor.get_submodule
    assert conv("layer4.0.conv1").stride == (1, 1) and conv("layer4.0.downsample.0").stride == (1, 1)
    assert conv("layer4.1.conv2").dilation == (2, 2) and conv("layer4.1.conv2").padding == (2, 2)
    assert conv("layer3.0.conv1").stride == (2, 2) and conv("layer3.0.conv1").dilation == (1, 1)


@pytest.mark.parametrize("output_stride, rates", [(16, (6, 12, 18)), (8, (12, 24, 36))])
def test_aspp_branch_dilations_and_output_shape(mod, output_stride, rates):
    head = mod.DeepLabV3Head({"c5": 64}, num_classes=21, output_stride=output_stride, width=16)
    convs = [branch[0] for branch in head.aspp.branches]
    assert [conv.kernel_size for conv in convs] == [(1, 1), (3, 3), (3, 3), (3, 3)]
    assert [conv.dilation[0] for conv in convs] == [1, *rates]
    assert [conv.padding[0] for conv in convs[1:]] == list(rates)  # same-size outputs
    assert isinstance(head.aspp.pool[0], torch.nn.AdaptiveAvgPool2d)  # the image-pooling branch
    with torch.no_grad():
        assert head.aspp.eval()(torch.randn(2, 64, 7, 9)).shape == (2, 16, 7, 9)
        assert head.eval()({"c5": torch.randn(2, 64, 7, 9)}).shape == (2, 21, 7, 9)
    model = mod.build_model("deeplabv3", "resnet18", 21, pretrained=False, output_stride=output_stride)
    assert [branch[0].dilation[0] for branch in model.decoder.aspp.branches] == [1, *rates]


def test_fpn_head_outputs_stride_4_logits(mod):
    head = mod.FPNHead({"c2": 8, "c3": 16, "c4": 32, "c5": 64}, num_classes=21, width=16).eval()
    sizes = {"c2": (17, 25), "c3": (9, 13), "c4": (5, 7), "c5": (3, 4)}  # odd sizes, as from 65 x 97
    features = {
        key: torch.randn(2, channels, *sizes[key])
        for key, channels in [("c2", 8), ("c3", 16), ("c4", 32), ("c5", 64)]
    }
    with torch.no_grad():
        assert head(features).shape == (2, 21, 17, 25)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_every_build_model_pair_gives_full_resolution_logits(mod, encoder):
    torch.manual_seed(0)
    images = torch.rand(1, 3, 65, 97)
    for architecture in ARCHITECTURES:
        model = mod.build_model(architecture, encoder, 21, pretrained=False).eval()
        with torch.no_grad():
            logits = model(images)
        assert logits.shape == (1, 21, 65, 97), f"{architecture} x {encoder}"
        assert torch.isfinite(logits).all()


def test_local_weights_file_loads_into_the_encoder(mod, isolated, tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    isolated(mod, PRETRAINED_WEIGHTS=tmp_path / "r18.pth")
    model = mod.build_model("deeplabv3", "resnet18", 21, pretrained=True)
    assert model.pretrained_loaded is True
    for key in ("conv1.weight", "layer4.1.conv2.weight", "layer2.0.downsample.1.running_var"):
        assert torch.equal(model.encoder.state_dict()[key], reference.state_dict()[key])


def test_wrong_or_missing_weights_file_gives_a_clear_error(mod, isolated, tmp_path):
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    isolated(mod, PRETRAINED_WEIGHTS=tmp_path / "r34.pth")
    with pytest.raises(
        SystemExit, match=r"^error: .*does not fit resnet18: .*unexpected keys \['layer1\.2\."
    ):
        mod.build_model("fpn", "resnet18", 21, pretrained=True)
    isolated(mod, PRETRAINED_WEIGHTS=tmp_path / "absent.pth")
    with pytest.raises(SystemExit, match="^error: PRETRAINED_WEIGHTS file not found"):
        mod.build_model("fpn", "resnet18", 21, pretrained=True)


def test_failing_weights_download_gives_random_init_and_one_line(mod, monkeypatch, capsys):
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    torch.manual_seed(0)
    model = mod.build_model("fpn", "resnet18", 21, pretrained=True)
    lines = capsys.readouterr().out.strip().splitlines()
    assert model.pretrained_loaded is False
    assert len(lines) == 1 and "URLError" in lines[0] and "random initialization" in lines[0]
    assert "PRETRAINED_WEIGHTS" in lines[0]


def test_failing_voc_download_falls_back_to_synthetic_with_one_line(
    mod, isolated, tmp_path, monkeypatch, capsys
):
    import torchvision.datasets.voc as voc

    monkeypatch.setattr(voc, "download_and_extract_archive", offline)
    isolated(
        mod, DATA_ROOT=tmp_path / "data", DOWNLOAD_VOC=True, SYNTHETIC_SPLIT_SIZES=(4, 2, 3), IMAGE_SIZE=32
    )
    datasets, name = mod.load_datasets()
    lines = capsys.readouterr().out.strip().splitlines()
    assert name == "synthetic"
    assert len(lines) == 1
    assert "download failed" in lines[0] and "URLError" in lines[0]  # what failed
    assert str(tmp_path / "data" / "VOCdevkit" / "VOC2012") in lines[0]  # where to put the data
    assert 'DATASET = "synthetic"' in lines[0]  # how to choose
    assert [len(datasets[split]) for split in ("train", "val", "test")] == [4, 2, 3]
    image, mask = datasets["train"][0]
    assert image.shape == (3, 32, 32) and mask.dtype == torch.int64


# ----------------------------------------------------------------------------------------------
# metrics, inference, training
# ----------------------------------------------------------------------------------------------


def test_confusion_matrix_metrics_on_hand_cases(mod):
    pred = torch.tensor([[0, 1, 1], [2, 2, 0]])
    target = torch.tensor([[0, 1, 255], [1, 2, 0]])  # the 255 pixel is ignored, class 3 absent
    cm = mod.confusion_matrix(pred, target, 4)
    assert cm.tolist() == [[2, 0, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    metrics = mod.metrics_from_confusion(cm)
    iou = metrics["per_class_iou"]
    assert iou[:3] == pytest.approx([1.0, 0.5, 0.5]) and np.isnan(iou[3])  # absent from both: NaN
    assert metrics["miou"] == pytest.approx(2 / 3)  # ... and left out of the mean
    assert metrics["pixel_accuracy"] == pytest.approx(4 / 5)
    assert metrics["mean_class_accuracy"] == pytest.approx((1 + 0.5 + 1) / 3)

    # a class predicted but never true has IoU 0 and counts in the mean
    metrics = mod.metrics_from_confusion(
        mod.confusion_matrix(torch.tensor([[3, 0]]), torch.tensor([[0, 0]]), 4)
    )
    assert metrics["per_class_iou"][0] == pytest.approx(0.5) and metrics["per_class_iou"][3] == 0.0
    assert metrics["miou"] == pytest.approx(0.25)


def test_multiscale_with_scale_one_and_no_flip_equals_plain_inference(mod):
    torch.manual_seed(0)
    model = mod.build_model("fpn", "resnet18", 21, pretrained=False).eval()
    images = torch.rand(2, 3, 40, 56)
    with torch.no_grad():
        plain = model(images).softmax(dim=1)
        assert torch.equal(mod.multiscale_probs(model, images, (1.0,), False), plain)
        averaged = mod.multiscale_probs(model, images, (0.75, 1.0, 1.25), True)
    assert averaged.shape == (2, 21, 40, 56)
    assert torch.allclose(averaged.sum(dim=1), torch.ones(2, 40, 56), atol=1e-5)  # still probabilities


def test_multiscale_flip_undoes_the_flip(mod):
    # a "model" that predicts class 1 on the left half of whatever it sees: averaged over an
    # unflipped and a flipped pass, a correctly undone flip gives 0.5 everywhere
    class LeftHalf(torch.nn.Module):
        def forward(self, images):
            logits = torch.zeros(images.shape[0], 2, *images.shape[-2:])
            logits[:, 0] = 25.0  # class 0 on the right half ...
            logits[:, 1, :, : images.shape[-1] // 2] = 50.0  # ... class 1 on the left half
            return logits

    probs = mod.multiscale_probs(LeftHalf(), torch.rand(1, 3, 8, 10), (1.0,), True)
    assert torch.allclose(probs[0, 1, :, :5], torch.full((8, 5), 0.5)) and torch.allclose(
        probs[0, 1, :, 5:], torch.full((8, 5), 0.5)
    )
    one_pass = mod.multiscale_probs(LeftHalf(), torch.rand(1, 3, 8, 10), (1.0,), False)
    assert one_pass[0, 1, 0, 0] > 0.99 and one_pass[0, 1, 0, 9] < 0.01


def test_warmup_freezes_encoder_and_its_batchnorm_then_training_learns(mod, isolated):
    isolated(mod, IMAGE_SIZE=32, LR=2e-3)
    torch.manual_seed(0)
    model = mod.build_model("fpn", "resnet18", 21, pretrained=False)
    data = mod.SyntheticVOC(split=0, length=4)
    images, masks = mod.pad_collate([data[i] for i in range(4)])
    optimizer, scheduler = mod.make_optimizer(model, total_steps=40)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batch = [(images, masks)]
    cpu = torch.device("cpu")

    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}  # weights and BN stats
    decoder_before = [p.clone() for p in model.decoder.parameters()]
    mod.set_encoder_trainable(model, False)
    first = mod.train_one_epoch(model, model, batch, optimizer, scheduler, scaler, cpu, frozen=True)
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[key]), f"frozen encoder changed: {key}"
    assert any(not torch.equal(a, b) for a, b in zip(decoder_before, model.decoder.parameters()))

    mod.set_encoder_trainable(model, True)
    for _ in range(20):  # fine-tuning on one batch: the loss must fall a lot
        last = mod.train_one_epoch(model, model, batch, optimizer, scheduler, scaler, cpu, frozen=False)
    assert not torch.equal(model.encoder.state_dict()["conv1.weight"], encoder_before["conv1.weight"])
    assert last < 0.5 * first


def test_poly_schedule_and_encoder_learning_rates(mod, isolated):
    isolated(mod, LR=0.01, ENCODER_LR_FACTOR=0.1, POLY_POWER=0.9)
    model = mod.build_model("fpn", "resnet18", 21, pretrained=False)
    for pretrained, encoder_lr in ((True, 0.001), (False, 0.01)):
        model.pretrained_loaded = pretrained  # a pretrained encoder learns 10x slower
        optimizer, scheduler = mod.make_optimizer(model, total_steps=10)
        assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([encoder_lr, 0.01])
        for _ in range(4):
            optimizer.step()
            scheduler.step()
        assert optimizer.param_groups[1]["lr"] == pytest.approx(0.01 * (1 - 4 / 10) ** 0.9)


# ----------------------------------------------------------------------------------------------
# scale-out and end to end
# ----------------------------------------------------------------------------------------------


def evaluate_fixed_model() -> torch.Tensor:
    """Confusion matrix of a fixed random FPN on 5 synthetic images, in 1 or N processes."""
    mod = load_script(SCRIPT)
    # batch size 1: oneDNN may pick other kernels for other batch sizes, changing the last bit
    mod.IMAGE_SIZE, mod.BATCH_SIZE, mod.NUM_WORKERS, mod.DEVICE = 40, 1, 0, "cpu"  # gloo, even with a GPU
    rank, world = mod.setup_distributed()
    torch.manual_seed(0)
    model = mod.build_model("fpn", "resnet18", mod.NUM_CLASSES, pretrained=False).eval()
    loader = mod.make_loader(mod.SyntheticVOC(split=2, length=5), train=False, rank=rank, world=world)
    return mod.evaluate(model, loader, torch.device("cpu"), mod.NUM_CLASSES)


def test_two_torchrun_processes_give_the_single_process_confusion_matrix(isolated, tmp_path):
    isolated(load_script(SCRIPT))  # restores the constants evaluate_fixed_model sets
    single = evaluate_fixed_model()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT / "tests"))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        __file__,
        str(tmp_path / "cm.pt"),
    ]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = torch.load(tmp_path / "cm.pt")
    assert torch.equal(distributed, single)
    masks = torch.stack([load_script(SCRIPT).SyntheticVOC(split=2, length=5)[i][1] for i in range(5)])
    assert single.sum() == (masks != 255).sum()  # every labelled pixel counted exactly once


def test_main_quick_end_to_end_then_predict(mod, isolated, tmp_path):
    isolated(mod, PRETRAINED=False, DEVICE="cpu")  # hermetic: no weight download, same device everywhere
    metrics = mod.main(["--quick"])
    out = tmp_path / "outputs" / "quick"  # a set-up check never touches a real run's files
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["dataset"] == "synthetic" and saved["pretrained"] is False
    assert saved["device"] == "cpu" and saved["total_seconds"] > 0
    assert [run["model"] for run in saved["runs"]] == ["deeplabv3_resnet18_scratch", "fpn_resnet18_scratch"]
    for run in saved["runs"]:
        assert 0 <= run["miou"] <= 1 and 0 <= run["pixel_accuracy"] <= 1
        assert run["params"] > 10_000_000 and run["train_seconds"] > 0
    for name in (
        "best_model.pt",
        "metrics.json",
        "confusion_matrix.png",
        "per_class_iou.png",
        "predictions.png",
        "training_curves.png",
    ):
        assert (out / name).is_file(), name

    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(photo)
    # main(["--quick"]) set OUTPUT_DIR to outputs/quick/ for the rest of this test (isolated()
    # restores it): --predict now finds the quick model, as `--quick --predict` does in a shell
    result = mod.main(["--predict", str(photo)])
    mask = Image.open(result["mask"])
    assert mask.mode == "P" and mask.size == (70, 50)
    assert set(np.unique(np.asarray(mask)).tolist()) <= set(range(21))
    assert (out / "photo_prediction.png").is_file()

    with pytest.raises(SystemExit, match="^error: no such image file"):
        mod.main(["--predict", str(tmp_path / "missing.png")])
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(SystemExit, match="^error: .*is not an image"):
        mod.main(["--predict", str(tmp_path / "notes.png")])


if __name__ == "__main__":  # one torchrun worker of the DDP test above
    confusion = evaluate_fixed_model()
    if int(os.environ["RANK"]) == 0:
        torch.save(confusion, sys.argv[1])
    torch.distributed.destroy_process_group()
