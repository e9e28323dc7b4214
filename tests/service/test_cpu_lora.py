"""The engine plugin's LoRA ops equal vLLM's own torch ops on random tensors: prefill segments and
decode tokens, one adapter, several adapters mixed in one batch, and tokens without an adapter."""

from __future__ import annotations

import pytest
import torch
from vllm.lora.ops import torch_ops as vllm_ops
from vllm.lora.punica_wrapper.utils import compute_meta

from service import cpu_lora
from service.processes import EXACT_LOGITS_ENV

SLOTS, RANK, HIDDEN, OUT = 4, 8, 64, 96


def weights(seed: int, empty_last: bool = True):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(SLOTS, 1, RANK, HIDDEN, generator=g).to(torch.bfloat16)
    b = torch.randn(SLOTS, 1, OUT, RANK, generator=g).to(torch.bfloat16)
    if empty_last:  # vLLM's torch ops read slot -1 as the last slot; an empty last slot makes that a no-op
        a[-1], b[-1] = 0, 0
    return a, b


def token_slots(kind: str) -> torch.Tensor:
    per_sequence = {"one": [0, 0, 0], "mixed": [0, 2, 1, 0], "with_base": [-1, 1, -1, 2], "none": [-1, -1]}[kind]
    lengths = [5, 11, 3, 7][: len(per_sequence)]
    return torch.repeat_interleave(torch.tensor(per_sequence), torch.tensor(lengths))


def lora_apply(ops, x, a, b, tokens, y0, scale=2.0, prefill=True):
    """What the CPU punica wrapper does for one LoRA linear: shrink into a float32 buffer, expand."""
    buffer, y = torch.zeros(x.shape[0], RANK, dtype=torch.float32), y0.clone()
    if prefill:
        starts, lengths, slots, batches, max_len, n, _ = compute_meta(tokens)
        ops.sgmv_shrink(x, a, buffer, starts, lengths, slots, batches, max_len, n, scale)
        ops.sgmv_expand_slice(buffer, b, y, starts, lengths, slots, batches, max_len, n, 8, OUT, True)
    else:
        ops.bgmv_shrink(x, a, buffer, tokens, scale)
        ops.bgmv_expand_slice(buffer, b, y, tokens, 8, OUT, True)
    return y


@pytest.mark.parametrize("prefill", [True, False], ids=["prefill", "decode"])
@pytest.mark.parametrize("kind", ["one", "mixed", "with_base", "none"])
def test_plugin_ops_equal_vllm_ops(kind, prefill):
    tokens = token_slots(kind)
    a, b = weights(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(tokens), HIDDEN, generator=g).to(torch.bfloat16)
    y0 = torch.randn(len(tokens), OUT + 16, generator=g).to(torch.bfloat16)
    ours = lora_apply(cpu_lora, x, a, b, tokens, y0, prefill=prefill)
    theirs = lora_apply(vllm_ops, x, a, b, tokens, y0, prefill=prefill)
    torch.testing.assert_close(ours, theirs, atol=0.07, rtol=0.02)
    if kind != "none":
        assert (ours - y0).abs().max() > 1, "the adapter term is missing"
    base_rows = tokens < 0
    assert torch.equal(ours[base_rows], y0[base_rows]), "tokens without an adapter must be left unchanged"


def test_tokens_without_adapter_ignore_a_loaded_last_slot():
    """Where vLLM's torch ops apply the last slot's weights to tokens without an adapter, ours do not."""
    tokens = token_slots("with_base")
    a, b = weights(0, empty_last=False)
    x = torch.randn(len(tokens), HIDDEN).to(torch.bfloat16)
    y0 = torch.zeros(len(tokens), OUT + 16, dtype=torch.bfloat16)
    base_rows = tokens < 0
    assert torch.equal(lora_apply(cpu_lora, x, a, b, tokens, y0)[base_rows], y0[base_rows])
    assert not torch.equal(lora_apply(vllm_ops, x, a, b, tokens, y0)[base_rows], y0[base_rows])


def test_expand_without_slice_and_broadcast_row():
    """sgmv_expand / bgmv_expand (embedding path): overwrite and add, output padded wider than the adapter."""
    tokens = token_slots("mixed")
    _, b = weights(2)
    buffer = torch.randn(len(tokens), RANK)
    for add in (False, True):
        start = torch.randn(len(tokens), OUT + 4).to(torch.bfloat16)
        ours, theirs = start.clone(), start.clone()
        meta = compute_meta(tokens)[:6]
        cpu_lora.sgmv_expand(buffer, b, ours, *meta, add_inputs=add)
        vllm_ops.sgmv_expand(buffer, b, theirs, *meta, add_inputs=add)
        torch.testing.assert_close(ours, theirs, atol=0.07, rtol=0.02)
        ours, theirs = start.clone(), start.clone()
        cpu_lora.bgmv_expand(buffer, b, ours, tokens, add_inputs=add)
        vllm_ops.bgmv_expand(buffer, b, theirs, tokens, add_inputs=add)
        torch.testing.assert_close(ours, theirs, atol=0.07, rtol=0.02)


def test_register_rebinds_the_cpu_wrapper_ops(monkeypatch):
    from vllm.lora.punica_wrapper import punica_cpu
    from vllm.model_executor.layers.layernorm import GemmaRMSNorm
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase

    monkeypatch.setattr(LogitsProcessor, "_apply_head", LogitsProcessor._apply_head)  # register patches these
    for op in (GemmaRMSNorm, RotaryEmbeddingBase):  # (the fused ops: later tests see vLLM's own again)
        monkeypatch.setattr(op, "forward_cpu", op.forward_cpu)
        monkeypatch.setattr(op, "enabled", op.enabled)

    saved = {name: getattr(punica_cpu, name) for name in cpu_lora.OPS}
    try:
        cpu_lora.register()
        assert all(getattr(punica_cpu, name) is op for name, op in cpu_lora.OPS.items())
    finally:
        for name, op in saved.items():
            setattr(punica_cpu, name, op)


@pytest.fixture
def bf16_head():
    """A bf16 output layer after loading (its CPU GEMM prepared), hidden states, their exact logits."""
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Module()
    head.weight = torch.nn.Parameter((torch.randn(300, HIDDEN, generator=g) * 4).to(torch.bfloat16),
                                     requires_grad=False)
    head.quant_method = UnquantizedEmbeddingMethod()
    head.quant_method.process_weights_after_loading(head)
    hidden = torch.randn(5, HIDDEN, generator=g).to(torch.bfloat16)
    return head, hidden, hidden.double() @ head.weight.double().T


@pytest.fixture
def processor(monkeypatch):
    """vLLM's LogitsProcessor with the plugin's head, answer tokens 7 and 42; only its head dtype matters."""
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    monkeypatch.setattr(LogitsProcessor, "_apply_head", LogitsProcessor._apply_head)  # restored afterwards
    monkeypatch.setenv(EXACT_LOGITS_ENV, "7,42")
    cpu_lora.precise_head()
    processor = LogitsProcessor.__new__(LogitsProcessor)
    processor.head_dtype = torch.bfloat16
    return processor


def test_a_bf16_head_computes_the_answer_tokens_logits_exactly(bf16_head, processor):
    head, hidden, exact = bf16_head
    logits = processor._apply_head(head, hidden, None)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits[:, [7, 42]].double(), exact[:, [7, 42]], atol=1e-4, rtol=1e-5)
    rounded = (hidden @ head.weight.T).double()  # bf16 logits: 8 bits of mantissa
    torch.testing.assert_close(logits.double(), rounded, atol=0.07, rtol=0.01)
    answer_gap = lambda x: x[:, 7] - x[:, 42]  # noqa: E731  what P(Yes) depends on
    error = {name: (answer_gap(x) - answer_gap(exact)).abs().max() for name, x in (("bf16", rounded), ("ours", logits))}
    assert error["bf16"] > 100 * error["ours"]


def test_an_fp32_head_reads_one_cached_fp32_copy_of_the_weight(bf16_head, processor):
    head, hidden, exact = bf16_head
    processor.head_dtype = torch.float32
    logits = processor._apply_head(head, hidden, None)
    copy = head._lorec_fp32_weight
    assert processor._apply_head(head, hidden, None).dtype == torch.float32
    assert head._lorec_fp32_weight is copy, "cast once, not at every step"
    torch.testing.assert_close(logits.double(), exact, atol=1e-4, rtol=1e-5)


def test_engine_process_loads_the_plugin(tiny_engine, workdir):
    """`lorec engine` names the plugin in VLLM_PLUGINS and its entry point resolves to this module."""
    from importlib.metadata import entry_points

    from service.processes import ENGINE_PLUGIN

    (entry,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == ENGINE_PLUGIN]
    assert entry.load() is cpu_lora.register and cpu_lora.PLUGIN_NAME == ENGINE_PLUGIN
    log = (workdir / "logs" / "vllm-tiny.log").read_text()
    assert "segment-wise LoRA ops installed" in log


@pytest.mark.parametrize("kind", ["one", "mixed", "with_base"])
def test_the_adapter_term_is_added_in_one_rounding(kind):
    """A prefill's expand adds each run's product inside the GEMM, into its columns of a wider output: every
    element is y0 + buffer @ B.T computed exactly, rounded to bf16 once (at most one bf16 step off)."""
    tokens = token_slots(kind)
    _, b = weights(3)
    g = torch.Generator().manual_seed(4)
    buffer = torch.randn(len(tokens), RANK, generator=g)
    y0 = torch.randn(len(tokens), OUT + 16, generator=g).to(torch.bfloat16)
    ours = y0.clone()
    starts, lengths, slots, batches, max_len, n, _ = compute_meta(tokens)
    cpu_lora.sgmv_expand_slice(buffer, b, ours, starts, lengths, slots, batches, max_len, n, 8, OUT, True)
    exact = y0.double()
    for row, slot in enumerate(tokens.tolist()):
        if slot >= 0:
            exact[row, 8:8 + OUT] += buffer[row].to(torch.bfloat16).double() @ b[slot, 0].double().T
    step = exact.abs() * 2.0 ** -8 + 1e-6  # half a bf16 step, plus fp32 accumulation's own rounding
    assert bool(((ours.double() - exact).abs() <= 2 * step).all())
    assert torch.equal(ours[:, :8], y0[:, :8]) and torch.equal(ours[:, 8 + OUT:], y0[:, 8 + OUT:])
