"""Tuning cache: which path and launch configuration to run per shape bucket, per GPU.

The runtime (and the vLLM shim) looks a decode step up here; it never imports ``smpart.bench``
(the autotuner, ``smpart.bench.autotune``, writes the files). Lookup is a dict access: nothing is
tuned or measured at run time, so a CUDA-graph capture never waits on it.

File format (JSON, schema 1)::

    {"schema": 1,
     "meta": {"gpu": "NVIDIA H200", "num_sms": 132, "torch": "2.11", "triton": "3.6", "date": ...,
              "source": "..."},
     "entries": {"H128-n1-T32-L8192": {"path": "dual_stream", "config": {...PartitionConfig...},
                                       "times_us": {"sequential": 52.5, "partitioned": 57.8, ...},
                                       "model_config": {...}}}}

``path`` is one of :data:`TUNABLE_PATHS`: this package's paths or vLLM's own computation
(``vllm_sequential`` / ``vllm_dual_stream`` / ``vllm_v32`` / ``vllm_v32_dual_stream``, measured by the
autotuner when loadable), which callers map to their region with :func:`path_for_region`; ``config``
is the bucket's best partitioned config whatever won (:attr:`Choice.run_config` gives ``run_region``'s).
A file is trusted only when its GPU name, SM count and torch/triton major.minor versions match the
running process; otherwise (or when it is corrupt) it is ignored with a warning, never used.
Writes are atomic (temporary file + ``os.replace``). Shipped results live in
``smpart/tuned/*.json``; ``SMPART_TUNING_CACHE`` points at another file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
import warnings

import torch
import triton

from .triton_kernels import dims
from . import cost_model
from .triton_kernels.partitioned import PartitionConfig

SCHEMA = 1
TUNED_DIR = os.path.join(os.path.dirname(__file__), "tuned")
SMPART_PATHS = ("sequential", "dual_stream", "partitioned")  # this package's own paths
# vLLM's own computation of the region (smpart.vendor / smpart.vendor_v32): the tuner may record that
# it won a bucket, so that the dispatch never runs something slower than vLLM there
VENDOR_PATHS = ("vllm_sequential", "vllm_dual_stream", "vllm_v32", "vllm_v32_dual_stream")
TUNABLE_PATHS = SMPART_PATHS + VENDOR_PATHS  # what a tuning file may hold and the dispatcher may choose
# the generic model's vendor baselines and the production model's (vllm_v32*) are the same choice
# ("vLLM's own kernels, one stream / two streams") for the two regions
_PRODUCTION_TWIN = {"vllm_sequential": "vllm_v32", "vllm_dual_stream": "vllm_v32_dual_stream"}
_GENERIC_TWIN = {v: k for k, v in _PRODUCTION_TWIN.items()}


def path_for_region(path: str, production: bool) -> str:
    """The path to run for a dispatched ``path`` on the generic (``production=False``) or the
    production model's region (``smpart.prep``): vLLM's vendor picks map to that region's own
    vendor path (``vllm_sequential`` <-> ``vllm_v32``, ``vllm_dual_stream`` <->
    ``vllm_v32_dual_stream``); every other path is returned unchanged.

    Raises
    ------
    ValueError : ``path`` is not in :data:`TUNABLE_PATHS`.
    """
    if path not in TUNABLE_PATHS:
        raise ValueError(f"path: expected one of {TUNABLE_PATHS}, got {path!r}")
    return _PRODUCTION_TWIN.get(path, path) if production else _GENERIC_TWIN.get(path, path)


@dataclasses.dataclass(frozen=True)
class Bucket:
    """A shape bucket: T rounded up to a power of two (<= 256), H, next_n, and the longest context
    rounded up to a power of two (>= 4096, capped at 163840)."""

    num_tokens: int
    num_heads: int
    next_n: int
    max_len: int

    @classmethod
    def of(cls, num_tokens: int, num_heads: int, next_n: int, max_len: int) -> "Bucket":
        """Bucket of a step. Raises ``ValueError`` on out-of-range values (named)."""
        if not 1 <= num_tokens <= dims.T_MAX:
            raise ValueError(f"num_tokens: expected 1..{dims.T_MAX}, got {num_tokens}")
        if num_heads not in dims.SUPPORTED_H:
            raise ValueError(f"num_heads: expected one of {dims.SUPPORTED_H}, got {num_heads}")
        if next_n not in dims.SUPPORTED_NEXT_N:
            raise ValueError(f"next_n: expected one of {dims.SUPPORTED_NEXT_N}, got {next_n}")
        if not 0 <= max_len <= dims.MAX_MODEL_LEN:
            raise ValueError(f"max_len: expected 0..{dims.MAX_MODEL_LEN}, got {max_len}")
        t = triton.next_power_of_2(num_tokens)
        L = min(max(4096, triton.next_power_of_2(max(max_len, 1))), dims.MAX_MODEL_LEN)
        return cls(t, num_heads, next_n, L)

    @property
    def key(self) -> str:
        """The bucket's key in a cache file's ``entries``: ``"H<heads>-n<next_n>-T<tokens>-L<max_len>"``
        (e.g. ``"H128-n1-T32-L8192"``; :meth:`TuningCache.nearest` parses it back)."""
        return f"H{self.num_heads}-n{self.next_n}-T{self.num_tokens}-L{self.max_len}"


@dataclasses.dataclass(frozen=True)
class Choice:
    """What to run: a path name, the partitioned kernel's config, and where the choice came from
    (``"tuned"``: the cache; ``"model"``: the cost model, for buckets the cache does not hold)."""

    path: str
    config: PartitionConfig
    source: str

    @property
    def run_config(self) -> PartitionConfig | None:
        """The ``config`` argument of ``run_region`` for this choice: the partitioned config when the
        path is ``partitioned``, else ``None`` (the file keeps the bucket's best partitioned config
        even when another path won; no other path takes a ``PartitionConfig``)."""
        return self.config if self.path == "partitioned" else None


def device_meta(device=None) -> dict:
    """The fields a cache file must match: GPU name, SM count, torch and triton major.minor."""
    if device is None or torch.device(device).type != "cuda":
        gpu, sms = "cpu", 0
    else:
        props = torch.cuda.get_device_properties(device)
        gpu, sms = props.name, props.multi_processor_count
    return {"gpu": gpu, "num_sms": sms, "torch": _major_minor(torch.__version__),
            "triton": _major_minor(triton.__version__)}


def _major_minor(v: str) -> str:
    return ".".join(v.split("+")[0].split(".")[:2])


def config_to_dict(cfg: PartitionConfig) -> dict:
    """``cfg``'s fields as a JSON-ready dict (``dataclasses.asdict``; ``topk_config`` as the dict of
    its ``RadixTopkConfig``, omitted when None). :func:`config_from_dict` reads it back."""
    d = dataclasses.asdict(cfg)
    if d.get("topk_config") is None:
        d.pop("topk_config", None)
    return d


def config_from_dict(d: dict) -> PartitionConfig:
    """The :class:`PartitionConfig` of a file's ``config`` object; fields it lacks (a file written
    before they existed) take their defaults, e.g. ``topk_impl="smpart"``.

    Raises
    ------
    ValueError : unknown fields (a stale or foreign file; also inside ``topk_config``), or a value
        ``PartitionConfig`` / ``RadixTopkConfig`` refuses (e.g. ``config.topk_impl`` not ``"smpart"`` /
        ``"vllm"``, ``config.algo`` not ``"sample"`` / ``"radix"``).
    TypeError : a value of the wrong type (``PartitionConfig.__post_init__``).
    """
    from .triton_kernels.radix_topk import RadixTopkConfig

    names = {f.name for f in dataclasses.fields(PartitionConfig)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"config: unknown fields {sorted(unknown)}")
    d = dict(d)
    tk = d.get("topk_config")
    if tk is not None:
        if not isinstance(tk, dict):
            raise TypeError(f"config.topk_config: expected an object, got {type(tk).__name__}")
        tnames = {f.name for f in dataclasses.fields(RadixTopkConfig)}
        if set(tk) - tnames:
            raise ValueError(f"config.topk_config: unknown fields {sorted(set(tk) - tnames)}")
        d["topk_config"] = RadixTopkConfig(**tk)  # fields it lacks (older files) take their defaults
    return PartitionConfig(**d)


@dataclasses.dataclass
class TuningCache:
    """Tuned choices of one GPU + software stack (see the module docstring for the format)."""

    meta: dict
    entries: dict = dataclasses.field(default_factory=dict)
    _resolved: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)  # Bucket -> Choice

    def lookup(self, bucket: Bucket) -> Choice | None:
        """The tuned :class:`Choice` (source ``"tuned"``) stored under ``bucket.key``, or None.

        Raises
        ------
        ValueError : the stored config has unknown fields (:func:`config_from_dict`).
        """
        e = self.entries.get(bucket.key)
        if e is None:
            return None
        return Choice(e["path"], config_from_dict(e.get("config", {})), "tuned")

    def nearest(self, bucket: Bucket) -> tuple[str, dict] | None:
        """The tuned entry closest to ``bucket`` (same H first, then the smallest
        ``|log2 T ratio| + |log2 L ratio| + 2 |next_n difference|``), as ``(key, entry)``; None if
        the cache is empty. Keys that do not parse are skipped."""
        best = None
        for key, e in self.entries.items():
            try:
                h, n, t, L = (int(x[1:]) for x in key.split("-"))
            except ValueError:
                continue
            d = (h != bucket.num_heads, abs(math.log2(t / bucket.num_tokens)) + abs(math.log2(L / bucket.max_len))
                 + 2 * abs(n - bucket.next_n), key)
            if best is None or d < best[0]:
                best = (d, key, e)
        return None if best is None else (best[1], best[2])

    def resolve(self, bucket: Bucket) -> Choice | None:
        """The bucket's tuned choice, else the nearest tuned bucket's (path and partitioned config;
        source ``"nearest:<key>"``), else None (empty cache). A bucket the tuner never measured
        thus runs what won next to it, never an unmeasured default."""
        if bucket in self._resolved:  # the nearest-entry scan runs once per bucket; later steps are a dict hit
            return self._resolved[bucket]
        hit = self.lookup(bucket)
        if hit is None:
            near = self.nearest(bucket)
            if near is not None:
                key, e = near
                hit = Choice(e["path"], config_from_dict(e.get("config", {})), f"nearest:{key}")
        self._resolved[bucket] = hit
        return hit

    def put(self, bucket: Bucket, path: str, config: PartitionConfig, times_us: dict, model_config=None) -> None:
        """Record a bucket's choice and every candidate's time (us).

        Parameters
        ----------
        bucket : Bucket. path : str, one of ``TUNABLE_PATHS``. config : PartitionConfig, the
        bucket's best partitioned config (kept even when another path won; the file's ``config``
        object, so never None). times_us : dict, candidate name (str) -> measured time in
        microseconds (int or float, finite, > 0); may be empty. model_config : PartitionConfig or
        None, the cost model's pick (recorded for comparison).

        Raises
        ------
        TypeError : ``bucket`` not a :class:`Bucket`; ``path`` not a str; ``config`` not a
            ``PartitionConfig``; ``times_us`` not a dict, or a key not a str, or a value not an int or
            float (a bool included); ``model_config`` neither a ``PartitionConfig`` nor None.
        ValueError : ``path`` not in ``TUNABLE_PATHS``; a ``times_us`` value not finite or <= 0.
        Nothing is stored when it raises.
        """
        if not isinstance(bucket, Bucket):
            raise TypeError(f"bucket: expected a Bucket, got {type(bucket).__name__}")
        if not isinstance(path, str):
            raise TypeError(f"path: expected a str (one of {TUNABLE_PATHS}), got {type(path).__name__} {path!r}")
        if path not in TUNABLE_PATHS:
            raise ValueError(f"path: expected one of {TUNABLE_PATHS}, got {path!r}")
        if not isinstance(config, PartitionConfig):
            raise TypeError(f"config: expected a PartitionConfig, got {type(config).__name__}")
        if model_config is not None and not isinstance(model_config, PartitionConfig):
            raise TypeError(f"model_config: expected a PartitionConfig or None, got {type(model_config).__name__}")
        if not isinstance(times_us, dict):
            raise TypeError(f"times_us: expected a dict (name -> us), got {type(times_us).__name__}")
        for k, v in times_us.items():
            if not isinstance(k, str):
                raise TypeError(f"times_us: expected str keys, got {type(k).__name__} {k!r}")
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"times_us[{k!r}]: expected an int or float (us), got {type(v).__name__} {v!r}")
            if not math.isfinite(v) or v <= 0:
                raise ValueError(f"times_us[{k!r}]: expected a finite time > 0 us, got {v!r}")
        self._resolved.clear()
        self.entries[bucket.key] = {
            "path": path, "config": config_to_dict(config), "times_us": dict(times_us),
            **({"model_config": config_to_dict(model_config)} if model_config is not None else {}),
        }

    def to_json(self) -> dict:
        """The file's JSON object: ``{"schema": SCHEMA, "meta": ..., "entries": ...}`` (see the module docstring)."""
        return {"schema": SCHEMA, "meta": self.meta, "entries": self.entries}


def save_cache(cache: TuningCache, path: str) -> None:
    """Write ``cache`` to ``path`` atomically (a reader never sees a half-written file).

    Raises
    ------
    OSError : the folder cannot be made or written (the temporary file is removed).
    """
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tuning-", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(cache.to_json(), f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_cache(path: str, want_meta: dict) -> TuningCache | None:
    """Load ``path`` if it is well-formed and made on this GPU + stack, else ``None`` (warning).

    ``want_meta``: :func:`device_meta` of the running process; ``gpu``, ``num_sms``, ``torch`` and
    ``triton`` must all match.
    """
    try:
        with open(path) as f:
            raw = json.load(f)
        if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
            raise ValueError(f"schema {raw.get('schema') if isinstance(raw, dict) else None!r} != {SCHEMA}")
        meta, entries = raw["meta"], raw["entries"]
        if not isinstance(meta, dict) or not isinstance(entries, dict):
            raise ValueError("meta/entries are not objects")
        for k, e in entries.items():
            if not isinstance(e, dict) or e.get("path") not in TUNABLE_PATHS:
                raise ValueError(f"entry {k}: path {e.get('path')!r}")
            config_from_dict(e.get("config", {}))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        warnings.warn(f"smpart tuning cache {path}: ignored, unreadable ({type(e).__name__}: {e})", stacklevel=2)
        return None
    for field in ("gpu", "num_sms", "torch", "triton"):
        if meta.get(field) != want_meta.get(field):
            warnings.warn(f"smpart tuning cache {path}: ignored, made for {field}={meta.get(field)!r}, "
                          f"this process has {want_meta.get(field)!r}", stacklevel=2)
            return None
    return TuningCache(meta=meta, entries=entries)


@functools.lru_cache(maxsize=8)
def _shipped_cache(meta_items: tuple) -> TuningCache | None:
    meta = dict(meta_items)
    env = os.environ.get("SMPART_TUNING_CACHE")
    files = [env] if env else sorted(os.path.join(TUNED_DIR, f) for f in os.listdir(TUNED_DIR)
                                     if f.endswith(".json")) if os.path.isdir(TUNED_DIR) else []
    for path in files:
        with warnings.catch_warnings():
            if not env:  # shipped files for other GPUs are expected not to match: stay quiet
                warnings.simplefilter("ignore")
            cache = load_cache(path, meta)
        if cache is not None:
            return cache
    return None


def model_config(num_tokens: int, num_heads: int, next_n: int, max_len: int, num_sms: int,
                 vllm_topk: bool = False) -> PartitionConfig:
    """The cost model's static split for a bucket (every request at ``max_len``), with the GEMM
    beside the top-k when the top-k is a few programs (``cost_model.gemm_in_tail``).

    ``vllm_topk`` (vLLM's top-k ops are registered in this process: ``vendor.vllm_topk_registered``):
    the hybrid instead, the same split with the top-k left to vLLM's own kernel after the fused
    launch (``topk_impl="vllm"``, ``gemm_in_tail=0``). Why: measured per op on an H100
    (2026-12-07, README), vLLM's top-k took 6.5-26.3 us where this package's radix top-k took
    9.7-212 us, while this package's logits and q side were at or ahead of vLLM's; the sampled
    top-k that replaced the radix one as the default has not been timed on a GPU yet.
    """
    rb = cost_model.role_bytes(num_tokens, num_heads, next_n, [max_len] * max(num_tokens // next_n, 1))
    base = PartitionConfig()
    n_idx, n_gemm = cost_model.first_split(cost_model.resident_programs(num_sms, base.num_warps), rb)
    if vllm_topk:
        return dataclasses.replace(base, indexer_programs=n_idx, gemm_programs=n_gemm, gemm_in_tail=0.0,
                                   topk_impl="vllm")
    return dataclasses.replace(base, indexer_programs=n_idx, gemm_programs=n_gemm,
                               gemm_in_tail=cost_model.gemm_in_tail(num_tokens, max_len, num_sms))


def choose(num_tokens: int, num_heads: int, next_n: int, max_len: int, device=None) -> Choice:
    """What to run for one step: the tuned choice of its bucket, else the choice of the nearest
    tuned bucket of this GPU's file (:meth:`TuningCache.resolve`), else (no file for this GPU) the
    partitioned kernel with the cost model's split (:func:`model_config`; the hybrid with vLLM's
    top-k where vLLM's ops are registered in the process, as in a vLLM server).

    Parameters
    ----------
    num_tokens, num_heads, next_n : T, H, rows per request. max_len : the longest visible length
        (or the workspace's capacity). device : the CUDA device (its name/SMs select the file).

    Raises
    ------
    ValueError : out-of-range shape values (see :meth:`Bucket.of`).
    """
    bucket = Bucket.of(num_tokens, num_heads, next_n, max_len)
    meta = device_meta(device)
    cache = _shipped_cache(tuple(sorted(meta.items())))
    hit = cache.resolve(bucket) if cache is not None else None
    if hit is not None:
        return hit
    sms = meta["num_sms"] or 8
    from .vendor import vllm_topk_registered

    cfg = model_config(bucket.num_tokens, num_heads, next_n, bucket.max_len, sms, vllm_topk=vllm_topk_registered())
    return Choice("partitioned", cfg, "model")
