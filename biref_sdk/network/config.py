"""Configuration of the paper's network (Encoder -> 3D ConvGRU -> attention -> decoder).

A configuration is a frozen dataclass: everything that fixes the shapes of the network and the
meaning of its inputs and outputs. It is stored inside every model file, so a model file alone
says how to feed it. Sizes derive from an acquisition :class:`~biref_sdk.geometry.Geometry`
through :func:`config_for_geometry`; ``width`` picks the channel counts (``"small"`` for CPUs,
``"paper"`` for the paper's 192-channel features and 512-channel hidden state).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..geometry import Geometry

INPUT_MODES = ("field", "hologram")
ATTENTION_MODES = ("position", "sequence")
NORMALIZATIONS = ("batch", "none")
PRIORS = ("none", "formula")
# channels of the formula prior: (n_e - index_min) / span, (n_o - index_min) / span, and the five
# Q-tensor components of the formula's director times (n_e - n_o) / span (zero where isotropic)
PRIOR_CHANNELS = {"none": 0, "formula": 7}


def window_layout(n_views: int, window_length: int) -> tuple[int, ...]:
    """Number of windows used from ``n_views`` views grouped ``window_length`` at a time.

    The paper: views are grouped into windows of ``window_length`` consecutive views (a window
    mean condenses each); the sequence length is the number of whole windows, and an odd
    sequence length drops one window. Views beyond the last used window are not used.
    """
    if window_length < 1:
        raise ValueError(f"window_length must be >= 1, got {window_length}")
    sequence_length = n_views // window_length
    if sequence_length % 2 == 1:
        sequence_length -= 1
    if sequence_length < 1:
        raise ValueError(f"{n_views} views in windows of {window_length} leave no sequence (need at least 2 windows)")
    return sequence_length


@dataclass(frozen=True)
class NetworkConfig:
    """Shapes and meaning of the network's inputs and outputs.

    Inputs: each view of each polarization is preprocessed (``input_mode``) into
    ``channels_per_polarization`` images of ``input_shape`` pixels; the views of window ``s``
    (views ``s*window_length ... (s+1)*window_length - 1``) are averaged, and the two
    polarizations are stacked as channels, giving one encoder input
    ``[2*channels_per_polarization, 1, *input_shape]`` per window (the 3D "layer" axis has size 1,
    as the paper's 1xHxW feature maps). Outputs: ``ne``, ``no`` in ``[index_min, index_max]`` and
    five components of the traceless Q-tensor on ``volume_shape``.
    """

    # acquisition
    n_views: int
    hologram_shape: tuple[int, int]
    volume_shape: tuple[int, int, int]
    # input grouping and preprocessing
    window_length: int = 3
    input_mode: str = "field"
    # "field": demodulated field resampled (Fourier crop) by this factor; "hologram": 1
    field_downsample: int = 2
    # the inputs are multiplied by this before the encoder; training sets it to 1 / (RMS of the
    # training inputs), so that a network without batch normalisation sees inputs of order 1
    input_scale: float = 1.0
    # encoder: five down-residual blocks (out channels, (h, w) stride each)
    encoder_channels: tuple[int, ...] = (16, 24, 32, 48, 64)
    encoder_strides: tuple[int, ...] = (2, 2, 2, 1, 1)
    # 3D ConvGRU hidden channels; attention over the sequence
    hidden_channels: int = 64
    attention: str = "position"
    # decoder: three up-residual blocks (out channels, (z, y, x) upsampling factors each)
    decoder_channels: tuple[int, ...] = (48, 24, 12)
    decoder_strides: tuple[tuple[int, int, int], ...] = ((2, 2, 2), (4, 2, 2), (4, 2, 2))
    # "batch": BatchNorm3d in every block (the paper); "none": no normalisation layer. Batch
    # statistics of a batch of 2 make each sample's features relative to the other's, which hides
    # the absolute field amplitude that fixes the index values (MODEL_CARD.md)
    normalization: str = "batch"
    # the output range of n_e and n_o (the paper: 1.54 - 1.57)
    index_min: float = 1.54
    index_max: float = 1.57
    # "none": the paper's network. "formula": the formula reconstruction of the same views
    # (biref_sdk.reconstruction.prior, with ``prior_options``) is a second input of the decoder's
    # last block and of the output layer. It carries what the network alone learns worst: the
    # index values inside a sample, which need the full tensor tomography (MODEL_CARD.md)
    prior: str = "none"
    # FormulaOptions fields of the prior; training records all of them (reconstruction.prior.
    # with_prior_options), so a model file fixes its prior exactly
    prior_options: dict | None = None
    # how the model reconstructs by default: True, the mean of its answers over four quarter turns
    # of the acquisition (biref_sdk.network.symmetry); False, one pass (a model distilled from that
    # mean, biref_sdk.training.distill, gives it in one decoder pass: a quarter of the work after
    # the last view)
    quarter_turns: bool = True
    # a second 1x1 output layer beside the head that gives the per-voxel uncertainty in one pass
    # (BirefNet.readout's fourth output): a distilled model learns it from the quarter turns' spread
    uncertainty_head: bool = False
    # a 1x1 gate on the output layer's input and the Q-tensor's norm (the order parameter: its
    # value, its mean over 5^3 voxels and the largest such mean within 9^3) that scales n_e - n_o
    # (BirefNet.readout): where the network's own Q says "isotropic" it removes the birefringence
    # the index outputs alone leave there
    # (trained_models/MODEL_CARD.md, "Stage 8")
    isotropy_gate: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "hologram_shape", tuple(int(v) for v in self.hologram_shape))
        object.__setattr__(self, "volume_shape", tuple(int(v) for v in self.volume_shape))
        object.__setattr__(self, "encoder_channels", tuple(int(v) for v in self.encoder_channels))
        object.__setattr__(self, "encoder_strides", tuple(int(v) for v in self.encoder_strides))
        object.__setattr__(self, "decoder_channels", tuple(int(v) for v in self.decoder_channels))
        object.__setattr__(self, "decoder_strides",
                           tuple(tuple(int(s) for s in stride) for stride in self.decoder_strides))
        if self.prior_options is not None:
            # kept as given; reconstruction.prior completes and checks them against FormulaOptions
            # (the network does not know the formula: it only reads the prior's channels)
            if not isinstance(self.prior_options, dict):
                raise ValueError(f"prior_options must be a dict, got {type(self.prior_options).__name__}")
            object.__setattr__(self, "prior_options", dict(self.prior_options))
        self.validate()

    def validate(self) -> None:
        if self.input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode must be one of {INPUT_MODES}, got {self.input_mode!r}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {self.prior!r}")
        flags = (self.quarter_turns, self.uncertainty_head, self.isotropy_gate)
        if not all(isinstance(flag, bool) for flag in flags):
            raise ValueError(f"quarter_turns, uncertainty_head and isotropy_gate must be true or false, got "
                             f"{', '.join(map(repr, flags))}")
        if self.prior == "none" and self.prior_options:
            raise ValueError("prior_options are given but prior is 'none'")
        if len(self.encoder_channels) != 5 or len(self.encoder_strides) != 5:
            raise ValueError("the encoder has five down-residual blocks: give 5 channels and 5 strides")
        if len(self.decoder_channels) != 3 or len(self.decoder_strides) != 3:
            raise ValueError("the decoder has three up-residual blocks: give 3 channels and 3 strides")
        if any(len(s) != 3 for s in self.decoder_strides):
            raise ValueError("each decoder stride is (z, y, x)")
        if min(self.encoder_channels + self.decoder_channels + (self.hidden_channels,)) < 1:
            raise ValueError("channel counts must be positive")
        if min(self.encoder_strides) < 1 or min(min(s) for s in self.decoder_strides) < 1:
            raise ValueError("strides must be >= 1")
        if not (math.isfinite(self.input_scale) and self.input_scale > 0):
            raise ValueError(f"input_scale must be positive and finite, got {self.input_scale}")
        if not self.index_max > self.index_min:
            raise ValueError(f"index_max {self.index_max} must exceed index_min {self.index_min}")
        downsample = self.field_downsample if self.input_mode == "field" else 1
        if downsample < 1 or any(n % downsample for n in self.hologram_shape):
            raise ValueError(f"hologram shape {self.hologram_shape} is not divisible by field_downsample {downsample}")
        total = math.prod(self.encoder_strides)
        if any(n % total for n in self.input_shape):
            raise ValueError(f"input shape {self.input_shape} is not divisible by the encoder's total stride {total}")
        window_layout(self.n_views, self.window_length)

    # -- derived shapes ---------------------------------------------------------------------------
    @property
    def sequence_length(self) -> int:
        return window_layout(self.n_views, self.window_length)

    @property
    def channels_per_polarization(self) -> int:
        # field: real and imaginary part of the x and y components; hologram: the frame itself
        return 4 if self.input_mode == "field" else 1

    @property
    def input_channels(self) -> int:
        return 2 * self.channels_per_polarization

    @property
    def prior_channels(self) -> int:
        return PRIOR_CHANNELS[self.prior]

    @property
    def input_shape(self) -> tuple[int, int]:
        downsample = self.field_downsample if self.input_mode == "field" else 1
        return (self.hologram_shape[0] // downsample, self.hologram_shape[1] // downsample)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(layer, height, width) of the encoder features and the GRU hidden state."""
        total = math.prod(self.encoder_strides)
        return (1, self.input_shape[0] // total, self.input_shape[1] // total)

    @property
    def decoded_shape(self) -> tuple[int, int, int]:
        """Shape the decoder blocks produce before the final resize to ``volume_shape``."""
        shape = list(self.latent_shape)
        for stride in self.decoder_strides:
            shape = [n * s for n, s in zip(shape, stride)]
        return tuple(shape)

    def window_views(self, window: int) -> range:
        return range(window * self.window_length, (window + 1) * self.window_length)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "NetworkConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown network configuration keys: {sorted(unknown)}")
        return cls(**values)

    def replace(self, **changes) -> "NetworkConfig":
        return dataclasses.replace(self, **changes)


# channel widths by name; "paper" follows the paper's 192-channel features / 512-channel hidden state
WIDTHS = {
    "small": dict(encoder_channels=(16, 24, 32, 48, 64), hidden_channels=64, decoder_channels=(48, 24, 12)),
    # the paper's six windows (37 views per polarization in windows of 6)
    "paper": dict(encoder_channels=(32, 64, 96, 128, 192), hidden_channels=512, decoder_channels=(128, 64, 32),
                  window_length=6),
    # for tests: a network of a few thousand parameters
    "tiny": dict(encoder_channels=(4, 4, 6, 6, 8), hidden_channels=8, decoder_channels=(6, 4, 4)),
}


def _decoder_strides(latent: tuple[int, int, int], volume: tuple[int, int, int]) -> tuple[tuple[int, int, int], ...]:
    # Per axis, three integer factors whose product covers latent -> volume: the smallest largest
    # factor first (balanced blocks), then the smallest product (least to trim); larger factors go
    # to earlier blocks, where the volume is still small; the final resize trims the rest.
    strides = []
    for n_in, n_out in zip(latent, volume):
        best = None
        for a in range(1, 9):
            for b in range(1, a + 1):
                for c in range(1, b + 1):
                    if n_in * a * b * c >= n_out:
                        key = (a, a * b * c)
                        if best is None or key < best[0]:
                            best = (key, (a, b, c))
        if best is None:
            raise ValueError(f"cannot upsample {n_in} to {n_out} in three blocks of factor <= 8")
        strides.append(best[1])
    return tuple(tuple(strides[axis][block] for axis in range(3)) for block in range(3))


def config_for_geometry(geometry: Geometry, width: str = "small", **overrides) -> NetworkConfig:
    """A network configuration sized for ``geometry``.

    ``width``: ``"small"``, ``"paper"`` or ``"tiny"``. The ``paper`` width with
    ``input_mode="hologram"`` on the ``paper`` preset reproduces the paper's shapes (512x512
    inputs -> 1x16x16x192 features -> 1x16x16x512 hidden state -> 80x332x332 volume).
    ``overrides`` replace any field.
    """
    if width not in WIDTHS:
        raise ValueError(f"unknown width {width!r}; choose one of {', '.join(WIDTHS)}")
    values = dict(n_views=geometry.n_views, hologram_shape=geometry.hologram_shape,
                  volume_shape=geometry.volume_shape, **WIDTHS[width])
    values.update(overrides)
    mode = values.get("input_mode", "field")
    downsample = values.get("field_downsample", 2) if mode == "field" else 1
    input_shape = [n // downsample for n in geometry.hologram_shape]
    if "encoder_strides" not in overrides:
        # halve while the features stay at least 8x8 (paper: 512 -> 16 after five halvings)
        strides, size = [], min(input_shape)
        for _ in range(5):
            if size // 2 >= 8 and size % 2 == 0:
                strides.append(2)
                size //= 2
            else:
                strides.append(1)
        values["encoder_strides"] = tuple(strides)
    if "decoder_strides" not in overrides:
        total = math.prod(values["encoder_strides"])
        latent = (1, input_shape[0] // total, input_shape[1] // total)
        values["decoder_strides"] = _decoder_strides(latent, geometry.volume_shape)
    return NetworkConfig(**values)
