"""The poster recipe's Ray Train worker loop (`train_loop_per_worker`): the head phase, full-network epochs,
validation scores, resume.

Runs the same on a laptop (gloo DDP over CPU workers) and a GPU cluster (nccl); each epoch reports
validation metrics and a self-describing checkpoint, and running the same command again resumes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from genre_pipeline import failpoints
from genre_pipeline.data import storage
from genre_pipeline.data.images import PreprocessSpec
from genre_pipeline.data.tensors import to_model_input
from genre_pipeline.model.architectures import GenreNet, build_model
from genre_pipeline.model.checkpoints import ModelMeta, runtime_versions
from genre_pipeline.train.fitting import (
    TRAIN_DATASET,
    VAL_DATASET,
    gather_objects,
    gather_rows,
    report_checkpoint,
    tuned_metrics,
)
from genre_pipeline.train.head import Features, extract_features, merge_features, train_head

logger = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.pt"
# Beside TRAIN_DATASET (augmented training rows) and VAL_DATASET: the same training rows plain, the head phase's
# features.
TRAIN_FEATURES_DATASET = "train_features"


@dataclass(frozen=True)
class LoopConfig:
    """Everything a training worker needs; built on the driver, shipped to every worker."""

    arch: str
    genres: list[str]
    preprocess: PreprocessSpec
    epochs: int
    batch_size: int  # per worker
    lr: float = 1e-3
    weight_decay: float = 1e-4
    backbone_lr_scale: float = 0.1  # pretrained features move slower than the head
    # Phase 1: head-only epochs on cached features of the frozen backbone, so a random head does not wreck
    # pretrained features when the whole network trains in phase 2 (`epochs`).
    head_epochs: int = 0
    head_lr: float = 1e-3
    freeze_batch_norm: bool = False  # a pretrained backbone keeps its ImageNet batch statistics
    pos_weight: list[float] | None = None  # per genre, against the imbalance of rare genres
    patience: int = 0  # stop after this many epochs without a better monitored metric; 0 = never
    monitor: str = "val_map_at_3"
    threshold_objective: str = "micro"
    pretrained: bool = False
    weights: str | None = None
    weights_source: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    data_fingerprint: str = ""
    storage_options: storage.StorageOptions = field(default_factory=storage.StorageOptions)


@dataclass
class TrainState:
    """What resuming needs besides the weights."""

    epoch: int = 0  # full-network epochs completed
    head_done: bool = False  # the cached-feature head phase has run (or was not asked for)
    resumed_from: int = 0  # epochs already done when this run started: shows a re-run continued, not restarted
    best_score: float = -math.inf
    epochs_since_best: int = 0


def lr_lambdas(config: LoopConfig) -> list:
    """Cosine decay per epoch, the backbone at `backbone_lr_scale` of the head's LR."""

    def cosine(epoch: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * epoch / max(1, config.epochs)))

    def backbone(epoch: int) -> float:
        return config.backbone_lr_scale * cosine(epoch)

    return [backbone, cosine]


Scheduler = torch.optim.lr_scheduler.LRScheduler


def make_optimizer(model: nn.Module, config: LoopConfig) -> tuple[torch.optim.Optimizer, Scheduler]:
    core = getattr(model, "module", model)
    groups = [{"params": core.backbone.parameters()}, {"params": core.head.parameters()}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambdas(config))


@dataclass(frozen=True)
class EpochResult:
    loss: float  # mean training loss of this worker's rows
    rows: int  # rows this worker trained on
    seconds: float  # wall time of the epoch's training pass (data loading included)


def set_train_mode(model: nn.Module, freeze_batch_norm: bool) -> None:
    """Training mode; with `freeze_batch_norm`, the backbone's batch norms keep their running statistics (a few
    posters per worker step would replace ImageNet's with noisy estimates)."""
    model.train()
    if freeze_batch_norm:
        for module in unwrapped(model).backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def train_one_epoch(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
                    loss_fn: nn.Module, config: LoopConfig) -> EpochResult:
    set_train_mode(model, config.freeze_batch_norm)
    started = time.perf_counter()
    total, count = 0.0, 0
    for batch in batches:
        logits = model(to_model_input(batch["image"], config.preprocess))
        loss = loss_fn(logits, batch["target"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(logits)
        count += len(logits)
    return EpochResult(total / max(count, 1), count, time.perf_counter() - started)


def global_rows(rows: int) -> int:
    """Rows trained on by all workers together (each worker sees its shard)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    counts: list = [None] * dist.get_world_size()
    dist.all_gather_object(counts, rows)  # objects, not a CPU tensor: works on gloo and nccl groups alike
    return sum(counts)


@torch.inference_mode()
def validation_scores(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], spec: PreprocessSpec,
                      num_genres: int) -> tuple[np.ndarray, np.ndarray]:
    """(targets, sigmoid scores) of this worker's validation shard."""
    model.eval()
    targets, scores = [np.zeros((0, num_genres), np.float32)], [np.zeros((0, num_genres), np.float32)]
    for batch in batches:
        scores.append(torch.sigmoid(model(to_model_input(batch["image"], spec))).float().cpu().numpy())
        targets.append(batch["target"].cpu().numpy())
    return np.concatenate(targets), np.concatenate(scores)


def unwrapped(model: nn.Module) -> nn.Module:
    """The module inside DDP. Evaluating through DDP would run its per-forward buffer broadcast, a collective:
    validation shards differ in size by a batch, so a rank with one more batch would wait on it forever."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def validation_metrics(y_true: np.ndarray, scores: np.ndarray, objective: str
                       ) -> tuple[dict[str, float], np.ndarray]:
    metrics, thresholds = tuned_metrics(y_true, scores, objective)
    metrics = {f"val_{name}": float(value) for name, value in metrics.items()}
    metrics["val_rows"] = float(len(y_true))  # what the figures were measured on
    return metrics, thresholds


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Scheduler
            ) -> TrainState:
    """Load the latest reported checkpoint, if Ray Train has one for this run name (i.e. we are resuming)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainState()
    with checkpoint.as_directory() as directory:
        model.load_state_dict(torch.load(Path(directory) / "model.pt", map_location="cpu", weights_only=True))
        saved = torch.load(Path(directory) / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    state = TrainState(**saved["state"])
    state.resumed_from = state.epoch
    # The saved LRs belong to the old schedule (0 at its end when a finished run is extended with more
    # epochs): recompute them for this run's schedule at the epoch we resume from.
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base_lr * factor(state.epoch)
    if ray.train.get_context().get_world_rank() == 0:
        logger.info("resuming after epoch %d (best %.4f)", state.epoch, state.best_score)
    return state


def checkpoint_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Scheduler,
                     state: TrainState, metrics: dict[str, float], meta: ModelMeta) -> None:
    """The epoch's checkpoint report (see `fitting.report_checkpoint`), with what resuming needs beside the weights."""

    def write_train_state(directory: Path) -> None:
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "state": asdict(state)}, directory / TRAIN_STATE_FILE)

    report_checkpoint(model, meta, metrics, label=f"epoch {state.epoch}", write_more=write_train_state,
                      reported={"epoch": state.epoch, "resumed_from_epoch": state.resumed_from})
    failpoints.reached("train.epoch_reported")


DTYPES = {"image": torch.uint8, "target": torch.float32}


def epoch_meta(config: LoopConfig, state: TrainState, metrics: dict[str, float], thresholds: np.ndarray) -> ModelMeta:
    return ModelMeta(arch=config.arch, genres=list(config.genres), preprocess=config.preprocess,
                     thresholds=thresholds.tolist(), threshold_objective=config.threshold_objective,
                     epoch=state.epoch, metrics=metrics, data_fingerprint=config.data_fingerprint,
                     weights_source=dict(config.weights_source), recipe=recipe_of(config), versions=runtime_versions())


def recipe_of(config: LoopConfig) -> dict[str, float | int | bool]:
    """The hyperparameters that made a checkpoint, recorded in its meta."""
    return {"head_epochs": config.head_epochs, "head_lr": config.head_lr, "epochs": config.epochs, "lr": config.lr,
            "backbone_lr_scale": config.backbone_lr_scale, "weight_decay": config.weight_decay,
            "batch_size": config.batch_size, "freeze_batch_norm": config.freeze_batch_norm,
            "class_weighting": config.pos_weight is not None, "seed": config.seed}


def run_head_phase(model: GenreNet, optimizer: torch.optim.Optimizer, scheduler: Scheduler, state: TrainState,
                   config: LoopConfig) -> None:
    """Phase 1: features of the frozen backbone once, then `head_epochs` of the head alone; report the best head."""
    started = time.perf_counter()
    model.to(ray.train.torch.get_device())

    def features(dataset: str, mirrored: bool) -> Features:
        batches = ray.train.get_dataset_shard(dataset).iter_torch_batches(batch_size=config.batch_size,
                                                                           dtypes=DTYPES)
        return merge_features(gather_objects(extract_features(model.backbone, batches, config.preprocess,
                                                              mirrored=mirrored)))

    train, val = features(TRAIN_FEATURES_DATASET, True), features(VAL_DATASET, False)
    feature_seconds = time.perf_counter() - started
    model.head.cpu()  # one linear layer on cached features: the CPU is as fast as any accelerator here

    def monitor(y_true: np.ndarray, scores: np.ndarray) -> float:
        return validation_metrics(y_true, scores, config.threshold_objective)[0][config.monitor]

    pos_weight = torch.tensor(config.pos_weight) if config.pos_weight else None
    with torch.random.fork_rng():  # the same head on every rank: same data, same seed, same dropout masks
        torch.manual_seed(config.seed)
        result = train_head(model.head, train, val, epochs=config.head_epochs, lr=config.head_lr,
                            weight_decay=config.weight_decay, loss_fn=nn.BCEWithLogitsLoss(pos_weight=pos_weight),
                            monitor=monitor, seed=config.seed)
    model.to(ray.train.torch.get_device())
    metrics, thresholds = validation_metrics(result.targets, result.scores, config.threshold_objective)
    state.head_done = True
    update_early_stopping(state, metrics[config.monitor])
    timing = {"head_best_epoch": float(result.best_epoch), "head_feature_seconds": feature_seconds,
              "head_seconds": time.perf_counter() - started, "train_rows": float(len(train.values))}
    checkpoint_epoch(model, optimizer, scheduler, state, {**timing, **metrics},
                     epoch_meta(config, state, metrics, thresholds))


def run_fine_tuning(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Scheduler, state: TrainState,
                    config: LoopConfig) -> None:
    """Phase 2 (or the only phase, from scratch): the whole network, epoch by epoch, with early stopping."""
    device = ray.train.torch.get_device()
    pos_weight = torch.tensor(config.pos_weight, device=device) if config.pos_weight else None
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    train_shard, val_shard = ray.train.get_dataset_shard(TRAIN_DATASET), ray.train.get_dataset_shard(VAL_DATASET)
    while state.epoch < config.epochs and not stopped_early(state, config):
        batches = train_shard.iter_torch_batches(batch_size=config.batch_size, dtypes=DTYPES, drop_last=False)
        epoch = train_one_epoch(model, batches, optimizer, loss_fn, config)
        scheduler.step()
        throughput = {"train_loss": epoch.loss, "train_seconds": epoch.seconds,
                      "train_samples_per_second": global_rows(epoch.rows) / epoch.seconds if epoch.seconds else 0.0}
        val_batches = val_shard.iter_torch_batches(batch_size=config.batch_size, dtypes=DTYPES)
        shard = validation_scores(unwrapped(model), val_batches, config.preprocess, len(config.genres))
        y_true, scores = (gather_rows(part) for part in shard)
        metrics, thresholds = validation_metrics(y_true, scores, config.threshold_objective)
        state.epoch += 1
        update_early_stopping(state, metrics[config.monitor])
        checkpoint_epoch(model, optimizer, scheduler, state, {**throughput, **metrics},
                         epoch_meta(config, state, metrics, thresholds))


def train_loop_per_worker(loop_config: dict) -> None:
    config: LoopConfig = loop_config["config"]
    cpus = loop_config.get("cpus_per_worker") or 1
    torch.set_num_threads(max(1, int(cpus)))
    torch.manual_seed(config.seed)  # the same initial head on every rank: the head phase trains it on each
    # Resuming replaces every weight: no need to load pretrained ones again.
    fresh = ray.train.get_checkpoint() is None
    model = build_model(arch=config.arch, num_genres=len(config.genres), pretrained=config.pretrained and fresh,
                        weights=config.weights if fresh else None, storage_options=config.storage_options)
    # Parameters in the layout of the channels_last input, so their gradients match DDP's buckets.
    model = model.to(memory_format=torch.channels_last)
    torch.manual_seed(config.seed + ray.train.get_context().get_world_rank())  # each rank its own augmentations
    optimizer, scheduler = make_optimizer(model, config)
    state = restore(model, optimizer, scheduler)
    if config.head_epochs > 0 and not state.head_done:
        run_head_phase(model, optimizer, scheduler, state, config)
    run_fine_tuning(ray.train.torch.prepare_model(model), optimizer, scheduler, state, config)


def update_early_stopping(state: TrainState, score: float) -> None:
    if score > state.best_score:
        state.best_score, state.epochs_since_best = score, 0
    else:
        state.epochs_since_best += 1


def stopped_early(state: TrainState, config: LoopConfig) -> bool:
    return config.patience > 0 and state.epochs_since_best >= config.patience
