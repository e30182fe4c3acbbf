"""vLLM general plugin ``smpart_dsv32`` (entry point group ``vllm.general_plugins``).

vLLM calls :func:`register` in every process it starts (API server, engine core, workers), and
may call it more than once (``vllm/plugins/__init__.py::load_general_plugins``). With
``SMPART_DSV32=1`` it:

1. registers :class:`smpart.integration.mla.SmpartDSV32MLAWrapper` as the out-of-tree replacement
   of ``MultiHeadLatentAttentionWrapper`` through vLLM's own API,
   ``PluggableLayer.register_oot(cls, name="MultiHeadLatentAttentionWrapper")``
   (``vllm/model_executor/custom_op.py``): vLLM's ``PluggableLayer.__new__`` then instantiates the
   subclass wherever a model builds a ``MultiHeadLatentAttentionWrapper``;
2. registers the region op ``torch.ops.smpart.dsv32_region`` (``ops.py``);
3. appends ``smpart::dsv32_region`` to ``CompilationConfig._attention_ops``, the list vLLM copies
   into ``splitting_ops`` when the user sets none, so piecewise CUDA graphs split at the op as
   they split at vLLM's ``sparse_attn_indexer`` (the op routes per step; see ``ops.py``). There is
   no API for this; it is a logged append to vLLM's class-level default list, made only with the
   flag;
4. on an sm_90 GPU, maps vLLM's production CUDA DSV3.2 architectures (``DeepseekV32ForCausalLM``,
   ``DeepseekV32MTPModel``) to subclasses of vLLM's own CUDA classes whose attention layers run the
   region on decode-only FULL-graph steps (``integration/v32``; ``ModelRegistry.register_model``);
5. with ``SMPART_DSV32_GENERIC_MODEL=1`` too (instead of 4), maps the ``DeepseekV32ForCausalLM`` architecture to
   vLLM's generic ``vllm.model_executor.models.deepseek_v2:DeepseekV3ForCausalLM`` through
   ``ModelRegistry.register_model``. On CUDA, vLLM 0.33 serves DeepSeek-V3.2 with its own
   ``vllm/models/deepseek_v32/nvidia`` model (``DeepseekV32Attention``, an ``MLAAttention``
   subclass that is no pluggable layer and never builds a ``MultiHeadLatentAttentionWrapper``),
   so without this mapping the swapped class is only used by models built from
   ``deepseek_v2.py`` (which is what vLLM 0.33 uses for DSV3.2 on CPU and XPU, and for DeepSeek
   V2/V3 everywhere; those are not DSV3.2 and keep vLLM's path).

Without the flag nothing is registered and nothing in vLLM changes. Calling :func:`register` again
is harmless: each step checks what is already there.
"""

import logging
import os

FLAG_ENV = "SMPART_DSV32"
GENERIC_MODEL_ENV = "SMPART_DSV32_GENERIC_MODEL"
VLLM_VERSION = "0.33.0"
LAYER_NAME = "MultiHeadLatentAttentionWrapper"
GENERIC_MODEL = "vllm.model_executor.models.deepseek_v2:DeepseekV3ForCausalLM"
ASSUME_SM90_ENV = "SMPART_DSV32_ASSUME_SM90"  # CPU test hook standing in for an sm_90 GPU
V32_MODEL_CLASSES = {  # vLLM architecture -> smpart subclass of vLLM's CUDA class (lazy strings)
    "DeepseekV32ForCausalLM": "smpart.integration.v32.model:SmpartDeepseekV32ForCausalLM",
    "DeepseekV32MTPModel": "smpart.integration.v32.model:SmpartDeepseekV32MTP",
}

logger = logging.getLogger("vllm.smpart_dsv32")


def enabled() -> bool:
    """Whether ``SMPART_DSV32=1`` is set."""
    return os.environ.get(FLAG_ENV, "0").strip() == "1"


def register() -> None:
    """The plugin entry point (``smpart.integration.plugin:register``); see the module docstring."""
    if not enabled():
        logger.debug("smpart: %s is not 1; vLLM is unchanged", FLAG_ENV)
        return
    import vllm

    version = vllm.__version__.split("+")[0]
    if version != VLLM_VERSION:
        logger.warning("smpart: %s=1 ignored: vLLM %s is installed, the shim mirrors vLLM %s "
                       "(install vLLM 0.33.0: docs/VLLM.md)", FLAG_ENV, vllm.__version__, VLLM_VERSION)
        return

    from vllm.model_executor.custom_op import PluggableLayer, op_registry_oot

    from . import ops
    from .mla import SmpartDSV32MLAWrapper

    ops.register_op()
    current = op_registry_oot.get(LAYER_NAME)
    if current is None:
        PluggableLayer.register_oot(SmpartDSV32MLAWrapper, name=LAYER_NAME)
        logger.info("smpart: %s=1: %s replaced by %s (PluggableLayer.register_oot); decode-only "
                    "batches of DSV3.2 layers run the fused region op %s", FLAG_ENV, LAYER_NAME,
                    SmpartDSV32MLAWrapper.__qualname__, ops.OP_QUALNAME)
    elif current is not SmpartDSV32MLAWrapper:
        logger.warning("smpart: %s is already replaced by %s; not registering the smpart layer",
                       LAYER_NAME, getattr(current, "__qualname__", current))
        return
    _add_splitting_op(ops.OP_QUALNAME)
    if os.environ.get(GENERIC_MODEL_ENV, "0").strip() == "1":
        _route_dsv32_to_generic_model()
    else:
        _route_dsv32_to_production_subclass()


def unregister() -> None:
    """Undo :func:`register`'s layer registration (tests; vLLM never calls this)."""
    from vllm.model_executor.custom_op import op_registry_oot

    from .mla import SmpartDSV32MLAWrapper

    if op_registry_oot.get(LAYER_NAME) is SmpartDSV32MLAWrapper:
        del op_registry_oot[LAYER_NAME]


def _add_splitting_op(qualname: str) -> None:
    from vllm.config.compilation import CompilationConfig

    ops_list = CompilationConfig._attention_ops
    if qualname not in ops_list:
        ops_list.append(qualname)
        logger.info("smpart: %s added to vLLM's default splitting ops (piecewise graphs split at it "
                    "as at vllm::sparse_attn_indexer); if you set compilation_config.splitting_ops "
                    "yourself, include it there", qualname)


def _is_sm90() -> str | None:
    """None when this machine's GPU is sm_90 (or the CPU test hook ``SMPART_DSV32_ASSUME_SM90=1`` is
    set), else why not. Reads the capability through vLLM's platform (NVML), which does not
    initialize CUDA in the process that loads the plugin."""
    if os.environ.get(ASSUME_SM90_ENV, "0").strip() == "1":
        return None
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return "not a CUDA platform"
    cap = current_platform.get_device_capability()
    if cap is None or (cap.major, cap.minor) != (9, 0):
        return f"GPU capability {cap} is not sm_90"
    return None


def _route_dsv32_to_production_subclass() -> None:
    """Map vLLM's DSV3.2 architectures (CUDA model and MTP draft) to the smpart subclasses
    (``integration/v32/model.py``) through ``ModelRegistry.register_model``, on sm_90 only."""
    why = _is_sm90()
    if why is not None:
        logger.info("smpart: %s=1: DSV3.2 production model left to vLLM (%s)", FLAG_ENV, why)
        return
    from vllm import ModelRegistry

    for arch, cls in V32_MODEL_CLASSES.items():
        ModelRegistry.register_model(arch, cls)
    logger.info("smpart: %s=1: %s served by %s (vLLM's CUDA deepseek_v32 classes whose decode-only "
                "FULL-graph steps run the smpart region)", FLAG_ENV, ", ".join(V32_MODEL_CLASSES),
                ", ".join(V32_MODEL_CLASSES.values()))


def _route_dsv32_to_generic_model() -> None:
    from vllm import ModelRegistry

    ModelRegistry.register_model("DeepseekV32ForCausalLM", GENERIC_MODEL)
    logger.warning("smpart: %s=1: DeepseekV32ForCausalLM is served by vLLM's generic %s (whose MLA "
                   "layer is the swapped MultiHeadLatentAttentionWrapper) instead of vLLM's CUDA "
                   "deepseek_v32 model", GENERIC_MODEL_ENV, GENERIC_MODEL)


__all__ = ["register", "unregister", "enabled", "FLAG_ENV", "GENERIC_MODEL_ENV", "VLLM_VERSION"]
