"""Reconstruct the samples of a data set with one or more methods and score them against the truth
with the paper's metrics (the paper's Table 1, plus RMSE, director error and speed).

Per method, every metric is the mean over samples of the per-sample value (the director error of a
sample is already a median over its droplet voxels; samples without birefringent voxels are left
out of that mean). ``seconds_per_sample`` is the mean wall time of ``Reconstructor.reconstruct``
on an acquisition already in memory, the first sample's one-off set-up (tables, background)
included; file reading and scoring are not timed.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import numpy as np

from .metrics import METRIC_KEYS, compare_volumes

RESULT_KEYS = (*METRIC_KEYS, "seconds_per_sample", "n_samples")


@dataclass
class MethodScores:
    """Scores of one method: per-sample metric dicts and reconstruction times."""

    method: str
    samples: list[dict] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        out: dict = {}
        for key in METRIC_KEYS:
            values = [s[key] for s in self.samples if not (isinstance(s[key], float) and math.isnan(s[key]))]
            finite = [v for v in values if math.isfinite(v)]
            if not values:
                out[key] = math.nan
            elif len(finite) < len(values):  # an identical reconstruction: PSNR is +inf
                out[key] = math.inf
            else:
                out[key] = float(np.mean(finite))
        out["seconds_per_sample"] = float(np.mean(self.seconds)) if self.seconds else math.nan
        out["n_samples"] = len(self.samples)
        return out


def evaluate(dataset_path, reconstructors: dict, limit: int | None = None, progress: bool = False,
             scores: dict[str, MethodScores] | None = None, on_volume=None, first: int = 0) -> dict[str, dict]:
    """Scores of each named :class:`Reconstructor` on ``limit`` samples (all by default) from sample
    ``first`` on of a data set file: ``{method: {psnr_ne, ..., seconds_per_sample, n_samples}}``. ``scores``
    (optional, filled in) keeps the per-sample values and times; ``on_volume(index, method,
    acquisition, volume)`` sees each reconstruction (e.g. to draw a few)."""
    from .files import Dataset

    if not reconstructors:
        raise ValueError("no reconstruction method to evaluate")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if first < 0:
        raise ValueError(f"first must be >= 0, got {first}")
    scores = scores if scores is not None else {}
    scores.update({name: MethodScores(name) for name in reconstructors})
    with Dataset(dataset_path) as dataset:
        end = len(dataset) if limit is None else min(first + limit, len(dataset))
        iterator = range(first, end)
        if progress:
            from tqdm.auto import tqdm
            iterator = tqdm(iterator, desc="evaluating", unit="sample")
        for index in iterator:
            acquisition = dataset.acquisition(index)
            for name, reconstructor in reconstructors.items():
                start = time.perf_counter()
                volume = reconstructor.reconstruct(acquisition)
                scores[name].seconds.append(time.perf_counter() - start)
                scores[name].samples.append(compare_volumes(acquisition.truth, volume))
                if on_volume is not None:
                    on_volume(index, name, acquisition, volume)
    return {name: s.summary() for name, s in scores.items()}


def format_table(results: dict[str, dict]) -> str:
    """The paper's Table 1 (PSNR and SSIM for n_e and n_o) with RMSE, director error and speed,
    one row per method."""
    columns = [("method", "{}"), ("PSNR ne (dB)", "{:.2f}"), ("PSNR no (dB)", "{:.2f}"), ("SSIM ne", "{:.4f}"),
               ("SSIM no", "{:.4f}"), ("RMSE ne", "{:.5f}"), ("RMSE no", "{:.5f}"), ("director (deg)", "{:.2f}"),
               ("iso |ne-no|", "{:.5f}"), ("s/sample", "{:.3f}"), ("samples", "{}")]
    keys = [None, "psnr_ne", "psnr_no", "ssim_ne", "ssim_no", "rmse_ne", "rmse_no", "director_error_deg",
            "isotropic_core_birefringence", "seconds_per_sample", "n_samples"]
    rows = [[title for title, _ in columns]]
    for name, result in results.items():
        rows.append([name] + [fmt.format(result[key]) for (_, fmt), key in zip(columns[1:], keys[1:])])
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def to_json(results: dict[str, dict]) -> str:
    """JSON text of ``evaluate``'s result (inf/nan written as null: strict JSON)."""
    def clean(value):
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return json.dumps({name: {k: clean(v) for k, v in r.items()} for name, r in results.items()}, indent=2)
