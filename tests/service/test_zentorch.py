"""The engine on AMD's ZenDNN kernels (LOREC_ENGINE_KERNELS=zentorch): on an AMD CPU with AVX-512 vLLM runs its
Zen platform, whose linear layers are zentorch's; its scores agree with the oneDNN fp32 engine's on the same
prompts, and a LoRA adapter changes them as it does there. Elsewhere vLLM keeps its own CPU platform."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service.config import EngineSettings
from service.processes import ZENTORCH_DIR, engine_env
from service.prompt import load_codec
from tests.utils.stack import engine_agreement, make_settings, start_engine

ADAPTER = "tiny-random-v1"


def zen_cpu() -> bool:
    """vLLM's own test (vllm/platforms/__init__.py _is_amd_zen_cpu)."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    return "AuthenticAMD" in cpuinfo and "avx512" in cpuinfo


@pytest.fixture(scope="module")
def zentorch_engine(workdir, tiny_model, redis_url):
    settings = make_settings(workdir, tiny_model, redis_url, engine_kernels="zentorch")
    engine, url = start_engine(settings, tiny_model, workdir / "logs" / "vllm-zentorch.log")
    yield url
    engine.stop()


def engine_platform(engine: EngineSettings) -> str:
    """The vLLM platform a process started with the engine's environment runs on."""
    probe = "from vllm.platforms import current_platform; print(type(current_platform).__name__)"
    run = subprocess.run([sys.executable, "-c", probe], env=engine_env(engine), capture_output=True, text=True,
                         check=True, timeout=300)
    return run.stdout.split()[-1]


def test_zentorch_is_installed_beside_the_virtualenv_and_used_only_when_asked_for():
    assert (ZENTORCH_DIR / "zentorch").is_dir(), "scripts/install.sh installs it"
    with pytest.raises(ImportError):
        import zentorch  # noqa: F401  (in site-packages vLLM would pick the Zen platform for every engine)
    zen = "ZenCpuPlatform" if zen_cpu() else "CpuPlatform"
    assert engine_platform(EngineSettings()) == "CpuPlatform", "oneDNN by default"
    assert engine_platform(EngineSettings(kernels="zentorch")) == zen


def test_zentorch_engine_agrees_with_onednn_and_lora_changes_it_alike(tiny_engine, zentorch_engine, tiny_model,
                                                                      adapter_dir):
    agreement = engine_agreement(tiny_engine, zentorch_engine, load_codec(tiny_model), adapter_dir, ADAPTER)
    for adapter in (None, ADAPTER):
        assert agreement.mean_dp[adapter] < 0.01 and agreement.max_dp[adapter] < 0.02, "the issue's bound"
    assert agreement.reference_effect > 0.05, "the adapter moves the scores"
    assert agreement.effect_correlation > 0.99, "and moves them alike through zentorch"
