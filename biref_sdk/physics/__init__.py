"""Wave propagation through anisotropic samples, and the optics every view shares (``frames``)."""
from .frames import ViewWavevectors, input_coefficients, polarization_basis, quadratic_form_rows, transverse_matrix
from .propagation import MultiSlice

__all__ = ["MultiSlice", "ViewWavevectors", "input_coefficients", "polarization_basis", "quadratic_form_rows",
           "transverse_matrix"]
