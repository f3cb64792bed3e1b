"""Wave propagation through anisotropic samples."""
from .propagation import MultiSlice, input_coefficients, polarization_basis, transverse_matrix

__all__ = ["MultiSlice", "input_coefficients", "polarization_basis", "transverse_matrix"]
