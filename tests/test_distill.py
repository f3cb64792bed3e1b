"""`biref distill`: a one-pass student of a model's quarter-turn mean, end to end on tiny data."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from biref_sdk.cli import main as biref
from biref_sdk.files import Dataset
from biref_sdk.network import load_model, save_model
from biref_sdk.network.config import config_for_geometry
from biref_sdk.network.model import BirefNet
from biref_sdk.reconstruction.model import ModelReconstructor
from biref_sdk.reconstruction.prior import with_prior_options
from biref_sdk.training.distill import _Items, _batch, prepare
from biref_sdk.training.loop import losses

from test_network_model import tiny_geometry
from test_training_loop import write_tiny_dataset


@pytest.fixture(scope="module")
def teacher_and_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distill")
    geometry = tiny_geometry(9)  # a ring of 8 views maps onto itself under a quarter turn
    write_tiny_dataset(folder / "train.h5", 3, seed=0, n_views=9)
    write_tiny_dataset(folder / "val.h5", 1, seed=1, n_views=9)
    torch.manual_seed(3)
    config = with_prior_options(config_for_geometry(geometry, "tiny", window_length=2, prior="formula",
                                                    normalization="none"))
    save_model(folder / "teacher.h5", BirefNet(config).eval(), geometry)
    return folder


def _loss_to_teacher(network, items) -> float:
    batch = _batch([items.item(i, turn) for i in range(len(items)) for turn in range(4)])
    with torch.no_grad():
        outputs = network.finalize(batch["states"], batch["prior"])
    return float(losses(outputs, batch["teacher"], network.config, 0.1)["total"])


def test_the_cache_holds_each_turns_states_and_the_teachers_mean(teacher_and_data):
    folder = teacher_and_data
    teacher = load_model(folder / "teacher.h5")
    [cache] = prepare(folder / "teacher.h5", [folder / "train.h5"], folder / "cache")
    entry = torch.load(cache / "000001.pt", weights_only=True)
    with Dataset(folder / "train.h5") as dataset:
        volume = ModelReconstructor(teacher, engine="torch", quarter_turns=True).reconstruct(dataset.acquisition(1))
    c = teacher.config
    span = c.index_max - c.index_min
    # float16 in units of the output range: 1e-3 of it
    np.testing.assert_allclose(c.index_min + span * entry["teacher"][0].float().numpy(), volume.ne, atol=span * 1e-3)
    np.testing.assert_allclose(c.index_min + span * entry["teacher"][1].float().numpy(), volume.no, atol=span * 1e-3)
    np.testing.assert_allclose(span * entry["spread"][0].float().numpy(), volume.uncertainty[0], atol=span * 1e-3)
    assert entry["states"].shape == (4, c.sequence_length, c.hidden_channels, *c.latent_shape)


def test_distill_trains_a_one_pass_student_that_keeps_the_encoder(teacher_and_data, tmp_path):
    folder = teacher_and_data
    out = tmp_path / "run"
    assert biref(["distill", "--teacher", str(folder / "teacher.h5"), "--data", str(folder / "train.h5"),
                  "--val", str(folder / "val.h5"), "--cache-dir", str(folder / "cache"), "--out", str(out),
                  "--epochs", "6", "--lr", "3e-3", "--batch-size", "2", "--teacher-weight", "10",
                  "--threads", "1"]) == 0
    teacher, student = load_model(folder / "teacher.h5"), load_model(out / "last.h5")
    assert student.config.quarter_turns is False and teacher.config.quarter_turns is True
    assert student.config.uncertainty_head and not teacher.config.uncertainty_head
    assert student.metadata["distilled_from"] == teacher.sha256
    teacher_weights, student_weights = teacher.network.state_dict(), student.network.state_dict()
    for name in teacher_weights:
        same = torch.equal(teacher_weights[name], student_weights[name])
        assert same == name.startswith(("encoder.", "gru.")), name  # encoder and GRU frozen, the rest trained
    # the student answers closer to the teacher's four-turn mean than the teacher's own one pass
    items = _Items([folder / "train.h5"], prepare(folder / "teacher.h5", [folder / "train.h5"], folder / "cache"),
                   teacher.config)
    assert _loss_to_teacher(student.network, items) < 0.7 * _loss_to_teacher(teacher.network, items)  # 0.53 measured
    # and reconstructs in one pass by default
    with Dataset(folder / "val.h5") as dataset:
        volume = ModelReconstructor(student, engine="torch").reconstruct(dataset.acquisition(0))
    assert volume.parameters["quarter_turns"] is False
    # with the uncertainty its head learnt from the teacher's turns
    assert volume.parameters["uncertainty"] == "predicted (uncertainty head)"
    assert volume.uncertainty.shape == (3, *volume.shape) and np.all(volume.uncertainty > 0)
    fit = load_model(out / "best.h5").metadata["uncertainty_fit"]["mean_squared_log_error"]
    assert fit[-1] < fit[0]


def test_a_student_may_read_a_prior_with_other_formula_options(teacher_and_data, tmp_path, capsys):
    """``--prior-option late_views=3``: the student learns the teacher's answer from the prior of the
    formula's streaming warm start, which its file then records (and its reconstructions use)."""
    from biref_sdk.reconstruction.formula import FormulaReconstructor
    from biref_sdk.reconstruction.prior import formula_prior

    folder = teacher_and_data
    out = tmp_path / "run"
    common = ["distill", "--teacher", str(folder / "teacher.h5"), "--data", str(folder / "train.h5"),
              "--val", str(folder / "val.h5"), "--cache-dir", str(folder / "cache"), "--out", str(out),
              "--epochs", "1", "--uncertainty-epochs", "0", "--threads", "1"]
    for bad, message in (("late_views", "expected KEY=VALUE"), ("bogus=1", "unknown prior_options ['bogus']")):
        assert biref(common + ["--prior-option", bad]) != 0
        assert message in capsys.readouterr().err
    assert biref(common + ["--prior-option", "late_views=3"]) == 0
    teacher, student = load_model(folder / "teacher.h5"), load_model(out / "best.h5")
    assert student.config.prior_options["late_views"] == 3 and teacher.config.prior_options["late_views"] == 0
    options = {**teacher.config.prior_options, "late_views": 3}
    teacher_cache = prepare(folder / "teacher.h5", [folder / "train.h5"], folder / "cache")  # kept: no work
    items = _Items([folder / "train.h5"], teacher_cache, teacher.config, student.config, folder / "cache")
    with Dataset(folder / "train.h5") as dataset:
        acquisition = dataset.acquisition(2)
        expected = formula_prior(FormulaReconstructor(**options).reconstruct(acquisition), student.config)
        cold = formula_prior(FormulaReconstructor(**teacher.config.prior_options).reconstruct(acquisition),
                             student.config)
    prior = items.inputs(2, 0)["prior"]
    np.testing.assert_allclose(prior.numpy(), expected.numpy(), atol=2e-3)  # float16 cache
    assert float((prior - cold).abs().max()) > 1e-2  # another prior than the teacher's
    volume = ModelReconstructor(student, engine="torch").reconstruct(acquisition)
    assert np.all(np.isfinite(volume.ne))


def test_the_isotropy_weight_is_checked_and_recorded(teacher_and_data, tmp_path, capsys):
    folder = teacher_and_data
    out = tmp_path / "run"
    common = ["distill", "--teacher", str(folder / "teacher.h5"), "--data", str(folder / "train.h5"),
              "--val", str(folder / "val.h5"), "--cache-dir", str(folder / "cache"), "--out", str(out),
              "--epochs", "1", "--uncertainty-epochs", "0", "--threads", "1"]
    assert biref(common + ["--isotropy-weight", "-1"]) != 0
    assert "--isotropy-weight must be >= 0" in capsys.readouterr().err
    assert biref(common + ["--isotropy-weight", "2"]) == 0
    assert load_model(out / "best.h5").metadata["distill"]["isotropy_weight"] == 2.0


def test_an_isotropy_gate_is_added_and_fitted_alone(teacher_and_data, tmp_path, capsys):
    folder = teacher_and_data
    common = ["distill", "--teacher", str(folder / "teacher.h5"), "--data", str(folder / "train.h5"),
              "--val", str(folder / "val.h5"), "--cache-dir", str(folder / "cache"), "--threads", "1",
              "--uncertainty-epochs", "0"]
    assert biref(common + ["--out", str(tmp_path / "a"), "--epochs", "1"]) == 0
    assert biref(common + ["--isotropy-gate-epochs", "-1", "--out", str(tmp_path / "b"), "--epochs", "0",
                           "--init", str(tmp_path / "a" / "best.h5")]) != 0
    assert "--isotropy-gate-epochs" in capsys.readouterr().err
    assert biref(common + ["--isotropy-gate-epochs", "3", "--out", str(tmp_path / "b"), "--epochs", "0",
                           "--init", str(tmp_path / "a" / "best.h5")]) == 0
    assert "isotropy gate fitted" in capsys.readouterr().out
    before, after = load_model(tmp_path / "a" / "best.h5"), load_model(tmp_path / "b" / "best.h5")
    assert after.config.isotropy_gate and not before.config.isotropy_gate
    weights = after.network.state_dict()
    for name, value in before.network.state_dict().items():
        assert torch.equal(weights[name], value), name  # everything but the gate as it was
    assert not torch.equal(weights["isotropy.weight"], BirefNet(after.config).state_dict()["isotropy.weight"])
    fit = after.metadata["isotropy_gate_fit"]
    assert fit["epochs"] == 3 and len(fit["loss"]) == 3 and all(np.isfinite(fit["loss"]))
