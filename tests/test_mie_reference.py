"""The simulator against exact Mie scattering (miepython), through the independent reference of
tests/mie_reference.py: scattered field, demodulated like an acquisition, within 1.5 radii."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("miepython", reason="miepython (the `test` extra) computes the exact Mie reference")

from biref_sdk.geometry import preset  # noqa: E402
from biref_sdk.holography import demodulate, intensity  # noqa: E402
from biref_sdk.samples import sphere_sample  # noqa: E402
from biref_sdk.simulate import Simulator  # noqa: E402

from mie_reference import amplitude_functions, mie_scattered_fields, relative_errors  # noqa: E402


@pytest.mark.parametrize("relative_index", [1.01, 1.05, 1.3])
def test_amplitude_functions_follow_the_rayleigh_limit(relative_index):
    # the convention (Bohren & Huffman, exp(-i w t)) fixed by the closed form of a tiny sphere
    x = 0.02
    s1, s2 = amplitude_functions(relative_index, x, np.array([1.0, 0.0]))
    alpha = (relative_index**2 - 1) / (relative_index**2 + 2)
    expected = -1j * x**3 * alpha
    assert abs(s1[0] - expected) < 1e-3 * abs(expected)
    assert abs(s2[0] - expected) < 1e-3 * abs(expected)
    assert abs(s2[1]) < 1e-3 * abs(expected)  # no parallel scattering at 90 degrees (dipole)
    assert s1[0].real > 0  # extinction: the optical theorem's sign


def test_reference_forward_wave_is_the_weak_phase_of_the_sphere():
    # a weak sphere's forward plane wave is the mean phase it adds: i k_m (m - 1) V / A (Born)
    g = preset("small")
    radius, index = 0.3e-6, 1.541
    fields = mie_scattered_fields(g, radius, index)
    mean = fields[0, 0, 0].mean()  # the axial view's x input, x component: its k_T = 0 plane wave
    H, W = g.hologram_shape
    expected = 1j * g.k_medium_per_m * (index / g.medium_index - 1) * (4 / 3 * np.pi * radius**3) / (H * W * g.pixel_size_m**2)
    assert abs(mean - expected) < 0.02 * abs(expected)


def _errors(radius, index):
    g = preset("small")
    simulator = Simulator(g)
    fields = simulator.fields(sphere_sample(g, radius, index))
    scattered = demodulate(intensity(fields, g), g) - demodulate(intensity(simulator.background_fields(), g), g)
    return relative_errors(scattered.numpy(), mie_scattered_fields(g, radius, index), g, radius)


# the sphere, then the extremes of contrast (up to 0.03) and radius (0.6-1.2 um) in n_m 1.54;
# benchmarks/mie_sweep.py runs the full sweep
@pytest.mark.parametrize("index, radius", [(1.552, 0.9e-6), (1.545, 0.6e-6), (1.57, 1.2e-6)])
def test_simulator_matches_exact_mie_at_every_view(index, radius):
    errors = _errors(radius, index)
    assert errors[0] <= 0.02, f"axial view {100 * errors[0]:.2f} %"
    assert errors[1:].max() <= 0.03, f"worst ring view {100 * errors[1:].max():.2f} %"
