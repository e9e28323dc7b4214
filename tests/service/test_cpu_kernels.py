"""The engine plugin's fused Gemma RMSNorm gives vLLM's native result: exactly up to float rounding in fp32,
within two bf16 steps in bf16, on plain rows, on the (tokens, heads, head_dim) views q_norm gets, and with a
residual; the plugin installs it, and switches it and the rotary embedding on, unless
LOREC_ENGINE_OPS=native."""

from __future__ import annotations

import pytest
import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.layernorm import GemmaRMSNorm
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase

from service import cpu_kernels
from service.processes import OPS_ENV

HIDDEN, HEADS, HEAD_DIM = 640, 4, 256


def gemma_norm(size: int, seed: int) -> GemmaRMSNorm:
    with set_current_vllm_config(VllmConfig()):
        norm = GemmaRMSNorm(size, eps=1e-6)
    norm.weight.data = torch.randn(size, generator=torch.Generator().manual_seed(seed)) * 0.7
    return norm


def inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)


def assert_close(fused: torch.Tensor, native: torch.Tensor) -> None:
    assert fused.dtype == native.dtype and fused.shape == native.shape
    if native.dtype == torch.float32:
        torch.testing.assert_close(fused, native, rtol=1e-5, atol=1e-5)
    else:  # (1 + w) rounded to bf16 once, and (with a residual) the norm of the rounded sum, as the model
        # (transformers) computes it, where vLLM's native op normalizes the unrounded one: two bf16 steps at most
        step = native.float().abs() * 2.0 ** -6 + 1e-3
        assert bool(((fused.float() - native.float()).abs() <= step).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_equal_native(dtype):
    norm, x = gemma_norm(HIDDEN, 0), inputs((37, HIDDEN), dtype, 1)
    assert_close(cpu_kernels.fused_gemma_rms_norm(norm, x.clone()), norm.forward_native(x.clone()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_views_of_a_split_equal_native(dtype):
    """q_norm's input: the q part of the fused qkv output, unflattened per head (not contiguous)."""
    norm = gemma_norm(HEAD_DIM, 2)
    qkv = inputs((29, HEADS * HEAD_DIM + 2 * HEAD_DIM), dtype, 3)
    q = qkv[:, : HEADS * HEAD_DIM].unflatten(-1, (HEADS, HEAD_DIM))
    assert not q.is_contiguous()
    assert_close(cpu_kernels.fused_gemma_rms_norm(norm, q), norm.forward_native(q))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_equal_native(dtype):
    norm, x, residual = gemma_norm(HIDDEN, 4), inputs((23, HIDDEN), dtype, 5), inputs((23, HIDDEN), dtype, 6)
    native_out, native_residual = norm.forward_native(x.clone(), residual.clone())
    fused_out, fused_residual = cpu_kernels.fused_gemma_rms_norm(norm, x.clone(), residual.clone())
    torch.testing.assert_close(fused_residual, native_residual, rtol=0, atol=0)  # the sum, rounded once
    assert_close(fused_out, native_out)


def test_weight_copy_follows_the_dtype():
    norm = gemma_norm(HIDDEN, 7)
    assert cpu_kernels.one_plus_weight(norm, torch.bfloat16).dtype == torch.bfloat16
    scale = cpu_kernels.one_plus_weight(norm, torch.float32)
    torch.testing.assert_close(scale, norm.weight.data + 1.0, rtol=0, atol=0)
    assert cpu_kernels.one_plus_weight(norm, torch.float32) is scale  # made once


@pytest.mark.parametrize("setting, installed", [("fused", True), ("native", False)])
def test_install_follows_the_setting(monkeypatch, setting, installed):
    for op in (GemmaRMSNorm, RotaryEmbeddingBase):  # restored after the test
        monkeypatch.setattr(op, "forward_cpu", op.forward_cpu)
        monkeypatch.setattr(op, "enabled", op.enabled)
    monkeypatch.setenv(OPS_ENV, setting)
    with set_current_vllm_config(VllmConfig()):
        cpu_kernels.install_fused_ops()
        assert (GemmaRMSNorm.forward_cpu is cpu_kernels.fused_gemma_rms_norm) == installed
        assert GemmaRMSNorm.enabled() == RotaryEmbeddingBase.enabled() == installed  # off in a default config
