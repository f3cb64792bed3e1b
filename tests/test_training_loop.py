"""Offline training: `biref train` end to end, resume equals an uninterrupted run, and the
DistributedDataParallel path with two gloo processes under torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from biref_sdk.cli import main as biref
from biref_sdk.files import DatasetWriter, Volume
from biref_sdk.network import load_model, save_model
from biref_sdk.network.config import config_for_geometry
from biref_sdk.network.model import BirefNet
from biref_sdk.reconstruction.prior import with_prior_options

from test_network_model import tiny_frames, tiny_geometry

TRAIN_ARGS = ["--width", "tiny", "--window-length", "2", "--no-progress", "--threads", "1"]


def write_tiny_dataset(path, n: int, seed: int, n_views: int = 7) -> None:
    """Block-shaped birefringent samples seen as thin phase objects: enough for the loop's
    mechanics and for a network to learn something, with no wave optics."""
    geometry = tiny_geometry(n_views)
    rng = np.random.default_rng(seed)
    Z, Y, X = geometry.volume_shape
    H, W = geometry.hologram_shape
    with DatasetWriter(path, geometry, n, tiny_frames(geometry), {"test": True}) as writer:
        for i in range(n):
            ne = np.full((Z, Y, X), 1.54, np.float32)
            no = ne.copy()
            z0, y0, x0 = rng.integers(0, 4), rng.integers(0, 8), rng.integers(0, 8)
            ne[z0:z0 + 6, y0:y0 + 8, x0:x0 + 8] = 1.56
            no[z0:z0 + 6, y0:y0 + 8, x0:x0 + 8] = 1.545
            axis = rng.normal(size=3)
            director = np.broadcast_to((axis / np.linalg.norm(axis))[:, None, None, None], (3, Z, Y, X))
            phase = np.zeros((H, W))
            # the volume is the central 16 x 16 pixels of the 32 x 32 frame
            phase[8 + y0:8 + y0 + 8, 8 + x0:8 + x0 + 8] = 0.3
            writer.write(i, tiny_frames(geometry, phase), Volume(ne, no, director, geometry.voxel_size_m,
                                                                geometry.medium_index))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_tiny_dataset(folder / "train.h5", 4, seed=0)
    write_tiny_dataset(folder / "val.h5", 2, seed=1)
    return folder / "train.h5", folder / "val.h5"


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_train_writes_models_history_and_figure(tiny_data, tmp_path):
    train, val = tiny_data
    out = tmp_path / "run"
    assert biref(["train", "--data", str(train), "--val", str(val), "--out", str(out), "--epochs", "2",
                  "--lr", "1e-3", *TRAIN_ARGS]) == 0
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    for record in history:
        assert np.isfinite(record["train"]["loss"]) and np.isfinite(record["val"]["psnr_ne"])
        assert 0 < record["val"]["ssim_no"] <= 1
    assert (out / "loss_curve.png").stat().st_size > 1000
    loaded = load_model(out / "best.h5", geometry=tiny_geometry())
    assert loaded.metadata["train_config"]["learning_rate"] == 1e-3
    assert load_model(out / "last.h5").metadata["epoch"] == 2


def test_training_scales_the_inputs_to_unit_rms_and_records_the_normalization(tiny_data, tmp_path):
    from biref_sdk.training.data import HologramDataset

    train, val = tiny_data
    out = tmp_path / "run"
    assert biref(["train", "--data", str(train), "--val", str(val), "--out", str(out), "--epochs", "1",
                  "--normalization", "none", *TRAIN_ARGS]) == 0
    config = load_model(out / "last.h5").config
    assert config.normalization == "none"
    windows = torch.cat([HologramDataset(train, config).windows(i) for i in range(4)])
    rms = float((windows.double() ** 2).mean().sqrt())
    assert config.input_scale == pytest.approx(1 / rms, rel=1e-6)


def test_resume_continues_exactly_like_an_uninterrupted_run(tiny_data, tmp_path):
    train, val = tiny_data
    common = ["--data", str(train), "--val", str(val), "--lr", "1e-3", "--seed", "5", *TRAIN_ARGS]
    assert biref(["train", *common, "--out", str(tmp_path / "straight"), "--epochs", "2"]) == 0
    assert biref(["train", *common, "--out", str(tmp_path / "split"), "--epochs", "1"]) == 0
    assert _state(tmp_path / "split" / "checkpoint.pt")["epoch"] == 1
    assert biref(["train", *common, "--out", str(tmp_path / "split"), "--epochs", "2", "--resume"]) == 0
    straight, split = _state(tmp_path / "straight" / "checkpoint.pt"), _state(tmp_path / "split" / "checkpoint.pt")
    assert split["epoch"] == 2 and len(split["history"]) == 2
    for name, value in straight["model"].items():
        torch.testing.assert_close(split["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_without_a_checkpoint_is_a_clear_error(tiny_data, tmp_path, capsys):
    train, val = tiny_data
    assert biref(["train", "--data", str(train), "--val", str(val), "--out", str(tmp_path / "empty"),
                  "--resume", *TRAIN_ARGS]) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_train_checks_and_records_the_isotropy_weight(tiny_data, tmp_path, capsys):
    train, val = tiny_data
    common = ["train", "--data", str(train), "--val", str(val), "--epochs", "1", *TRAIN_ARGS]
    assert biref(common + ["--out", str(tmp_path / "bad"), "--isotropy-weight", "-1"]) == 1
    assert "isotropy_weight must be >= 0" in capsys.readouterr().err
    assert biref(common + ["--out", str(tmp_path / "run"), "--isotropy-weight", "3"]) == 0
    assert load_model(tmp_path / "run" / "best.h5").metadata["train_config"]["isotropy_weight"] == 3.0


def test_init_starts_from_a_model_file_and_records_it(tiny_data, tmp_path):
    train, val = tiny_data
    common = ["--data", str(train), "--val", str(val), "--lr", "1e-3", *TRAIN_ARGS]
    assert biref(["train", *common, "--out", str(tmp_path / "first"), "--epochs", "1"]) == 0
    first = load_model(tmp_path / "first" / "last.h5")
    # zero epochs of training: the new run's model must be the initial one, exactly
    from biref_sdk.training import TrainConfig, train as train_fn

    config = TrainConfig(epochs=1, learning_rate=1e-12, width="small", window_length=3, threads=1)
    train_fn(train, val, tmp_path / "second", config, progress=False, log=lambda *a: None,
             init=tmp_path / "first" / "last.h5")
    second = load_model(tmp_path / "second" / "last.h5")
    assert second.config == first.config  # taken from the model file, not from --width
    assert second.metadata["initialised_from"]["sha256"] == first.sha256
    recorded = second.metadata["train_config"]
    assert recorded["window_length"] == first.config.window_length != config.window_length
    assert recorded["normalization"] == first.config.normalization
    for name, value in first.network.state_dict().items():
        if value.dtype.is_floating_point and "running" not in name:
            torch.testing.assert_close(second.network.state_dict()[name], value, rtol=1e-6, atol=1e-6, msg=name)
    assert biref(["train", *common, "--out", str(tmp_path / "second"), "--resume",
                  "--init", str(tmp_path / "first" / "last.h5")]) == 1


def test_training_reduces_the_loss(tiny_data, tmp_path):
    from biref_sdk.training import TrainConfig, train

    train_file, val = tiny_data
    # the "tiny" width is too narrow to learn much; "small" learns these blocks in a few dozen steps
    config = TrainConfig(epochs=30, learning_rate=1e-3, batch_size=2, width="small", window_length=2, threads=1,
                         limit=2)
    history = train(train_file, val, tmp_path / "fit", config, progress=False, log=lambda *a: None)
    losses = [h["train"]["loss_ne"] + h["train"]["loss_no"] for h in history]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("init", ["new", "uncertainty-head"])
def test_ddp_with_two_gloo_processes(tiny_data, tmp_path, init):
    train, val = tiny_data
    out = tmp_path / "ddp"
    start = []
    if init == "uncertainty-head":
        # fine-tuning a distilled model: its uncertainty head has no loss here, and DDP refuses
        # parameters without gradients unless they are frozen
        config = config_for_geometry(tiny_geometry(), "tiny", window_length=2, normalization="none",
                                     uncertainty_head=True)
        torch.manual_seed(5)
        save_model(tmp_path / "distilled.h5", BirefNet(config).eval(), tiny_geometry())
        start = ["--init", str(tmp_path / "distilled.h5"), "--batch-size", "1"]  # DDP fails from step 2
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(__file__))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "biref_sdk", "train", "--data", str(train), "--val", str(val), "--out", str(out),
               "--epochs", "1", "--device", "cpu", "--lr", "1e-3", *TRAIN_ARGS, *start]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    history = json.loads((out / "history.json").read_text())
    assert history[0]["world_size"] == 2
    assert np.isfinite(history[0]["train"]["loss"])
    assert load_model(out / "best.h5").metadata["epoch"] == 1
    if start:
        before, after = (load_model(path).network.state_dict() for path in (tmp_path / "distilled.h5", out / "last.h5"))
        changed = {name for name in before if not torch.equal(before[name], after[name])}
        assert changed and not any(name.startswith("uncertainty.") for name in changed)
        assert any(name.startswith("decoder.") for name in changed), changed


def test_birefringent_q_loss_averages_over_voxels_with_a_director_only():
    from biref_sdk.network.config import NetworkConfig
    from biref_sdk.training.loop import losses

    config = NetworkConfig(n_views=4, hologram_shape=(32, 32), volume_shape=(2, 4, 4), window_length=2)
    truth_q = torch.zeros(1, 5, 2, 4, 4)
    truth_q[0, :, 0, :2, :2] = torch.arange(1.0, 6.0)[:, None, None]  # 4 of 32 voxels carry a director
    batch = {"ne": torch.full((1, 2, 4, 4), 1.55), "no": torch.full((1, 2, 4, 4), 1.545), "q": truth_q}
    outputs = (batch["ne"], batch["no"], torch.zeros_like(truth_q))  # Q = 0 everywhere
    per_voxel = float((torch.arange(1.0, 6.0) ** 2).mean())  # mean over the 5 components
    assert float(losses(outputs, batch, config, 1.0, "birefringent")["q"]) == pytest.approx(per_voxel)
    assert float(losses(outputs, batch, config, 1.0, "volume")["q"]) == pytest.approx(per_voxel * 4 / 32)
    exact = (batch["ne"], batch["no"], truth_q)
    assert float(losses(exact, batch, config, 1.0, "birefringent")["total"]) == 0.0
    with pytest.raises(ValueError, match="q_loss"):
        losses(outputs, batch, config, 1.0, "everywhere")


def test_isotropy_loss_weighs_the_birefringence_reported_where_the_truth_is_isotropic():
    from biref_sdk.network.config import NetworkConfig
    from biref_sdk.training.loop import losses

    config = NetworkConfig(n_views=4, hologram_shape=(32, 32), volume_shape=(2, 4, 4), window_length=2)
    span = config.index_max - config.index_min
    truth = {"ne": torch.full((1, 2, 4, 4), 1.55), "no": torch.full((1, 2, 4, 4), 1.55), "q": torch.zeros(1, 5, 2, 4, 4)}
    truth["ne"][0, 0] = 1.56  # the first slice birefringent (16 of 32 voxels), the second an isotropic particle
    truth["ne"][0, 1, 0], truth["no"][0, 1, 0] = config.index_min, config.index_min  # but for 4 voxels of medium
    q = torch.zeros(1, 5, 2, 4, 4)
    # both indices off by the same amount: no false birefringence, nothing added
    shifted = (truth["ne"] + 0.003, truth["no"] + 0.003, q)
    plain = losses(shifted, truth, config, 1.0)
    weighted = losses(shifted, truth, config, 1.0, isotropy_weight=5.0)
    assert float(weighted["false_birefringence"]) == 0.0
    assert float(weighted["total"]) == pytest.approx(float(plain["total"]))
    # n_e up by 0.004 everywhere: false birefringence in the particle's 12 voxels only
    raised = (truth["ne"] + 0.004, truth["no"], q)
    weighted = losses(raised, truth, config, 1.0, isotropy_weight=5.0)
    assert float(weighted["false_birefringence"]) == pytest.approx(12 / 32 * (0.004 / span) ** 2, rel=1e-3)
    assert float(weighted["total"]) == pytest.approx((0.004 / span) ** 2 * (1 + 5.0 * 12 / 32), rel=1e-3)
    assert "false_birefringence" not in losses(raised, truth, config, 1.0)



def test_init_with_the_formula_prior_starts_from_the_initial_models_answers(tiny_data, tmp_path):
    from biref_sdk.training import TrainConfig, train as train_fn
    from biref_sdk.training.data import HologramDataset

    train, val = tiny_data
    common = ["--data", str(train), "--val", str(val), "--lr", "1e-3", "--epochs", "1", *TRAIN_ARGS]
    assert biref(["train", *common, "--out", str(tmp_path / "plain"), "--normalization", "none"]) == 0
    plain = load_model(tmp_path / "plain" / "last.h5")
    config = TrainConfig(epochs=1, learning_rate=1e-12, prior="formula", threads=1)
    train_fn(train, val, tmp_path / "prior", config, progress=False, log=lambda *a: None,
             init=tmp_path / "plain" / "last.h5")
    widened = load_model(tmp_path / "prior" / "last.h5")
    assert widened.config == with_prior_options(plain.config.replace(prior="formula"))
    assert widened.metadata["train_config"]["prior"] == "formula"
    item = HologramDataset(val, widened.config)[0]
    assert item["prior"].shape == (7, *widened.config.volume_shape)
    with torch.no_grad():
        before = plain.network(item["windows"][None])
        after = widened.network(item["windows"][None], item["prior"][None])
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # a model with a prior keeps it when none is named, and cannot drop it
    train_fn(train, val, tmp_path / "again", TrainConfig(epochs=1, learning_rate=1e-12, threads=1), progress=False,
             log=lambda *a: None, init=tmp_path / "prior" / "last.h5")
    again = load_model(tmp_path / "again" / "last.h5")
    assert again.config.prior == "formula" and again.metadata["train_config"]["prior"] == "formula"
    with pytest.raises(ValueError, match="cannot change"):
        train_fn(train, val, tmp_path / "dropped", TrainConfig(epochs=1, prior="none", threads=1), progress=False,
                 log=lambda *a: None, init=tmp_path / "prior" / "last.h5")


def test_priors_kept_on_disk_are_reused_and_keyed_by_the_options(tiny_data, tmp_path):
    from biref_sdk.network.config import config_for_geometry
    from biref_sdk.training.data import HologramDataset

    train = tiny_data[0]
    config = with_prior_options(config_for_geometry(tiny_geometry(), "tiny", window_length=2, prior="formula"))
    first = HologramDataset(train, config, cache_dir=tmp_path / "priors")
    prior = first.prior(1)
    assert sorted(p.name for p in first.prior_folder.iterdir()) == ["000001.pt"]
    second = HologramDataset(train, config, cache_dir=tmp_path / "priors")
    second._formula = "must not be used"  # a cached prior is read, not recomputed
    torch.testing.assert_close(second.prior(1), prior, rtol=0, atol=0)
    other = HologramDataset(train, config.replace(prior_options={**config.prior_options, "shrinkage": 0.0}),
                            cache_dir=tmp_path / "priors")
    assert other.prior_folder != first.prior_folder


def test_inputs_kept_on_disk_are_reused_not_held_in_memory(tmp_path):
    from biref_sdk.network.config import config_for_geometry
    from biref_sdk.training.data import HologramDataset

    write_tiny_dataset(tmp_path / "a.h5", 2, seed=0, n_views=9)
    config = config_for_geometry(tiny_geometry(n_views=9), "tiny", window_length=2)
    first = HologramDataset(tmp_path / "a.h5", config, cache_dir=tmp_path / "cache", augment=True)
    inputs = first._inputs(1)
    assert sorted(p.name for p in first.input_folder.iterdir()) == ["000001.pt"]
    assert first._cache == {}  # on disk only: memory stays bounded whatever the data set's size
    second = HologramDataset(tmp_path / "a.h5", config, cache_dir=tmp_path / "cache", augment=True)
    second.file = None  # a cached input is read from the cache, not demodulated from the file again
    torch.testing.assert_close(second._inputs(1), inputs, rtol=0, atol=0)
    windows = HologramDataset(tmp_path / "a.h5", config, cache_dir=tmp_path / "cache", augment=False)
    assert windows.input_folder != first.input_folder  # windows, not per-view inputs: another key


def test_quarter_turn_augmentation_and_several_training_files(tmp_path):
    from biref_sdk.training.data import HologramDataset
    from biref_sdk.network.config import config_for_geometry

    for name, seed in (("a", 0), ("b", 1), ("val", 2)):  # 9 views: a ring of 8 maps onto itself
        write_tiny_dataset(tmp_path / f"{name}.h5", 2 if name != "val" else 1, seed=seed, n_views=9)
    assert biref(["train", "--data", str(tmp_path / "a.h5"), "--data", str(tmp_path / "b.h5"),
                  "--val", str(tmp_path / "val.h5"), "--out", str(tmp_path / "run"), "--epochs", "1",
                  "--augment", "quarter-turns", *TRAIN_ARGS]) == 0
    model = load_model(tmp_path / "run" / "last.h5")
    assert model.metadata["train_data"] == [str(tmp_path / "a.h5"), str(tmp_path / "b.h5")]
    assert model.metadata["train_config"]["augment"] == "quarter-turns"
    assert json.loads((tmp_path / "run" / "history.json").read_text())[0]["train"]["loss"] > 0

    # an item is its per-view inputs turned, then window-averaged; the turns are drawn at random
    config = config_for_geometry(tiny_geometry(9), "tiny", window_length=2)
    plain = HologramDataset(tmp_path / "a.h5", config)
    augmented = HologramDataset(tmp_path / "a.h5", config, augment=True)
    # the same windows (float16 per view against float16 per window)
    torch.testing.assert_close(augmented.windows(1), plain.windows(1), atol=1e-3, rtol=0)
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        item = augmented[1]
        torch.manual_seed(seed)
        turns = int(torch.randint(4, ()))
        views, expected = augmented.turns(augmented._inputs(1), plain[1], turns)
        torch.testing.assert_close(item["windows"], augmented.preprocessor.window_mean(views), atol=0, rtol=0)
        torch.testing.assert_close(item["ne"], expected["ne"], atol=0, rtol=0)
        seen.add(turns)
    assert len(seen) > 1


def test_quarter_turns_need_a_symmetric_illumination_ring(tiny_data, tmp_path, capsys):
    train, val = tiny_data  # 7 views: a ring of 6 at 60 degrees
    assert biref(["train", "--data", str(train), "--val", str(val), "--out", str(tmp_path / "run"), "--epochs", "1",
                  "--augment", "quarter-turns", *TRAIN_ARGS]) != 0
    assert "does not map onto itself under a quarter turn" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; no GPU on this machine")
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_training_on_cuda_follows_the_cpu(tiny_data, tmp_path, amp):
    """The same epoch on both devices: fp32 gives the CPU's losses (up to TF32 convolutions), mixed
    precision a finite loss and a model that loads and runs on the CPU."""
    train, val = tiny_data
    common = ["--data", str(train), "--val", str(val), "--lr", "1e-3", "--seed", "3", "--epochs", "1", *TRAIN_ARGS]
    assert biref(["train", *common, "--out", str(tmp_path / "cpu"), "--device", "cpu"]) == 0
    assert biref(["train", *common, "--out", str(tmp_path / "cuda"), "--device", "cuda",
                  *([] if amp else ["--no-amp"])]) == 0
    cpu, cuda = (json.loads((tmp_path / run / "history.json").read_text())[0] for run in ("cpu", "cuda"))
    assert np.isfinite(cuda["train"]["loss"]) and np.isfinite(cuda["val"]["psnr_ne"])
    if not amp:
        assert cuda["train"]["loss"] == pytest.approx(cpu["train"]["loss"], rel=0.02)
        assert cuda["val"]["psnr_ne"] == pytest.approx(cpu["val"]["psnr_ne"], abs=0.2)
    model = load_model(tmp_path / "cuda" / "last.h5")
    assert next(model.network.parameters()).device.type == "cpu"


def test_blend_interpolates_a_model_and_its_fine_tuned_copy(tiny_data, tmp_path, capsys):
    train, val = tiny_data
    common = ["--data", str(train), "--val", str(val), "--epochs", "1", "--lr", "1e-3", *TRAIN_ARGS]
    assert biref(["train", *common, "--out", str(tmp_path / "base")]) == 0
    base = str(tmp_path / "base" / "last.h5")
    assert biref(["train", *common, "--out", str(tmp_path / "tuned"), "--init", base, "--seed", "1"]) == 0
    tuned = str(tmp_path / "tuned" / "last.h5")
    weights = {}
    for alpha in (0.0, 0.25, 1.0):
        out = tmp_path / f"blend{alpha}.h5"
        assert biref(["blend", "--base", base, "--tuned", tuned, "--alpha", str(alpha), "--out", str(out)]) == 0
        model = load_model(out)
        assert model.metadata["weight_blend"]["alpha"] == alpha
        weights[alpha] = model.network.state_dict()
    start, end = load_model(base).network.state_dict(), load_model(tuned).network.state_dict()
    assert any(not torch.equal(start[k], end[k]) for k in start)
    for name in (name for name in start if start[name].is_floating_point()):  # not BatchNorm's step count
        torch.testing.assert_close(weights[0.0][name], start[name], rtol=0, atol=0)
        torch.testing.assert_close(weights[1.0][name], end[name], rtol=0, atol=0)
        torch.testing.assert_close(weights[0.25][name], 0.75 * start[name] + 0.25 * end[name])
    other = tmp_path / "other"
    assert biref(["train", *common, "--out", str(other), "--normalization", "none"]) == 0
    capsys.readouterr()
    assert biref(["blend", "--base", base, "--tuned", str(other / "last.h5"), "--alpha", "0.5",
                  "--out", str(tmp_path / "x.h5")]) != 0
    assert "different network configurations" in capsys.readouterr().err
    assert biref(["blend", "--base", base, "--tuned", tuned, "--alpha", "1.5", "--out", str(tmp_path / "y.h5")]) != 0
