"""The smpart region in vLLM 0.33's production CUDA DSV3.2 model (``vllm/models/deepseek_v32/nvidia``).

* ``vllm_kernels.py``: vLLM's own ``fused_q`` / ``fused_norm_rope`` Triton kernels loaded with real
  Triton (CPU oracle under the interpreter; the ``vllm_v32`` vendor baseline on the GPU machine).
* ``model.py``: ``SmpartDeepseekV32ForCausalLM`` / ``SmpartDeepseekV32MTP``, subclasses of vLLM's
  CUDA model classes whose attention layers run the region on decode-only FULL-graph batches.
* ``attention.py``: the attention forward (vLLM's ``DeepseekV32Attention.forward`` with the region
  in place of ``q_b_proj`` + ``fused_q`` + the indexer's logits/top-k).

Importing this package imports nothing from vLLM.
"""
