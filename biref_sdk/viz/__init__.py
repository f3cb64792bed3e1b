"""What scientists look at: slice figures as the paper's Fig. 2a (:mod:`.slices`), a 3D view and a
360-degree video (:mod:`.view3d`), and a self-contained HTML report (:mod:`.report`).

Importing this package is light: matplotlib (extra ``[viz]``) and pyvista (extra ``[viz3d]``) load
inside the functions that draw.
"""
from __future__ import annotations

from .slices import compare_figure, largest_droplet_centre, slices_figure, volume_figure

__all__ = ["compare_figure", "largest_droplet_centre", "slices_figure", "volume_figure"]
