"""Benchmark the course: what each example costs, and how close it runs to this machine's limit.

What it measures
----------------
For every example, on the current device, at the example's own default image size and batch size
(read from the constants at the top of its script, so a change you make there is benchmarked):

- training throughput: images per second for forward + loss + backward + optimizer step;
- inference latency: milliseconds to segment one image (eval mode, ``torch.inference_mode``);
- achieved FLOP rate of the training step, counted with ``torch.utils.flop_counter``, as a
  fraction of this machine's fp32 matrix-multiply rate measured in the same run (the
  practical ceiling: a matrix multiply is the most efficient thing a CPU or GPU does);
- where the step's time goes: the share spent in convolutions and matrix multiplies (the only
  operations with FLOPs to count) and their own FLOP rate, from ``torch.profiler``;
- peak memory of a training step, without and with gradient checkpointing, and on CUDA also
  with and without mixed precision (AMP); and the activations saved for backward, the part
  that checkpointing reduces;
- the share of training time spent waiting for the example's own DataLoader;
- time to the headline metric, read from the example's ``outputs/metrics.json`` when a default
  run has written one.

Each timing is a median over several repeats, after warm-up steps: the first calls of a model
pay for memory allocation, kernel selection (cudnn.benchmark) and lazy initialization.

How to run
----------
From the repository root (any folder works)::

    python benchmarks/benchmark.py                    # all examples, a few minutes on a 2-core CPU
    python benchmarks/benchmark.py --examples 1 3     # only some
    python benchmarks/benchmark.py --tiny             # seconds: each example's --quick sizes
    python benchmarks/benchmark.py --examples 1 --set BASE_CHANNELS=16   # what if it were wider?

It prints one table and writes ``benchmarks/outputs/benchmark.json``. Run it on an idle
machine: anything else running (a training, a browser tab playing video) lowers every number.

References
----------
- Performance tuning guide: https://pytorch.org/tutorials/recipes/recipes/tuning_guide.html
- Channels-last memory format: https://pytorch.org/tutorials/intermediate/memory_format_tutorial.html
- torch.utils.flop_counter: https://pytorch.org/docs/stable/generated/torch.utils.flop_counter.FlopCounterMode.html
"""

import argparse
import ast
import contextlib
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

# -----------------------------------------------------------------------------------------------
# Settings

WARMUP = 3  # untimed steps first: allocation, kernel choice and caches settle
REPEATS = 7  # timed repeats; the median ignores the odd step slowed by the OS
MATMUL_SIZE = 2048  # n of the n x n fp32 matrix multiply that measures the machine's rate (CPU)
MATMUL_SIZE_CUDA = 8192  # a GPU needs a bigger problem to reach its rate
DATA_BATCHES = 20  # training steps fed by each example's own DataLoader to measure the data wait
PROFILED_STEPS = 3  # training steps recorded by torch.profiler for the time breakdown
TINY = dict(WARMUP=1, REPEATS=2, DATA_BATCHES=2, PROFILED_STEPS=1, MATMUL_SIZE=256)  # --tiny
ROOT = Path(__file__).resolve().parents[1]
OUTPUT_DIR = Path(__file__).resolve().parent / "outputs"  # benchmark.json (gitignored)
# -----------------------------------------------------------------------------------------------


def pick_device() -> torch.device:
    """CUDA, then Apple MPS, then the CPU (the examples' DEVICE = "auto" rule)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work: GPU calls return before the work is done, a timer must not."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def median_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Median wall time of fn() over REPEATS calls, after WARMUP untimed calls."""
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(REPEATS):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ===============================================================================================
# 1. The examples: how to build each one's model, batch and loss from its own script
# ===============================================================================================
# The scripts are not a package (students run them from their folders), so we import each from
# its file, exactly as the tests do. Nothing is copied here: the model classes, losses, loaders
# and constants are the script's own, so the benchmark follows every edit a reader makes.


@dataclass
class Example:
    """How to benchmark one model of one example script."""

    name: str  # row label in the table
    script: str  # path relative to the repository root
    build: Callable  # (module, grad_checkpoint: bool) -> nn.Module
    num_classes: Callable  # module -> classes of the output
    in_channels: Callable  # module -> channels of the input
    loss: Callable  # (module, logits, masks) -> scalar loss, the loss the example trains with
    train_loader: Callable  # module -> the example's training DataLoader (for the data share)
    headline: Callable  # metrics.json contents -> {"metric", "value", "seconds"}


class Checkpointed(nn.Module):
    """Gradient checkpointing around a module: backward keeps only its inputs and recomputes
    its insides (less memory, one more forward pass of compute).

    BatchNorm inside updates its running statistics twice per step (forward and recompute):
    harmless for a benchmark, worth knowing in a real training run.
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return checkpoint(self.inner, *args, use_reentrant=False)  # the recommended variant


def checkpoint_modules(model: nn.Module, kinds: tuple) -> nn.Module:
    """Wrap every submodule of the given classes in Checkpointed (in place)."""
    wrapped = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, kinds):
                setattr(parent, child_name, Checkpointed(child))
                wrapped += 1
    if wrapped == 0:  # a silent no-op would report "checkpointing saves nothing"
        raise ValueError(f"no {kinds} inside {type(model).__name__} to checkpoint")
    return model


def unet_example(
    number: int,
    script: str,
    config: Callable,
    in_channels: Callable,
    loss: Callable,
    train_loader: Callable,
    headline: Callable,
) -> Example:
    """Examples 1 and 3: a U-Net whose DoubleConv blocks are checkpointed on request."""

    def build(m, grad_checkpoint):
        model = m.UNet(**config(m))
        return checkpoint_modules(model, (m.DoubleConv,)) if grad_checkpoint else model

    return Example(
        f"{number}",
        script,
        build,
        lambda m: config(m)["num_classes"],
        in_channels,
        loss,
        train_loader,
        headline,
    )


def example_2(architecture: str) -> Example:
    """Example 2: one of its (decoder, encoder) runs, built without downloading weights."""

    def build(m, grad_checkpoint):
        encoder = dict(m.RUNS)[architecture]
        model = m.build_model(architecture, encoder, m.NUM_CLASSES, pretrained=False)
        if grad_checkpoint:
            # The encoder is a torch.fx feature extractor: tracing replaced its residual blocks
            # by one flat graph, so we checkpoint the whole encoder and the whole decoder.
            model.encoder, model.decoder = Checkpointed(model.encoder), Checkpointed(model.decoder)
        return model

    def train_loader(m):
        datasets, _ = m.load_datasets()  # VOC if it is on disk, else the synthetic scenes
        return m.make_loader(datasets["train"], train=True)

    return Example(
        f"2 {architecture}",
        "example_2_pretrained_encoders/pretrained_segmentation.py",
        build,
        lambda m: m.NUM_CLASSES,
        lambda m: 3,
        lambda m, logits, masks: F.cross_entropy(logits, masks, ignore_index=m.IGNORE_INDEX),
        train_loader,
        lambda d: next(
            dict(
                metric="test mIoU",
                value=run["miou"],
                seconds=run["train_seconds"],
                timed="training",
            )
            for run in d["runs"]
            if run["architecture"] == architecture
        ),
    )


def example_3_loader(m):
    """Example 3's training loader: synthetic cohort -> preprocessing -> patient split -> slices."""
    splits, _ = m.load_data()
    return m.train_loader([m.preprocess(case) for case in splits["train"]], m.SEED)


def example_4_loader(m):
    """Example 4's training loader; its batches also carry the U-Net weight map."""
    return m.train_loader(m.make_datasets(m.SEED)["train"], m.SEED)


def example_4_loss(m, logits, masks):
    """The mixed loss of Example 4's final model, with a flat weight map (all ones)."""
    return m.mixed_loss(logits, masks, torch.ones(masks.shape, device=masks.device))


EXAMPLES = {
    "1": [
        unet_example(
            1,
            "example_1_basic_unet/basic_unet_segmentation.py",
            lambda m: m.model_config(),
            lambda m: 3,
            lambda m, logits, masks: F.cross_entropy(logits, masks, ignore_index=m.IGNORE_INDEX),
            lambda m: m.build_loaders(m.SEED)["train"],
            lambda d: dict(
                metric="test foreground IoU",
                value=d["test"]["foreground_iou"],
                seconds=d["total_seconds"],
                timed="run",
            ),
        )
    ],
    "2": [example_2("deeplabv3"), example_2("fpn")],
    "3": [
        unet_example(
            3,
            "example_3_medical_segmentation/medical_segmentation.py",
            lambda m: m.model_config(2 * m.CONTEXT_SLICES + 1, len(m.CT_CLASS_NAMES)),
            lambda m: 2 * m.CONTEXT_SLICES + 1,
            lambda m, logits, masks: m.make_loss(
                m.LOSS, torch.ones(logits.shape[1], device=logits.device)
            )(logits, masks),
            example_3_loader,
            lambda d: dict(
                metric="test lesion Dice",
                value=d["test"]["dice"]["lesion"],
                seconds=d["total_seconds"],
                timed="run",
            ),
        )
    ],
    "4": [
        Example(
            "4",
            "example_4_advanced_techniques/advanced_segmentation.py",
            lambda m, checkpointing: m.DilatedAttentionNet(
                **dict(m.model_config(True, True), grad_checkpoint=checkpointing)
            ),  # CBAM and position attention: the final model's network
            lambda m: len(m.CLASS_NAMES),
            lambda m: 3,
            example_4_loss,
            example_4_loader,
            lambda d: dict(
                metric="test mIoU, final pipeline",
                value=[row for row in d["ablation"] if row.get("kept", True)][-1]["miou"],
                seconds=d["total_seconds"],
                timed="run",
            ),
        )
    ],
}


def load_script(relative_path: str):
    """Import an example script from its file (once; a module already imported is reused)."""
    path = ROOT / relative_path
    module = sys.modules.get(path.stem)
    if module is not None and Path(getattr(module, "__file__", "")).resolve() == path:
        return module
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up by name while being built
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def example_constants(module, tiny: bool, overrides: dict):
    """Within the block: the script's --quick sizes if tiny, then `overrides` (NAME: value) where
    the script has such a constant, and its CPU thread setting; afterwards, everything restored."""
    saved = {name: value for name, value in vars(module).items() if name.isupper()}
    threads = torch.get_num_threads()
    try:
        if tiny:
            vars(module).update(module.QUICK)
        vars(module).update({name: value for name, value in overrides.items() if name in saved})
        wanted = getattr(module, "NUM_THREADS", None)
        if wanted:  # an example that pins its CPU threads is measured as it runs
            torch.set_num_threads(wanted)
        yield module
    finally:
        vars(module).update(saved)
        torch.set_num_threads(threads)


# ===============================================================================================
# 2. The measurements
# ===============================================================================================


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of an n x n matrix multiply (2 n^3 FLOPs): the ceiling we compare against.

    In the precision the training step computes in: float32 on a CPU, float16 under AMP on CUDA
    (tensor cores make it several times faster than float32 there).
    """
    n = MATMUL_SIZE_CUDA if device.type == "cuda" else MATMUL_SIZE
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / median_seconds(lambda: a @ b, device)


def random_batch(ex: Example, m, device, memory_format) -> tuple:
    """A batch shaped like the example's: images (N, C, S, S) float32, masks (N, S, S) int64."""
    n, size = m.BATCH_SIZE, m.IMAGE_SIZE
    images = torch.rand(n, ex.in_channels(m), size, size, device=device)
    masks = torch.randint(0, ex.num_classes(m), (n, size, size), device=device)
    return images.contiguous(memory_format=memory_format), masks


def autocast(device: torch.device, amp: bool):
    """float16 autocast on CUDA when amp is on; otherwise nothing (older PyTorch builds reject
    torch.autocast(device_type="mps") even when it is disabled)."""
    return (
        torch.autocast(device_type="cuda", dtype=torch.float16) if amp else contextlib.nullcontext()
    )


def training_step(ex: Example, m, model, optimizer, amp: bool) -> Callable:
    """step(images, masks): one training step the way the examples run it (AMP only on CUDA)."""
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def step(images, masks):
        with autocast(images.device, amp):
            logits = model(images)
        loss = ex.loss(m, logits.float(), masks)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def prepare(ex: Example, m, device, memory_format, grad_checkpoint=False):
    """Model (train mode, in `memory_format`) and its AdamW optimizer (fused where the examples
    fuse it: CPU and CUDA), seeded."""
    torch.manual_seed(0)
    model = ex.build(m, grad_checkpoint).to(device, memory_format=memory_format).train()
    return model, torch.optim.AdamW(
        model.parameters(), lr=1e-4, fused=device.type in ("cpu", "cuda")
    )


def count_flops(step: Callable[[], object]) -> int:
    """FLOPs of one call of step(), as torch.utils.flop_counter counts them.

    It counts matrix multiplies and convolutions (forward and backward): 2 FLOPs per
    multiply-add. Element-wise work (BatchNorm, ReLU, the optimizer) has no FLOPs in this count,
    which is the usual convention for "model FLOPs".
    """
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


FLOP_OPS = re.compile(r"conv|mm$|matmul|linear")  # aten ops that carry the counted FLOPs


def time_breakdown(step: Callable, device: torch.device) -> float | None:
    """Share of the step's operator time spent in convolutions and matrix multiplies (CPU only).

    On a GPU the operators' CPU time is only the time to launch them; their GPU time would
    need the kernel-level events, so there we report nothing rather than a wrong number.
    """
    if device.type != "cpu":
        return None
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(PROFILED_STEPS):
            step()
    times = {event.key: event.self_cpu_time_total for event in prof.key_averages()}
    heavy = sum(t for key, t in times.items() if FLOP_OPS.search(key.split("::")[-1]))
    return heavy / sum(times.values())


@torch.inference_mode()
def inference_latency(model: nn.Module, images: torch.Tensor, device, amp: bool) -> float:
    """Seconds to segment one image: eval mode, no autograd, batch of one (AMP as in training)."""
    model.eval()  # Gotcha: BatchNorm must use its running statistics, as in deployment
    one = images[:1]

    def infer():
        with autocast(device, amp):
            return model(one)

    seconds = median_seconds(infer, device)
    model.train()
    return seconds


def data_wait(ex: Example, m, device, memory_format, amp: bool) -> tuple[float, float]:
    """(share of training time spent waiting for the next batch, seconds per batch) in a real loop.

    The example's own training DataLoader feeds DATA_BATCHES training steps; the time inside
    next(loader) is the wait. With NUM_WORKERS = 0 all the loader's work happens in that wait;
    with workers, only the part they could not prepare ahead of time. Augmentation that an
    example does on whole batches inside its training loop (Example 4's flips and turns) counts
    as training time here, not as waiting.
    """
    model, optimizer = prepare(ex, m, device, memory_format)
    step = training_step(ex, m, model, optimizer, amp)
    batches = iter(ex.train_loader(m))
    first = next(batches)  # the first batch also starts any workers and draws the shuffling order
    step(first[0].to(device, memory_format=memory_format), first[1].to(device))  # warm-up step
    waited, steps, start = 0.0, 0, time.perf_counter()
    for _ in range(DATA_BATCHES):
        before = time.perf_counter()
        batch = next(batches, None)
        waited += time.perf_counter() - before
        if batch is None:  # the epoch ended
            break
        images, masks = batch[0], batch[1]  # Example 4's batches also carry a weight map
        step(images.to(device, memory_format=memory_format), masks.to(device))
        steps += 1
    synchronize(device)
    return waited / (time.perf_counter() - start), waited / max(steps, 1)


def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB (Linux)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) / 1024


def peak_step_memory(
    ex: Example, m, device, memory_format, grad_checkpoint: bool, amp: bool
) -> float:
    """MiB a training step adds at its peak: activations, gradients, optimizer state, workspace.

    CUDA: the caching allocator's peak. CPU: the peak resident memory of the process (Linux
    only), which is why a fresh process measures each case (see `memory_in_subprocess`).
    """
    model, optimizer = prepare(ex, m, device, memory_format, grad_checkpoint)
    images, masks = random_batch(ex, m, device, memory_format)
    step = training_step(ex, m, model, optimizer, amp)
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated()  # weights and the batch
        step(images, masks)  # warm-up: optimizer state, gradients, cudnn.benchmark's trials
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        step(images, masks)
        synchronize(device)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = rss_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current size
    step(images, masks)
    step(images, masks)
    return rss_mib("VmHWM") - before


def saved_activation_mib(
    ex: Example, m, device, memory_format, grad_checkpoint: bool, amp: bool
) -> float:
    """MiB of the tensors autograd keeps for backward in one training step (weights not counted).

    Exact, and measured the same way on every device: every tensor saved for backward passes
    through `pack`. It is the part of the memory that gradient checkpointing reduces (and AMP
    halves, where it is on).
    """
    model, _ = prepare(ex, m, device, memory_format, grad_checkpoint)
    images, masks = random_batch(ex, m, device, memory_format)
    sizes = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        sizes[storage.data_ptr()] = storage.nbytes()  # views of one storage are counted once
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with autocast(device, amp):
            logits = model(images)
        loss = ex.loss(m, logits.float(), masks)
    loss.backward()  # recomputed insides of checkpointed blocks are freed at once, not counted
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for pointer, size in sizes.items() if pointer not in weights) / 2**20


def memory_in_subprocess(
    key: str, index: int, tiny: bool, overrides: dict, grad_checkpoint: bool
) -> float | None:
    """Peak step memory on the CPU, measured in a fresh Python process; None where unsupported.

    Freed memory stays in the process (the C allocator keeps it for reuse), so a second
    measurement in the same process would see the first one's leftovers and report too little.
    """
    if not Path("/proc/self/clear_refs").exists():
        return None  # not Linux: no way to read and reset the peak resident memory
    command = [sys.executable, __file__, "--memory-probe", key, str(index)]
    command += ["--tiny"] * tiny + ["--grad-checkpoint"] * grad_checkpoint
    command += [arg for name, value in overrides.items() for arg in ("--set", f"{name}={value!r}")]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        print("  memory probe took over 10 minutes; skipped")
        return None
    if result.returncode != 0:
        print(f"  memory probe failed: {result.stderr.strip().splitlines()[-1:]}")
        return None
    return float(result.stdout.strip().splitlines()[-1])


def read_headline(ex: Example) -> dict | None:
    """{"metric", "value", "seconds", "timed"} of the example's last run, if it wrote
    outputs/metrics.json.

    Run the example with its defaults first (a --quick run writes to outputs/quick/ instead).

    The seconds are the whole run's (timed "run": data, training, evaluation, figures), or the
    model's own training where one run trains several models (timed "training": Example 2).
    """
    path = ROOT / Path(ex.script).parent / "outputs" / "metrics.json"
    if not path.is_file():
        return None
    try:
        headline = ex.headline(json.loads(path.read_text()))
    except (KeyError, StopIteration, IndexError, json.JSONDecodeError):
        return None  # written by an older version of the script
    return headline if headline["value"] is not None else None  # a NaN score is stored as null


# ===============================================================================================
# 3. One example, then all of them
# ===============================================================================================


def benchmark_example(key: str, index: int, device, tiny: bool, overrides: dict) -> dict:
    """Every measurement for one model of one example, as a dict (one row of the table)."""
    ex = EXAMPLES[key][index]
    m = load_script(ex.script)
    with example_constants(m, tiny, overrides):
        # 0) the ceiling, measured for every row just before and just after the training step is
        #    timed: a laptop's (or a shared server's) speed can drift by 20% and more over
        #    minutes, and the ratio must compare like with like
        amp = device.type == "cuda"  # what the examples do: mixed precision on CUDA only
        ceiling_dtype = torch.float16 if amp else torch.float32
        ceiling_before = matmul_rate(device, ceiling_dtype)

        chosen = m.memory_format(device)  # the example's own choice, explained in its script
        other = torch.contiguous_format if chosen == torch.channels_last else torch.channels_last

        # 1) training step in the example's memory format, then in the other one for comparison
        step_seconds = {}
        for memory_format in (chosen, other):
            model, optimizer = prepare(ex, m, device, memory_format)
            images, masks = random_batch(ex, m, device, memory_format)
            step = training_step(ex, m, model, optimizer, amp)
            step_seconds[memory_format] = median_seconds(lambda: step(images, masks), device)
            if memory_format == chosen:
                peak_rate = (ceiling_before + matmul_rate(device, ceiling_dtype)) / 2
                flops = count_flops(lambda: step(images, masks))
                heavy_share = time_breakdown(lambda: step(images, masks), device)
                latency = inference_latency(model, images, device, amp)
                parameters = sum(p.numel() for p in model.parameters())
        seconds = step_seconds[chosen]
        rate = flops / seconds

        # 2) data: the example's own training loader feeding real training steps
        wait_share, data_seconds = data_wait(ex, m, device, chosen, amp)

        # 3) memory, without and with gradient checkpointing (and AMP on CUDA)
        memory = {}
        for grad_checkpoint in (False, True):
            label = "checkpointing" if grad_checkpoint else "plain"
            if device.type == "cuda":
                memory[label] = peak_step_memory(ex, m, device, chosen, grad_checkpoint, amp)
            elif device.type == "cpu":
                memory[label] = memory_in_subprocess(key, index, tiny, overrides, grad_checkpoint)
            else:
                memory[label] = None  # Apple MPS: no peak counter to read
        if device.type == "cuda":
            memory["plain_fp32"] = peak_step_memory(ex, m, device, chosen, False, False)
        activations = {
            label: saved_activation_mib(ex, m, device, chosen, grad_checkpoint, amp)
            for label, grad_checkpoint in (("plain", False), ("checkpointing", True))
        }

        return dict(
            example=ex.name,
            image_size=m.IMAGE_SIZE,
            batch_size=m.BATCH_SIZE,
            parameters=parameters,
            channels_last=chosen == torch.channels_last,
            threads=torch.get_num_threads(),
            step_seconds=seconds,
            other_format_step_seconds=step_seconds[other],
            train_images_per_second=m.BATCH_SIZE / seconds,
            gflop_per_step=flops / 1e9,
            gflops=rate / 1e9,
            matmul_gflops=peak_rate / 1e9,
            matmul_dtype="float16" if amp else "float32",
            fraction_of_matmul=rate / peak_rate,
            conv_matmul_time_share=heavy_share,
            conv_matmul_fraction_of_matmul=None
            if heavy_share is None
            else rate / heavy_share / peak_rate,
            inference_ms_per_image=latency * 1e3,
            data_seconds_per_batch=data_seconds,
            data_wait_share=wait_share,
            peak_memory_mib=memory,
            activation_mib=activations,
            headline=read_headline(ex),
        )


def fmt(value, spec: str, missing: str = "-") -> str:
    """format(value, spec), or `missing` for None."""
    return missing if value is None else format(value, spec)


def percent(value) -> str:
    """A share as a percentage: whole numbers from 10%, one decimal from 1%, two below (a GPU
    runs these small models at a fraction of a percent of its matmul rate); "-" for None."""
    if value is None or value >= 0.1:
        return fmt(value, ".0%")
    return format(value, ".1%" if value >= 0.01 else ".2%")


def print_table(rows: list[dict], machine: dict) -> None:
    """The results as two text tables: speed, then memory, data and results."""
    print(
        f"\n{machine['device_name']} | {machine['cpu_count']} cores | torch {machine['torch']} | "
        f"{machine['threads']} threads | matmul {machine['matmul_gflops']:.0f} GFLOP/s "
        f"({rows[0]['matmul_dtype']}, median of the rows)"
    )
    header = (
        f"{'example':<13}{'img':>4}{'batch':>6}{'train img/s':>12}{'GFLOP/step':>11}{'GFLOP/s':>8}"
        f"{'of matmul':>10}{'conv time':>10}{'conv rate':>10}{'other layout':>13}{'infer ms':>9}"
    )
    print(header + "\n" + "-" * len(header))
    for r in rows:
        other = r["step_seconds"] / r["other_format_step_seconds"] - 1  # > 0: the other is faster
        print(
            f"{r['example']:<13}{r['image_size']:>4}{r['batch_size']:>6}{r['train_images_per_second']:>12.1f}"
            f"{r['gflop_per_step']:>11.2f}{r['gflops']:>8.1f}{percent(r['fraction_of_matmul']):>10}"
            f"{percent(r['conv_matmul_time_share']):>10}{percent(r['conv_matmul_fraction_of_matmul']):>10}"
            f"{other:>+13.0%}{r['inference_ms_per_image']:>9.1f}"
        )
    header = (
        f"{'example':<13}{'peak MiB':>9}{'ckpt':>7}{'no AMP':>7}{'activations MiB':>16}{'ckpt':>7}"
        f"{'data wait':>10}{'headline metric (outputs/metrics.json)':>50}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        peak, act, headline = r["peak_memory_mib"], r["activation_mib"], r["headline"]
        shown = "-"
        if headline is not None:
            shown = f"{headline['metric']} {headline['value']:.3f}, "
            shown += f"{headline['timed']} {headline['seconds']:.0f} s"
        print(
            f"{r['example']:<13}{fmt(peak['plain'], '.0f'):>9}"
            f"{fmt(peak['checkpointing'], '.0f'):>7}{fmt(peak.get('plain_fp32'), '.0f'):>7}"
            f"{act['plain']:>16.1f}{act['checkpointing']:>7.1f}"
            f"{r['data_wait_share']:>10.0%}{shown:>50}"
        )
    print(
        "\nof matmul: the training step's FLOP rate / the matmul rate in the step's precision "
        "(float32 on a CPU, float16 on CUDA). conv time (CPU only): share of the step spent in "
        "convolutions and matmuls; conv rate: their own FLOP rate / the matmul rate. "
        "other layout: how much faster (+) the step is in the memory layout the example does not "
        "use. peak: MiB a training step adds at its peak (CPU: resident memory, which memory the "
        "process freed earlier and reuses can understate); no AMP: the same in float32 (CUDA); "
        "activations: MiB saved for backward; ckpt: with gradient checkpointing. data wait: share "
        "of training time spent waiting for the DataLoader."
    )


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        match = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, rows: list[dict]) -> dict:
    """What the numbers were measured on."""
    name = torch.cuda.get_device_name() if device.type == "cuda" else cpu_name()
    return dict(
        device=str(device),
        device_name=name,
        cpu_count=os.cpu_count(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        python=platform.python_version(),
        matmul_gflops=statistics.median(row["matmul_gflops"] for row in rows),
    )


def parse_overrides(assignments: list[str]) -> dict:
    """["BASE_CHANNELS=16", ...] -> {"BASE_CHANNELS": 16}; values are Python literals."""
    overrides = {}
    for assignment in assignments:
        name, _, value = assignment.partition("=")
        if not name.isupper() or not value:
            raise SystemExit(
                f"error: --set expects NAME=VALUE with an UPPERCASE name, got {assignment!r}"
            )
        try:
            overrides[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise SystemExit(
                f"error: --set {assignment!r}: the value is not a Python literal"
            ) from None
    return overrides


def main(argv: list[str] | None = None) -> dict:
    """Benchmark the chosen examples, print the table, write the JSON; returns the results."""
    parser = argparse.ArgumentParser(description="Benchmark the course's examples.")
    parser.add_argument("--examples", nargs="+", choices=sorted(EXAMPLES), default=sorted(EXAMPLES))
    parser.add_argument("--tiny", action="store_true", help="each example's --quick sizes: seconds")
    parser.add_argument("--output", type=Path, default=OUTPUT_DIR / "benchmark.json")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="change a constant of the examples that have it, e.g. --set BASE_CHANNELS=16",
    )
    parser.add_argument(
        "--memory-probe", nargs=2, metavar=("EXAMPLE", "INDEX"), help=argparse.SUPPRESS
    )
    parser.add_argument("--grad-checkpoint", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        globals().update(TINY)
    overrides = parse_overrides(args.set)
    device = pick_device()
    if args.memory_probe:  # internal: one memory measurement in this fresh process
        ex = EXAMPLES[args.memory_probe[0]][int(args.memory_probe[1])]
        m = load_script(ex.script)
        with example_constants(m, args.tiny, overrides):
            print(
                peak_step_memory(
                    ex, m, device, m.memory_format(device), args.grad_checkpoint, amp=False
                )
            )
        return {}
    # cudnn.benchmark: let cuDNN time its algorithms for each new input shape and keep the
    # fastest; it pays off whenever the shapes repeat, as in a training loop.
    torch.backends.cudnn.benchmark = True
    print(f"device: {device}")
    rows = []
    for key in args.examples:
        for index in range(len(EXAMPLES[key])):
            print(f"example {EXAMPLES[key][index].name} ...", flush=True)
            rows.append(benchmark_example(key, index, device, args.tiny, overrides))
    machine = machine_info(device, rows)
    print_table(rows, machine)
    result = dict(machine=machine, tiny=args.tiny, overrides=overrides, rows=rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"written: {args.output}")
    return result


if __name__ == "__main__":
    main()
