"""Drop-in fused modules and fused forwards for the model's modules (used by `use_fused_kernels`).

Each fused forward uses only attributes that both our reference modules and the published ones have
(parameters, `tile_inference`, `is_first_chunk`, ...), so it can be bound onto an existing instance.
"""
