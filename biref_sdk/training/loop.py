"""Offline training of the paper's network: MSE loss, Adam, checkpoints, resume, validation
metrics, a loss-curve figure, mixed precision on CUDA and data parallelism through ``torchrun``.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every process trains a
DistributedDataParallel replica on its shard of the data (DistributedSampler); rank 0 alone
writes checkpoints, model files and figures.

Files in the output folder:

- ``checkpoint.pt``: the full training state after the last finished epoch (``--resume`` reads it);
- ``best.h5`` / ``last.h5``: model files (see :mod:`biref_sdk.network.io`) of the epoch with the
  best validation PSNR and of the last epoch;
- ``history.json``: per-epoch losses and validation metrics; ``loss_curve.png``: the figure.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..network.config import NetworkConfig, config_for_geometry
from ..network.io import check_geometry, save_model
from ..network.model import BirefNet
from ..reconstruction.prior import with_prior_options
from ..files import Dataset
from .data import ISOTROPIC_BIREFRINGENCE, HologramDataset

CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class TrainConfig:
    """The paper's recipe by default: MSE loss, Adam at 1e-4, batch size 2, 50 epochs."""

    epochs: int = 50
    learning_rate: float = 1e-4
    # "constant" (the paper) or "cosine": the rate decays to 1 % over ``epochs``, set per epoch
    schedule: str = "constant"
    batch_size: int = 2
    seed: int = 0
    # weight of the Q-tensor (director) MSE next to the n_e and n_o MSEs
    q_weight: float = 0.1
    # where the Q-tensor MSE is averaged: "volume" (every voxel) or "birefringent" (only voxels
    # with a director; in a mostly isotropic volume the former is small even for Q = 0 everywhere)
    q_loss: str = "volume"
    # weight of the birefringence n_e - n_o the network reports in isotropic particles (its
    # square in units of the output range, averaged over the volume): the index MSEs alone leave a
    # false birefringence of ~0.003 in isotropic particles, where the network's Q-tensor already
    # says "isotropic" (trained_models/MODEL_CARD.md, "Stage 8")
    isotropy_weight: float = 0.0
    width: str = "small"
    # "batch" (the paper) or "none" (NetworkConfig.normalization)
    normalization: str = "batch"
    window_length: int = 3
    input_mode: str = "field"
    # "none" or "formula" (NetworkConfig.prior); None: the ``init`` model's, else "none". With
    # ``init`` from a network without the prior, the prior's new weights start at zero, so
    # training starts from that network's answers
    prior: str | None = None
    cache_dir: str | None = None  # folder for cached inputs and priors on disk (HologramDataset)
    # "none" or "quarter-turns": each training item turned by a random number of quarter turns
    # about the optical axis (network.symmetry; an exact symmetry of the acquisition)
    augment: str = "none"
    num_workers: int = 0
    cache: bool = True
    amp: bool = True  # mixed precision, used on CUDA only
    limit: int | None = None  # use only the first ``limit`` samples of each training file (tests, quick runs)
    threads: int | None = None  # torch CPU threads per process

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def normalised_mse(prediction: torch.Tensor, truth: torch.Tensor, config: NetworkConfig) -> torch.Tensor:
    """MSE of refractive indices in units of the output range (index_max - index_min)."""
    span = config.index_max - config.index_min
    return torch.mean(((prediction.float() - truth) / span) ** 2)


# an isotropic voxel this far above the range's bottom (the medium) is inside a particle
PARTICLE_CONTRAST = 1e-4


def losses(outputs, batch, config: NetworkConfig, q_weight: float, q_loss: str = "volume",
           isotropy_weight: float = 0.0) -> dict[str, torch.Tensor]:
    ne, no, q = outputs[:3]  # a fourth, the uncertainty head's, is trained by distillation only
    q_error = (q.float() - batch["q"]) ** 2
    if q_loss == "volume":
        q_mse = torch.mean(q_error)
    elif q_loss == "birefringent":
        # training targets are Q = 0 exactly where there is no director (training_targets)
        mask = (batch["q"] != 0).any(dim=1, keepdim=True).to(q_error.dtype)
        q_mse = (q_error * mask).sum() / torch.clamp(mask.sum() * q_error.shape[1], min=1.0)
    else:
        raise ValueError(f"unknown q_loss {q_loss!r}: volume or birefringent")
    result = {"ne": normalised_mse(ne, batch["ne"], config), "no": normalised_mse(no, batch["no"], config),
              "q": q_mse}
    result["total"] = result["ne"] + result["no"] + q_weight * result["q"]
    if isotropy_weight:
        # isotropic particles: not the medium (the range's bottom), where the decoder's blur of a
        # droplet's surface is already weighed by the index MSEs
        isotropic = (((batch["ne"] - batch["no"]) <= ISOTROPIC_BIREFRINGENCE)
                     & (batch["no"] > config.index_min + PARTICLE_CONTRAST)).to(ne.dtype)
        span = config.index_max - config.index_min
        result["false_birefringence"] = torch.mean((isotropic * (ne.float() - no.float()) / span) ** 2)
        result["total"] = result["total"] + isotropy_weight * result["false_birefringence"]
    return result


def input_scale(dataset: HologramDataset, n_samples: int = 16) -> float:
    """1 / RMS of the network inputs of the first ``n_samples`` samples (the same on every rank)."""
    squares = [torch.mean(dataset.windows(i).double() ** 2) for i in range(min(n_samples, len(dataset)))]
    rms = float(torch.stack(squares).mean().sqrt())
    if not rms > 0:
        raise ValueError("the training inputs are all zero: no sample scatters light")
    return 1.0 / rms


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """The rate of ``epoch`` (1-based); a function of the epoch alone, so resuming needs no state."""
    if config.schedule == "constant":
        return config.learning_rate
    if config.schedule == "cosine":
        progress = (epoch - 1) / max(config.epochs - 1, 1)
        return config.learning_rate * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown schedule {config.schedule!r}: constant or cosine")


def load_widened(network: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``network``, whose layers may read more input channels (a prior added).

    A weight whose shape differs only in its input-channel axis (1) is copied into the first
    channels and the new ones are set to zero: the widened network computes what the old one did.
    """
    own = network.state_dict()
    if set(own) != set(state):
        raise ValueError(f"the initial weights do not fit this network: {sorted(set(own) ^ set(state))[:5]}")
    widened = {}
    for name, value in state.items():
        target = own[name]
        if target.shape == value.shape:
            widened[name] = value
        elif (target.dim() == value.dim() >= 2 and target.shape[0] == value.shape[0]
              and target.shape[2:] == value.shape[2:] and target.shape[1] > value.shape[1]):
            grown = torch.zeros_like(target)
            grown[:, :value.shape[1]] = value
            widened[name] = grown
        else:
            raise ValueError(f"initial weight {name} has shape {tuple(value.shape)}, the network's is "
                             f"{tuple(target.shape)}")
    network.load_state_dict(widened)


# -- distributed helpers -------------------------------------------------------------------------
@dataclass
class _Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> _Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Distributed()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Distributed(rank=dist.get_rank(), world_size=dist.get_world_size(),
                        local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def _all_reduce_sum(values: torch.Tensor, dist_info: _Distributed) -> torch.Tensor:
    if dist_info.enabled:
        import torch.distributed as dist

        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def _barrier(dist_info: _Distributed) -> None:
    if dist_info.enabled:
        import torch.distributed as dist

        dist.barrier()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but CUDA is not available")
    return device


# -- checkpoints ----------------------------------------------------------------------------------
def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.part")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def validate(network: BirefNet, dataset: HologramDataset, device: torch.device, dist_info: _Distributed,
             q_weight: float, progress: bool = False, q_loss: str = "volume", isotropy_weight: float = 0.0
             ) -> dict[str, float]:
    """Mean losses and the paper's PSNR/SSIM (biref_sdk.metrics) of n_e and n_o over ``dataset``.

    Each process evaluates samples ``rank, rank + world_size, ...``; sums are all-reduced, so
    every sample counts exactly once.
    """
    from tqdm.auto import tqdm

    from .. import metrics

    network.eval()
    config = network.config
    names = ("loss_ne", "loss_no", "loss_q", "loss", "psnr_ne", "psnr_no", "ssim_ne", "ssim_no")
    sums = torch.zeros(len(names) + 1, dtype=torch.float64)
    indices = range(dist_info.rank, len(dataset), dist_info.world_size)
    for index in tqdm(indices, desc="validate", leave=False, disable=not progress):
        item = dataset[index]
        batch = {k: v[None].to(device) for k, v in item.items()}
        outputs = network(batch["windows"], batch.get("prior"))
        loss = losses(outputs, batch, config, q_weight, q_loss, isotropy_weight)
        ne, no = (o[0].float().cpu().numpy() for o in outputs[:2])
        values = [loss["ne"].item(), loss["no"].item(), loss["q"].item(), loss["total"].item(),
                  metrics.psnr(ne, item["ne"].numpy()), metrics.psnr(no, item["no"].numpy()),
                  metrics.ssim(ne, item["ne"].numpy()), metrics.ssim(no, item["no"].numpy()), 1.0]
        sums += torch.tensor(values, dtype=torch.float64)
    sums = _all_reduce_sum(sums, dist_info)
    count = max(sums[-1].item(), 1.0)
    return {name: sums[i].item() / count for i, name in enumerate(names)}


# -- the figure -----------------------------------------------------------------------------------
def plot_history(history: list[dict], path) -> None:
    """Loss curves like the paper's Fig. 1: (a) n_e, (b) n_o MSE per epoch, training and validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for ax, key, title in ((axes[0], "ne", "(a) extraordinary ray $n_e$"), (axes[1], "no", "(b) ordinary ray $n_o$")):
        ax.plot(epochs, [h["train"][f"loss_{key}"] for h in history], "o-", ms=3, label="training")
        ax.plot(epochs, [h["val"][f"loss_{key}"] for h in history], "s-", ms=3, label="validation")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("MSE (in units of the 0.03 index range, squared)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- training -------------------------------------------------------------------------------------
AUGMENTATIONS = ("none", "quarter-turns")


def train(data, val, out, config: TrainConfig = TrainConfig(), resume: bool = False, device: str | None = None,
          progress: bool = True, log=print, init=None) -> list[dict]:
    """Train on data set file ``data`` (or a list of files of one geometry), validate on ``val``
    each epoch, write into folder ``out``.

    With ``resume`` the state in ``out/checkpoint.pt`` is restored and training continues at the
    next epoch (with the same configuration; ``epochs`` may be raised). With ``init`` (a model
    file) a new run starts from that model's weights and network configuration (fine-tuning, or
    continuing a shipped model's training in a later session: the optimizer starts afresh).
    Returns the history.
    """
    from tqdm.auto import tqdm

    device = _resolve_device(device)
    dist_info = _init_distributed(device)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    if config.threads:
        torch.set_num_threads(int(config.threads))
    out = Path(out)
    checkpoint_path = out / "checkpoint.pt"
    if dist_info.main:
        out.mkdir(parents=True, exist_ok=True)
    log = log if dist_info.main else (lambda *a, **k: None)
    progress = progress and dist_info.main

    checkpoint = None
    if resume:
        if not checkpoint_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_path}")
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if checkpoint.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{checkpoint_path}: checkpoint version {checkpoint.get('version')} is not "
                             f"{CHECKPOINT_VERSION}")
        saved = TrainConfig(**checkpoint["train_config"])
        # the run's recipe stays that of the checkpoint; only the epoch count may change
        config = dataclasses.replace(saved, epochs=config.epochs, num_workers=config.num_workers,
                                     threads=config.threads)
        net_config = NetworkConfig.from_dict(checkpoint["network_config"])
    initial = None
    if init is not None:
        if checkpoint is not None:
            raise ValueError("--init starts a new run; --resume continues one: give only one")
        from ..network.io import load_model

        initial = load_model(init)
    learning_rate(config, 1)  # validates the schedule before any work
    if config.q_loss not in ("volume", "birefringent"):
        raise ValueError(f"unknown q_loss {config.q_loss!r}: volume or birefringent")
    if not config.isotropy_weight >= 0:
        raise ValueError(f"isotropy_weight must be >= 0, got {config.isotropy_weight}")
    if config.augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augment {config.augment!r}: one of {AUGMENTATIONS}")
    data_files = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not data_files:
        raise ValueError("no training data file given")
    _seed_everything(config.seed + dist_info.rank)

    with Dataset(data_files[0]) as handle:
        geometry = handle.geometry
    if initial is not None:
        check_geometry(initial.geometry, geometry)
        net_config = initial.config
        if config.prior is not None and config.prior != net_config.prior:
            if net_config.prior != "none":
                raise ValueError(f"--init model has the {net_config.prior!r} prior; it cannot change to {config.prior!r}")
            net_config = net_config.replace(prior=config.prior)
        # the recorded recipe names the network actually trained, not the CLI defaults
        config = dataclasses.replace(config, normalization=net_config.normalization, prior=net_config.prior,
                                     window_length=net_config.window_length, input_mode=net_config.input_mode)
    elif checkpoint is None:
        net_config = config_for_geometry(geometry, config.width, window_length=config.window_length,
                                         input_mode=config.input_mode, normalization=config.normalization,
                                         prior=config.prior or "none")
        config = dataclasses.replace(config, prior=net_config.prior)
    if net_config.prior == "formula":  # the model file records every option of its prior
        net_config = with_prior_options(net_config)
    train_parts = [HologramDataset(path, net_config, cache=config.cache, limit=config.limit,
                                   cache_dir=config.cache_dir, augment=config.augment == "quarter-turns")
                   for path in data_files]
    for part in train_parts[1:]:
        check_geometry(geometry, part.geometry)
    if initial is None and checkpoint is None:
        net_config = net_config.replace(input_scale=input_scale(train_parts[0]))
        for part in train_parts:
            part.config = net_config
    train_set = train_parts[0] if len(train_parts) == 1 else torch.utils.data.ConcatDataset(train_parts)
    val_set = HologramDataset(val, net_config, cache=config.cache, cache_dir=config.cache_dir)
    check_geometry(geometry, val_set.geometry)

    network = BirefNet(net_config).to(device)
    optimizer = torch.optim.Adam(network.parameters(), lr=config.learning_rate)
    use_amp = config.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if (use_amp and torch.cuda.is_bf16_supported()) else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    history: list[dict] = []
    start_epoch = 1
    best = -math.inf
    if initial is not None:
        load_widened(network, initial.network.state_dict())
        log(f"initialised from {init} (sha256 {initial.sha256[:12]})")
    if checkpoint is not None:
        network.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        history = checkpoint["history"]
        start_epoch = checkpoint["epoch"] + 1
        best = checkpoint["best"]
        if dist_info.world_size == checkpoint.get("world_size", 1):
            _set_rng_state(checkpoint["rng"])
        log(f"resumed from {checkpoint_path} after epoch {checkpoint['epoch']}")
    if net_config.uncertainty_head:
        # no loss here reaches it (distillation trains it), and DDP refuses parameters without gradients
        network.uncertainty.requires_grad_(False)
    model = network
    if dist_info.enabled:
        model = nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = None
    if dist_info.enabled:
        sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=dist_info.world_size,
                                                      rank=dist_info.rank, shuffle=True, seed=config.seed)
    n_parameters = sum(p.numel() for p in network.parameters())
    log(f"network: {n_parameters:,} parameters ({n_parameters * 4 / 1e6:.1f} MB float32); "
        f"{len(train_set)} training / {len(val_set)} validation samples; device {device}; "
        f"world size {dist_info.world_size}; sequence {net_config.sequence_length} windows of "
        f"{net_config.window_length} views; latent {net_config.latent_shape}")
    train_data = str(data_files[0]) if len(data_files) == 1 else [str(path) for path in data_files]
    metadata_base = {"train_config": config.to_dict(), "train_data": train_data, "val_data": str(val),
                     "parameters": n_parameters}
    if initial is not None:
        metadata_base["initialised_from"] = {"path": str(init), "sha256": initial.sha256,
                                             "metadata": initial.metadata}
    elif checkpoint is not None and checkpoint.get("initialised_from"):
        metadata_base["initialised_from"] = checkpoint["initialised_from"]

    for epoch in range(start_epoch, config.epochs + 1):
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        loader = torch.utils.data.DataLoader(
            train_set, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler,
            generator=generator, num_workers=config.num_workers, drop_last=False,
            persistent_workers=False)
        model.train()
        sums = torch.zeros(4, dtype=torch.float64)
        count = 0
        bar = tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", leave=False, disable=not progress)
        for batch in bar:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            autocast = torch.autocast("cuda", dtype=amp_dtype) if use_amp else contextlib.nullcontext()
            with autocast:
                outputs = model(batch["windows"], batch.get("prior"))
            loss = losses(outputs, batch, net_config, config.q_weight, config.q_loss, config.isotropy_weight)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss["total"]).backward()
            scaler.step(optimizer)
            scaler.update()
            n = batch["windows"].shape[0]
            sums += n * torch.tensor([loss[k].item() for k in ("ne", "no", "q", "total")], dtype=torch.float64)
            count += n
            bar.set_postfix(loss=f"{loss['total'].item():.4g}")
        totals = _all_reduce_sum(torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64)]), dist_info)
        train_metrics = {name: totals[i].item() / max(totals[-1].item(), 1.0)
                         for i, name in enumerate(("loss_ne", "loss_no", "loss_q", "loss"))}
        val_metrics = validate(network, val_set, device, dist_info, config.q_weight, progress=progress,
                               q_loss=config.q_loss, isotropy_weight=config.isotropy_weight)
        record = {"epoch": epoch, "train": train_metrics, "val": val_metrics, "lr": learning_rate(config, epoch),
                  "seconds": time.perf_counter() - started, "world_size": dist_info.world_size}
        history.append(record)
        score = 0.5 * (val_metrics["psnr_ne"] + val_metrics["psnr_no"])
        improved = score > best
        best = max(best, score)
        if dist_info.main:
            metadata = dict(metadata_base, epoch=epoch, val=val_metrics)
            save_model(out / "last.h5", network, geometry, metadata)
            if improved:
                save_model(out / "best.h5", network, geometry, metadata)
            _atomic_torch_save({"version": CHECKPOINT_VERSION, "epoch": epoch, "model": network.state_dict(),
                                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                                "history": history, "best": best, "rng": _rng_state(),
                                "train_config": config.to_dict(), "network_config": net_config.to_dict(),
                                "world_size": dist_info.world_size,
                                "initialised_from": metadata_base.get("initialised_from")}, checkpoint_path)
            (out / "history.json").write_text(json.dumps(history, indent=1))
            plot_history(history, out / "loss_curve.png")
        log(f"epoch {epoch}: train loss {train_metrics['loss']:.4g} (ne {train_metrics['loss_ne']:.3g}, "
            f"no {train_metrics['loss_no']:.3g}, q {train_metrics['loss_q']:.3g}); val PSNR ne "
            f"{val_metrics['psnr_ne']:.2f} / no {val_metrics['psnr_no']:.2f} dB, SSIM ne {val_metrics['ssim_ne']:.4f} "
            f"/ no {val_metrics['ssim_no']:.4f}; {record['seconds']:.0f} s{' (best)' if improved else ''}")
        _barrier(dist_info)
    if dist_info.enabled:
        import torch.distributed as dist

        dist.destroy_process_group()
    return history

