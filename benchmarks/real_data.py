"""Time to quality on real data: one chapter's real-data run, timed, beside the machine's ceiling.

The chapters' budgets for real data are written for a 2-core CPU whose float32 matrix multiply
runs at about 165 GFLOP/s (and, for Example 2's GPU setting, for one GPU). This script runs a
chapter on your dataset as a learner would (its defaults, or the GPU setting that Example 2's
README suggests), measures the matmul ceiling right before and right after, and appends one line
of results, so that the time can be scaled to another machine (time x ceiling / 165).

    python benchmarks/real_data.py 3 /data/drive                  # Example 3 --data-dir
    python benchmarks/real_data.py 2 /data/camvid                 # Example 2, DATASET = "folder"
    python benchmarks/real_data.py 2 /data/camvid --preset gpu    # Example 2's GPU setting
    python benchmarks/real_data.py 2 /data/export --dataset voc   # a VOC-format folder
    python benchmarks/real_data.py 2 /data/camvid --quick         # the chapter's tiny sizes

Writes the chapter's own files into benchmarks/outputs/real_data/<example>_<preset>/ and appends
one JSON line to benchmarks/outputs/real_data.jsonl.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark  # noqa: E402  (the benchmark's matmul ceiling and script loader)

SCRIPTS = {
    2: "example_2_pretrained_encoders/pretrained_segmentation.py",
    3: "example_3_medical_segmentation/medical_segmentation.py",
}
# Example 2's README, "On a GPU": what it suggests for a CamVid-sized dataset on one GPU
GPU_SETTING = dict(
    REAL_SHORT_SIDE=None, CROP_SIZE=352, REAL_SCALE_RANGE=(0.5, 2.0), REAL_BATCH_SIZE=16,
    REAL_STEPS=4000, REAL_VAL_EVERY=500, REAL_LR=3e-3, NUM_WORKERS="auto",
)  # fmt: skip
PRESETS = {"cpu": {}, "gpu": GPU_SETTING}


def ceiling_gflops(device: torch.device) -> float:
    """The matmul rate in the precision the chapters train in: float16 (AMP) on CUDA, else fp32."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return round(benchmark.matmul_rate(device, dtype) / 1e9, 1)


def headline(example: int, metrics: dict) -> dict:
    """The scores a budget is judged on, from the chapter's returned metrics."""
    if example == 2:
        run = metrics["runs"][0]  # real data trains one model (REAL_RUNS)
        return {"val_miou": run["val_miou"], "test_miou": run["miou"],
                "test_miou_multiscale_flip": run["miou_multiscale"]}  # fmt: skip
    name = metrics["data"]["class_names"][-1]
    threshold = metrics["validation"]["threshold"]
    return {
        "val_dice": metrics["validation"]["dice_by_threshold"][threshold],
        "test_dice_mean": metrics["test"]["dice"][name],
        "test_dice_pooled": metrics["test"]["pooled"]["dice"][name],
        "test_auc": metrics["test"]["auc"][name],
    }


def run(example: int, data: Path, preset: str, dataset: str, output: Path, quick=False) -> dict:
    """Run the chapter once on `data` (quick: its --quick sizes); time, scores, ceilings, device."""
    module = benchmark.load_script(SCRIPTS[example])
    output.mkdir(parents=True, exist_ok=True)
    device = benchmark.pick_device()
    before = ceiling_gflops(device)
    start = time.perf_counter()
    if example == 2:
        overrides = dict(DATASET=dataset, DATA_ROOT=data, OUTPUT_DIR=output, **PRESETS[preset])
        with benchmark.example_constants(module, quick, overrides):
            metrics = module.main([])
    else:
        with benchmark.example_constants(module, quick, dict(OUTPUT_DIR=output)):
            metrics = module.main(["--data-dir", str(data)])
    seconds = time.perf_counter() - start
    return {
        "example": example, "data": str(data), "preset": preset, "seconds": round(seconds, 1),
        **headline(example, metrics), "ceiling_gflops_before": before,
        "ceiling_gflops_after": ceiling_gflops(device), "device": str(device),
        "dataset": dataset if example == 2 else "folder", "quick": quick,
        "cpu": benchmark.cpu_name(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("example", type=int, choices=sorted(SCRIPTS))
    parser.add_argument("data", type=Path, help="the dataset folder (DATA_ROOT / --data-dir)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--dataset", choices=("folder", "voc"), default="folder")
    parser.add_argument("--quick", action="store_true", help="the chapter's tiny sizes: a check")
    args = parser.parse_args(argv)
    if args.example == 3 and (args.preset, args.dataset) != ("cpu", "folder"):
        parser.error("Example 3 reads a folder with its defaults (no --preset, no --dataset)")
    output = benchmark.OUTPUT_DIR / "real_data" / f"example{args.example}_{args.preset}"
    result = run(args.example, args.data.resolve(), args.preset, args.dataset, output, args.quick)
    print(json.dumps(result))
    with open(benchmark.OUTPUT_DIR / "real_data.jsonl", "a") as log:
        log.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
