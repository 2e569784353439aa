"""Weight initialisation schemes, chosen by `ModelConfig.init`.

- normal: GPT-2 (Radford et al. 2019): N(0, 0.02); residual output projections scaled by 1/√(2·layers)
  so the residual stream's variance does not grow with depth.
- xavier: Glorot & Bengio 2010, uniform with variance 2/(fan_in + fan_out), for symmetric activations.
- he: He et al. 2015, normal with variance 2/fan_in, for rectifier-like activations (GELU, SiLU).
Embeddings use N(0, initializer_range) in every scheme; biases start at zero, norm scales at one.
"""

from __future__ import annotations

import math

from torch import nn

from lmforge.config import ModelConfig

RESIDUAL_PROJECTIONS = ("attn.proj.weight", "mlp.down.weight")


def init_weights(model: nn.Module, config: ModelConfig) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if config.init == "xavier":
                nn.init.xavier_uniform_(module.weight)
            elif config.init == "he":
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            else:
                std = config.initializer_range
                if f"{name}.weight".endswith(RESIDUAL_PROJECTIONS):
                    std /= math.sqrt(2 * config.num_hidden_layers)
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=config.initializer_range)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
