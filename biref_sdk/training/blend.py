"""Weight interpolation between a model and its fine-tuned copy (Wortsman et al., "Robust fine-tuning
of zero-shot models", CVPR 2022): ``(1 - alpha) * base + alpha * tuned``, weight by weight.

A fine-tune that gains on some categories and loses on others often keeps most of the gains and
fewer of the losses part of the way along the straight line between the two (MODEL_CARD.md,
"Stage 9"). Only models of one architecture, configuration and geometry blend: the tuned model
must have been trained from the base (``biref train --init``), else the line between them is
meaningless and the result a different network."""
from __future__ import annotations

from ..network.io import check_geometry, load_model, save_model


def blend(base, tuned, alpha: float, out) -> str:
    """Write ``(1 - alpha) * base + alpha * tuned`` (model files) to ``out``, with ``tuned``'s
    configuration and metadata plus ``weight_blend`` (both checksums and ``alpha``); returns the
    new checksum. ``alpha`` in [0, 1]: 0 gives the base's weights, 1 the tuned model's; integer
    buffers (BatchNorm's step count, unused at inference) are the tuned model's."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base_model, tuned_model = load_model(base), load_model(tuned)
    check_geometry(base_model.geometry, tuned_model.geometry)
    if base_model.config.to_dict() != tuned_model.config.to_dict():
        raise ValueError(f"{base} and {tuned} have different network configurations; only a model and its "
                         "fine-tuned copy (biref train --init) blend")
    start = base_model.network.state_dict()
    network = tuned_model.network
    blended = {name: (1 - alpha) * start[name] + alpha * value if value.is_floating_point() else value
               for name, value in network.state_dict().items()}
    network.load_state_dict(blended)
    metadata = dict(tuned_model.metadata, weight_blend={"alpha": alpha, "base_sha256": base_model.sha256,
                                                        "tuned_sha256": tuned_model.sha256})
    return save_model(out, network, tuned_model.geometry, metadata)
