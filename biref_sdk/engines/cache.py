"""Engine cache keys: an engine built for one model, GPU and TensorRT version is never used for another.

The key follows NVIDIA Holoscan's engine file names: model SHA-256, GPU name, compute capability,
SM count, TensorRT version and precision (and the stage). Any change gives another file name, so
a stale engine is rebuilt, not loaded; the key is also stored beside the engine and compared on
load.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class EngineKey:
    model_sha256: str
    gpu_name: str
    compute_capability: str  # "9.0"
    sm_count: int
    tensorrt_version: str
    precision: str
    stage: str

    def file_stem(self) -> str:
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", self.gpu_name).strip("-")
        return (f"{self.stage}.{self.model_sha256[:16]}.{gpu}.sm{self.compute_capability.replace('.', '')}"
                f".{self.sm_count}sm.trt{self.tensorrt_version}.{self.precision}")

    def paths(self, folder) -> tuple[Path, Path]:
        """(engine file, key file) in ``folder``."""
        stem = Path(folder) / self.file_stem()
        return stem.with_suffix(stem.suffix + ".engine"), stem.with_suffix(stem.suffix + ".json")

    def matches(self, key_file) -> bool:
        """Whether ``key_file`` (written beside an engine) records exactly this key."""
        try:
            return json.loads(Path(key_file).read_text()) == asdict(self)
        except (OSError, ValueError):
            return False

    def write(self, key_file) -> None:
        Path(key_file).write_text(json.dumps(asdict(self), indent=2))


def current_gpu(device_index: int = 0) -> dict:
    """Name, compute capability and SM count of a CUDA device (through torch)."""
    import torch

    properties = torch.cuda.get_device_properties(device_index)
    return {"gpu_name": properties.name, "compute_capability": f"{properties.major}.{properties.minor}",
            "sm_count": int(properties.multi_processor_count)}
