"""smpart Triton kernels for the DeepSeek-V3.2 decode region (installed as ``smpart.triton_kernels``)."""
