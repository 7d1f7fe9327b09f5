"""What CPU this process runs on: its model name and feature flags (Linux's /proc/cpuinfo).

One place reads them: the AMX and AVX-512 checks of the kernels, the benchmarks' headers and
the reproduction study's timing records all ask here.
"""

import functools
import os
import platform


@functools.cache
def _cpuinfo():
    """(model name, flags) of the first CPU in /proc/cpuinfo; ("", set()) where there is none
    (not Linux, or an ARM kernel that names no model)."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not name:
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return name, frozenset(flags)


def cpu_flags():
    """The CPU's feature flags ("avx512f", "amx_tile", ...), read once per process (the
    kernels ask at every convolution); empty where unknown."""
    return _cpuinfo()[1]


def cpu_model():
    """The CPU's model name, e.g. "Intel(R) Xeon(R) Processor"."""
    return _cpuinfo()[0] or platform.processor() or platform.machine() or "unknown CPU"


def describe():
    """The facts a timing record keeps: {"cpu": model, "cpus": count, "amx": bool}."""
    return {"cpu": cpu_model(), "cpus": os.cpu_count() or 1, "amx": "amx_tile" in cpu_flags()}
