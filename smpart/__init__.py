"""smpart: one SM-partitioned persistent Triton kernel for the DeepSeek-V3.2 decode region.

Subpackages (mapped from the repository's top-level folders by ``pyproject.toml``):
``smpart.triton_kernels`` (kernels, reference, entry point), ``smpart.integration`` (vLLM shim),
``smpart.bench`` (benchmarks and the split autotuner).
"""

__version__ = "0.1.0"
