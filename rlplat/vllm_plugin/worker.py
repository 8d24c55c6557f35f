"""Weight updates in a running vLLM engine, through vLLM's worker-extension API.

Start the engine with ``LLM(..., worker_extension_cls=WORKER_EXTENSION)``; vLLM mixes
:class:`WeightUpdateExtension` into each of its workers, and :func:`update_weights` calls it on all of them with
``collective_rpc``. Tensors are HF-named (the checkpoint's names); a subset is fine.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from safetensors.torch import load, save

WORKER_EXTENSION = "rlplat.vllm_plugin.worker.WeightUpdateExtension"


class WeightUpdateExtension:
    """Methods vLLM adds to its worker (``self.model_runner`` is the worker's)."""

    def rlplat_update_weights(self, payload: bytes) -> int:
        return self.model_runner.get_model().update_weights(list(load(payload).items()))


def update_weights(llm, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Push new weights into a running ``vllm.LLM`` and drop its prefix cache (computed with the old weights).

    Returns how many tensors each worker loaded. Unknown names and wrong shapes make the model refuse the whole
    update (nothing changes) with an error naming every offender.
    """
    # safetensors bytes: vLLM 0.32 re-pickles collective_rpc arguments between its engine-core and worker
    # processes, and the tensors it decoded from its own message format fail that ("cannot pickle memoryview")
    payload = save({name: t.detach().cpu().contiguous() for name, t in named_tensors})
    counts = llm.collective_rpc("rlplat_update_weights", args=(payload,))
    llm.reset_prefix_cache()
    return counts[0]
