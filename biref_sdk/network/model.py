"""The paper's network: Encoder -> 3D ConvGRU -> attention -> Decoder (Fig. 4-8 of the paper).

Tensor layout is PyTorch's ``[batch, channels, layer, height, width]``; the "layer" axis of the
encoder and GRU feature maps has size 1 (the paper's 1x16x16x192 maps), so their convolutions use
``(1, 3, 3)`` kernels; the decoder grows that axis into the volume's z axis.

The forward pass is available stage by stage for the streaming runtime:

- :meth:`BirefNet.encode` one window ``[B, C_in, 1, H, W]`` -> features ``[B, C_e, 1, h, w]``;
- :meth:`BirefNet.gru_step` ``(hidden, features) -> hidden`` ``[B, C_h, 1, h, w]``;
- :meth:`BirefNet.decode` all hidden states ``[B, S, C_h, 1, h, w]`` -> decoder features, all of
  the decoder's work that does not read the formula prior;
- :meth:`BirefNet.readout` ``(features, prior) -> (ne, no, q)``: the prior's term and the head
  (``finalize`` is the two in order).

``forward`` is exactly these stages in order. None of the stages has data-dependent Python
control flow, so each exports to ONNX/TensorRT as one static graph.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .config import NetworkConfig

# Orthonormal basis (Frobenius) of the traceless symmetric 3x3 matrices; Q = sum_k q_k B_k.
_S2, _S6 = 2.0 ** -0.5, 6.0 ** -0.5
Q_BASIS = torch.tensor([
    [[_S2, 0, 0], [0, -_S2, 0], [0, 0, 0]],
    [[-_S6, 0, 0], [0, -_S6, 0], [0, 0, 2 * _S6]],
    [[0, _S2, 0], [_S2, 0, 0], [0, 0, 0]],
    [[0, 0, _S2], [0, 0, 0], [_S2, 0, 0]],
    [[0, 0, 0], [0, 0, _S2], [0, _S2, 0]],
], dtype=torch.float64)


# The prior enters multiplied by this: its channels are of order 0.1 - 1, and the weights that read
# them start at zero (training --init); Adam moves a weight by about the learning rate per step,
# so without a gain they would need tens of thousands of steps to reach the slopes they need.
PRIOR_GAIN = 10.0


class Float32BatchNorm3d(nn.BatchNorm3d):
    """BatchNorm3d that computes in its parameters' dtype (kept fp32 in a half-precision network:
    reduced-precision statistics lose the small differences the features carry) and returns the
    input's dtype. Same parameters and state-dict names as BatchNorm3d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


def _normalization(channels: int, kind: str) -> nn.Module:
    # "none" keeps a module in the BN's place (and its name in the state dict) that does nothing
    return Float32BatchNorm3d(channels) if kind == "batch" else nn.Identity()


def layer_conv(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """A ``(1, k, k)`` Conv3d on maps whose layer axis has size 1, computed as the equal Conv2d.

    Same weights, same result; CPU 3D-convolution kernels are about twice as slow as the 2D ones.
    """
    weight = conv.weight.squeeze(2)
    y = F.conv2d(x.squeeze(2), weight, conv.bias, stride=conv.stride[1:], padding=conv.padding[1:])
    return y.unsqueeze(2)


class DownResidualBlock(nn.Module):
    """BN-ReLU-Conv3D twice (the first strided) plus a strided Conv3D shortcut, added."""

    def __init__(self, c_in: int, c_out: int, stride: int, normalization: str = "batch") -> None:
        super().__init__()
        s = (1, stride, stride)
        self.bn1 = _normalization(c_in, normalization)
        self.conv1 = nn.Conv3d(c_in, c_out, (1, 3, 3), stride=s, padding=(0, 1, 1), bias=False)
        self.bn2 = _normalization(c_out, normalization)
        self.conv2 = nn.Conv3d(c_out, c_out, (1, 3, 3), padding=(0, 1, 1))
        self.shortcut = nn.Conv3d(c_in, c_out, 1, stride=s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = layer_conv(self.conv1, F.relu(self.bn1(x)))
        y = layer_conv(self.conv2, F.relu(self.bn2(y)))
        return y + layer_conv(self.shortcut, x)


class UpResidualBlock(nn.Module):
    """BN-ReLU-ConvTranspose3D (upsampling), then a Conv3D whose output is added to it (skip).

    With ``extra_channels``, the Conv3D also reads an extra input on the block's output grid
    (the formula prior), concatenated after the ReLU so that its signed values pass unchanged.
    """

    def __init__(self, c_in: int, c_out: int, stride: tuple[int, int, int], normalization: str = "batch",
                 extra_channels: int = 0) -> None:
        super().__init__()
        self.bn1 = _normalization(c_in, normalization)
        self.up = nn.ConvTranspose3d(c_in, c_out, kernel_size=stride, stride=stride)
        self.bn2 = _normalization(c_out, normalization)
        self.conv = nn.Conv3d(c_out + extra_channels, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        partial = self.without_extra(x)
        return partial if extra is None else self.add_extra(partial, extra)

    def without_extra(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output without the extra input's term: the convolution is linear, so
        ``conv([z, extra]) = conv_z(z) + conv_extra(extra)``, and everything here can be computed
        before the extra input (the formula prior, known only after the last view) exists."""
        y = self.up(F.relu(self.bn1(x)))
        z = F.relu(self.bn2(y))
        c = y.shape[1]
        return y + F.conv3d(z, self.conv.weight[:, :c], self.conv.bias, padding=self.conv.padding)

    def add_extra(self, partial: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        """``without_extra``'s result plus the extra input's term: the block's output."""
        c = partial.shape[1]
        return partial + F.conv3d(extra, self.conv.weight[:, c:], None, padding=self.conv.padding)


class ConvGRU3d(nn.Module):
    """3D convolutional GRU cell: reset and update gates from the input and the previous state."""

    def __init__(self, c_in: int, c_hidden: int) -> None:
        super().__init__()
        self.gates = nn.Conv3d(c_in + c_hidden, 2 * c_hidden, (1, 3, 3), padding=(0, 1, 1))
        self.candidate = nn.Conv3d(c_in + c_hidden, c_hidden, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        reset, update = torch.sigmoid(layer_conv(self.gates, torch.cat([x, h], dim=1))).chunk(2, dim=1)
        candidate = torch.tanh(layer_conv(self.candidate, torch.cat([x, reset * h], dim=1)))
        return (1 - update) * h + update * candidate


class SequenceAttention(nn.Module):
    """Dense layer on each flattened hidden state, tanh, softmax over the sequence, weighted sum.

    ``mode="position"`` scores every position of the feature map (the paper: "weights are
    calculated for each position"), ``mode="sequence"`` one score per hidden state.
    """

    def __init__(self, c_hidden: int, latent_shape: tuple[int, int, int], mode: str) -> None:
        super().__init__()
        positions = latent_shape[0] * latent_shape[1] * latent_shape[2]
        self.mode = mode
        self.dense = nn.Linear(c_hidden * positions, positions if mode == "position" else 1)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        # states [B, S, C, D, H, W] -> context [B, C, D, H, W]
        # computed in the dense layer's dtype (kept fp32 in a half-precision network), returned in
        # the states' dtype
        b, s, c, d, h, w = states.shape
        dtype = states.dtype
        states = states.to(self.dense.weight.dtype)
        scores = torch.tanh(self.dense(states.reshape(b, s, c * d * h * w)))  # [B, S, P or 1]
        weights = torch.softmax(scores, dim=1)
        weights = weights.reshape(b, s, 1, d, h, w) if self.mode == "position" else weights.reshape(b, s, 1, 1, 1, 1)
        return (weights * states).sum(dim=1).to(dtype)


class BirefNet(nn.Module):
    """Windows of views -> (n_e, n_o, Q-tensor components) on the volume grid."""

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        self.config = config
        channels = (config.input_channels,) + config.encoder_channels
        self.encoder = nn.Sequential(*[DownResidualBlock(channels[i], channels[i + 1], config.encoder_strides[i],
                                                         config.normalization)
                                       for i in range(5)])
        self.gru = ConvGRU3d(config.encoder_channels[-1], config.hidden_channels)
        self.attention = SequenceAttention(config.hidden_channels, config.latent_shape, config.attention)
        channels = (config.hidden_channels,) + config.decoder_channels
        prior = config.prior_channels
        self.decoder = nn.Sequential(*[UpResidualBlock(channels[i], channels[i + 1], config.decoder_strides[i],
                                                       config.normalization, prior if i == 2 else 0)
                                       for i in range(3)])
        self.head_bn = _normalization(config.decoder_channels[-1], config.normalization)
        # 2 index channels (n_e, n_o) + 5 Q-tensor components, from the features (and the prior)
        self.head = nn.Conv3d(config.decoder_channels[-1] + prior, 7, 1)
        # start near the bottom of the index range, where the medium (most voxels) lies, without
        # saturating the sigmoids (their slope at -3 is still 0.045)
        with torch.no_grad():
            self.head.bias[:2].fill_(-3.0)
        if config.uncertainty_head:
            # log of the uncertainty: n_e, n_o spreads in units of the output range, director angle
            # in radians (readout scales them); starts at 1 % and 0.01 rad
            self.uncertainty = nn.Conv3d(config.decoder_channels[-1] + prior, 3, 1)
            with torch.no_grad():
                self.uncertainty.weight.zero_()
                self.uncertainty.bias.fill_(math.log(0.01))
        if config.isotropy_gate:
            # inputs: the head's, the order |Q|, its mean over 5^3 voxels and the largest such mean
            # within 9^3 (a particle's order, not a voxel's: a liquid crystal's |Q| drops at its
            # defects and surface, an isotropic particle's is low throughout); starts as
            # sigmoid(20 max<|Q|> - 3): 1 near liquid crystal (|Q| = 0.82 for a perfect director),
            # 0.27 where the order is 0.1 all around
            self.isotropy = nn.Conv3d(config.decoder_channels[-1] + prior + 3, 1, 1)
            with torch.no_grad():
                self.isotropy.weight.zero_()
                self.isotropy.weight[0, -1].fill_(20.0)
                self.isotropy.bias.fill_(-3.0)

    # -- stages -----------------------------------------------------------------------------------
    def initial_hidden(self, batch: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch, self.config.hidden_channels, *self.config.latent_shape, device=device, dtype=dtype)

    def encode(self, window: torch.Tensor) -> torch.Tensor:
        """One window ``[B, C_in, 1, H, W]`` -> features ``[B, C_e, 1, h, w]``."""
        return self.encoder(window * self.config.input_scale)

    def gru_step(self, hidden: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.gru(hidden, features)

    def decode(self, states: torch.Tensor) -> torch.Tensor:
        """All hidden states ``[B, S, C_h, 1, h, w]`` -> the decoder's features ``[B, C_d, Z', Y', X']``
        up to where the prior enters (without its term; :meth:`readout` adds it), so that this
        part can run before the prior exists."""
        x = self.attention(states)
        return self.decoder[2].without_extra(self.decoder[1](self.decoder[0](x)))

    def readout(self, features: torch.Tensor, prior: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`decode`'s features (and, for ``config.prior == "formula"``, the prior
        ``[B, 7, Z, Y, X]`` of :func:`biref_sdk.reconstruction.prior.formula_prior`) -> ``ne``, ``no``
        ``[B, Z, Y, X]`` and ``q`` ``[B, 5, Z, Y, X]`` (components in :data:`Q_BASIS`); with
        ``config.uncertainty_head`` also the uncertainty ``[B, 3, Z, Y, X]`` (n_e and n_o in index
        units, the director angle in radians, as ``reconstruction.model.turn_spread``)."""
        expected = (features.shape[0], self.config.prior_channels, *self.config.volume_shape)
        if self.config.prior_channels:
            if prior is None or tuple(prior.shape) != expected:
                raise ValueError(f"this network needs its {self.config.prior!r} prior of shape {expected}, got "
                                 f"{None if prior is None else tuple(prior.shape)}")
            prior = (PRIOR_GAIN * prior).to(self.head.weight.dtype)
            if tuple(prior.shape[2:]) != self.config.decoded_shape:
                prior = F.interpolate(prior, size=self.config.decoded_shape, mode="trilinear", align_corners=False)
            x = self.decoder[2].add_extra(features, prior)
        elif prior is not None:
            raise ValueError("this network takes no prior (config.prior is 'none')")
        else:
            x = features
        x = F.relu(self.head_bn(x))
        x = x if prior is None else torch.cat([x, prior], dim=1)
        out = self._to_volume(self.head(x).float())  # the outputs in fp32
        lo, span = self.config.index_min, self.config.index_max - self.config.index_min
        # n_o in the range, n_e between n_o and the top: n_e >= n_o holds by construction
        no = lo + span * torch.sigmoid(out[:, 1])
        birefringence = torch.sigmoid(out[:, 0])
        if self.config.isotropy_gate:
            birefringence = birefringence * self._isotropy(x, out[:, 2:])
        ne = no + (self.config.index_max - no) * birefringence
        if not self.config.uncertainty_head:
            return ne, no, out[:, 2:]
        log_spread = self._to_volume(self.uncertainty(x).float()).clamp(-16.0, 2.0)
        spread = torch.exp(log_spread)
        # index spreads in index units; the director's angle is at most a right angle
        spread = torch.cat([span * spread[:, :2], spread[:, 2:].clamp(max=math.pi / 2)], dim=1)
        return ne, no, out[:, 2:], spread

    def _isotropy(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The isotropy gate ``[B, Z, Y, X]`` in (0, 1) (``config.isotropy_gate``)."""
        order = torch.sqrt((q * q).sum(dim=1, keepdim=True) + 1e-12)  # |Q|; sqrt(sum) exports to any opset
        if tuple(order.shape[2:]) != tuple(x.shape[2:]):
            order = F.interpolate(order, size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)
        local = order
        # box filters one axis at a time (a box's mean and maximum are separable): 15 and 27
        # operations per voxel instead of 125 and 729
        for axis in range(3):
            kernel = tuple(5 if a == axis else 1 for a in range(3))
            local = F.avg_pool3d(local, kernel, stride=1, padding=tuple(k // 2 for k in kernel),
                                 count_include_pad=False)
        around = local
        for axis in range(3):
            kernel = tuple(9 if a == axis else 1 for a in range(3))
            around = F.max_pool3d(around, kernel, stride=1, padding=tuple(k // 2 for k in kernel))
        inputs = torch.cat([x, order.to(x.dtype), local.to(x.dtype), around.to(x.dtype)], dim=1)
        return torch.sigmoid(self._to_volume(self.isotropy(inputs).float())[:, 0])

    def _to_volume(self, out: torch.Tensor) -> torch.Tensor:
        if tuple(out.shape[2:]) != self.config.volume_shape:
            out = F.interpolate(out, size=self.config.volume_shape, mode="trilinear", align_corners=False)
        return out

    def finalize(self, states: torch.Tensor, prior: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All hidden states ``[B, S, C_h, 1, h, w]`` (and the prior, see :meth:`readout`) ->
        ``(ne, no, q)``: :meth:`decode`, then :meth:`readout`."""
        return self.readout(self.decode(states), prior)

    # -- whole forward ---------------------------------------------------------------------------
    def forward(self, windows: torch.Tensor, prior: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``windows`` ``[B, S, C_in, 1, H, W]`` (S = sequence length) and the prior (if the
        configuration has one; see :meth:`finalize`) -> ``(ne, no, q)`` (and the uncertainty, see
        :meth:`readout`)."""
        return self.finalize(self.hidden_states(windows), prior)

    def hidden_states(self, windows: torch.Tensor) -> torch.Tensor:
        """``windows`` ``[B, S, C_in, 1, H, W]`` -> the GRU's hidden states ``[B, S, C_h, 1, h, w]``."""
        b, s = windows.shape[:2]
        features = self.encode(windows.reshape(b * s, *windows.shape[2:]))
        features = features.reshape(b, s, *features.shape[1:])
        hidden = self.initial_hidden(b, windows.device, features.dtype)
        states = []
        for t in range(s):  # s is fixed by the configuration, not by the data
            hidden = self.gru_step(hidden, features[:, t])
            states.append(hidden)
        return torch.stack(states, dim=1)


def q_from_director(director: torch.Tensor) -> torch.Tensor:
    """Unit directors ``[..., 3, Z, Y, X]`` -> Q components ``[..., 5, Z, Y, X]`` of d dᵀ - I/3.

    The map is even in d, so the director's arbitrary sign does not matter.
    """
    basis = Q_BASIS.to(director.device, director.dtype)
    outer = director.unsqueeze(-4) * director.unsqueeze(-5)  # [..., 3, 3, Z, Y, X]
    return torch.einsum("kij,...ijzyx->...kzyx", basis, outer)
