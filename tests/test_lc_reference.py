"""The simulator against independent physics on anisotropic particles (issue 12): the discrete dipole
approximation (tests/dda_reference.py), itself checked against exact Mie scattering first.

`small` preset, noise-free, the axial view and two ring views a quarter turn apart; relative L2 of
the scattered field within 1.5 radii. The lattice spacing is 33 nm (0.4-0.6 % from exact Mie);
benchmarks/lc_reference.py runs every view and more droplets (docs/simulator.md)."""
from __future__ import annotations

import pytest

from biref_sdk.geometry import preset
from biref_sdk.samples import droplet_sample
from biref_sdk.samples.droplets import Droplet
from biref_sdk.simulate import Simulator

from dda_reference import dda_scattered_fields, droplet_lattice
from mie_reference import mie_scattered_fields, relative_errors

SPACING_M = 33.3e-9
VIEWS = [0, 2, 11]


@pytest.fixture(scope="module")
def views():
    g = preset("small")
    return g, g.replace(illumination_sines=g.sines[VIEWS])


def test_the_dipole_reference_agrees_with_exact_mie(views):
    g, sub = views
    sphere = Droplet((0, 0, 0), 0.6e-6, (0, 0, 1), "uniform", 1.552, 1.552)
    dda = dda_scattered_fields(sub, droplet_lattice(sphere, SPACING_M, g.medium_index, g.wavelength_m), range(3))
    errors = relative_errors(dda, mie_scattered_fields(sub, 0.6e-6, 1.552), sub, 0.6e-6)
    assert errors.max() < 0.01, errors


@pytest.mark.parametrize("droplet", [
    Droplet((0, 0, 0), 0.6e-6, (0, 0, 1), "radial", 1.57, 1.55),
    Droplet((0, 0, 0), 0.6e-6, (0, 0, 1), "bipolar", 1.57, 1.55),
    Droplet((0, 0, 0), 0.6e-6, (1, 1, 1), "bipolar", 1.565, 1.548),
], ids=["radial", "bipolar-z", "bipolar-tilted"])
def test_liquid_crystal_droplets_agree_with_the_dipole_reference(views, droplet):
    """Issue 12's goal is 5 % at every view; measured 0.5-1.3 % (docs/simulator.md)."""
    g, sub = views
    simulator = Simulator(sub)
    simulated = (simulator.fields(droplet_sample([droplet], g)) - simulator.background_fields()).numpy()
    reference = dda_scattered_fields(sub, droplet_lattice(droplet, SPACING_M, g.medium_index, g.wavelength_m),
                                     range(3))
    errors = relative_errors(simulated, reference, sub, droplet.radius_m)
    assert errors.max() < 0.03, errors
