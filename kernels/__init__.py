"""Fused attention: performance code. Each computes attention.causal_attention's function, proven
equal to it in tests/test_attention.py; attention.py chooses among them (`attention="auto"`).

    flash.py    FlashAttention-2 in jnp ops with its own backward pass (CPUs, GPUs)
    splash.py   the Pallas TPU kernel (interpret mode on CPUs)
    cudnn.py    cuDNN's kernel (NVIDIA GPUs)
"""
