"""Figures, 3D view, video and report: their content, drawn headless from known volumes."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from biref_sdk.files import Volume, write_volume

pytest.importorskip("matplotlib", reason="figures need the [viz] extra")

SHAPE = (24, 32, 40)                 # z, y, x: distinct, so a transposed plane fails
VOXEL_M = (100e-9, 50e-9, 50e-9)     # z voxels twice as large, as the small preset


def droplet_volume(director=(1.0, 0.0, 0.0), centre=(12, 14, 22), radius=7, ne=1.566, no=1.548) -> Volume:
    """A ball (radius in y/x voxels; z radius halved, so it is round in µm) with a uniform director."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    inside = ((z - centre[0]) * 2) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius ** 2
    d = np.asarray(director, dtype=np.float32)
    d = d / np.linalg.norm(d)
    ne_map = np.where(inside, ne, 1.54).astype(np.float32)
    no_map = np.where(inside, no, 1.54).astype(np.float32)
    return Volume(ne_map, no_map, np.broadcast_to(d.reshape(3, 1, 1, 1), (3, *SHAPE)).copy(), VOXEL_M, 1.54)


def test_largest_droplet_centre_picks_the_larger_droplet():
    from biref_sdk.viz import largest_droplet_centre

    big = droplet_volume(centre=(12, 14, 22), radius=7)
    small = droplet_volume(centre=(5, 26, 6), radius=3)
    both = Volume(np.maximum(big.ne, small.ne), np.minimum(big.no, small.no), big.director, VOXEL_M, 1.54)
    assert largest_droplet_centre(both) == (12, 14, 22)


def _axes(fig, title):
    return next(ax for ax in fig.axes if ax.get_title() == title)


@pytest.mark.parametrize("plane, expected", [("xy", (1.0, 1.0)), ("zy", (0.0, 1.0)), ("xz", (1.0, 0.0))])
def test_director_segments_follow_a_uniform_director(plane, expected):
    """Director (1, 1, 0)/√2: in xy the segments run at 45°, in zy along y, in xz along x; sign-free
    (centred on their voxel) and the same length in µm along both axes (true aspect)."""
    from matplotlib.collections import LineCollection

    from biref_sdk.viz import volume_figure

    fig = volume_figure(droplet_volume(director=(1, 1, 0)))
    ax = _axes(fig, f"Δn, {plane}")
    lines = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert len(lines) == 1
    segments = np.asarray(lines[0].get_segments())
    assert len(segments) >= 4
    direction = segments[:, 1] - segments[:, 0]
    unit = np.asarray(expected) / np.linalg.norm(expected)
    cosine = np.abs(direction @ unit) / np.linalg.norm(direction, axis=1)
    np.testing.assert_allclose(cosine, 1.0, atol=1e-6)
    # in-plane projection length: |(1,1)|/√2 = 1 in xy, 1/√2 in the others
    lengths = np.linalg.norm(direction, axis=1)
    assert lengths.max() / lengths.min() == pytest.approx(1.0, abs=1e-6)
    # 0.9 x the spacing (longer side / 12: xy 2.0 µm, zy and xz 2.4 µm) x the in-plane projection
    expected_length = {"xy": 0.9 * 2.0 / 12, "zy": 0.9 * 2.4 / 12 / np.sqrt(2), "xz": 0.9 * 2.4 / 12 / np.sqrt(2)}
    assert lengths[0] == pytest.approx(expected_length[plane], rel=1e-6)
    # every segment sits inside the droplet: its centre is on a birefringent pixel
    image = ax.get_images()[0]
    left, right, bottom, top = image.get_extent()
    data = image.get_array()
    centres = segments.mean(axis=1)
    cols = ((centres[:, 0] - left) / (right - left) * data.shape[1]).astype(int)
    rows = ((centres[:, 1] - bottom) / (top - bottom) * data.shape[0]).astype(int)
    assert np.all(data[rows, cols] > 0.01)


def test_panels_have_the_true_aspect_and_the_colour_scale_spans_the_data():
    from biref_sdk.viz import volume_figure

    volume = droplet_volume()
    fig = volume_figure(volume)
    Z, Y, X = SHAPE
    for plane, (width_um, height_um) in {"xy": (X * 0.05, Y * 0.05), "zy": (Z * 0.1, Y * 0.05),
                                         "xz": (X * 0.05, Z * 0.1)}.items():
        image = _axes(fig, f"n_e, {plane}").get_images()[0]
        left, right, bottom, top = image.get_extent()
        assert (right - left, top - bottom) == pytest.approx((width_um, height_um))
        assert _axes(fig, f"n_e, {plane}").get_aspect() == 1.0
    ne_image = _axes(fig, "n_e, xy").get_images()[0]
    assert ne_image.get_clim() == pytest.approx((1.54, 1.566), abs=1e-6)   # n_e and n_o share the index scale
    assert _axes(fig, "n_o, zy").get_images()[0].get_clim() == pytest.approx((1.54, 1.566), abs=1e-6)
    assert _axes(fig, "Δn, xz").get_images()[0].get_clim() == pytest.approx((0.0, 0.018), abs=1e-6)
    bars = [ax for ax in fig.axes if "refractive index" in ax.get_ylabel()]
    assert len(bars) == 3


def _text_boxes(fig):
    """(text, window box) of every label drawn: titles, axis labels, tick labels inside the view."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = list({id(t): t for t in [*fig.texts, fig._suptitle] if t is not None}.values())
    for ax in fig.axes:
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label]
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            texts += [tick.label1 for tick in axis.get_major_ticks()
                      if lo - 1e-9 <= tick.get_loc() <= hi + 1e-9 and tick.label1.get_visible()]
    boxes = []
    for text in texts:
        if text.get_visible() and text.get_text().strip():
            boxes.append((text.get_text(), text.get_window_extent(renderer)))
    return boxes


@pytest.mark.parametrize("kind", ["volume", "compare"])
def test_no_labels_overlap(kind):
    from biref_sdk.viz import compare_figure, volume_figure

    truth = droplet_volume()
    other = droplet_volume(director=(0, 1, 1), radius=6)
    fig = volume_figure(truth, title="a title") if kind == "volume" else \
        compare_figure([("truth", truth), ("model", other), ("formula", droplet_volume(radius=5))], title="t")
    boxes = _text_boxes(fig)
    assert len(boxes) > 50
    overlaps = [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:]
                if box_a.shrunk(0.9, 0.9).overlaps(box_b.shrunk(0.9, 0.9))]
    assert not overlaps, overlaps[:5]


def test_compare_shares_one_scale_and_draws_differences():
    from biref_sdk.viz import compare_figure

    truth = droplet_volume(ne=1.566)
    other = droplet_volume(ne=1.560, no=1.545)
    fig = compare_figure([("truth", truth), ("model", other)])
    for label in ("truth", "model"):
        assert _axes(fig, f"{label}: n_e, xy").get_images()[0].get_clim() == pytest.approx((1.54, 1.566), abs=1e-6)
    diff = next(ax for ax in fig.axes if ax.get_title() == "model − truth")
    data = diff.get_images()[0].get_array()
    assert data.min() == pytest.approx(-0.006, abs=1e-6)          # n_e, xy: 1.560 − 1.566 inside
    assert diff.get_images()[0].get_clim() == pytest.approx((-0.006, 0.006), abs=1e-6)


def test_render_cli_draws_figure_and_compare(tmp_path):
    truth, other = tmp_path / "truth.h5", tmp_path / "other.h5"
    write_volume(truth, droplet_volume())
    write_volume(other, droplet_volume(ne=1.56))
    run = [sys.executable, "-m", "biref_sdk", "render"]
    done = subprocess.run([*run, str(truth), "--out", str(tmp_path / "fig.png"), "--planes", "12,14,22"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([*run, "--compare", str(truth), str(other), "--labels", "truth", "other",
                           "--out", str(tmp_path / "cmp.png")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    from matplotlib.image import imread

    for name in ("fig.png", "cmp.png"):
        image = imread(tmp_path / name)
        assert image.shape[0] > 500 and image.std() > 0.05
    bad = subprocess.run([*run, str(truth), "--out", str(tmp_path / "x.png"), "--planes", "99,0,0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "outside the volume" in bad.stderr and "Traceback" not in bad.stderr


def test_viz_libraries_stay_out_of_import_biref_sdk():
    code = ("import sys, biref_sdk, biref_sdk.viz, biref_sdk.napari; "
            "print(sorted(m for m in ('matplotlib', 'pyvista', 'vtk', 'napari', 'qtpy', 'PyQt6') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --- 3D view and video ------------------------------------------------------------------------------

def _pyvista_or_skip():
    pv = pytest.importorskip("pyvista", reason="the 3D view needs the [viz3d] extra")
    try:
        plotter = pv.Plotter(off_screen=True, window_size=[64, 64])
        plotter.screenshot(return_img=True)
        plotter.close()
    except Exception as error:  # no EGL/OSMesa/X: nothing can render here
        pytest.skip(f"VTK cannot render off screen here: {error}")
    return pv


def test_director_glyphs_follow_a_uniform_director():
    from biref_sdk.viz.view3d import director_glyphs

    d = np.array([1.0, 2.0, 2.0]) / 3
    starts, ends = director_glyphs(droplet_volume(director=d))
    assert len(starts) >= 4
    direction = ends - starts
    np.testing.assert_allclose(direction / np.linalg.norm(direction, axis=1, keepdims=True), np.tile(d, (len(d), 1))[:1]
                               .repeat(len(direction), 0), atol=1e-6)
    centres = (starts + ends) / 2  # sign-free: centred on the droplet's voxels (µm, formats.md centres)
    assert np.all(np.linalg.norm((centres - [22 * 0.05 - 1.0, 14 * 0.05 - 0.8, 12 * 0.1 - 1.2]) /
                                 [0.35, 0.35, 0.35], axis=1) <= 1.0 + 1e-6)


def test_3d_view_shows_red_glyphs_over_the_droplet(tmp_path):
    _pyvista_or_skip()
    from matplotlib.image import imread

    from biref_sdk.viz.view3d import render_3d

    path = render_3d(droplet_volume(), tmp_path / "view.png", title="droplet")
    image = (imread(path)[..., :3] * 255).astype(int)
    red = (image[..., 0] > 180) & (image[..., 1] < 80) & (image[..., 2] < 80)
    blue = (image[..., 2] > image[..., 0] + 20)  # the translucent isosurface over white
    assert red.sum() > 200 and blue.sum() > 2000
    empty = render_3d(Volume(np.full(SHAPE, 1.54), np.full(SHAPE, 1.54), np.zeros((3, *SHAPE)), VOXEL_M, 1.54),
                      tmp_path / "empty.png")
    image = (imread(empty)[..., :3] * 255).astype(int)
    assert ((image[..., 0] > 180) & (image[..., 1] < 80)).sum() == 0  # nothing birefringent: no glyph


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_video_has_the_requested_frames_and_turns(tmp_path, suffix):
    _pyvista_or_skip()
    if suffix == ".mp4":
        pytest.importorskip("imageio_ffmpeg", reason="mp4 needs imageio-ffmpeg ([viz3d])")
    import imageio.v2 as imageio

    from biref_sdk.viz.view3d import rotation_video

    path = rotation_video(droplet_volume(director=(1, 0, 0)), tmp_path / f"turn{suffix}", frames=8, fps=8)
    reader = imageio.get_reader(path)
    frames = [np.asarray(f, dtype=float) for f in reader]
    assert len(frames) == 8
    # the camera turns: successive frames differ, and a quarter turn differs more than noise
    steps = [np.abs(frames[i + 1] - frames[i]).mean() for i in range(7)]
    assert min(steps) > 1.0


def test_render_cli_writes_3d_view_and_video(tmp_path):
    _pyvista_or_skip()
    volume = tmp_path / "v.h5"
    write_volume(volume, droplet_volume())
    done = subprocess.run([sys.executable, "-m", "biref_sdk", "render", str(volume), "--view3d",
                           str(tmp_path / "v3d.png"), "--video", str(tmp_path / "v.gif"), "--frames", "4"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "4 frames" in done.stdout and (tmp_path / "v3d.png").stat().st_size > 10_000


# --- report -------------------------------------------------------------------------------------------

class _Offset:
    """A reconstruction that is the truth with n_e raised by ``offset``: PSNR n_e is known in closed
    form, 20 log10(255 / (offset * 255 / 0.03)); n_o is exact (PSNR ∞)."""

    def __init__(self, offset: float) -> None:
        self.name = f"offset {offset}"
        self.offset = offset

    def reconstruct(self, acquisition):
        t = acquisition.truth
        return Volume(t.ne + self.offset, t.no, t.director, t.voxel_size_m, t.medium_index)


def test_report_has_the_tables_with_measured_numbers_and_embedded_figures(tmp_path):
    import dataclasses
    import re

    from biref_sdk.files import DatasetWriter
    from biref_sdk.geometry import preset
    from biref_sdk.viz.report import build_report, write_report

    geometry = dataclasses.replace(preset("small"), volume_shape=SHAPE, voxel_size_m=VOXEL_M)
    frames = np.zeros((2, geometry.n_views, *geometry.hologram_shape), np.uint16)
    dataset = tmp_path / "set.h5"
    with DatasetWriter(dataset, geometry, 3, frames, {}) as writer:
        for i in range(3):
            writer.write(i, frames, droplet_volume(centre=(12, 14, 16 + 2 * i), ne=1.56))  # + 0.006 stays < 1.57
    card = tmp_path / "card"
    card.mkdir()
    from matplotlib.image import imsave

    imsave(card / "loss_curve.png", np.random.default_rng(0).random((20, 30)))
    report = build_report(dataset, {"small": _Offset(0.003), "large": _Offset(0.006)}, {"small": "cpu"},
                          limit=None, n_figures=2, model_card_dir=card)
    page = write_report(report, tmp_path / "r.html").read_text()
    table1 = page[page.index("Table 1"):page.index("Table 2")]
    rows = re.findall(r"<tr><td>(\w+)</td><td>([\d.]+)</td><td>(.*?)</td>", table1)
    assert rows == [("small", "20.00", "∞"), ("large", "13.98", "∞")]  # 20 log10(10), 20 log10(5)
    table2 = page[page.index("Table 2"):]
    times = re.findall(r"<tr><td>(\w+)</td><td>([\w ]+)</td><td>([\d.]+)</td><td>([\d.]+)</td><td>([\d.]+)</td>"
                       r"<td>3</td></tr>", table2)
    assert [t[:2] for t in times] == [("small", "cpu"), ("large", "large")]
    assert page.count('src="data:image/png;base64,') == 3      # the loss curve and two samples
    assert 'src="http' not in page and "<link" not in page and "<script" not in page  # self-contained


def test_report_cli_fails_clearly_without_the_data_set(tmp_path):
    done = subprocess.run([sys.executable, "-m", "biref_sdk", "report", str(tmp_path / "none.h5"), "--out",
                           str(tmp_path / "r.html"), "--method", "formula"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "no such file" in done.stderr and "Traceback" not in done.stderr


def test_report_cli_on_a_simulated_data_set(tmp_path):
    import re

    data = tmp_path / "data.h5"
    done = subprocess.run([sys.executable, "-m", "biref_sdk", "simulate", "--preset", "small", "--n", "1", "--seed",
                           "7", "--out", str(data)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "biref_sdk", "report", str(data), "--method", "formula",
                           "--figures", "1", "--out", str(tmp_path / "r.html")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "r.html").read_text()
    psnr_ne, psnr_no = (float(v) for v in re.search(r"<tr><td>formula</td><td>([\d.]+)</td><td>([\d.]+)</td>",
                                                    page).groups())
    assert 15 < psnr_ne < 40 and 15 < psnr_no < 45      # the formula method's range (model card: 22.75 / 29.92)
    assert re.search(r"<tr><td>formula</td><td>formula on cpu</td><td>[\d.]+</td>", page)
    assert page.count('src="data:image/png;base64,') == 2   # the shipped model's loss curve and the sample
