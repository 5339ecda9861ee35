"""GPU check: is this NVIDIA machine fast and correct for genre_pipeline? One script, no Ray cluster.

    python benchmarks/gpu_check.py [--arch resnet50] [--posters 512] [--batch-size 256] [--compile]

On generated posters (JPEGs of real poster size, 300x450) and a randomly initialised model of `--arch`, it prints
the machine (GPU, memory, torch/torchvision/CUDA versions, CPUs, date), then:
  ceiling      GenrePredictor.predict on CUDA (bf16 autocast, as the label job's actors run it) on preloaded,
               decoded posters: posters/s;
  CPU decode   decode + resize from bytes in memory, on 1 thread and on a thread per CPU: posters/s, and how many
               CPU cores one GPU needs to be fed at its ceiling;
  end to end   read + CPU decode on a thread per CPU, overlapped with GPU prediction: posters/s and its ratio
               to the ceiling;
  GPU decode   torchvision.io.decode_jpeg(device="cuda") (nvjpeg) + antialiased resize, where this build has it;
  training     steps of the model on CUDA (channels_last, AdamW, BCE, bf16 autocast): samples/s;
  --compile    the ceiling again with torch.compile(model).
and checks:
  predict      scores on CUDA (bf16) against CPU (fp32) on the same 64 posters: max |score diff| < 0.05 and
               labels (score >= threshold 0.3) agree on >= 98% of cells;
  train step   one fp32 step (TF32 off) from the same weights on the same batch, CPU against CUDA: loss within
               relative 1e-3, gradient norm within relative 1e-2;
  compile      with --compile: torch.compile must compile and run.

Exit codes: 0 every check passed; 1 a check failed; 3 no CUDA device ("no CUDA device: nothing to check"), so CI
and CPU machines can call it harmlessly. GPU JPEG decoding being unavailable is reported, not a failure.

The script never starts Ray (`genre_pipeline.model.predictor` imports the `ray` package for its metrics, which stay
off without a running Ray). Its functions take a `device`, so tests can run their logic on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import os
import platform
import sys
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402

from genre_pipeline.data.images import PreprocessSpec, Size, as_shape, decode_poster  # noqa: E402
from genre_pipeline.data.sample import build_sample_catalog  # noqa: E402
from genre_pipeline.data.tensors import to_model_input  # noqa: E402
from genre_pipeline.genres import GENRES, encode_many  # noqa: E402
from genre_pipeline.model.architectures import ARCHS, build_model, default_preprocess  # noqa: E402
from genre_pipeline.model.checkpoints import ModelMeta, save_checkpoint  # noqa: E402
from genre_pipeline.model.predictor import GenrePredictor, load_predictor  # noqa: E402
from genre_pipeline.model.signals import POSTER

EXIT_OK, EXIT_FAILED, EXIT_NO_CUDA = 0, 1, 3
NO_CUDA_MESSAGE = "no CUDA device: nothing to check"
THRESHOLD = 0.3  # every genre's threshold in the random-weight checkpoint
CHECK_POSTERS = 64  # posters scored on both devices by the predict check
# bf16 keeps 8 bits of mantissa: sigmoid scores move by up to ~1e-2 on a deep net; labels flip only near 0.3.
MAX_SCORE_DIFF, MIN_LABEL_AGREEMENT = 0.05, 0.98
# fp32 on both sides: only summation order differs. Gradients pass through BatchNorm's batch statistics on a
# small batch, which amplify that noise, hence the looser gradient tolerance.
LOSS_RTOL, GRAD_RTOL = 1e-3, 1e-2
PARITY_BATCH = 8


@dataclass(frozen=True)
class Posters:
    """The generated inputs: poster files, their genres as multi-hot targets, and a checkpoint to score them."""

    paths: list[Path]
    targets: np.ndarray  # float32 N×18
    model_uri: str
    spec: PreprocessSpec

    def read_all(self) -> list[bytes]:
        return [p.read_bytes() for p in self.paths]


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"check {self.name}: {self.detail}: {'PASS' if self.passed else 'FAIL'}"


def say(text: str) -> None:
    print(text, flush=True)  # the runs take minutes: show progress as it happens, also through a pipe


def usable_cpus() -> int:
    """CPUs this process may run on (a container's cpuset, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def sync(device: torch.device) -> None:
    """CUDA kernels run asynchronously: wait for them before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_lines(device: torch.device) -> list[str]:
    lines = [f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC, host {platform.node()}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"GPU {props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability "
                     f"{props.major}.{props.minor}, {props.multi_processor_count} SMs, "
                     f"{torch.cuda.device_count()} visible")
    else:
        lines.append(f"device {device} (no GPU)")
    lines.append(f"torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA {torch.version.cuda}, "
                 f"cuDNN {torch.backends.cudnn.version()}, Python {platform.python_version()}")
    lines.append(f"CPUs: {usable_cpus()} usable of {os.cpu_count()}")
    return lines


def make_posters(root: Path, arch: str, count: int, image_size: int | None = None, seed: int = 1) -> Posters:
    """`count` generated posters of 300x450 and a random-weight checkpoint of `arch` (seeded: reruns compare)."""
    table = build_sample_catalog(str(root / "sample"), count, seed=seed)
    rows = [r for r in table.select(["poster_uri", "genres"]).to_pylist() if r["poster_uri"]]
    spec = default_preprocess(arch, image_size)
    meta = ModelMeta(arch=arch, genres=list(GENRES), preprocess=spec, thresholds=[THRESHOLD] * len(GENRES))
    torch.manual_seed(seed)
    save_checkpoint(root / "model", build_model(arch=arch, num_genres=len(GENRES)), meta)
    return Posters(paths=[Path(r["poster_uri"]) for r in rows], targets=encode_many(r["genres"] for r in rows),
                   model_uri=str(root / "model"), spec=spec)


def decode_many(data: Sequence[bytes], image_size: Size, workers: int) -> np.ndarray:
    """uint8 N×S×S×3; PIL releases the GIL while decoding and resizing, so threads use several cores."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return np.stack(list(pool.map(lambda d: decode_poster(d, image_size), data)))


def cpu_decode_rate(data: Sequence[bytes], image_size: Size, workers: int) -> float:
    """Posters/s of decode + resize from bytes in memory (no file reads: the decoder's cost alone)."""
    started = time.perf_counter()
    decode_many(data, image_size, workers)
    return len(data) / (time.perf_counter() - started)


def batches_of(images: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [images[i:i + batch_size] for i in range(0, len(images), batch_size)]


def ceiling(predictor: GenrePredictor, images: np.ndarray, batch_size: int) -> float:
    """Posters/s of `predictor.predict` alone on preloaded, decoded posters: the most a GPU can give the job."""
    batches = batches_of(images, batch_size)
    # Warm up on every batch shape, twice: cuDNN/oneDNN pick kernels, the allocator grows and torch.compile
    # compiles per shape (and may recompile once on the second call); none of that is steady-state throughput.
    for batch in 2 * list({b.shape: b for b in batches}.values()):
        predictor.predict(batch)
    sync(predictor.device)
    started = time.perf_counter()
    for batch in batches:
        predictor.predict(batch)
    sync(predictor.device)
    return len(images) / (time.perf_counter() - started)


def load_poster(path: Path, image_size: Size) -> np.ndarray:
    return decode_poster(path.read_bytes(), image_size)


def end_to_end(predictor: GenrePredictor, paths: Sequence[Path], batch_size: int, workers: int,
               prefetch: int = 2) -> float:
    """Posters/s of read + decode on `workers` CPU threads, overlapped with prediction.

    While batch k is on the GPU, batches k+1..k+prefetch are being read and decoded: the GPU waits only when
    decoding is slower than the model. Each poster is its own task so all threads work on the next batch.
    """
    size = predictor.spec.shape
    chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    predictor.predict(decode_many([p.read_bytes() for p in chunks[0][:8]], size, workers))  # warm-up
    sync(predictor.device)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:

        def submit(chunk: Sequence[Path]) -> list[Future]:
            return [pool.submit(load_poster, p, size) for p in chunk]

        pending: deque[list[Future]] = deque(submit(c) for c in chunks[:prefetch])
        next_chunk = prefetch
        while pending:
            futures = pending.popleft()
            if next_chunk < len(chunks):
                pending.append(submit(chunks[next_chunk]))
                next_chunk += 1
            predictor.predict(np.stack([f.result() for f in futures]))
    sync(predictor.device)
    return len(paths) / (time.perf_counter() - started)


def device_decode(data: Sequence[torch.Tensor], image_size: Size, device: torch.device) -> torch.Tensor:
    """torchvision.io JPEG decode on `device` (nvjpeg on CUDA) + antialiased resize -> uint8 N×S×S×3 there."""
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of torchcodec; the warning says nothing about speed.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        decoded = torchvision.io.decode_jpeg(list(data), mode=torchvision.io.ImageReadMode.RGB, device=device)
    resized: list[torch.Tensor] = []
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for image in decoded:
        by_shape.setdefault(tuple(image.shape), []).append(image)
    # Posters of one shape resize as one batch; real catalogues have a few shapes, so this stays a few kernels.
    for same in by_shape.values():
        batch = torch.stack(same).float()
        out = nn.functional.interpolate(batch, size=as_shape(image_size), mode="bilinear",
                                        antialias=True, align_corners=False)
        resized.extend(out.round_().clamp_(0, 255).to(torch.uint8))
    # Order follows shapes, not input; fine for a throughput and mean-difference measure of uniform posters.
    return torch.stack(resized).permute(0, 2, 3, 1)


def device_decode_rate(data: Sequence[bytes], image_size: Size, batch_size: int,
                       device: torch.device) -> tuple[float, float]:
    """(posters/s, mean |difference| in grey levels against the CPU decoder) of `device_decode`."""
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    chunks = [tensors[i:i + batch_size] for i in range(0, len(tensors), batch_size)]
    first = device_decode(chunks[0], image_size, device)  # warm-up: nvjpeg's handles and buffers
    sync(device)
    started = time.perf_counter()
    for chunk in chunks:
        device_decode(chunk, image_size, device)
    sync(device)
    rate = len(tensors) / (time.perf_counter() - started)
    reference = decode_many(data[:len(first)], image_size, usable_cpus())
    difference = float(np.abs(first.cpu().numpy().astype(np.int16) - reference.astype(np.int16)).mean())
    return rate, difference


def predict_check(model_uri: str, images: np.ndarray, device: torch.device) -> Check:
    """Scores on `device` against CPU fp32 on the same posters, with the checkpoint's thresholds."""
    reference = load_predictor(model_uri, device="cpu", num_threads=usable_cpus(), precision="fp32")
    candidate = load_predictor(model_uri, device=str(device), num_threads=usable_cpus())
    expected, got = reference.predict(images), candidate.predict(images)
    thresholds = reference.meta.thresholds_for(POSTER)
    max_diff = float(np.abs(expected - got).max())
    agreement = float(((expected >= thresholds) == (got >= thresholds)).mean())
    passed = bool(np.isfinite(got).all()) and max_diff < MAX_SCORE_DIFF and agreement >= MIN_LABEL_AGREEMENT
    detail = (f"{device} vs cpu on {len(images)} posters: max |score diff| {max_diff:.4f} (< {MAX_SCORE_DIFF}), "
              f"labels agree on {agreement:.2%} of cells (>= {MIN_LABEL_AGREEMENT:.0%})")
    return Check("predict", passed, detail)


def training_model(arch: str, device: torch.device) -> nn.Module:
    return build_model(arch=arch, num_genres=len(GENRES)).to(device, memory_format=torch.channels_last).train()


def train_steps(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, spec: PreprocessSpec, steps: int,
                optimizer: torch.optim.Optimizer | None = None) -> list[float]:
    """`steps` AdamW steps on one batch (uint8 NHWC on the model's device); losses as the job computes them.

    bf16 autocast on CUDA, as the label job predicts; fp32 elsewhere (CPU autocast would measure something the
    jobs never run).
    """
    device = images.device
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    losses = []
    for _ in range(steps):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(to_model_input(images, spec))
        loss = loss_fn(logits.float(), targets)  # the loss in fp32: BCE's log terms lose too much in bf16
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return [float(loss) for loss in losses]  # one sync at the end, not one per step


def training_rate(arch: str, images: np.ndarray, targets: np.ndarray, spec: PreprocessSpec, steps: int,
                  device: torch.device) -> tuple[float, list[float]]:
    """(samples/s, losses) of training steps on one batch kept on `device` (the input pipeline is not timed)."""
    torch.manual_seed(0)
    model = training_model(arch, device)
    batch, target = torch.from_numpy(images).to(device), torch.from_numpy(targets).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    train_steps(model, batch, target, spec, 2, optimizer)  # warm-up: kernels, allocator, AdamW's state
    sync(device)
    started = time.perf_counter()
    losses = train_steps(model, batch, target, spec, steps, optimizer)
    sync(device)
    return steps * len(images) / (time.perf_counter() - started), losses


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """TF32 off for cuDNN convolutions (on by default) and cuBLAS: true fp32 to compare with the CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def loss_and_grad_norm(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                       spec: PreprocessSpec) -> tuple[float, float]:
    model.zero_grad(set_to_none=True)
    loss = nn.BCEWithLogitsLoss()(model(to_model_input(images, spec)), targets)
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    return loss.item(), norm.item()


def train_step_check(arch: str, images: np.ndarray, targets: np.ndarray, spec: PreprocessSpec,
                     device: torch.device) -> Check:
    """One fp32 training step from the same initial weights on the same batch: CPU against `device`."""
    torch.manual_seed(0)
    reference = training_model(arch, torch.device("cpu"))
    candidate = copy.deepcopy(reference).to(device)
    for model in (reference, candidate):
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.eval()  # dropout masks come from each device's own RNG: they can never match
    batch, target = torch.from_numpy(images), torch.from_numpy(targets)
    expected = loss_and_grad_norm(reference, batch, target, spec)
    with strict_fp32():
        got = loss_and_grad_norm(candidate, batch.to(device), target.to(device), spec)
    loss_rel = abs(got[0] - expected[0]) / max(abs(expected[0]), 1e-12)
    grad_rel = abs(got[1] - expected[1]) / max(abs(expected[1]), 1e-12)
    passed = all(np.isfinite(got)) and loss_rel < LOSS_RTOL and grad_rel < GRAD_RTOL
    detail = (f"fp32 {device} vs cpu, batch {len(images)}: loss {got[0]:.6f} vs {expected[0]:.6f} "
              f"(rel diff {loss_rel:.1e} < {LOSS_RTOL:.0e}), grad norm rel diff {grad_rel:.1e} (< {GRAD_RTOL:.0e})")
    return Check("train step", passed, detail)


def compiled_ceiling(model_uri: str, images: np.ndarray, batch_size: int, device: torch.device) -> float:
    predictor = load_predictor(model_uri, device=str(device), num_threads=usable_cpus(), compile_model=True)
    return ceiling(predictor, images, batch_size)  # its warm-up pays for compilation, outside the timing


def repeat_to(array: np.ndarray, count: int) -> np.ndarray:
    """The first `count` rows, cycling when there are fewer (tiny --posters runs still train on full batches)."""
    return array[np.arange(count) % len(array)]


def run(args: argparse.Namespace, device: torch.device) -> list[Check]:
    """Every measurement and check on `device`; prints as it goes and returns the checks."""
    workers = usable_cpus()
    for line in machine_lines(device):
        say(line)
    checks: list[Check] = []
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        posters = make_posters(Path(tmp), args.arch, args.posters, args.image_size)
        size = posters.spec.shape
        data = posters.read_all()
        images = decode_many(data, size, workers)
        say(f"{args.arch} at {size}x{size}, {len(images)} posters of 300x450 (generated in "
            f"{time.perf_counter() - started:.1f}s), batch {args.batch_size}, random weights")

        predictor = load_predictor(posters.model_uri, device=str(device), num_threads=workers)
        top = ceiling(predictor, images, args.batch_size)
        say(f"ceiling: GenrePredictor.predict on {device}, preloaded posters: {top:.1f} posters/s")

        one_core = cpu_decode_rate(data, size, 1)
        all_cores = cpu_decode_rate(data, size, workers)
        say(f"CPU decode + resize from memory: {one_core:.1f} posters/s on 1 thread, {all_cores:.1f} on {workers}; "
            f"feeding the ceiling takes ~{top / one_core:.2f} CPU cores")

        e2e = end_to_end(predictor, posters.paths, args.batch_size, workers)
        say(f"end to end: read + CPU decode on {workers} threads, overlapped with predict: {e2e:.1f} posters/s "
            f"= {e2e / top:.2f} of the ceiling")

        try:
            rate, difference = device_decode_rate(data, size, args.batch_size, device)
            say(f"JPEG decode + antialiased resize on {device} (torchvision.io, nvjpeg on CUDA): {rate:.1f} posters/s; "
                f"mean |diff| vs the CPU decoder {difference:.2f} grey levels")
        except Exception as error:  # no nvjpeg in this build, an old CUDA, a driver refusing: all "not here"
            say(f"GPU JPEG decode unavailable: {type(error).__name__}: {error}")

        checks.append(predict_check(posters.model_uri, images[:CHECK_POSTERS], device))
        say(checks[-1].line())

        train_images = repeat_to(images, args.train_batch_size)
        train_targets = repeat_to(posters.targets, args.train_batch_size)
        samples, losses = training_rate(args.arch, train_images, train_targets, posters.spec, args.train_steps, device)
        say(f"training on {device} (channels_last, AdamW, bf16 autocast on CUDA), batch {args.train_batch_size}: "
            f"{samples:.1f} samples/s; loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")

        checks.append(train_step_check(args.arch, images[:PARITY_BATCH], posters.targets[:PARITY_BATCH],
                                       posters.spec, device))
        say(checks[-1].line())

        if args.compile:
            checks.append(compile_check(posters.model_uri, images, args.batch_size, device, top))
            say(checks[-1].line())
    return checks


def compile_check(model_uri: str, images: np.ndarray, batch_size: int, device: torch.device, eager: float) -> Check:
    try:
        rate = compiled_ceiling(model_uri, images, batch_size, device)
    except Exception as error:  # Inductor and Triton errors vary by version; the message is what matters
        return Check("compile", False, f"torch.compile failed: {type(error).__name__}: {str(error)[:500]}")
    return Check("compile", True, f"ceiling with torch.compile {rate:.1f} posters/s = {rate / eager:.2f}x eager")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--arch", default="resnet50", choices=ARCHS)
    parser.add_argument("--posters", type=int, default=512, help="generated posters (300x450 JPEGs)")
    parser.add_argument("--batch-size", type=int, default=256, help="prediction batch, as the label job's")
    parser.add_argument("--image-size", type=int, default=None, help="model input side; default: the arch's")
    parser.add_argument("--train-batch-size", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=10, help="timed steps, after 2 warm-up steps")
    parser.add_argument("--compile", action="store_true", help="also measure the ceiling with torch.compile")
    args = parser.parse_args(argv)
    if args.posters < 1 or args.batch_size < 1 or args.train_batch_size < 2 or args.train_steps < 1:
        parser.error("--posters, --batch-size and --train-steps must be >= 1, --train-batch-size >= 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        say(NO_CUDA_MESSAGE)
        return EXIT_NO_CUDA
    checks = run(args, torch.device("cuda"))
    failed = [c.name for c in checks if not c.passed]
    say(f"FAILED: {', '.join(failed)}" if failed else f"all {len(checks)} checks passed")
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
