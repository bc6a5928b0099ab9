"""Triton kernels and their launchers. Imported lazily: `import leanvae_kernels` never imports triton."""
from .._triton import _import

_import()  # under TRITON_INTERPRET=1 this also fixes the interpreter's mask dtypes (see _triton.py)
