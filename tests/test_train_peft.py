"""IB-Tune against the real transformers + peft (PyTorch): the exported adapter loads in peft with the same
logits as mfjax's side path, the SFT gradients equal peft's (mapped through the export layout), a peft-saved
adapter comes back tensor for tensor, and the export merges as mfjax merges."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from hf_fixtures import hf_logits, make_tiny_hf_model
from mfjax.io.hf import load_hf
from mfjax.io.peft import load_peft_lora, merge_peft_adapter, peft_tensors, save_peft_adapter
from mfjax.models import decoder
from mfjax.models import lora as lora_lib
from mfjax.train import losses

peft = pytest.importorskip("peft")

TOKENS = np.array([[1, 5, 9, 33, 70, 2, 17, 101, 64, 3, 44, 12], [0, 0, 0, 90, 8, 8, 120, 6, 51, 77, 29, 15]])
MASK = (np.arange(12)[None, :] >= np.array([[0], [3]])).astype(np.int32)
_logits = jax.jit(decoder.forward_logits, static_argnames=("cfg",))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Qwen2 (q/k/v biases, untied head) as an HF folder, its torch model, and mfjax's copy."""
    model_dir, model = make_tiny_hf_model("qwen2", tmp_path_factory.mktemp("ibtune_peft"), seed=3)
    cfg, weights = load_hf(model_dir)
    return model_dir, model, cfg, weights


def trained_lora(cfg, spec, seed=0):
    """A LoRA as training leaves it: PEFT's init, then B moved off zero."""
    lora = lora_lib.init_lora(cfg, spec, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 16))
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), lora)


def peft_model(model, adapter_dir):
    return peft.PeftModel.from_pretrained(model, adapter_dir, is_trainable=True).float()


@pytest.mark.parametrize("rslora", [False, True])
def test_exported_adapter_loads_in_peft_with_the_side_path_logits(tiny, tmp_path, rslora):
    model_dir, model, cfg, weights = tiny
    spec = lora_lib.LoraSpec(rank=4, alpha=8, use_rslora=rslora)
    lora = trained_lora(cfg, spec)
    adapter = save_peft_adapter(cfg, lora, spec, tmp_path / "adapter", base_model_name_or_path=model_dir)
    config = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert config["target_modules"] == sorted(lora_lib.HF_MODULES.values()) and config["use_rslora"] == rslora

    side = np.asarray(_logits(weights, cfg, jnp.asarray(TOKENS), jnp.asarray(MASK), lora=lora))
    tuned = peft_model(model, adapter)
    want = hf_logits(tuned, TOKENS, MASK)
    valid = MASK.astype(bool)
    np.testing.assert_allclose(side[valid], want[valid], atol=1e-4, rtol=1e-4)
    with tuned.disable_adapter():
        base = hf_logits(tuned, TOKENS, MASK)
    assert np.abs(want - base)[valid].max() > 100 * 1e-4  # the adapter really moves the logits

    # mfjax's own loader merges the export exactly as models.lora.merge does.
    merged = merge_peft_adapter(cfg, weights, adapter)
    reference = lora_lib.merge(weights, lora)
    for got, ref in zip(jax.tree.leaves(merged), jax.tree.leaves(reference)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-6, rtol=0)
    merged_logits = np.asarray(_logits(merged, cfg, jnp.asarray(TOKENS), jnp.asarray(MASK)))
    np.testing.assert_allclose(merged_logits[valid], side[valid], atol=1e-5, rtol=0)
    tuned.unload()


def test_peft_saved_adapter_round_trips_bit_for_bit(tiny, tmp_path):
    model_dir, model, cfg, _ = tiny
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                             lora_dropout=0.0, task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    wrapped.save_pretrained(tmp_path / "saved")
    saved = load_file(os.path.join(tmp_path / "saved", "adapter_model.safetensors"))
    wrapped.unload()

    spec, lora = load_peft_lora(cfg, tmp_path / "saved")
    assert spec == lora_lib.LoraSpec(rank=4, alpha=16, targets=("q", "v", "o", "down"))
    assert lora.scale == 4.0
    again = peft_tensors(cfg, lora)
    assert sorted(again) == sorted(saved)
    for key, value in saved.items():
        assert again[key].dtype == value.dtype and np.array_equal(again[key], value), key
    save_peft_adapter(cfg, lora, spec, tmp_path / "again")
    rewritten = load_file(os.path.join(tmp_path / "again", "adapter_model.safetensors"))
    assert all(np.array_equal(rewritten[k], saved[k]) for k in saved)


def _torch_sft_loss(model, batch: losses.ScoreBatch) -> torch.Tensor:
    """sft_loss written out on full sequences (prefix + prompt + target) in torch."""
    from test_train_losses import full_sequences

    rows, spans, ids, mask = full_sequences(batch)
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    logits = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                   position_ids=torch.as_tensor(positions)).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    total = torch.zeros(())
    for i, (start, tl) in enumerate(spans):
        if tl == 0 or not bool(batch.valid[i]):
            continue
        targets = torch.as_tensor(rows[i][start:start + tl])
        total = total - logp[i, start - 1:start - 1 + tl].gather(1, targets[:, None]).mean()
    return total / len(rows)


def test_sft_gradients_match_peft(tiny, tmp_path):
    model_dir, model, cfg, weights = tiny
    from test_train_losses import make_batch

    spec = lora_lib.LoraSpec(rank=4, alpha=8)
    lora = trained_lora(cfg, spec, seed=5)
    batch = make_batch(np.random.default_rng(4), E=2, R=2, P=6, Ts=3, Tt=5, vocab=128)
    loss, grads = jax.jit(jax.value_and_grad(lambda l: losses.sft_loss(l, weights, cfg, batch)[0]))(lora)

    tuned = peft_model(model, save_peft_adapter(cfg, lora, spec, tmp_path / "adapter"))
    torch_loss = _torch_sft_loss(tuned, batch)
    torch_loss.backward()
    np.testing.assert_allclose(float(loss), torch_loss.item(), rtol=1e-5)
    want = {name.replace(".default", ""): p.grad.numpy() for name, p in tuned.named_parameters() if "lora_" in name}
    got = peft_tensors(cfg, grads)  # the gradients through the export layout
    assert sorted(got) == sorted(want) and len(got) == 2 * 7 * cfg.num_layers
    scale = max(np.abs(v).max() for v in want.values())
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, atol=1e-4 * scale, rtol=1e-4, err_msg=key)
    assert all(np.abs(v).max() > 0 for v in want.values())
    tuned.unload()
