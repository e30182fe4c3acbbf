"""``LoopConfig``: the options of one decode-loop run, validated by :meth:`LoopConfig.resolved`."""

from __future__ import annotations

import dataclasses

import torch

from .common import BLOCK_SIZE, MAX_MODEL_LEN, SUPPORTED_H, T_MAX
from .scheduler import RequestMix



# ======================================================================================
# configuration
# ======================================================================================
@dataclasses.dataclass
class LoopConfig:
    """Options of one decode-loop run (the CLI's, see ``--help``).

    Attributes
    ----------
    num_heads : MLA heads per rank H (128, 64, 32 or 16). next_n : rows per request (1, or 2 = MTP).
    steps : decode steps. max_batch : requests per step (max_batch * next_n <= 256).
    max_context : longest context (tokens); prompts are clipped to leave room for one step.
    num_blocks : cache blocks per copy (incl. the null block); ``None`` = enough for
        ``max(2 * max_context, 16384 * max_batch)`` tokens (GPU) or ``2 * max_context`` (CPU).
    paths : paths to run besides ``reference`` (which always runs).
    strides : ``{path: n}``: run ``path`` only every ``n``-th step (the other steps copy the
        reference's new cache bytes into its copy); 1 (every step) unless given. A CPU economy.
    configs : ``{path: config}`` passed to ``run_region`` (e.g. a ``PartitionConfig``).
    mix : RequestMix. arrival_peak : peak Poisson arrivals per step (``None``: ``2 * max_batch /
        mean output steps``). arrival_period : steps per arrival wave (``None``: ``steps / 2`` on a
        GPU, ``steps`` on the CPU, at least 2).
    mtp_accept : probability that the MTP draft is accepted (next_n = 2; DeepSeek-V3 reports 85-90%).
    tie_free : build indexer inputs whose logits are exact and distinct (exact top-k index sets).
    pad_batches : pad every batch to its bucket in eager mode too (graphs always pad).
    graphs : CUDA-graph mode. cold_l2 : flush L2 (read sweep) before each timed GPU run.
    check : ``"full"`` (``checks.check_region``) or ``"fast"`` (:func:`fast_check_region`).
    check_every : compare with the reference every n-th step (1 = every step).
    use_ue8m0 : power-of-two scales (vLLM 0.33 on Hopper). seed : RNG seed. device : torch device.
    production : run the production model's region (``smpart.prep``, what ``vllm_v32*`` need): every
        path gets bf16 ``index_q`` + raw weights (the index-q prep runs in the region) and
        ``production_defaults()``; the new keys are written into every cache copy and ``topk_indices``
        is -1-filled by the loop outside the timing, as vLLM's ``fused_norm_rope`` does. Refuses the
        generic-model vendor paths and ``tie_free``.
    """

    num_heads: int = 16
    next_n: int = 1
    steps: int = 20
    max_batch: int = 4
    max_context: int = 3072
    num_blocks: int | None = None
    paths: tuple = ("sequential", "partitioned")
    strides: dict = dataclasses.field(default_factory=dict)
    configs: dict = dataclasses.field(default_factory=dict)
    mix: RequestMix | None = None
    arrival_peak: float | None = None
    arrival_period: int | None = None
    mtp_accept: float = 0.85
    tie_free: bool = False
    pad_batches: bool = False
    graphs: bool = False
    cold_l2: bool = False
    check: str = "full"
    check_every: int = 1
    use_ue8m0: bool = True
    seed: int = 0
    device: str = "cpu"
    production: bool = False

    def resolved(self) -> "LoopConfig":
        """A validated copy with every ``None`` default filled in.

        Raises
        ------
        ValueError : a bad option (the message names it).
        """
        from smpart.region import PATHS

        c = dataclasses.replace(self, strides=dict(self.strides), configs=dict(self.configs))
        dev = torch.device(c.device)
        if c.num_heads not in SUPPORTED_H:
            raise ValueError(f"num_heads: expected one of {SUPPORTED_H}, got {c.num_heads!r}")
        if c.next_n not in (1, 2):
            raise ValueError(f"next_n: expected 1 or 2, got {c.next_n!r}")
        if not isinstance(c.steps, int) or c.steps < 1:
            raise ValueError(f"steps: expected an int >= 1, got {c.steps!r}")
        if not isinstance(c.max_batch, int) or c.max_batch < 1 or c.max_batch * c.next_n > T_MAX:
            raise ValueError(f"max_batch: expected 1..{T_MAX // c.next_n} (max_batch * next_n <= {T_MAX}), "
                             f"got {c.max_batch!r}")
        if not isinstance(c.max_context, int) or not c.next_n + 1 <= c.max_context <= MAX_MODEL_LEN:
            raise ValueError(f"max_context: expected {c.next_n + 1}..{MAX_MODEL_LEN}, got {c.max_context!r}")
        need = -(-c.max_context // BLOCK_SIZE) + 1
        if c.num_blocks is None:
            tokens = 2 * c.max_context if dev.type != "cuda" else max(2 * c.max_context, 16384 * c.max_batch)
            c.num_blocks = -(-tokens // BLOCK_SIZE) + 1
        if not isinstance(c.num_blocks, int) or c.num_blocks < need:
            raise ValueError(f"num_blocks: expected >= {need} (one request at max_context {c.max_context} plus the "
                             f"null block), got {c.num_blocks!r}")
        paths = tuple(dict.fromkeys(p for p in c.paths if p != "reference"))
        bad = [p for p in paths if p not in PATHS]
        if bad:
            raise ValueError(f"paths: unknown {bad}; choose from {[p for p in PATHS if p != 'reference']}")
        c.paths = paths
        for p, n in c.strides.items():
            if p not in paths:
                raise ValueError(f"strides: path {p!r} is not among the paths {list(paths)}")
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"strides: expected an int >= 1 for {p!r}, got {n!r}")
        if not isinstance(c.production, bool):
            raise TypeError(f"production: expected a bool, got {c.production!r}")
        from .common import V32_PATHS, VENDOR_PATHS

        if c.production:
            generic = [p for p in paths if p in VENDOR_PATHS]
            if generic:
                raise ValueError(f"paths: {generic} run the generic model's region; the production-model loop "
                                 f"compares with {list(V32_PATHS)}")
            if c.tie_free:
                raise ValueError("tie_free: the production region quantizes index_q itself (smpart.prep); "
                                 "tie-free indexer inputs need the generic region")
        for p in c.configs:
            if p not in paths:
                raise ValueError(f"configs: path {p!r} is not among the paths {list(paths)}")
        if c.mix is None:
            c.mix = RequestMix() if dev.type == "cuda" else RequestMix.small(c.max_context)
        c.mix.validate()
        if c.arrival_period is None:
            c.arrival_period = max(2, c.steps // 2 if dev.type == "cuda" else c.steps)
        if not isinstance(c.arrival_period, int) or c.arrival_period < 2:
            raise ValueError(f"arrival_period: expected an int >= 2, got {c.arrival_period!r}")
        if c.arrival_peak is None:
            mean_steps = c.mix.mean_output() / (1.0 + (c.mtp_accept if c.next_n == 2 else 0.0))
            c.arrival_peak = 2.0 * c.max_batch / max(mean_steps, 1.0)
        if not (isinstance(c.arrival_peak, (int, float)) and 0 < c.arrival_peak <= 1e4):
            raise ValueError(f"arrival_peak: expected a number in (0, 1e4], got {c.arrival_peak!r}")
        if not 0.0 <= c.mtp_accept <= 1.0:
            raise ValueError(f"mtp_accept: expected a probability in [0, 1], got {c.mtp_accept!r}")
        if c.check not in ("full", "fast"):
            raise ValueError(f"check: expected 'full' or 'fast', got {c.check!r}")
        if not isinstance(c.check_every, int) or c.check_every < 1:
            raise ValueError(f"check_every: expected an int >= 1, got {c.check_every!r}")
        if c.graphs and dev.type != "cuda":
            raise ValueError("graphs: CUDA-graph mode needs a CUDA device")
        if c.cold_l2 and dev.type != "cuda":
            raise ValueError("cold_l2: the L2 flush needs a CUDA device")
        return c
