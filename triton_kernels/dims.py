"""DeepSeek-V3.2 dimensions and layout constants of the decode region (the model's
``config.json``, deepseek-ai/DeepSeek-V3.2; cache layout: docs/KERNELS.md, "Layouts").

All of these are fixed by the model or by vLLM's cache layout; tests shrink only the batch,
the context lengths and the number of MLA heads ``H`` (``num_attention_heads / TP``).
"""

Q_LORA_RANK = 1536  # K of q_b_proj
QK_NOPE_HEAD_DIM = 128
QK_ROPE_HEAD_DIM = 64
QK_HEAD_DIM = QK_NOPE_HEAD_DIM + QK_ROPE_HEAD_DIM  # 192 columns per MLA head
KV_LORA_RANK = 512

INDEX_N_HEADS = 64
INDEX_HEAD_DIM = 128
INDEX_TOPK = 2048

QUANT_GROUP = 128  # activation group and weight block edge (128x128 block scales)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
KEY_SCALE_EPS = 1e-4  # vLLM csrc/cache_kernels.cu: fmaxf(amax, 1e-4f) / 448
ACT_SCALE_EPS = 1e-10  # vLLM fp8_utils.per_token_group_quant_fp8 default eps

# Indexer cache (vLLM csrc/cache_kernels.cu, indexer_k_quant_and_cache_kernel):
# per block, 64 x 128 FP8 values token-major, then 64 fp32 scales.
CACHE_BLOCK_SIZE = 64
CACHE_BYTES_PER_TOKEN = INDEX_HEAD_DIM + 4  # 132
CACHE_BYTES_PER_BLOCK = CACHE_BLOCK_SIZE * CACHE_BYTES_PER_TOKEN  # 8448
CACHE_SCALE_OFFSET = CACHE_BLOCK_SIZE * INDEX_HEAD_DIM  # byte offset of the scales: 8192

MAX_MODEL_LEN = 163840
T_MAX = 256  # decode rows the fused region accepts (more: vLLM's own path, docs/VLLM.md)
SUPPORTED_H = (128, 64, 32, 16)
SUPPORTED_NEXT_N = (1, 2)

# DeepSeek-V3.2 YaRN rope parameters (config.json rope_scaling).
ROPE_THETA = 10000.0
ROPE_FACTOR = 40.0
ROPE_ORIGINAL_MAX_POS = 4096
ROPE_BETA_FAST = 32
ROPE_BETA_SLOW = 1
ROPE_MSCALE = 1.0
ROPE_MSCALE_ALL_DIM = 1.0

