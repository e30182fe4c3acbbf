"""smpart's Triton kernels for the DeepSeek-V3.2 decode region (installed as ``smpart.triton_kernels``).

Only ``@triton.jit`` code, each op's launcher and the model dims live here: ``fp8``,
``indexer_cache``, ``fill``, ``mqa_logits``, ``topk``, ``q_b_proj``, ``partitioned`` (the
persistent kernel and its ``PartitionConfig``) and ``dims``. Nothing here imports the runtime
(``smpart.region`` and friends); the host side of the partitioned path is ``smpart.partitioned``.
"""
