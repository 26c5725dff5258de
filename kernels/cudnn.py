"""cuDNN's fused attention kernel on NVIDIA GPUs (jax.nn.dot_product_attention): performance code.
It takes no segment ids, so it cannot keep attention inside packed documents (document_mask). It
computes attention.causal_attention's function (tests/test_attention.py, bench/gpu.py on a GPU).
"""
import math

import jax


def cudnn_attention(q, k, v):
    """Causal grouped-query attention through cuDNN's fused kernel (NVIDIA GPUs only)."""
    return jax.nn.dot_product_attention(q, k, v, scale=1 / math.sqrt(q.shape[-1]), is_causal=True,
                                        implementation="cudnn")
