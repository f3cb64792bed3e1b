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


@pytest.fixture(scope="module")
def issue_sphere_errors():
    g = preset("small")
    radius, index = 0.9e-6, 1.552
    simulator = Simulator(g)
    fields = simulator.fields(sphere_sample(g, radius, index))
    scattered = demodulate(intensity(fields, g), g) - demodulate(intensity(simulator.background_fields(), g), g)
    return relative_errors(scattered.numpy(), mie_scattered_fields(g, radius, index), g, radius)


def test_simulator_stays_within_todays_error_against_mie(issue_sphere_errors):
    # measured for the Jones multi-slice model: 2.6 % axial, 7.7 % ring median, 8.2 % ring worst;
    # a regression bound until the high-NA model of issue 12 tightens it to the goals below
    errors = issue_sphere_errors
    assert errors[0] < 0.03
    assert errors[1:].max() < 0.09


@pytest.mark.xfail(strict=True, reason="issue 12 goal (<= 2 % axial, <= 3 % ring) needs the high-NA forward model, "
                                       "not built yet; strict: passing means this mark must go")
def test_simulator_meets_the_high_na_goal_against_mie(issue_sphere_errors):
    errors = issue_sphere_errors
    assert errors[0] <= 0.02
    assert errors[1:].max() <= 0.03
