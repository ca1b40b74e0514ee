"""Ray start-up and the Ray Train configuration shared by the distributed trainers.

:func:`start_ray` connects to (``address="auto"`` or ``ray://...``) or starts (``"local"``) Ray
only when it is not initialised yet, so that a caller that already runs inside a Ray job (``ray
job submit``) or a test fixture keeps its instance. :func:`trainer_configs` turns a
:class:`~kgrank.config.RayTrainConfig` into Ray Train's ``ScalingConfig`` and ``RunConfig``
(``FailureConfig(max_failures)``, the last two checkpoints kept, ``storage_path``).

Inside a worker :func:`setup_worker` sets the thread count deliberately: Ray sets
``OMP_NUM_THREADS=1`` in its workers (ray-project/ray#15718), which would silently make every
worker single-threaded; ``threads_per_worker`` is applied to ``torch.set_num_threads`` and the
environment.

Fault injection (tests, demos): ``KGRANK_FAIL_AT_EPOCH=N`` in the driver's environment makes the
last worker raise at the start of epoch ``N``, once: it first creates the marker file
``KGRANK_FAIL_MARKER`` (default: ``<storage>/<run>/.fail-marker``) and does not fail again when the
marker exists, so the restarted worker group resumes from the latest checkpoint and finishes.
With ``KGRANK_FAIL_HARD=1`` the worker process exits instead (``os._exit``), as on a crash.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kgrank.config import RayTrainConfig

log = logging.getLogger("kgrank")

FAIL_ENV = "KGRANK_FAIL_AT_EPOCH"
MARKER_ENV = "KGRANK_FAIL_MARKER"
HARD_ENV = "KGRANK_FAIL_HARD"


class InjectedFailure(RuntimeError):
    """The failure :func:`maybe_fail` raises on purpose."""


def start_ray(address: str | None, threads: int = 1) -> bool:
    """Initialise Ray unless it is already; True when this call started (and so must shut
    down) it. ``"local"`` starts a local instance with this machine's CPUs."""
    import ray

    if ray.is_initialized():
        return False
    # Ray 2.60 sets up token authentication (and writes a token file) unless told otherwise.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address in (None, "local"):
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}})
    else:
        ray.init(address=address, logging_level=logging.WARNING)
    return True


@contextmanager
def ray_session(address: str | None, threads: int = 1) -> Iterator[None]:
    """Ray started (or connected) once around several trainings, and shut down after if this
    call started it; nothing when ``address`` is None (in-process)."""
    if address is None:
        yield
        return
    started = start_ray(address, threads)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def storage_path(ray_cfg: RayTrainConfig, output_dir: str | Path = "runs") -> str:
    """Absolute ``RunConfig(storage_path)``: the configured one (a URI is kept as is) or
    ``<output_dir>/ray_results``."""
    if ray_cfg.storage_path and "://" in ray_cfg.storage_path:
        return ray_cfg.storage_path
    path = Path(ray_cfg.storage_path) if ray_cfg.storage_path else Path(output_dir) / "ray_results"
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


@dataclass
class FailPlan:
    """Where to inject one failure (None epoch: never)."""

    epoch: int | None = None
    marker: str = ""
    rank: int = -1  # -1: the last worker
    hard: bool = False  # kill the worker process (os._exit) instead of raising

    @classmethod
    def from_env(cls, default_marker: str) -> FailPlan:
        raw = os.environ.get(FAIL_ENV, "").strip()
        if not raw:
            return cls()
        return cls(int(raw), os.environ.get(MARKER_ENV, default_marker),
                   hard=os.environ.get(HARD_ENV, "") == "1")


def maybe_fail(plan: FailPlan, epoch: int, rank: int, world: int) -> None:
    """Raise :class:`InjectedFailure` on the planned worker at the planned epoch, once."""
    if plan.epoch is None or epoch != plan.epoch:
        return
    if rank != (plan.rank if plan.rank >= 0 else world - 1):
        return
    marker = Path(plan.marker)
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"failed at epoch {epoch} on rank {rank}\n")
    if plan.hard:  # the process dies as on a crash or an OOM kill: no exception, no clean-up
        os._exit(13)
    raise InjectedFailure(f"{FAIL_ENV}={plan.epoch}: injected failure on rank {rank}")


def run_name(prefix: str) -> str:
    """A unique Ray Train run name (the storage sub-directory of one ``fit``)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def set_poll_interval(ray_cfg: RayTrainConfig) -> None:
    """``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` = ``ray_cfg.poll_interval_s`` in the driver's
    environment (Ray Train hands it to its controller), unless it is set already. The controller
    collects the workers' reports at this interval and a worker's next report waits for the
    previous one to be collected, so at Ray's default of 2 s every epoch pays ~1.5 s
    (``benchmarks/RESULTS.md``)."""
    os.environ.setdefault(POLL_ENV, str(ray_cfg.poll_interval_s))


def trainer_configs(
    ray_cfg: RayTrainConfig, name: str, storage: str, use_gpu: bool | None = None
) -> tuple[Any, Any]:
    """(``ScalingConfig``, ``RunConfig``) of one Ray Train run; also sets the controller's poll
    interval (see :func:`set_poll_interval`). ``use_gpu`` None: GPUs when
    ``ray_cfg.gpus_per_worker`` > 0."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    set_poll_interval(ray_cfg)

    use_gpu = ray_cfg.gpus_per_worker > 0 if use_gpu is None else use_gpu
    resources: dict[str, float] = {"CPU": ray_cfg.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = ray_cfg.gpus_per_worker
    scaling = ScalingConfig(num_workers=ray_cfg.workers, use_gpu=use_gpu,
                            resources_per_worker=resources)
    run = RunConfig(
        name=name, storage_path=storage,
        failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
    )
    return scaling, run


def setup_worker(threads: int) -> tuple[int, int]:
    """Set the worker's thread count (torch and ``OMP_NUM_THREADS``); returns (rank, world)."""
    import ray.train
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def worker_device(use_gpu: bool) -> Any:
    """The worker's torch device: the GPU Ray assigned to it, or the CPU."""
    import torch

    if use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def fit_trainer(make: Callable[[Any, Any], Any], ray_cfg: RayTrainConfig,
                output_dir: str | Path, label: str, what: str, use_gpu: bool | None = None
                ) -> tuple[Any, str]:
    """Start Ray when needed, build a Ray Train trainer with ``make(scaling_config,
    run_config)`` (after Ray is up, so it may ``ray.put``), fit it, shut Ray down again if this
    call started it; returns ``(ray.train.Result, storage path)``. Raises when training ended
    without a checkpoint (``what`` names the model). ``use_gpu=False`` asks for CPUs only
    whatever ``ray_cfg.gpus_per_worker`` says (a CPU-only learner)."""
    import ray

    started = start_ray(ray_cfg.address, ray_cfg.threads_per_worker)
    try:
        storage = storage_path(ray_cfg, output_dir)
        scaling, run_cfg = trainer_configs(ray_cfg, label, storage, use_gpu)
        result = make(scaling, run_cfg).fit()
    finally:
        if started:
            ray.shutdown()
    if result.checkpoint is None:
        raise RuntimeError(f"ray train of {what} ended without a checkpoint ({result.error})")
    return result, storage


def fit_torch_trainer(worker: Callable[[dict[str, Any]], None], data: Any,
                      config: dict[str, Any], ray_cfg: RayTrainConfig,
                      output_dir: str | Path, label: str, progress: bool, what: str
                      ) -> tuple[Any, str]:
    """Run ``worker`` with a Ray Train ``TorchTrainer`` on ``ray_cfg.workers`` workers and return
    ``(ray.train.Result, storage path)``; the shared set-up of the graph and fusion runners.

    ``data`` is put in the object store once (``config["data"]``); ``config`` gets the worker
    settings every runner passes (threads, GPU, the failure-injection plan, progress, batch
    split). Raises when training ended without a checkpoint (``what`` names the model)."""
    import ray
    from ray.train.torch import TorchTrainer

    storage = storage_path(ray_cfg, output_dir)
    fail = FailPlan.from_env(str(Path(storage) / label / ".fail-marker")) \
        if "://" not in storage else FailPlan()

    def make(scaling: Any, run_cfg: Any) -> Any:
        return TorchTrainer(
            worker,
            train_loop_config={
                **config, "data": ray.put(data), "threads": ray_cfg.threads_per_worker,
                "use_gpu": ray_cfg.gpus_per_worker > 0, "fail": asdict(fail),
                "progress": progress, "split_batch": ray_cfg.split_batch,
            },
            scaling_config=scaling, run_config=run_cfg,
        )

    return fit_trainer(make, ray_cfg, output_dir, label, what)

