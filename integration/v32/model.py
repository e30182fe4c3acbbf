"""Model classes registered for ``DeepseekV32ForCausalLM`` / ``DeepseekV32MTPModel`` with ``SMPART_DSV32=1``.

Subclasses of vLLM 0.33's CUDA classes (``vllm/models/deepseek_v32/nvidia/model.py::DeepseekV32ForCausalLM``,
``nvidia/mtp.py::DeepseekV32MTP``): vLLM's own ``__init__`` builds the model and ``load_weights`` is
inherited unchanged; afterwards every ``DeepseekV32Attention`` module is re-classed to
:class:`~smpart.integration.v32.attention.SmpartDeepseekV32Attention` (same object, same
parameters, same registration in vLLM's ``static_forward_context``), which adds only a forward.
The architecture names stay vLLM's, so vLLM's per-architecture defaults (breakable CUDA graphs,
config hooks) still apply. Registered by :func:`smpart.integration.plugin.register`.
"""

from __future__ import annotations

from vllm.models.deepseek_v32.attention import DeepseekV32Attention
from vllm.models.deepseek_v32.nvidia.model import DeepseekV32ForCausalLM
from vllm.models.deepseek_v32.nvidia.mtp import DeepseekV32MTP

from .attention import SmpartDeepseekV32Attention


def swap_attention(model) -> int:
    """Re-class every ``DeepseekV32Attention`` in ``model`` to ``SmpartDeepseekV32Attention``; returns the count.

    All or nothing: every module is checked before any is re-classed, so a refusal leaves the whole
    model as vLLM built it. Layers already ``SmpartDeepseekV32Attention`` are left as they are (not
    counted).

    Raises
    ------
    TypeError : some module is a subclass of ``DeepseekV32Attention`` other than ours (another
        plugin's). Nothing in ``model`` is re-classed then; the message names every such module.
    """
    mine, foreign = [], []
    for name, m in model.named_modules():
        if type(m) is DeepseekV32Attention:
            mine.append(m)
        elif isinstance(m, DeepseekV32Attention) and not isinstance(m, SmpartDeepseekV32Attention):
            foreign.append(f"{name or '<model>'} ({type(m).__qualname__})")
    if foreign:
        raise TypeError(f"{', '.join(foreign)} already replace(s) DeepseekV32Attention; smpart re-classed no "
                        f"layer of this model (unset SMPART_DSV32 to run the other replacement alone)")
    for m in mine:
        m.__class__ = SmpartDeepseekV32Attention
        m.smpart_setup()
    return len(mine)


class SmpartDeepseekV32ForCausalLM(DeepseekV32ForCausalLM):
    """vLLM's CUDA ``DeepseekV32ForCausalLM`` with its attention layers re-classed (module docstring)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.smpart_num_attention = swap_attention(self)


class SmpartDeepseekV32MTP(DeepseekV32MTP):
    """vLLM's CUDA ``DeepseekV32MTP`` draft model with its attention layers re-classed."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.smpart_num_attention = swap_attention(self)


__all__ = ["SmpartDeepseekV32ForCausalLM", "SmpartDeepseekV32MTP", "swap_attention"]
