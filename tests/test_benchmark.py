"""Tests for benchmarks/benchmark.py: its counts against closed forms, its helpers, a tiny run.

No timing thresholds here: speed depends on the machine. What is tested is that the benchmark
measures the right things (FLOP counts, checkpointing that changes memory but not results,
headline metrics read from the right place) and that it runs end to end.
"""

import ast
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import REPO_ROOT, load_script
from PIL import Image

bench = load_script("benchmarks/benchmark.py")
ex1 = load_script("example_1_basic_unet/basic_unet_segmentation.py")


def conv_flops(n, c_in, c_out, h_out, w_out, k):
    """Closed form: every output value takes c_in * k * k multiply-adds, 2 FLOPs each."""
    return 2 * n * c_out * h_out * w_out * c_in * k * k


@pytest.mark.parametrize(
    "stride, padding, h_out, w_out",
    [
        (1, 1, 7, 9),
        (2, 0, 3, 4),
    ],  # (7 + 2 - 3) / 1 + 1 = 7; (7 - 3) // 2 + 1 = 3, (9 - 3) // 2 + 1 = 4
)
def test_flop_count_of_a_convolution_matches_the_closed_form(stride, padding, h_out, w_out):
    conv = nn.Conv2d(3, 5, kernel_size=3, stride=stride, padding=padding)
    x = torch.randn(2, 3, 7, 9)
    assert conv(x).shape[-2:] == (h_out, w_out)
    forward = conv_flops(2, 3, 5, h_out, w_out, 3)
    assert bench.count_flops(lambda: conv(x)) == forward
    # backward computes two products of the same size: the gradients for the input and weights
    x.requires_grad_(True)
    assert bench.count_flops(lambda: conv(x).sum().backward()) == 3 * forward


def test_flop_count_of_a_matrix_multiply_matches_the_closed_form():
    a, b = torch.randn(6, 10), torch.randn(10, 4)
    assert bench.count_flops(lambda: a @ b) == 2 * 6 * 10 * 4


@pytest.mark.parametrize(
    "name, heavy",
    [
        ("aten::mkldnn_convolution", True),
        ("aten::convolution_backward", True),
        ("aten::cudnn_convolution", True),
        ("aten::mm", True),
        ("aten::bmm", True),
        ("aten::addmm", True),
        ("aten::native_batch_norm", False),
        ("aten::add_", False),
        ("aten::threshold_backward", False),
        ("Optimizer.step#AdamW.step", False),
    ],
)
def test_time_breakdown_counts_exactly_the_operations_with_flops(name, heavy):
    assert bool(bench.FLOP_OPS.search(name.split("::")[-1])) == heavy


def test_gradient_checkpointing_wrapper_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    plain = ex1.UNet(base_channels=4, depth=2)
    wrapped = ex1.UNet(base_channels=4, depth=2)
    wrapped.load_state_dict(plain.state_dict())
    bench.checkpoint_modules(wrapped, (ex1.DoubleConv,))
    assert (
        sum(type(m).__name__ == "Checkpointed" for m in wrapped.modules()) == 5
    )  # inc, 2 down, 2 up
    x = torch.randn(2, 3, 16, 16)
    losses = []
    for model in (plain, wrapped):
        loss = model(x).square().mean()
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    grads = [p.grad for p in plain.parameters()], [p.grad for p in wrapped.parameters()]
    assert len(grads[0]) == len(grads[1])
    for g_plain, g_wrapped in zip(*grads):
        assert torch.allclose(g_plain, g_wrapped, atol=1e-6)


def test_overrides_are_parsed_applied_and_restored():
    overrides = bench.parse_overrides(
        ["BASE_CHANNELS=4", "NOISE_STD=(0.0, 0.01)", "NOT_IN_EXAMPLE_1=3"]
    )
    assert overrides == {"BASE_CHANNELS": 4, "NOISE_STD": (0.0, 0.01), "NOT_IN_EXAMPLE_1": 3}
    before = ex1.BASE_CHANNELS, ex1.IMAGE_SIZE
    with bench.example_constants(ex1, tiny=True, overrides=overrides):
        assert ex1.BASE_CHANNELS == 4 and ex1.IMAGE_SIZE == ex1.QUICK["IMAGE_SIZE"]
        assert not hasattr(ex1, "NOT_IN_EXAMPLE_1")  # only constants the script has are changed
    assert (ex1.BASE_CHANNELS, ex1.IMAGE_SIZE) == before
    for bad in ("base_channels=4", "BASE_CHANNELS", "BASE_CHANNELS=sixteen"):
        with pytest.raises(SystemExit, match="--set"):
            bench.parse_overrides([bad])


def test_headline_metrics_are_read_from_each_examples_metrics_json(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "ROOT", tmp_path)

    def write(example, data):
        folder = tmp_path / bench.Path(example.script).parent / "outputs"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(data))

    one, (deeplab, fpn), four = bench.EXAMPLES["1"][0], bench.EXAMPLES["2"], bench.EXAMPLES["4"][0]
    assert bench.read_headline(one) is None  # no run yet
    write(one, {"test": {"foreground_iou": 0.9}, "total_seconds": 170.0})
    assert bench.read_headline(one) == dict(
        metric="test foreground IoU", value=0.9, seconds=170.0, timed="run"
    )
    runs = [
        dict(model="deeplabv3_resnet18", architecture="deeplabv3", miou=0.5, train_seconds=280.0),
        dict(model="fpn_resnet18", architecture="fpn", miou=0.9, train_seconds=150.0),
    ]
    write(deeplab, {"runs": runs})
    assert bench.read_headline(deeplab)["value"] == 0.5
    assert bench.read_headline(fpn) == dict(
        metric="test mIoU", value=0.9, seconds=150.0, timed="training"
    )
    ablation = [  # the final pipeline is the last row kept (training rows have no "kept")
        dict(name="baseline", miou=0.4),
        dict(name="+ TTA", miou=0.8, kept=True),
        dict(name="+ CRF", miou=0.82, kept=True),
        dict(name="+ morphology", miou=0.81, kept=False),
    ]
    write(four, {"ablation": ablation, "total_seconds": 180.0})
    assert bench.read_headline(four)["value"] == 0.82
    (tmp_path / bench.Path(four.script).parent / "outputs" / "metrics.json").write_text("{}")
    assert bench.read_headline(four) is None  # written by an older script: no crash


def test_benchmark_runs_end_to_end_on_a_tiny_configuration(isolated, tmp_path):
    isolated(bench)
    before = ex1.IMAGE_SIZE, ex1.BATCH_SIZE
    output = tmp_path / "benchmark.json"
    result = bench.main(["--tiny", "--examples", "1", "--output", str(output)])
    assert json.loads(output.read_text()) == json.loads(json.dumps(result))
    assert (ex1.IMAGE_SIZE, ex1.BATCH_SIZE) == before  # the example's constants are restored
    machine, (row,) = result["machine"], result["rows"]
    assert machine["matmul_gflops"] > 0 and machine["threads"] >= 1
    assert row["example"] == "1" and row["image_size"] == ex1.QUICK["IMAGE_SIZE"]
    assert row["batch_size"] == ex1.BATCH_SIZE
    assert row["channels_last"] == (ex1.memory_format(bench.pick_device()) == torch.channels_last)
    # the step's FLOPs are those of the tiny U-Net's forward and backward on one batch: recount
    model = ex1.UNet(
        base_channels=ex1.QUICK["BASE_CHANNELS"], depth=ex1.QUICK["DEPTH"], bilinear=ex1.BILINEAR
    )
    assert row["parameters"] == sum(p.numel() for p in model.parameters())
    size = ex1.QUICK["IMAGE_SIZE"]
    images = torch.rand(ex1.BATCH_SIZE, 3, size, size)
    flops = bench.count_flops(lambda: model(images).sum().backward())
    assert row["gflop_per_step"] == pytest.approx(flops / 1e9)
    assert row["gflops"] == pytest.approx(row["gflop_per_step"] / row["step_seconds"])
    assert row["fraction_of_matmul"] == pytest.approx(row["gflops"] / row["matmul_gflops"])
    assert machine["matmul_gflops"] == row["matmul_gflops"]  # the median of one row
    assert row["train_images_per_second"] == pytest.approx(row["batch_size"] / row["step_seconds"])
    if bench.pick_device().type == "cpu":  # the operator-time breakdown is measured on the CPU only
        assert 0 < row["conv_matmul_time_share"] <= 1
    else:
        assert (
            row["conv_matmul_time_share"] is None and row["conv_matmul_fraction_of_matmul"] is None
        )
    assert 0 <= row["data_wait_share"] < 1 and row["data_seconds_per_batch"] > 0
    assert row["inference_ms_per_image"] > 0
    for value in row["peak_memory_mib"].values():
        assert value is None or value > 0
    # checkpointing keeps only each DoubleConv's input for backward: fewer saved activations
    assert 0 < row["activation_mib"]["checkpointing"] < row["activation_mib"]["plain"]


# benchmarks/real_data.py: a chapter's real-data run, timed beside the ceiling
# ----------------------------------------------------------------------------------------------

real_data = load_script("benchmarks/real_data.py")


def test_real_data_gpu_preset_is_the_setting_example_2s_readme_suggests():
    readme = (REPO_ROOT / "example_2_pretrained_encoders" / "README.md").read_text()
    section = readme.split("**On a GPU")[1]
    block = section.split("```python")[1].split("```")[0]
    suggested = {}
    for statement in block.replace(";", "\n").splitlines():
        code = statement.split("#")[0].strip()
        if code:
            name, value = (part.strip() for part in code.split("=", 1))
            suggested[name] = ast.literal_eval(value)
    assert suggested == real_data.GPU_SETTING


def write_block_photos(root, count, seed=0):
    """root/images/*.png + root/masks/*.png: 3 classes in 8-px blocks, each class its colour."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    colours = np.array([(30, 30, 30), (220, 40, 40), (40, 60, 220)], dtype=np.uint8)
    for index in range(count):
        labels = np.kron(rng.integers(0, 3, (6, 7)), np.ones((8, 8), dtype=np.int64))
        Image.fromarray(colours[labels]).save(root / "images" / f"p{index}.png")
        Image.fromarray(labels.astype(np.uint8)).save(root / "masks" / f"p{index}.png")


@pytest.mark.parametrize("example", [2, 3])
def test_real_data_runs_a_chapter_on_a_folder_and_logs_time_scores_and_ceilings(
    isolated, tmp_path, example
):
    isolated(bench, OUTPUT_DIR=tmp_path / "bench", MATMUL_SIZE=64)
    write_block_photos(tmp_path / "photos", 6)
    result = real_data.main([str(example), str(tmp_path / "photos"), "--quick"])
    logged = (tmp_path / "bench" / "real_data.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in logged] == [json.loads(json.dumps(result))]
    assert result["example"] == example and result["quick"] and result["seconds"] > 0
    assert result["ceiling_gflops_before"] > 0 and result["ceiling_gflops_after"] > 0
    scores = [v for k, v in result.items() if k.startswith(("val_", "test_"))]
    assert len(scores) == (3 if example == 2 else 4) and all(0 <= v <= 1 for v in scores)
    chapter_metrics = tmp_path / "bench" / "real_data" / f"example{example}_cpu" / "metrics.json"
    saved = json.loads(chapter_metrics.read_text())  # the chapter wrote its own files there
    if example == 2:
        assert saved["dataset"] == "folder" and saved["runs"][0]["miou"] == result["test_miou"]
    else:
        assert saved["test"]["dice"]["class_2"] == result["test_dice_mean"]


# ----------------------------------------------------------------------------------------------
# benchmarks/stride_reference.py: Example 2's coarse-label score is a floor, not a ceiling
# ----------------------------------------------------------------------------------------------
stride_reference = load_script("benchmarks/stride_reference.py")


def test_fitted_logits_draw_what_cell_averages_lose():
    ex2 = load_script("example_2_pretrained_encoders/pretrained_segmentation.py")
    mask = torch.zeros(1, 16, 16, dtype=torch.int64)
    mask[0, 5:7, 9:11] = 1  # a 2 x 2 object: a quarter of one cell of a 4-px grid
    coarse = ex2.coarse_labels_miou([(None, mask)], 4, 2)
    assert coarse == pytest.approx(0.5 * 252 / 256)  # cell averages lose the object
    fitted = stride_reference.fitted_grid_miou(ex2, mask, 4, steps=200, num_classes=2)
    assert fitted > coarse + 0.2  # a 4 x 4 grid of fitted logits draws it (or most of it)


def test_stride_reference_runs_on_a_few_images(capsys):
    results = stride_reference.main(["--images", "3", "--steps", "2"])
    assert set(results) == {16, 4}
    assert all(0 <= value <= 1 for row in results.values() for value in row.values())
    assert "stride 16: coarse labels" in capsys.readouterr().out
