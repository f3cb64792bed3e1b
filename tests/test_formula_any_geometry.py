"""The formula method on geometries that are not presets (issue 15), against exact Mie holograms
of a weak isotropic sphere (tests/mie_acquisition.py): off-grid illumination and carriers, frames
of any size, any NA, volume grids not at the camera pitch."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("miepython", reason="miepython (the `test` extra) computes the exact Mie reference")

from biref_sdk.cli import main  # noqa: E402
from biref_sdk.files import read_geometry, read_volume, write_acquisition, write_geometry  # noqa: E402
from biref_sdk.geometry import Geometry, geometry_findings, preset  # noqa: E402

from mie_acquisition import CASES, mie_acquisition, sphere_figures  # noqa: E402


@pytest.mark.parametrize("case", sorted(CASES))
def test_formula_meets_the_goals_on_exact_mie(case, tmp_path):
    g, radius_m, index = CASES[case]
    assert not g.frames_periodic()  # the point: leakage must be handled
    path = tmp_path / "mie.h5"
    write_acquisition(path, mie_acquisition(case))
    assert main(["reconstruct", str(path), "--method", "formula", "--out", str(tmp_path / "v.h5")]) == 0
    figures = sphere_figures(read_volume(tmp_path / "v.h5"), g, radius_m, index)
    assert abs(figures["centre_ne"] - index) <= 0.004, figures
    assert abs(figures["centre_no"] - index) <= 0.004, figures
    assert abs(figures["background"] - g.medium_index) <= 0.001, figures
    assert 0.85 <= figures["excess_ratio"] <= 1.15, figures


def test_geometry_json_round_trip_and_acquisition_source(tmp_path):
    g = CASES["water633"][0]
    write_geometry(tmp_path / "g.json", g)
    assert read_geometry(tmp_path / "g.json") == g
    assert read_geometry("small") == preset("small")
    with pytest.raises(ValueError, match="hologram_shape"):
        (tmp_path / "bad.json").write_text(json.dumps({"wavelength_m": 5e-7}))
        read_geometry(tmp_path / "bad.json")


def test_geometry_check_exit_status_follows_the_refusal(tmp_path, capsys):
    g = CASES["issue"][0]
    write_geometry(tmp_path / "ok.json", g)
    assert main(["geometry", "check", str(tmp_path / "ok.json")]) == 0
    out = capsys.readouterr().out
    assert "REFUSED" not in out and "off the FFT grid" in out and "lateral resolution" in out
    # carriers so close to the axis that the sidebands overlap the DC term: refused, and the
    # constructor (what the service and every reader use) refuses it with the same words
    attrs = json.loads((tmp_path / "ok.json").read_text())
    attrs["reference_carriers"] = [[0.2, 0.0], [0.0, 0.2]]
    (tmp_path / "bad.json").write_text(json.dumps(attrs))
    assert main(["geometry", "check", str(tmp_path / "bad.json")]) == 1
    assert "REFUSED: a sideband overlaps the DC term" in capsys.readouterr().out
    with pytest.raises(ValueError, match="overlaps the DC term"):
        Geometry(**{**{k: v for k, v in attrs.items()}})
    refused = [f for f in geometry_findings(read_geometry(tmp_path / "bad.json", checked=False)) if f.refused]
    assert len(refused) == 1


def test_smoothing_default_is_geometry_aware():
    from biref_sdk.reconstruction.formula import FormulaOptions

    assert FormulaOptions().background_smoothing_for(preset("small")) == 0.5e-6
    assert FormulaOptions().background_smoothing_for(CASES["issue"][0]) == 0.0
    assert FormulaOptions(background_smoothing_m=1e-6).background_smoothing_for(CASES["issue"][0]) == 1e-6
    assert np.isclose(FormulaOptions(background_smoothing_m=0).background_smoothing_for(preset("small")), 0.0)
