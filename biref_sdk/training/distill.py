"""Distillation of the quarter-turn average into one decoder pass (the volume at the last view).

A model reconstructs with four decoder passes by default: the acquisition as recorded and turned
by one, two and three quarter turns (:mod:`biref_sdk.network.symmetry`), the answers turned back
and averaged. After the last view that is four times the decoder's work. Here a student, the same
network initialised from the teacher, learns to give that average in one pass:

- the encoder and the ConvGRU are frozen (they run while the views arrive, and their hidden states
  are cached once per sample and turn by :func:`prepare`);
- attention, decoder and head are trained on one turn's hidden states (a random turn per item:
  the student must answer alike from any of them) against the truth and the teacher's average,
  both turned into that turn's frame;
- the student's file records ``quarter_turns = False``: it reconstructs in one pass by default;
- the student may read a prior made with other formula options than the teacher's
  (``prior_options``, e.g. the streaming warm start ``late_views``): it learns the teacher's
  answer from that prior, cached per sample beside the hidden states (``HologramDataset.prior``).

Files in the output folder: ``best.h5`` / ``last.h5`` (model files), ``history.json``.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch

from ..files import Dataset
from ..network.io import LoadedModel, load_model, save_model
from ..network.symmetry import quarter_turn_sources, turn_output, turn_prior, turn_views
from ..reconstruction.model import director_from_q, turn_spread
from ..reconstruction.prior import formula_prior, formula_reconstructor, with_prior_options
from .data import HologramDataset, training_targets
from .loop import learning_rate, losses, TrainConfig

logger = logging.getLogger(__name__)

TURNS = 4


def _normalised(ne: torch.Tensor, no: torch.Tensor, q: torch.Tensor, config) -> torch.Tensor:
    """(n_e, n_o, Q) -> ``[7, Z, Y, X]`` with the indices in units of the output range (float16 keeps
    ~1e-5 index units there; the indices themselves would lose 1e-3 near 1.5)."""
    span = config.index_max - config.index_min
    return torch.cat([((ne - config.index_min) / span)[None], ((no - config.index_min) / span)[None], q])


@torch.no_grad()
def prepare_sample(teacher: LoadedModel, dataset: Dataset, index: int, formula, sources: np.ndarray) -> dict:
    """One sample's cache entry: the hidden states of every turn ``[4, S, C_h, 1, h, w]``, the prior
    ``[7, Z, Y, X]``, the teacher's quarter-turn average ``[7, Z, Y, X]`` (normalised, the
    sample's own frame) and the turns' spread ``[3, Z, Y, X]`` (``turn_spread``, index spreads in
    units of the output range), float16."""
    from ..network.preprocess import InputPreprocessor

    network, config = teacher.network, teacher.config
    acquisition = dataset.acquisition(index)
    preprocessor = InputPreprocessor(config, dataset.geometry, acquisition.background)
    views = preprocessor.per_view(acquisition.holograms)
    prior = formula_prior(formula.reconstruct(acquisition), config)
    states, answers = [], []
    turned_views, turned_prior = views, prior
    for turn in range(TURNS):
        if turn:
            turned_views, turned_prior = turn_views(turned_views, sources), turn_prior(turned_prior)
        hidden = network.hidden_states(preprocessor.window_mean(turned_views)[None])[0]
        ne, no, q = network.finalize(hidden[None], turned_prior[None])
        answers.append(turn_output(ne[0], no[0], q[0], -turn))
        states.append(hidden)
    stacked = [torch.stack(a) for a in zip(*answers)]
    ne, no, q = (a.mean(dim=0) for a in stacked)
    spread = turn_spread(*stacked, director_from_q(q))  # the teacher's uncertainty, for a student's own
    span = config.index_max - config.index_min
    return {"states": torch.stack(states).half(), "prior": prior.half(),
            "teacher": _normalised(ne, no, q, config).half(),
            "spread": torch.cat([spread[:2] / span, spread[2:]]).half()}


def prepare(teacher_path, data_paths, cache_dir) -> list[Path]:
    """Cache :func:`prepare_sample` of every sample of ``data_paths`` under ``cache_dir`` (one
    ``.pt`` file per sample; existing ones are kept, so an interrupted run resumes)."""
    teacher = load_model(teacher_path)
    formula = formula_reconstructor(teacher.config)
    folders = []
    for path in data_paths:
        folder = Path(cache_dir) / f"{Path(path).stem}-{teacher.sha256[:12]}"
        folder.mkdir(parents=True, exist_ok=True)
        with Dataset(path) as dataset:
            sources = quarter_turn_sources(dataset.geometry)
            start = time.perf_counter()
            for index in range(len(dataset)):
                target = folder / f"{index:06d}.pt"
                if target.is_file():
                    continue
                entry = prepare_sample(teacher, dataset, index, formula, sources)
                temporary = target.with_suffix(".tmp")
                torch.save(entry, temporary)
                temporary.replace(target)
                if index % 20 == 0:
                    logger.info("%s: %d/%d (%.2f s per sample)", path, index + 1, len(dataset),
                                (time.perf_counter() - start) / (index + 1))
        folders.append(folder)
    return folders


class _Items:
    """The cached entries (in memory, float16) and the truths of the data files; with a
    ``student_config`` whose prior differs from the teacher's, that prior replaces the cached one
    (made once per sample and kept on disk under ``cache_dir``)."""

    def __init__(self, data_paths, folders, config, student_config=None, cache_dir=None) -> None:
        self.entries, self.truths = [], []
        own_prior = student_config is not None and student_config.prior_options != config.prior_options
        for path, folder in zip(data_paths, folders):
            priors = HologramDataset(path, student_config, cache_dir=cache_dir) if own_prior else None
            with Dataset(path) as dataset:
                for index in range(len(dataset)):
                    entry = torch.load(folder / f"{index:06d}.pt", weights_only=True)
                    if priors is not None:
                        entry["prior"] = priors.prior(index).half()
                        if index % 50 == 0:
                            logger.info("%s: the student's prior, %d/%d", path, index + 1, len(dataset))
                    self.entries.append(entry)
                    truth = dataset.truth(index)
                    targets = training_targets(truth.ne, truth.no, truth.director)
                    self.truths.append({k: v.half() if k == "q" else v for k, v in targets.items()})
            if priors is not None:
                priors.file.close()
        self.config = config

    def __len__(self) -> int:
        return len(self.entries)

    def inputs(self, index: int, turn: int) -> dict:
        """Turn ``turn``'s hidden states and prior (in that turn's frame)."""
        entry = self.entries[index]
        prior = entry["prior"].float()
        for _ in range(turn):
            prior = turn_prior(prior)
        return {"states": entry["states"][turn].float(), "prior": prior}

    def item(self, index: int, turn: int) -> dict:
        """:meth:`inputs`, and the truth and the teacher's answer in that turn's frame."""
        c = self.config
        span = c.index_max - c.index_min
        truth = self.truths[index]
        teacher = self.entries[index]["teacher"].float()
        ne, no, q = turn_output(c.index_min + span * teacher[0], c.index_min + span * teacher[1], teacher[2:], turn)
        tne, tno, tq = turn_output(truth["ne"], truth["no"], truth["q"].float(), turn)
        return {**self.inputs(index, turn), "truth": {"ne": tne, "no": tno, "q": tq},
                "teacher": {"ne": ne, "no": no, "q": q}}


    def spread(self, index: int, turn: int) -> torch.Tensor:
        """The teacher's quarter-turn spread ``[3, Z, Y, X]`` in turn ``turn``'s frame (index
        spreads in units of the output range, angles in radians: scalars, turned as images)."""
        from ..network.symmetry import turn_image

        return turn_image(self.entries[index]["spread"].float(), turn)


def _batch(items: list[dict]) -> dict:
    """Stack items of :meth:`_Items.item` (or of :meth:`_Items.inputs`) into a batch."""
    batch = {"states": torch.stack([i["states"] for i in items]), "prior": torch.stack([i["prior"] for i in items])}
    for kind in ("truth", "teacher"):
        if kind in items[0]:
            batch[kind] = {k: torch.stack([i[kind][k] for i in items]) for k in ("ne", "no", "q")}
    return batch


def distill(teacher_path, data_paths, val_paths, out, cache_dir, epochs: int = 10, lr: float = 1e-4,
            batch_size: int = 4, teacher_weight: float = 1.0, seed: int = 0, init=None,
            uncertainty_epochs: int = 3, q_weight: float | None = None, prior_options: dict | None = None,
            isotropy_weight: float = 0.0, gate_epochs: int = 0, log=logger.info) -> list[dict]:
    """Train the one-pass student of ``teacher_path`` (see the module) and write it to ``out``.

    Each epoch: every sample once, at a random turn; then the student's reconstructions of the
    ``val_paths`` data sets in one pass (the streaming path, :class:`ModelReconstructor`), scored
    with the paper's metrics. ``best.h5`` is the epoch with the best mean PSNR of n_e and n_o,
    its uncertainty head then fitted (:func:`fit_uncertainty`, ``uncertainty_epochs``). ``init``:
    a student file of this teacher to continue from (``epochs=0``: fit only its head). ``q_weight``:
    the Q-tensor loss's weight (default: the teacher's training recipe's); the director of the
    teacher's mean is where one pass loses most. ``prior_options``: formula options of the
    student's prior that differ from the teacher's (default: the ``init`` student's, else the
    teacher's). ``isotropy_weight``: weight of the false birefringence (``training.loop.losses``),
    to the truth only: the teacher's term weighs n_e and n_o alone. ``gate_epochs``: then fit the
    student's isotropy gate alone (``NetworkConfig.isotropy_gate``, added if the student has
    none; :func:`fit_isotropy_gate`) for that many epochs."""
    random.seed(seed)
    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_model(teacher_path)
    folders = prepare(teacher_path, data_paths, cache_dir)
    initial = load_model(init) if init is not None else None
    student = _student(teacher, initial, prior_options, isotropy_gate=gate_epochs > 0)
    config = student.config
    items = _Items(data_paths, folders, teacher.config, config, cache_dir)
    train_config = TrainConfig(**{k: v for k, v in teacher.metadata.get("train_config", {}).items()
                                  if k in TrainConfig.__dataclass_fields__})
    schedule = TrainConfig(epochs=epochs, learning_rate=lr, schedule="cosine")
    q_weight = train_config.q_weight if q_weight is None else q_weight
    parameters = [p for name, p in student.named_parameters()  # the heads are fitted afterwards, alone
                  if p.requires_grad and not name.startswith(("uncertainty.", "isotropy."))]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    history = []
    best, best_state = -math.inf, None
    metadata = {"distilled_from": teacher.sha256, "teacher_file": str(teacher_path),
                "distill": {"data": [str(p) for p in data_paths], "epochs": epochs, "lr": lr, "init": str(init),
                            "batch_size": batch_size, "teacher_weight": teacher_weight, "seed": seed,
                            "q_weight": q_weight, "prior_options": prior_options,
                            "isotropy_weight": isotropy_weight, "gate_epochs": gate_epochs},
                "train_config": teacher.metadata.get("train_config")}
    if initial is not None:
        metadata.update({k: v for k, v in initial.metadata.items() if k in ("epoch", "val")})
    for epoch in range(1, epochs + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(schedule, epoch)
        student.train()
        order = list(range(len(items)))
        random.shuffle(order)
        sums = {"truth": 0.0, "teacher": 0.0}
        start = time.perf_counter()
        for first in range(0, len(order), batch_size):
            batch = _batch([items.item(i, random.randrange(TURNS)) for i in order[first:first + batch_size]])
            outputs = student.finalize(batch["states"], batch["prior"])
            to_truth = losses(outputs, batch["truth"], config, q_weight, train_config.q_loss,
                              isotropy_weight)["total"]
            to_teacher = losses(outputs, batch["teacher"], config, q_weight, "volume")["total"]
            loss = to_truth + teacher_weight * to_teacher
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = len(batch["states"])
            sums["truth"] += to_truth.item() * n
            sums["teacher"] += to_teacher.item() * n
        seconds = time.perf_counter() - start
        val = _validate(student, teacher.geometry, val_paths, f"student-epoch-{epoch}")
        score = float(np.mean([(v["psnr_ne"] + v["psnr_no"]) / 2 for v in val.values()]))
        record = {"epoch": epoch, "lr": learning_rate(schedule, epoch), "seconds": seconds,
                  "loss_truth": sums["truth"] / len(items), "loss_teacher": sums["teacher"] / len(items),
                  "val": val, "val_score": score}
        history.append(record)
        save_model(out / "last.h5", student, teacher.geometry, dict(metadata, epoch=epoch, val=val))
        if score > best:
            best, best_state = score, deepcopy(student.state_dict())
            metadata.update(epoch=epoch, val=val)
            save_model(out / "best.h5", student, teacher.geometry, metadata)
        (out / "history.json").write_text(json.dumps(history, indent=2))
        log(f"epoch {epoch}: loss to truth {record['loss_truth']:.4g}, to teacher {record['loss_teacher']:.4g} "
            f"({seconds:.0f} s); val " + ", ".join(_scores(name, v) for name, v in val.items()))
    if best_state is not None:
        student.load_state_dict(best_state)
    if gate_epochs:
        losses_per_epoch = fit_isotropy_gate(student, items, gate_epochs, batch_size=batch_size,
                                             isotropy_weight=isotropy_weight, log=log)
        val = _validate(student, teacher.geometry, val_paths, "student-gated")
        metadata.update(val=val, isotropy_gate_fit={"epochs": gate_epochs, "loss": losses_per_epoch})
        log("with the isotropy gate: val " + ", ".join(_scores(name, v) for name, v in val.items()))
    if uncertainty_epochs:
        errors = fit_uncertainty(student, items, uncertainty_epochs, batch_size=batch_size, log=log)
        metadata["uncertainty_fit"] = {"epochs": uncertainty_epochs, "mean_squared_log_error": errors}
    student.eval()
    save_model(out / "best.h5", student, teacher.geometry, metadata)
    return history


def _validate(student, geometry, val_paths, label: str) -> dict:
    """The student's one-pass reconstructions of each validation file, scored with the paper's
    metrics (the streaming path, :class:`ModelReconstructor`): ``{file stem: scores}``."""
    from ..evaluation import evaluate
    from ..reconstruction.model import ModelReconstructor

    student.eval()
    model = LoadedModel(network=student, config=student.config, geometry=geometry, metadata={}, sha256=label,
                        path=None)
    reconstructor = ModelReconstructor(model, engine="torch", quarter_turns=False)
    return {Path(p).stem: evaluate(p, {"student": reconstructor})["student"] for p in val_paths}


def _scores(name: str, val: dict) -> str:
    """One validation set's line: PSNR n_e/n_o, director, the isotropic cores' birefringence if any."""
    line = f"{name} {val['psnr_ne']:.2f}/{val['psnr_no']:.2f} dB, {val['director_error_deg']:.2f} deg"
    core = val.get("isotropic_core_birefringence")
    return line if core is None or not math.isfinite(core) else f"{line}, isotropic cores {core:.4f}"


def _student(teacher: LoadedModel, init: LoadedModel | None = None, prior_options: dict | None = None,
             isotropy_gate: bool = False):
    """The student network: the teacher's, one pass by default, with an uncertainty head (its
    weights from ``init``, a loaded student of this teacher, where given; else the teacher's and a
    new head), its prior's formula options ``prior_options`` over the init's (else the teacher's),
    with an isotropy gate if ``isotropy_gate`` or the init has one (a new one starts as
    ``BirefNet`` makes it)."""
    from ..network.model import BirefNet

    if init is not None and init.metadata.get("distilled_from") != teacher.sha256:
        raise ValueError(f"{init.path} was not distilled from this teacher")
    config = teacher.config.replace(quarter_turns=False, uncertainty_head=True,
                                    isotropy_gate=isotropy_gate or (init is not None and init.config.isotropy_gate))
    if init is not None:
        config = config.replace(prior_options=init.config.prior_options)
    if prior_options:
        config = with_prior_options(config.replace(prior_options={**(config.prior_options or {}), **prior_options}))
    student = BirefNet(config)
    source = (init or teacher).network
    missing, unexpected = student.load_state_dict(source.state_dict(), strict=False)
    if unexpected or any(not name.startswith(("uncertainty.", "isotropy.")) for name in missing):
        raise ValueError(f"{(init or teacher).path} does not fit the student: {sorted(missing + unexpected)[:5]}")
    for module in (student.encoder, student.gru):
        module.requires_grad_(False)
    return student


def _fit_alone(student, name: str, items: "_Items", epochs: int, lr: float, batch_size: int, batch_loss,
               describe: str, log) -> list[float]:
    """Train ``student.<name>`` alone (everything else frozen): each epoch every sample once, at a
    random turn; ``batch_loss(chosen)`` is the loss of a batch of ``(sample, turn)`` pairs.
    Returns the mean loss per epoch, each logged as ``describe`` formatted with epoch and loss."""
    frozen = [p for key, p in student.named_parameters() if p.requires_grad and not key.startswith(name + ".")]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(getattr(student, name).parameters(), lr=lr)
    means = []
    try:
        for epoch in range(1, epochs + 1):
            order = list(range(len(items)))
            random.shuffle(order)
            total = 0.0
            for first in range(0, len(order), batch_size):
                chosen = [(i, random.randrange(TURNS)) for i in order[first:first + batch_size]]
                loss = batch_loss(chosen)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(chosen)
            means.append(total / len(items))
            log(describe.format(epoch=epoch, loss=means[-1]))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return means


def _readout(student, batch: dict):
    """The student's answer to a batch, the decoder frozen (no graph kept for it)."""
    with torch.no_grad():
        features = student.decode(batch["states"])
    return student.readout(features, batch["prior"])


def fit_isotropy_gate(student, items: "_Items", epochs: int = 3, lr: float = 1e-2, batch_size: int = 4,
                      isotropy_weight: float = 0.0, log=logger.info) -> list[float]:
    """Train the student's isotropy gate alone (everything else frozen) to the truth: the index
    MSEs (the gate moves n_e alone) plus ``isotropy_weight`` times the false birefringence
    (``training.loop.losses``); returns the mean loss per epoch."""
    def batch_loss(chosen):
        batch = _batch([items.item(i, turn) for i, turn in chosen])
        return losses(_readout(student, batch), batch["truth"], student.config, 0.0,
                      isotropy_weight=isotropy_weight)["total"]

    return _fit_alone(student, "isotropy", items, epochs, lr, batch_size, batch_loss,
                      "isotropy gate, epoch {epoch}: loss to truth {loss:.4g}", log)


# the uncertainty head regresses the log of the teacher's spread; spreads below this floor (index
# spreads in units of the output range, angles in radians) are noise of the float16 cache
SPREAD_FLOOR = 1e-5


def fit_uncertainty(student, items: "_Items", epochs: int = 3, lr: float = 1e-3, batch_size: int = 4,
                    log=logger.info) -> list[float]:
    """Train the student's uncertainty head alone (everything else frozen) to give the log of the
    teacher's quarter-turn spread; returns the mean squared log error per epoch."""
    c = student.config
    scale = torch.tensor([c.index_max - c.index_min, c.index_max - c.index_min, 1.0])[None, :, None, None, None]

    def batch_loss(chosen):
        batch = _batch([items.inputs(i, turn) for i, turn in chosen])
        target = torch.stack([items.spread(i, turn) for i, turn in chosen]).clamp_min(SPREAD_FLOOR).log()
        predicted = _readout(student, batch)[3]
        return torch.mean(((predicted / scale).log() - target) ** 2)

    return _fit_alone(student, "uncertainty", items, epochs, lr, batch_size, batch_loss,
                      "uncertainty head, epoch {epoch}: mean squared log error {loss:.3f}", log)
