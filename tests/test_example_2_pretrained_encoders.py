"""Tests for Example 2: pretrained encoders, DeepLabV3 / FPN decoders, VOC data, metrics, DDP.

Run from the repository root: python -m pytest -q tests/test_example_2_pretrained_encoders.py
"""

import json
import os
import shutil
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
    splits = {
        "train": ["2007_000032", "2007_000033", "2007_000039"],
        "val": ["2007_000042", "2007_000061"],
    }
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
    isolated(mod, DATA_ROOT=tmp_path, DATASET="voc", VAL_FRACTION=0.34, CROP_SIZE=24)
    written = write_tiny_vocdevkit(tmp_path, mod.voc_palette())
    datasets, source = mod.load_datasets()
    assert source["dataset"] == "voc" and source["real"] and len(source["classes"]) == 21
    assert (len(datasets["train"]), len(datasets["val"]), len(datasets["test"])) == (2, 1, 2)

    # test split = VOC val, untransformed: exactly the files' pixels and class ids
    voc_root = tmp_path / "VOCdevkit" / "VOC2012"
    for index, file_name in enumerate(["2007_000042", "2007_000061"]):
        image, mask = datasets["test"][index]
        expected_mask, label = written[file_name]
        jpeg = Image.open(voc_root / "JPEGImages" / f"{file_name}.jpg")
        decoded = np.asarray(jpeg, dtype=np.float32) / 255
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
    labels_8x = torch.from_numpy(np.kron(blocks, np.ones((8, 8), dtype=int)))
    image = palette[labels_8x].permute(2, 0, 1).contiguous()

    for trial in range(30):
        torch.manual_seed(trial)
        out_image, out_mask = mod.train_transform(image, mask)
        assert out_image.shape == (3, 48, 48) and out_mask.shape == (48, 48)
        assert out_mask.dtype == torch.int64
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
    extractor, channels, mean, std, loaded = mod.build_encoder(name, output_stride, False)
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
    assert conv("layer4.0.conv1").stride == (1, 1)
    assert conv("layer4.0.downsample.0").stride == (1, 1)
    assert conv("layer4.1.conv2").dilation == (2, 2) and conv("layer4.1.conv2").padding == (2, 2)
    assert conv("layer3.0.conv1").stride == (2, 2) and conv("layer3.0.conv1").dilation == (1, 1)


@pytest.mark.parametrize("output_stride, rates", [(16, (6, 12, 18)), (8, (12, 24, 36))])
def test_aspp_branch_dilations_and_output_shape(mod, output_stride, rates):
    # "auto" rates give back the paper's at the paper's 513-px crops
    assert mod.fitted_aspp_rates(513, output_stride) == rates
    head = mod.DeepLabV3Head({"c5": 64}, num_classes=21, rates=rates, width=16)
    convs = [branch[0] for branch in head.aspp.branches]
    assert [conv.kernel_size for conv in convs] == [(1, 1), (3, 3), (3, 3), (3, 3)]
    assert [conv.dilation[0] for conv in convs] == [1, *rates]
    assert [conv.padding[0] for conv in convs[1:]] == list(rates)  # same-size outputs
    assert isinstance(head.aspp.pool[0], torch.nn.AdaptiveAvgPool2d)  # the image-pooling branch
    with torch.no_grad():
        assert head.aspp.eval()(torch.randn(2, 64, 7, 9)).shape == (2, 16, 7, 9)
        assert head.eval()({"c5": torch.randn(2, 64, 7, 9)}).shape == (2, 21, 7, 9)
    model = mod.build_model(
        "deeplabv3", "resnet18", 21, pretrained=False, output_stride=output_stride, crop=513
    )
    assert [branch[0].dilation[0] for branch in model.decoder.aspp.branches] == [1, *rates]
    assert model.config["aspp_rates"] == rates  # stored: --predict rebuilds the same network


def test_fpn_head_outputs_stride_4_logits(mod):
    head = mod.FPNHead({"c2": 8, "c3": 16, "c4": 32, "c5": 64}, num_classes=21, width=16).eval()
    sizes = {"c2": (17, 25), "c3": (9, 13), "c4": (5, 7), "c5": (3, 4)}  # odd, as from 65 x 97
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
        mod,
        DATA_ROOT=tmp_path / "data",
        DOWNLOAD_VOC=True,
        SYNTHETIC_SPLIT_SIZES=(4, 2, 3),
        IMAGE_SIZE=32,
    )
    datasets, source = mod.load_datasets()
    lines = capsys.readouterr().out.strip().splitlines()
    assert source["dataset"] == "synthetic"
    assert len(lines) == 1
    assert "download failed" in lines[0] and "URLError" in lines[0]  # what failed
    assert str(tmp_path / "data" / "VOCdevkit" / "VOC2012") in lines[0]  # where to put the data
    assert 'DATASET = "synthetic"' in lines[0]  # how to choose
    assert [len(datasets[split]) for split in ("train", "val", "test")] == [4, 2, 3]
    image, mask = datasets["train"][0]
    assert image.shape == (3, 32, 32) and mask.dtype == torch.int64


def test_a_voc_download_that_works_is_read_as_voc(mod, isolated, tmp_path, monkeypatch):
    import torchvision.datasets.voc as voc

    def unpack_tiny_devkit(url, download_root, **kwargs):  # the archive, as VOC 2012 unpacks it
        write_tiny_vocdevkit(Path(download_root), mod.voc_palette())

    monkeypatch.setattr(voc, "download_and_extract_archive", unpack_tiny_devkit)
    isolated(mod, DATA_ROOT=tmp_path / "data", DATASET="voc", DOWNLOAD_VOC=True)
    datasets, source = mod.load_datasets()
    assert source["dataset"] == "voc" and len(source["classes"]) == 21
    assert sum(len(datasets[split]) for split in ("train", "val", "test")) == 5


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
    ones = torch.ones(2, 40, 56)
    assert torch.allclose(averaged.sum(dim=1), ones, atol=1e-5)  # still probabilities


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

    # weights and BatchNorm statistics
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    decoder_before = [p.clone() for p in model.decoder.parameters()]
    mod.set_encoder_trainable(model, False)
    first = mod.train_steps(model, model, batch, optimizer, scheduler, scaler, cpu, frozen=True)
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[key]), f"frozen encoder changed: {key}"
    assert any(not torch.equal(a, b) for a, b in zip(decoder_before, model.decoder.parameters()))

    mod.set_encoder_trainable(model, True)
    for _ in range(20):  # fine-tuning on one batch: the loss must fall a lot
        last = mod.train_steps(
            model, model, batch, optimizer, scheduler, scaler, cpu, frozen=False
        )
    after = model.encoder.state_dict()["conv1.weight"]
    assert not torch.equal(after, encoder_before["conv1.weight"])
    assert last < 0.5 * first


def test_poly_schedule_and_encoder_learning_rates(mod, isolated):
    isolated(mod, LR=0.01, ENCODER_LR_FACTOR=0.1, POLY_POWER=0.9)
    model = mod.build_model("fpn", "resnet18", 21, pretrained=False)
    for pretrained, encoder_lr in ((True, 0.001), (False, 0.01)):
        model.pretrained_loaded = pretrained  # a pretrained encoder learns 10x slower
        optimizer, scheduler = mod.make_optimizer(model, total_steps=10)
        rates = [group["lr"] for group in optimizer.param_groups]
        assert rates == pytest.approx([encoder_lr, 0.01])
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
    # DEVICE "cpu": gloo, even with a GPU
    mod.IMAGE_SIZE, mod.BATCH_SIZE, mod.NUM_WORKERS, mod.DEVICE = 40, 1, 0, "cpu"
    rank, world = mod.setup_distributed()
    torch.manual_seed(0)
    model = mod.build_model("fpn", "resnet18", mod.NUM_CLASSES, pretrained=False).eval()
    dataset = mod.SyntheticVOC(split=2, length=5)
    loader = mod.make_loader(dataset, train=False, rank=rank, world=world)
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
    result = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = torch.load(tmp_path / "cm.pt")
    assert torch.equal(distributed, single)
    test_split = load_script(SCRIPT).SyntheticVOC(split=2, length=5)
    masks = torch.stack([test_split[i][1] for i in range(5)])
    assert single.sum() == (masks != 255).sum()  # every labelled pixel counted exactly once


def test_main_quick_end_to_end_then_predict(mod, isolated, tmp_path):
    # hermetic: no weight download, the same device everywhere
    isolated(mod, PRETRAINED=False, DEVICE="cpu")
    metrics = mod.main(["--quick"])
    out = tmp_path / "outputs" / "quick"  # a set-up check never touches a real run's files
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["dataset"] == "synthetic" and saved["pretrained"] is False
    assert saved["device"] == "cpu" and saved["total_seconds"] > 0
    names = [run["model"] for run in saved["runs"]]
    assert names == ["deeplabv3_resnet18_scratch", "fpn_resnet18_scratch"]
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
    pixels = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(photo)
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


# ----------------------------------------------------------------------------------------------
# your own data: "folder" and VOC-format folders (issue 11), made in tmp_path
# ----------------------------------------------------------------------------------------------

BLOCK_COLOURS = {0: (40, 40, 40), 1: (220, 40, 40), 2: (40, 60, 220)}  # class -> RGB


def block_scene(rng, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A photo-like stand-in: 16-px blocks of 3 classes, each its own colour plus noise; labels."""
    blocks = rng.integers(0, 3, (height // 16 + 1, width // 16 + 1))
    labels = np.kron(blocks, np.ones((16, 16), dtype=np.int64))[:height, :width]
    colours = np.array([BLOCK_COLOURS[c] for c in range(3)], dtype=np.float64)
    image = colours[labels] + rng.normal(0, 12, (height, width, 3))
    labels[:2, :2] = 255  # a few unlabelled pixels, like VOC's outlines
    return np.clip(image, 0, 255).astype(np.uint8), labels


def write_folder(root: Path, count: int, seed: int = 0, palette_every: int = 2, sizes=None) -> list:
    """root/images/*.png + root/masks/*.png (every palette_every-th mask a palette PNG)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = []
    for index in range(count):
        default = (40 + 4 * (index % 3), 48 + 6 * (index % 2))
        height, width = sizes[index % len(sizes)] if sizes else default
        image, labels = block_scene(rng, height, width)
        Image.fromarray(image).save(root / "images" / f"img{seed}_{index:03d}.png")
        mask = Image.fromarray(labels.astype(np.uint8), mode="L")
        if index % palette_every == 1:  # a VOC-style palette PNG: the values are still the indices
            mask = mask.convert("P")
            mask.putpalette(load_script(SCRIPT).voc_palette().flatten().tolist())
        mask.save(root / "masks" / f"img{seed}_{index:03d}.png")
        written.append(labels)
    return written


def test_folder_layout_seeded_split_palette_and_index_masks_and_classes_txt(
    mod, isolated, tmp_path
):
    root = tmp_path / "mine"
    written = write_folder(root, 10)
    isolated(mod, DATA_ROOT=root, DATASET="folder", SPLIT_FRACTIONS=(0.6, 0.2, 0.2))
    datasets, source = mod.load_datasets()
    assert source["dataset"] == "folder" and source["real"]
    assert source["classes"] == ("class 0", "class 1", "class 2")  # no classes.txt: largest + 1
    assert [len(datasets[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    stems = [sorted(p.stem for p, _ in datasets[s].pairs) for s in ("train", "val", "test")]
    everything = [stem for split in stems for stem in split]
    assert sorted(everything) == sorted(f"img0_{i:03d}" for i in range(10))  # a partition
    again, _ = mod.load_datasets()
    assert [p for p, _ in again["val"].pairs] == [p for p, _ in datasets["val"].pairs]  # seeded
    for image_path, mask_path in datasets["test"].pairs:  # whole images, exact labels
        index = int(image_path.stem.split("_")[1])
        image, mask = datasets["test"][datasets["test"].pairs.index((image_path, mask_path))]
        assert torch.equal(mask, torch.from_numpy(written[index]))  # palette or index PNG alike
        assert image.shape == (3, *written[index].shape) and image.dtype == torch.float32

    (root / "classes.txt").write_text("road\nsky\ncar\nperson\n")  # fixes the number: 4
    _, source = mod.load_datasets()
    assert source["classes"] == ("road", "sky", "car", "person")
    (root / "classes.txt").write_text("road\nsky\n")  # class 2 in the masks: one line naming it
    with pytest.raises(SystemExit, match=r"^error: mask .*img0_\d+\.png has class values \[2\]"):
        mod.load_datasets()


def test_folder_with_official_splits_keeps_them_and_carves_a_missing_val(mod, isolated, tmp_path):
    root = tmp_path / "official"
    write_folder(root / "train", 6, seed=1)
    write_folder(root / "test", 3, seed=2)
    isolated(mod, DATA_ROOT=root, DATASET="folder", VAL_FRACTION=0.34)
    datasets, _ = mod.load_datasets()
    assert [len(datasets[s]) for s in ("train", "val", "test")] == [4, 2, 3]
    assert all(p.parent.parent.name == "test" for p, _ in datasets["test"].pairs)  # untouched
    assert all(p.parent.parent.name == "train" for p, _ in datasets["val"].pairs)  # from train
    write_folder(root / "val", 2, seed=3)
    datasets, _ = mod.load_datasets()
    assert [len(datasets[s]) for s in ("train", "val", "test")] == [6, 2, 3]


def test_an_rgb_mask_with_equal_channels_is_read_as_class_ids(mod, tmp_path):
    labels = np.random.default_rng(0).integers(0, 3, size=(20, 30)).astype(np.uint8)
    labels[0, :5] = 255  # ignore
    Image.fromarray(np.repeat(labels[..., None], 3, axis=2)).save(tmp_path / "rgb.png")  # r = g = b
    Image.fromarray(labels).save(tmp_path / "grey.png")
    assert Image.open(tmp_path / "rgb.png").mode == "RGB"
    grey = mod.read_mask(tmp_path / "grey.png")
    assert grey.dtype == np.int64 and np.array_equal(grey, labels)
    assert np.array_equal(mod.read_mask(tmp_path / "rgb.png"), grey)


def test_bad_folders_and_masks_are_one_line_errors_naming_the_file(mod, isolated, tmp_path):
    root = tmp_path / "bad"
    write_folder(root, 3)
    isolated(mod, DATA_ROOT=root, DATASET="folder")
    wrong = root / "masks" / "img0_001.png"
    Image.fromarray(np.zeros((10, 12), dtype=np.uint8)).save(wrong)  # wrong size
    with pytest.raises(SystemExit, match=r"^error: mask .*img0_001\.png is 12 x 10 but its image"):
        mod.load_datasets()
    Image.fromarray(np.full((44, 54), 255, np.uint8)).save(wrong)  # size fixed, all ignore
    (root / "classes.txt").write_text("a\nb\nc\n")
    Image.fromarray(np.full((40, 48), 7, np.uint8)).save(root / "masks" / "img0_000.png")
    with pytest.raises(SystemExit, match=r"^error: mask .*img0_000\.png has class values \[7\]"):
        mod.load_datasets()
    colour = np.zeros((40, 48, 3), np.uint8)
    colour[:, :24] = (200, 30, 30)  # a colour mask: red and black
    Image.fromarray(colour).save(root / "masks" / "img0_000.png")
    with pytest.raises(SystemExit, match=r"^error: .*img0_000\.png is a colour image"):
        mod.load_datasets()
    (root / "masks" / "img0_000.png").unlink()
    with pytest.raises(SystemExit, match=r"^error: no mask for .*img0_000\.png"):
        mod.load_datasets()

    empty = tmp_path / "empty"
    write_folder(empty / "train", 2)
    (empty / "test" / "images").mkdir(parents=True)  # an empty split
    (empty / "test" / "masks").mkdir(parents=True)
    isolated(mod, DATA_ROOT=empty, DATASET="folder")
    with pytest.raises(SystemExit, match=r"^error: .*empty.test.images holds no images"):
        mod.load_datasets()
    isolated(mod, DATA_ROOT=tmp_path / "nothing", DATASET="folder")
    with pytest.raises(SystemExit, match=r"^error: no folder .*nothing.images") as error:
        mod.load_datasets()
    assert "\n" not in str(error.value)


def test_grey_alpha_masks_negative_labels_and_bad_settings(mod, isolated, tmp_path):
    root = tmp_path / "odd"
    written = write_folder(root, 3)
    path = root / "masks" / "img0_000.png"
    Image.fromarray(written[0].astype(np.uint8), mode="L").convert("LA").save(path)
    assert np.array_equal(mod.read_mask(path), written[0])  # grey + alpha: the grey values
    path.unlink()
    Image.fromarray(np.full(written[0].shape, -1, np.int32)).save(path.with_suffix(".tif"))
    isolated(mod, DATA_ROOT=root, DATASET="folder")  # no classes.txt: no number of classes yet
    with pytest.raises(SystemExit, match=r"^error: mask .*img0_000\.tif has class values \[-1\] "
                       r"outside 0, 1, 2, \.\.\."):  # fmt: skip
        mod.load_datasets()
    isolated(mod, DATA_ROOT=root, DATASET="folder", CLASS_WEIGHTING="log")
    with pytest.raises(SystemExit, match=r'^error: CLASS_WEIGHTING must be "sqrt" or None'):
        mod.prepare_data(0, 1)


def test_validation_without_labelled_pixels_is_one_clear_error(mod, isolated):
    isolated(mod)
    model = mod.build_model("fpn", "resnet18", 3, pretrained=False, decoder_channels=8)
    masks = torch.full((2, 32, 32), 255, dtype=torch.int64)  # every pixel ignored
    loader = [(torch.rand(2, 3, 32, 32), masks)]
    plan = {"short_side": None}
    with pytest.raises(SystemExit, match=r"^error: the validation masks hold no labelled pixel"):
        mod.validate(model, loader, torch.device("cpu"), plan, 3)


def test_a_tiny_voc_format_folder_with_only_a_train_list_still_splits(mod, isolated, tmp_path):
    write_tiny_vocdevkit(tmp_path, mod.voc_palette())
    (tmp_path / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").unlink()
    isolated(mod, DATA_ROOT=tmp_path, DATASET="voc", VAL_FRACTION=0.34)
    datasets, source = mod.load_datasets()
    assert source["dataset"] == "voc"
    assert [len(datasets[s]) for s in ("train", "val", "test")] == [1, 1, 1]  # 3 images, 3 splits


EXPORT_CLASSES = {"background": (0, 0, 0), "cat": (250, 50, 83), "dog": (42, 125, 209)}


def write_voc_export(root: Path, count: int, colours: np.ndarray | None = None) -> dict:
    """A VOC-format folder as CVAT / Datumaro export it: labelmap.txt with the classes' colours,
    RGB colour masks, PNG images, one subset list (default.txt). Returns {id: true labels}.

    colours: the RGB of class 0, 1, 2 and of ignore (255); default: the labelmap's + VOC's cream.
    """
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    lines = [f"{name}:{r},{g},{b}::" for name, (r, g, b) in EXPORT_CLASSES.items()]
    (root / "labelmap.txt").write_text("# label:color_rgb:parts:actions\n" + "\n".join(lines))
    if colours is None:
        colours = np.array([*EXPORT_CLASSES.values(), (224, 224, 192)], dtype=np.uint8)
    rng, written = np.random.default_rng(7), {}
    for index in range(count):
        name = f"frame_{index:06d}"
        image, labels = block_scene(rng, 40 + 4 * (index % 3), 48)
        Image.fromarray(image).save(root / "JPEGImages" / f"{name}.png")
        painted = colours[np.where(labels == 255, 3, labels)]  # H x W x 3 colours
        Image.fromarray(painted).save(root / "SegmentationClass" / f"{name}.png")
        written[name] = labels
    (root / "ImageSets" / "Segmentation" / "default.txt").write_text("\n".join(written) + "\n")
    return written


def assert_splits_hold_the_true_labels(mod, datasets, source, written, sizes) -> None:
    """Every image in exactly one split of the expected sizes, every mask decoded exactly."""
    assert [len(datasets[s]) for s in ("train", "val", "test")] == sizes
    stems = sorted(image.stem for s in datasets.values() for image, _ in s.pairs)
    assert stems == sorted(written)
    for split in ("val", "test"):  # untransformed: the decoded masks themselves
        for index, (image_path, _) in enumerate(datasets[split].pairs):
            truth = torch.from_numpy(written[image_path.stem])
            assert torch.equal(datasets[split][index][1], truth)
    for image_path, mask_path in datasets["train"].pairs:  # as the training loader decodes them
        decoded = mod.read_mask(mask_path, mod.paired_files(datasets["train"])[1])
        assert np.array_equal(decoded, written[image_path.stem])


def test_a_voc_export_with_labelmap_colour_masks_and_one_list_is_read_exactly(
    mod, isolated, tmp_path
):
    root = tmp_path / "export"
    written = write_voc_export(root, 5)
    assert Image.open(next((root / "SegmentationClass").iterdir())).mode == "RGB"
    isolated(mod, DATA_ROOT=tmp_path, DATASET="voc")  # found one level down
    datasets, source = mod.load_datasets()
    assert source["dataset"] == "voc" and source["classes"] == ("background", "cat", "dog")
    assert_splits_hold_the_true_labels(mod, datasets, source, written, [3, 1, 1])  # 70/15/15 of 5
    again, _ = mod.load_datasets()
    assert again["test"].pairs == datasets["test"].pairs  # the split is seeded

    shutil.rmtree(root / "ImageSets")  # no lists at all: every mask of SegmentationClass
    datasets, source = mod.load_datasets()
    assert_splits_hold_the_true_labels(mod, datasets, source, written, [3, 1, 1])

    bad = np.array(Image.open(root / "SegmentationClass" / "frame_000002.png"))
    bad[5, 5] = (1, 2, 3)  # a colour no class has (an anti-aliased edge, say)
    Image.fromarray(bad).save(root / "SegmentationClass" / "frame_000002.png")
    unknown = r"^error: mask .*frame_000002\.png has the colour \(1, 2, 3\)"
    with pytest.raises(SystemExit, match=unknown):
        mod.load_datasets()


def test_a_voc_folder_with_colour_masks_and_no_labelmap_uses_the_voc_palette(
    mod, isolated, tmp_path
):
    palette = mod.voc_palette()
    root = tmp_path / "VOC2012"
    written = write_voc_export(root, 4, colours=palette[[0, 1, 2, 255]])  # (224, 224, 192) = 255
    (root / "labelmap.txt").unlink()
    isolated(mod, DATA_ROOT=root, DATASET="voc")
    datasets, source = mod.load_datasets()
    assert source["classes"] == mod.VOC_CLASSES  # 21 classes: background, aeroplane, bicycle...
    assert_splits_hold_the_true_labels(mod, datasets, source, written, [2, 1, 1])


def test_main_trains_on_a_voc_export_with_its_own_classes(mod, isolated, tmp_path):
    write_voc_export(tmp_path / "export", 4)
    isolated(
        mod, DATA_ROOT=tmp_path / "export", DATASET="voc", PRETRAINED=False, DEVICE="cpu",
        REAL_STEPS=2, REAL_VAL_EVERY=1, REAL_BATCH_SIZE=2, CROP_SIZE=32, REAL_SHORT_SIDE=None,
        DECODER_CHANNELS=16, REAL_EVAL_SCALES=(1.0,), EVAL_FLIP=False,
    )  # fmt: skip
    metrics = mod.main([])
    saved = json.loads((tmp_path / "outputs" / "metrics.json").read_text())
    assert saved["dataset"] == "voc" and saved["classes"] == ["background", "cat", "dog"]
    assert 0 <= metrics["runs"][0]["miou"] <= 1
    checkpoint = torch.load(tmp_path / "outputs" / "best_model.pt", weights_only=True)
    assert checkpoint["config"]["num_classes"] == 3
    # --predict paints the export's own colours: its mask re-imports through labelmap.txt
    image = next((tmp_path / "export" / "JPEGImages").iterdir())
    mod.main(["--predict", str(image)])
    mask = Image.open(tmp_path / "outputs" / f"{image.stem}_mask.png")
    assert mask.mode == "P"
    assert mask.getpalette()[:9] == [value for rgb in EXPORT_CLASSES.values() for value in rgb]
    colours = mod.read_label_map(tmp_path / "export")[1]
    decoded = mod.colours_to_labels(np.array(mask.convert("RGB")), colours, image)
    assert np.array_equal(decoded, np.array(mask))  # the colours are the labelmap's, class by class


@pytest.mark.parametrize("count", [1, 2, 3])
def test_folders_of_one_two_three_ragged_images_train_end_to_end(mod, isolated, tmp_path, count):
    root = tmp_path / "few"
    write_folder(root, count, sizes=[(37, 53), (44, 40), (50, 61)])
    isolated(
        mod, DATA_ROOT=root, DATASET="folder", PRETRAINED=False, DEVICE="cpu",
        REAL_RUNS=(("deeplabv3", "resnet18"),),  # ASPP's image-pool BatchNorm needs batches >= 2
        REAL_STEPS=2, REAL_VAL_EVERY=1, REAL_BATCH_SIZE=4, CROP_SIZE=32, REAL_SHORT_SIDE=None,
        DECODER_CHANNELS=16, REAL_EVAL_SCALES=(1.0,), EVAL_FLIP=False,
    )  # fmt: skip
    metrics = mod.main([])
    run = metrics["runs"][0]
    assert metrics["dataset"] == "folder" and run["steps"] == 2
    assert 0 <= run["val_miou"] <= 1 and 0 <= run["miou"] <= 1
    # a split smaller than a batch still gives full batches (different crops of the same images)
    images, masks = next(iter(mod.make_loader(mod.load_datasets()[0]["train"], True, batch_size=4)))
    assert images.shape == (4, 3, 32, 32) and masks.shape == (4, 32, 32)


def test_main_on_a_tiny_folder_dataset_learns_and_reports_val_and_test(
    mod, isolated, tmp_path, capsys
):
    root = tmp_path / "blocks"
    write_folder(root, 12, seed=5)
    (root / "classes.txt").write_text("dark\nred\nblue\n")
    isolated(
        mod, DATA_ROOT=root, DATASET="folder", PRETRAINED=False, DEVICE="cpu",
        REAL_STEPS=40, REAL_VAL_EVERY=10, REAL_BATCH_SIZE=4, CROP_SIZE=48, REAL_SHORT_SIDE=None,
        DECODER_CHANNELS=16, REAL_LR=3e-3, EVAL_FLIP=True, REAL_EVAL_SCALES=(1.0,),
    )  # fmt: skip
    metrics = mod.main([])
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "outputs" / "metrics.json").read_text())
    assert saved["dataset"] == "folder" and saved["classes"] == ["dark", "red", "blue"]
    run = saved["runs"][0]
    assert run["model"] == "fpn_resnet18_scratch" and metrics["best_model"] == run["model"]
    assert {"val_miou", "miou", "miou_multiscale"} <= set(run)
    assert run["miou"] > 0.5  # colour decides the class: 40 steps learn it (untrained: ~0.1-0.2)
    assert "estimated time to the end of training: about" in out  # print_eta on photos
    assert (tmp_path / "outputs" / "predictions.png").is_file()
    checkpoint = torch.load(tmp_path / "outputs" / "best_model.pt", weights_only=True)
    assert checkpoint["config"]["class_names"] == ("dark", "red", "blue")


def test_real_train_transform_is_paired_pads_with_255_and_never_invents_labels(mod, isolated):
    isolated(mod, CROP_SIZE=40, REAL_SHORT_SIDE=24, REAL_SCALE_RANGE=(0.5, 2.0))
    colours = {0: (0.2, 0.7, 0.3), 3: (1.0, 0.0, 0.0), 7: (0.0, 0.0, 1.0), 255: (1.0, 1.0, 1.0)}
    labels = np.array(list(colours))
    blocks = np.random.default_rng(1).integers(0, len(labels), (4, 6))
    index = torch.from_numpy(np.kron(blocks, np.ones((8, 8), dtype=int)))  # 32 x 48
    mask = torch.from_numpy(labels)[index]
    image = torch.tensor([colours[int(v)] for v in labels])[index].permute(2, 0, 1).contiguous()
    padded_seen = False
    for trial in range(30):
        torch.manual_seed(trial)
        out_image, out_mask = mod.real_train_transform(image, mask)
        assert out_image.shape == (3, 40, 40) and out_mask.shape == (40, 40)
        assert out_mask.dtype == torch.int64 and type(out_mask) is torch.Tensor
        assert set(out_mask.unique().tolist()) <= set(colours)  # nearest: no invented labels
        for label, colour in colours.items():
            exact = (out_image - torch.tensor(colour)[:, None, None]).abs().amax(dim=0) < 1e-4
            assert (out_mask[exact] == label).all(), f"trial {trial}: label {label} misaligned"
        padding = out_image.abs().amax(dim=0) == 0  # black = padding: 255, never background
        assert (out_mask[padding] == 255).all()
        padded_seen |= bool(padding.any())
    assert padded_seen  # shorter side 12-48 px < the 40-px crop some of the time: padding happened


def test_evaluation_of_photos_does_not_depend_on_batch_mates(mod, isolated, tmp_path):
    # ragged VOC test images through the evaluation loader: exactly the per-image evaluation
    isolated(mod, DATA_ROOT=tmp_path, DATASET="voc", BATCH_SIZE=16)
    write_tiny_vocdevkit(tmp_path, mod.voc_palette())
    test = mod.load_datasets()[0]["test"]
    torch.manual_seed(0)
    model = mod.build_model("fpn", "resnet18", 21, pretrained=False).eval()
    with torch.no_grad():  # BatchNorm statistics under which zero padding changes the features
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
    expected = torch.zeros(21, 21, dtype=torch.int64)
    with torch.no_grad():
        for index in range(len(test)):  # independent truth: each image on its own
            image, mask = test[index]
            expected += mod.confusion_matrix(model(image[None]).argmax(dim=1), mask[None], 21)
    loader = mod.make_loader(test, train=False)  # a batch of 16 holds both images
    assert torch.equal(mod.evaluate(model, loader, torch.device("cpu"), 21), expected)


def test_evaluate_scores_photos_at_full_resolution_from_a_smaller_network_input(mod, isolated):
    class Bright(torch.nn.Module):  # pixelwise: class 1 where the red channel is bright
        def forward(self, images):
            return torch.cat([torch.zeros_like(images[:, :1]), 20 * (images[:, :1] - 0.5)], dim=1)

    image = torch.zeros(3, 37, 53)
    image[0, :, :20] = 1.0  # bright left part
    mask = (image[0] > 0.5).long()
    mask[0, 0] = 255
    loader = [(image[None], mask[None])]
    cm = mod.evaluate(Bright(), loader, torch.device("cpu"), 2, short_side=24)
    assert cm.sum() == 37 * 53 - 1  # every labelled full-size pixel scored, at its full size
    assert cm.trace() >= cm.sum() - 2 * 37  # the edge may move by a pixel, nothing else


# ----------------------------------------------------------------------------------------------
# issue 12: choosing on validation, fair DeepLabV3, warm-up, weights file, inference pipeline
# ----------------------------------------------------------------------------------------------


def fake_row(name: str, architecture: str, val_miou: float, test_miou: float) -> dict:
    """A result row as run_experiment returns it, with chosen validation and test scores."""
    return {
        "model": name, "architecture": architecture, "encoder": "resnet18", "pretrained": False,
        "params": 1, "output_stride": 16 if architecture == "deeplabv3" else 32, "aspp_rates": None,
        "train_seconds": 1.0, "steps": 1, "validations": 1, "val_miou": val_miou,
        "miou": test_miou, "pixel_accuracy": 0.5, "mean_class_accuracy": 0.5,
        "miou_multiscale": test_miou, "pixel_accuracy_multiscale": 0.5,
        "per_class_iou": [0.5] * 21, "per_class_accuracy": [0.5] * 21,
        "history": [{"epoch": 1, "step": 1, "loss": 1.0, "val_miou": val_miou}],
        "confusion_matrix": torch.eye(21, dtype=torch.int64).tolist(),
    }  # fmt: skip


def test_best_model_is_chosen_on_validation_never_on_test(
    mod, isolated, tmp_path, monkeypatch, capsys
):
    # deeplabv3 is better on validation, fpn on test: validation must decide everywhere
    scores = {"deeplabv3": (0.7, 0.5), "fpn": (0.6, 0.9)}

    def fake_experiment(architecture, encoder, pretrained, loaders, device, *rest):
        model = mod.build_model(architecture, encoder, 21, pretrained=False, decoder_channels=8)
        return fake_row(f"{architecture}_x", architecture, *scores[architecture]), model

    isolated(mod, PRETRAINED=False, DEVICE="cpu")
    monkeypatch.setattr(mod, "run_experiment", fake_experiment)
    metrics = mod.main(["--quick"])
    out = capsys.readouterr().out
    assert metrics["best_model"] == "deeplabv3_x"
    assert "per-class test results of deeplabv3_x" in out
    saved = torch.load(tmp_path / "outputs" / "quick" / "best_model.pt", weights_only=True)
    assert saved["config"]["architecture"] == "deeplabv3"
    assert [run["val_miou"] for run in metrics["runs"]] == [0.7, 0.6]  # stored per run


def test_aspp_warns_when_a_rate_does_not_fit_and_auto_rates_fit(mod, isolated, capsys):
    isolated(mod, DECODER_CHANNELS=8, IMAGE_SIZE=64)
    images = torch.rand(2, 3, 64, 64)  # stride 16 -> a 4 x 4 map
    paper = mod.build_model(
        "deeplabv3", "resnet18", 21, False, output_stride=16, aspp_rates=(6, 12, 18)
    )
    paper.train()(images)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("Warning: ASPP rates [6, 12, 18]")
    assert "4 x 4" in out[0]
    fitted = mod.build_model("deeplabv3", "resnet18", 21, False, output_stride=16)  # "auto"
    assert fitted.config["aspp_rates"] == (1, 2, 3)
    fitted.train()(images)
    assert "Warning" not in capsys.readouterr().out
    for crop in (32, 48, 64, 96, 321, 513):  # "auto" fits every map of 2 cells or more
        side = -(-crop // 16)
        assert all(1 <= rate < side for rate in mod.fitted_aspp_rates(crop, 16)), crop
    assert mod.fitted_aspp_rates(48, 16) == (1, 2, 2)  # 3 x 3 cells: a rate may repeat

    # why it matters: a 3x3 convolution with rate 6 on a 4 x 4 map IS a 1x1 (its centre tap)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 3, 3, padding=6, dilation=6, bias=False)
    x = torch.randn(1, 5, 4, 4)
    centre = torch.nn.functional.conv2d(x, conv.weight[:, :, 1:2, 1:2])
    assert torch.allclose(conv(x), centre, atol=1e-6)
    conv2 = torch.nn.Conv2d(5, 3, 3, padding=2, dilation=2, bias=False)
    assert not torch.allclose(conv2(x), torch.nn.functional.conv2d(x, conv2.weight[:, :, 1:2, 1:2]))


def test_coarse_labels_score_on_hand_cases(mod):
    mask = torch.zeros(1, 16, 16, dtype=torch.int64)
    mask[0, 5:7, 9:11] = 1  # a 2 x 2 object
    loader = [(None, mask)]
    assert mod.coarse_labels_miou(loader, 1, 2) == pytest.approx(1.0)  # stride 1 draws anything
    assert mod.coarse_labels_miou(loader, 8, 2) == pytest.approx(0.5 * (252 / 256))  # object lost
    big = torch.zeros(1, 16, 16, dtype=torch.int64)
    big[0, :, 8:] = 1  # a half-image object, aligned with the 8-px grid: still perfect
    assert mod.coarse_labels_miou([(None, big)], 8, 2) == pytest.approx(1.0)
    # photos: the grid is the network input's. Shown at twice the size, stride 2 is a 16 x 16 grid
    # on this 16-px mask (draws the object); shown at half the size, stride 4 is a 2 x 2 grid.
    assert mod.coarse_labels_miou(loader, 2, 2, short_side=32) == pytest.approx(1.0)
    assert mod.coarse_labels_miou(loader, 2, 2) < 1.0
    assert mod.coarse_labels_miou(loader, 4, 2, short_side=8) == pytest.approx(0.5 * (252 / 256))


def test_warmup_freezes_only_a_pretrained_encoder(mod, isolated, tmp_path):
    isolated(mod, EPOCHS=1, WARMUP_EPOCHS=1, BATCH_SIZE=4, IMAGE_SIZE=32, DECODER_CHANNELS=8,
             SYNTHETIC_SPLIT_SIZES=(4, 2, 2), DATASET="synthetic", NUM_WORKERS=0)
    datasets, _ = mod.load_datasets()
    loaders = {
        "train": mod.make_loader(datasets["train"], train=True),
        "val": mod.make_loader(datasets["val"], train=False),
    }
    cpu = torch.device("cpu")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    for weights, frozen in ((None, False), (tmp_path / "r18.pth", True)):
        isolated(mod, PRETRAINED_WEIGHTS=weights)
        torch.manual_seed(0)
        model = mod.build_model("fpn", "resnet18", 21, pretrained=weights is not None)
        before = model.encoder.state_dict()["conv1.weight"].clone()
        mod.fit(model, "m", loaders, cpu)  # one step, in the warm-up phase
        unchanged = torch.equal(model.encoder.state_dict()["conv1.weight"], before)
        assert unchanged == frozen, f"pretrained={weights is not None}: frozen should be {frozen}"


def test_keep_if_best_keeps_the_best_weights_and_stops_after_patience(mod, isolated, tmp_path):
    isolated(mod, PATIENCE=2)
    model = mod.build_model("fpn", "resnet18", 3, pretrained=False, decoder_channels=8)
    best = {"val_miou": -1.0, "weights": None, "stale": 0}
    assert mod.keep_if_best(model, "m", 0.5, best) and best["val_miou"] == 0.5
    saved = torch.load(tmp_path / "outputs" / "m.pt", weights_only=True)
    assert set(saved) == {"model", "config"} and saved["config"]["architecture"] == "fpn"
    kept = best["weights"]["decoder.classifier.weight"].clone()
    with torch.no_grad():
        model.decoder.classifier.weight.add_(1.0)  # training moves on...
    assert mod.keep_if_best(model, "m", 0.4, best)  # ...worse on validation: go on, keep the old
    assert torch.equal(best["weights"]["decoder.classifier.weight"], kept)
    assert not mod.keep_if_best(model, "m", 0.5, best)  # equal is not better: 2 stale, stop
    assert best["val_miou"] == 0.5


def test_each_torchrun_process_gets_a_device_that_gloo_can_use(mod, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(mod.dist, "is_initialized", lambda: True)
    assert mod.process_device() == torch.device("cpu")  # gloo cannot use Apple's MPS
    monkeypatch.setattr(mod.dist, "is_initialized", lambda: False)
    assert mod.process_device() == torch.device("mps")  # one process: MPS is fine


def test_a_weights_file_that_is_not_a_checkpoint_is_one_line(mod, isolated, tmp_path):
    notes = tmp_path / "weights.pth"
    notes.write_text("these are not weights\n")
    isolated(mod, PRETRAINED_WEIGHTS=notes)
    with pytest.raises(SystemExit) as error:
        mod.build_model("fpn", "resnet18", 21, pretrained=True)
    message = str(error.value)
    assert message.startswith("error: PRETRAINED_WEIGHTS") and str(notes) in message
    assert "\n" not in message


def test_multiscale_averages_probabilities_not_logits(mod):
    # asymmetric passes: confident at full size (logit +8), unsure at half size (-1)
    class ScaleDependent(torch.nn.Module):
        def forward(self, images):
            n, _, h, w = images.shape
            value = 8.0 if w == 20 else -1.0
            return torch.stack([torch.zeros(n, h, w), torch.full((n, h, w), value)], dim=1)

    probs = mod.multiscale_probs(ScaleDependent(), torch.rand(1, 3, 10, 20), (0.5, 1.0), False)
    expected = (torch.sigmoid(torch.tensor(8.0)) + torch.sigmoid(torch.tensor(-1.0))) / 2  # 0.634
    assert probs.shape == (1, 2, 10, 20)
    assert torch.allclose(probs[0, 1], torch.full((10, 20), expected.item()), atol=1e-5)
    # (averaging logits would give sigmoid(3.5) = 0.97: a different, overconfident answer)


def test_multiscale_flip_and_resize_keep_an_asymmetric_scene_in_place(mod):
    # a pixelwise model commutes with flips and resizes: every pass, undone correctly, agrees
    class Bright(torch.nn.Module):
        def forward(self, images):
            return torch.cat([torch.zeros_like(images[:, :1]), 30 * (images[:, :1] - 0.5)], dim=1)

    image = torch.zeros(1, 3, 37, 53)  # odd sizes: 0.75 x 37 = 27.75 must round, come back exact
    image[..., :, :13] = 1.0  # bright on the left only: a missing flip-back moves it right
    image[..., :9, 30:] = 1.0
    plain = mod.multiscale_probs(Bright(), image, (1.0,), False)
    averaged = mod.multiscale_probs(Bright(), image, (0.75, 1.0, 1.25), True)
    assert averaged.shape == plain.shape == (1, 2, 37, 53)
    agree = (averaged.argmax(dim=1) == plain.argmax(dim=1)).float().mean()
    assert agree > 0.97  # only edge pixels may differ


def test_pick_num_workers_and_endless_sampler(mod, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert mod.pick_num_workers("auto") == 0 and mod.pick_num_workers(3) == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert mod.pick_num_workers("auto") == 8
    streams = [mod.EndlessSampler(5, rank, 2, seed=0) for rank in range(2)]
    firsts = [list(zip(range(5), iter(s))) for s in streams]
    merged = [i for pair in zip(*[[i for _, i in f] for f in firsts]) for i in pair]
    assert sorted(merged[:5]) == [0, 1, 2, 3, 4]  # one shared pass, split between the ranks
    assert len(list(zip(range(7), iter(mod.EndlessSampler(1))))) == 7  # never runs dry


def test_warn_if_collapsed_names_the_likely_causes(mod, capsys):
    names = ("background", "cat", "dog")
    collapsed = torch.tensor([[5, 0, 0], [3, 0, 0], [2, 0, 0]])  # everything predicted as class 0
    line = mod.warn_if_collapsed(collapsed.sum(dim=0), 0.2, names)  # predicted pixels per class
    assert line == capsys.readouterr().out.strip()  # printed, and returned for this test
    assert line.startswith("Warning:") and "\n" not in line and "0/255" in line
    assert "'background'" in line  # names the one class it predicts
    healthy = torch.tensor([[5, 1, 0], [0, 3, 0], [1, 0, 2]])
    assert mod.warn_if_collapsed(healthy.sum(dim=0), 0.5, names) is None
    assert capsys.readouterr().out == ""  # all is well: silent
    never = mod.warn_if_collapsed(healthy.sum(dim=0), 0.0, names)  # validation never scored
    assert never.startswith("Warning: the validation score stayed at 0")


if __name__ == "__main__":  # one torchrun worker of the DDP test above
    confusion = evaluate_fixed_model()
    if int(os.environ["RANK"]) == 0:
        torch.save(confusion, sys.argv[1])
    torch.distributed.destroy_process_group()
