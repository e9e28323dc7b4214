"""How the engine process is started (service/processes.py): its environment and its flags."""

from __future__ import annotations

import ctypes.util
import json

import pytest

from service import processes
from service.config import EngineSettings, cpu_engine_dtype
from service.processes import engine_command, engine_env
from service.prompt import load_codec


def test_the_engine_runs_on_tcmalloc_before_torch_s_libgomp(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/opt/torch/lib/libgomp.so.1")
    library = ctypes.util.find_library("tcmalloc_minimal")
    assert library, "scripts/install.sh installs libtcmalloc-minimal4"
    assert engine_env(EngineSettings())["LD_PRELOAD"] == f"{library}:/opt/torch/lib/libgomp.so.1"
    assert engine_env(EngineSettings(tcmalloc=False))["LD_PRELOAD"] == "/opt/torch/lib/libgomp.so.1"
    monkeypatch.setenv("LD_PRELOAD", "/x/libtcmalloc.so.4")
    assert engine_env(EngineSettings())["LD_PRELOAD"] == "/x/libtcmalloc.so.4", "an operator's choice stands"


def test_the_engine_gets_every_core_and_its_kv_cache_size(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    env = engine_env(EngineSettings(kv_cache_gib=3))
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3" and env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"


def test_further_engine_flags_are_appended_as_the_shell_would_split_them(tmp_path):
    flags = """--profiler-config '{"profiler": "torch", "torch_profiler_dir": "/tmp/p q"}' --seed 3"""
    command = engine_command(EngineSettings(extra_args=flags), tmp_path, 8100)
    assert command[-4:] == ["--profiler-config", '{"profiler": "torch", "torch_profiler_dir": "/tmp/p q"}',
                            "--seed", "3"]
    assert engine_command(EngineSettings(), tmp_path, 8100)[-2:] == ["--block-size", "32"]


def test_a_bf16_engine_gets_exact_answer_logits_or_an_fp32_head_as_told(tmp_path, tiny_model, monkeypatch):
    def overrides(**engine) -> list[str]:
        command = engine_command(EngineSettings(**engine), tmp_path, 8100)
        return [json.loads(command[i + 1]) for i, flag in enumerate(command) if flag == "--hf-overrides"]

    def exact_tokens(**engine) -> str | None:
        return engine_env(EngineSettings(**engine), tiny_model).get(processes.EXACT_LOGITS_ENV)

    answer = load_codec(tiny_model).answer
    assert exact_tokens(dtype="bfloat16") == f"{answer.yes},{answer.no}" and overrides(dtype="bfloat16") == []
    assert overrides(dtype="bfloat16", head_dtype="float32") == [{"head_dtype": "float32"}]
    assert exact_tokens(dtype="bfloat16", head_dtype="float32") is None
    assert exact_tokens(dtype="bfloat16", head_dtype="model") is None
    assert overrides(dtype="bfloat16", head_dtype="model") == []
    assert exact_tokens(dtype="float32") is None and overrides(dtype="float32") == [], "fp32 logits already"
    monkeypatch.setenv(processes.EXACT_LOGITS_ENV, "1,2")
    assert exact_tokens(dtype="bfloat16", head_dtype="model") is None, "not inherited from the caller"


def test_zentorch_is_on_the_engine_s_path_only_when_chosen(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", "/opt/extra")
    with_zentorch = f"{processes.ZENTORCH_DIR}:/opt/extra"
    assert engine_env(EngineSettings(kernels="onednn"))["PYTHONPATH"] == "/opt/extra"
    assert engine_env(EngineSettings(kernels="zentorch"))["PYTHONPATH"] == with_zentorch
    assert engine_env(EngineSettings())["PYTHONPATH"] == "/opt/extra", "oneDNN by default"
    monkeypatch.setattr(processes, "ZENTORCH_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="LOREC_ENGINE_KERNELS=zentorch"):
        engine_env(EngineSettings(kernels="zentorch"))


def test_free_ports_lie_below_the_range_the_kernel_hands_out(monkeypatch):
    import socket

    ports = {processes.free_port() for _ in range(20)}
    low = int(processes.EPHEMERAL_RANGE.read_text().split()[0])
    assert all(10000 <= p < low for p in ports) and len(ports) > 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        monkeypatch.setattr(processes.random, "randrange", lambda a, b: taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="no free port"):
            processes.free_port()


def test_the_engine_runs_bf16_where_the_cpu_multiplies_bf16_natively(tmp_path, monkeypatch):
    def dtype_for(flags: str) -> str:
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n")
        return cpu_engine_dtype(tmp_path / "cpuinfo")

    assert dtype_for("avx2 avx512f avx512_bf16 avx512_vnni") == "bfloat16"
    assert dtype_for("avx2 amx_bf16 amx_tile") == "bfloat16"
    assert dtype_for("avx2 avx512f avx512_vnni") == "float32" and dtype_for("avx2 fma") == "float32"
    assert cpu_engine_dtype(tmp_path / "absent") == "float32"
    monkeypatch.delenv("LOREC_ENGINE_DTYPE", raising=False)
    assert EngineSettings().dtype == cpu_engine_dtype(), "auto by default"
    assert EngineSettings(dtype="float32").dtype == "float32"
    assert EngineSettings(weights="int8").dtype == "float32", "int8 weights keep fp32 activations unless told"

