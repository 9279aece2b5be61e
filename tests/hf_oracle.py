"""transformers' LlamaForCausalLM as the reference implementation for parity tests.

Random weights are drawn wider than HF's default init (std 0.02) so that a wrong
permutation, scaling or mask changes the logits by far more than rounding does.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

from llama_jax import LlamaConfig
from llama_jax.checkpoint.configs import config_to_hf
from llama_jax.checkpoint.layout import params_from_hf


def make_hf_model(cfg: LlamaConfig, seed: int = 0, std: float = 0.15):
    """A random `LlamaForCausalLM` in float32 with the architecture of `cfg`."""
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(**config_to_hf(cfg))
    hf_cfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model


def hf_state_numpy(model) -> dict[str, np.ndarray]:
    """The HF model's state dict as float32 numpy arrays."""
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def hf_params(model, cfg: LlamaConfig) -> dict:
    """The HF model's weights in this package's layout (rotary rows un-permuted)."""
    return params_from_hf(hf_state_numpy(model), cfg)


def hf_logits(
    model, tokens: np.ndarray, attention_mask: np.ndarray | None = None, positions=None
) -> np.ndarray:
    """float32 logits [B, T, V] from the HF model."""
    with torch.no_grad():
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.tensor(np.asarray(attention_mask), dtype=torch.long)
        if positions is not None:
            kwargs["position_ids"] = torch.tensor(np.asarray(positions), dtype=torch.long)
        out = model(torch.tensor(tokens, dtype=torch.long), **kwargs)
    return out.logits.float().numpy()
