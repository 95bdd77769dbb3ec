"""Triton kernels for the GPU: the fused Sinkhorn + clustering loss and the fused RoPE.

Each module says when it is used (``available``) and is checked against the plain PyTorch form it replaces
(tests/test_fused_clustering.py, tests/test_fused_rope.py). The model and the losses call them; they import
nothing from the model.
"""
