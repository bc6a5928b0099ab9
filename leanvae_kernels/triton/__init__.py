"""Triton kernels and their launchers. Imported lazily: `import leanvae_kernels` never imports triton."""
