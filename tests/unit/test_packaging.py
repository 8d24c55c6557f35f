"""Our top-level `kernels` package must not confuse transformers (which probes for the PyPI `kernels` package)."""

import subprocess
import sys

SCRIPT = """
import kernels, transformers, torch
from transformers.utils.import_utils import is_kernels_available
assert not is_kernels_available(), "transformers thinks rlplat's kernels package is the hub kernels package"
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1)
print(LlamaForCausalLM(cfg)(torch.tensor([[1, 2, 3]])).logits.shape)
import rlplat.models
"""


def test_transformers_imports_next_to_our_kernels_package():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "torch.Size([1, 3, 64])" in out.stdout
