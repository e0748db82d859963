"""The orchestration layer: params.yaml, the DVC stages, Prefect flows, MLflow tracking, Optuna sweeps, serving.

Importing it turns telemetry off for every tool it drives, including servers they start in other
processes (Prefect's temporary API server checks only its own setting, not ``DO_NOT_TRACK``), and
pins the CPU kernels (:func:`pin_cpu_kernels`) before any of them runs.
"""

from __future__ import annotations

import os

TELEMETRY_OFF = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
}
TRUTHY = ("1", "true", "yes")
# The same CPU kernels on every x86 CPU with AVX2 + FMA (an AVX-512/AMX CPU would otherwise take its
# own code paths in ATen and MKL, whose rounding differs): measured, each of these changes the trained
# weights' bits, and pinned they are the kernels an AVX2-only CPU runs anyway. oneDNN is not pinned:
# train and evaluate run with it off (pipelines.builders.apply_cpu_policy), so its ISA does not reach
# their bits, and a process-wide ONEDNN_MAX_CPU_ISA breaks OpenVINO's CPU plugin on AVX-512 CPUs (its
# INT8-weight FullyConnected then has no primitive: measured on an AMD EPYC Zen 4).
CPU_KERNEL_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT"}
KERNELS_ENV = "INPFORMER_CPU_KERNELS"  # avx2 (default) | native (each CPU's fastest kernels; bits differ by CPU)
CPUINFO = "/proc/cpuinfo"


def telemetry_off() -> None:
    """Default every tool's telemetry to off; with ``DO_NOT_TRACK`` set, force Prefect's server analytics off."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    if os.environ["DO_NOT_TRACK"].strip().lower() in TRUTHY:
        os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"


def cpu_flags(cpuinfo: str = CPUINFO) -> list[str]:
    """This (Linux) CPU's feature flags; empty when they cannot be read (another OS)."""
    try:
        with open(cpuinfo) as fh:
            return next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return []


def has_avx2(cpuinfo: str = CPUINFO) -> bool:
    """Whether this (Linux) CPU has AVX2 and FMA; False when that cannot be read (another OS, ARM)."""
    flags = cpu_flags(cpuinfo)
    return "avx2" in flags and "fma" in flags


def pin_cpu_kernels(cpuinfo: str = CPUINFO) -> dict[str, str]:
    """Default :data:`CPU_KERNEL_PINS` (a value already set wins) unless ``INPFORMER_CPU_KERNELS=native``
    or the CPU lacks AVX2; returns what is pinned. Takes effect when set before the first tensor
    operation (ATen, MKL and oneDNN read these lazily)."""
    if os.environ.get(KERNELS_ENV, "avx2").strip().lower() == "native" or not has_avx2(cpuinfo):
        return {}
    for key, value in CPU_KERNEL_PINS.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in CPU_KERNEL_PINS}


telemetry_off()
pin_cpu_kernels()
