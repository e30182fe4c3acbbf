"""vLLM integration shim (``SMPART_DSV32=1``): the DSV3.2 decode region as one fused op in vLLM 0.33.

* ``plugin.py``: the vLLM general plugin (entry point ``smpart_dsv32`` in ``vllm.general_plugins``);
  :func:`register` swaps ``MultiHeadLatentAttentionWrapper`` through ``PluggableLayer.register_oot``.
* ``mla.py``: ``SmpartDSV32MLAWrapper``, the replacement layer.
* ``ops.py``: ``torch.ops.smpart.dsv32_region``, the fused region as one custom op.

Importing this package does not import vLLM (an optional dependency; its 0.33.0 release: docs/VLLM.md);
``mla`` and ``ops`` do.
"""

from .plugin import FLAG_ENV, GENERIC_MODEL_ENV, VLLM_VERSION, enabled, register, unregister

__all__ = ["register", "unregister", "enabled", "FLAG_ENV", "GENERIC_MODEL_ENV", "VLLM_VERSION"]
