"""ONNX Runtime execution providers and sessions: TensorRT -> CUDA -> CPU, verified, never silent.

`onnxruntime-gpu` lists CUDA and TensorRT in `get_available_providers()` even on machines without a
GPU or without the CUDA libraries; asking for them there makes ORT print load errors and fall back to
CPU. So an accelerator is only requested when (1) ORT lists it, (2) the NVIDIA driver loads and sees a
device, and (3) the provider's shared library loads (which needs CUDA/cuDNN/TensorRT libraries, after
`onnxruntime.preload_dlls()` has had a chance to find the pip-installed ones). After the session is
built, `session.get_providers()` is checked: an explicit request that was not honoured is an error,
and an automatic choice reports what it actually runs on.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys.compat import require
from recsys.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PRIORITY = (TENSORRT, CUDA, CPU)
ALIASES = {"tensorrt": TENSORRT, "trt": TENSORRT, "cuda": CUDA, "gpu": CUDA, "cpu": CPU}
_PROVIDER_LIB = {TENSORRT: "libonnxruntime_providers_tensorrt.so", CUDA: "libonnxruntime_providers_cuda.so"}

FIX_CORRUPT = (
    "The file is corrupt, truncated or not an ONNX model. Re-export it with "
    "`recsys export --checkpoint CKPT --registry DIR`, or switch back to the previous version with "
    "`recsys models rollback --registry DIR`."
)


def ort() -> Any:
    """onnxruntime, imported on first use (CLI modules must not import it at import time)."""
    return require("onnxruntime")


def _driver_devices() -> int:
    """Number of CUDA devices the NVIDIA driver sees (0 without driver or GPU); loads no CUDA toolkit."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return int(count.value)


@functools.lru_cache(maxsize=1)
def accelerator_status() -> dict[str, str | None]:
    """provider -> None when usable here, else the reason it is not. Cached: it probes shared libraries."""
    rt = ort()
    listed = set(rt.get_available_providers())
    status: dict[str, str | None] = {}
    devices = _driver_devices() if (listed & {CUDA, TENSORRT}) else 0
    if devices and hasattr(rt, "preload_dlls"):
        # Loads CUDA/cuDNN from pip's nvidia-* wheels (or torch's) if present; it prints what it misses.
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            try:
                rt.preload_dlls()
            except Exception as exc:  # an optional helper: its failure only means no preloaded libs
                log.debug("onnxruntime.preload_dlls() failed: %s", exc)
        if buffer.getvalue().strip():
            log.debug("preload_dlls: %s", buffer.getvalue().strip())
    capi = Path(rt.__file__).parent / "capi"
    for provider in (TENSORRT, CUDA):
        if provider not in listed:
            status[provider] = f"this onnxruntime build has no {provider} (install onnxruntime-gpu)"
        elif not devices:
            status[provider] = "no NVIDIA driver or GPU visible (libcuda.so.1 / cuDeviceGetCount)"
        else:
            status[provider] = _load_provider_library(capi, provider)
    status[CPU] = None
    return status


def _load_provider_library(capi: Path, provider: str) -> str | None:
    try:
        shared = capi / "libonnxruntime_providers_shared.so"
        if shared.exists():
            ctypes.CDLL(str(shared), mode=os.RTLD_GLOBAL)
        ctypes.CDLL(str(capi / _PROVIDER_LIB[provider]))
    except OSError as exc:
        return f"its libraries do not load ({exc}); install the CUDA/cuDNN/TensorRT runtime it needs"
    return None


@dataclass(frozen=True)
class ProviderPlan:
    """Which providers to request, in priority order, and why accelerators were left out."""

    request: str
    providers: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)


def plan_providers(request: str = "auto") -> ProviderPlan:
    """'auto' = best usable of TensorRT, CUDA, CPU; 'tensorrt' | 'cuda' | 'cpu' = exactly that (plus the
    providers below it for nodes it cannot run), or a ModelError saying why it is not possible here."""
    request = request.lower()
    status = accelerator_status()
    if request == "auto":
        usable = tuple(p for p in PRIORITY if status[p] is None)
        skipped = {p: reason for p, reason in status.items() if reason is not None}
        return ProviderPlan(request, usable, skipped)
    if request not in ALIASES:
        raise ConfigError(f"unknown execution provider {request!r}: use auto, tensorrt, cuda or cpu")
    wanted = ALIASES[request]
    if status[wanted] is not None:
        raise ModelError(
            f"execution provider {request!r} was requested but cannot be used here: {status[wanted]}. "
            f"Use --provider auto (best available) or --provider cpu."
        )
    below = PRIORITY[PRIORITY.index(wanted) :]
    return ProviderPlan(request, tuple(p for p in below if status[p] is None))


def usable_cpus() -> int:
    """CPUs this process may run on (cgroup/affinity aware where the OS tells), not the host's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def session_options(threads: int | None = None, optimization: str = "all", spinning: bool = True) -> Any:
    """Intra-op threads default to the usable CPUs; one inter-op thread (a BERT graph is a chain).
    `spinning=False`: idle intra-op threads sleep instead of busy-waiting between ops."""
    rt = ort()
    opts = rt.SessionOptions()
    opts.intra_op_num_threads = int(threads) if threads else usable_cpus()
    opts.inter_op_num_threads = 1
    opts.execution_mode = rt.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = {
        "none": rt.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": rt.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": rt.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": rt.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    opts.log_severity_level = 3  # errors only: no per-node fallback chatter
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def provider_options(provider: str, trt_profile: Mapping[str, str] | None = None, fp16: bool = False) -> dict[str, Any]:
    """Options per provider: TensorRT caches built engines and gets the dynamic-shape profile."""
    if provider == TENSORRT:
        cache = Path(os.environ.get("RECSYS_TRT_CACHE", Path.home() / ".cache" / "recsys" / "trt"))
        cache.mkdir(parents=True, exist_ok=True)
        opts: dict[str, Any] = {
            "device_id": 0,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_fp16_enable": fp16,
        }
        if trt_profile:
            opts.update({f"trt_profile_{k}_shapes": v for k, v in trt_profile.items()})
        return opts
    if provider == CUDA:
        return {"device_id": 0}
    return {}


@dataclass(frozen=True)
class SessionInfo:
    """What a session was asked for and what it runs on (for logs, manifests and benchmarks)."""

    path: str
    request: str
    requested: tuple[str, ...]
    active: tuple[str, ...]
    skipped: dict[str, str]

    @property
    def primary(self) -> str:
        return self.active[0]

    @property
    def on_gpu(self) -> bool:
        return self.primary in (CUDA, TENSORRT)


def create_session(
    path: Path | str,
    provider: str = "auto",
    threads: int | None = None,
    trt_profile: Mapping[str, str] | None = None,
    fp16: bool = False,
    optimization: str = "all",
    *,
    spinning: bool = True,
) -> tuple[Any, SessionInfo]:
    """Load an ONNX model on the chosen providers; refuse corrupt files and unhonoured requests."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"ONNX model {path} is missing. {FIX_CORRUPT}")
    plan = plan_providers(provider)
    rt = ort()
    requested = [(p, provider_options(p, trt_profile, fp16)) for p in plan.providers]
    try:
        session = rt.InferenceSession(str(path), sess_options=session_options(threads, optimization, spinning), providers=requested)
    except Exception as exc:  # ORT raises its own pybind types (InvalidProtobuf, Fail, ...)
        raise ModelError(f"cannot load ONNX model {path}: {str(exc).strip()[:300]}. {FIX_CORRUPT}") from exc
    active = tuple(session.get_providers())
    info = SessionInfo(str(path), provider, plan.providers, active, dict(plan.skipped))
    if active[0] != plan.providers[0]:
        message = f"{path.name}: asked for {plan.providers[0]} but ONNX Runtime runs it on {active[0]}"
        if provider != "auto":
            raise ModelError(f"{message}. Check the CUDA/TensorRT installation, or use --provider cpu.")
        log.warning("%s (falling back)", message)
    log.info("%s runs on %s", path.name, ", ".join(active))
    return session, info
