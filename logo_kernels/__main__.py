"""``python -m logo_kernels``: the environment report to paste into a bug report (``--json`` for a machine).

Versions (Python, torch, CUDA, Triton, the peers this package integrates with), the machine (CPU model, cores,
SIMD), each backend of the fused op — available, or why not — and the torch the C++ extension was built for.
Peers are read from their installed metadata, not imported, so the report is quick and never fails on a broken
peer.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
from typing import Dict, Optional

PEERS = ("transformers", "trl", "peft", "deepspeed", "accelerate", "datasets", "liger-kernel", "cut-cross-entropy",
         "verl", "lm-eval", "spacy", "numpy", "triton")


def _installed(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_description() -> Dict[str, object]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    simd = [name for name in ("avx512f", "avx512_bf16", "amx_bf16", "avx2", "fma", "neon", "asimd") if name in flags]
    return {"model": model, "cores": os.cpu_count(), "simd": simd}


def report() -> Dict[str, object]:
    import torch

    from . import __version__
    from .backends import available_backends, cpp, triton

    cuda = torch.cuda.is_available()
    spec = importlib.util.find_spec("logo_kernels._C")
    backends = {
        "torch": "available",
        "cpp": "available" if cpp.is_available() else f"unavailable: {cpp.unavailable_reason()}",
        "triton": ("available on CUDA" if cuda and triton.is_available() else
                   "available under the interpreter (TRITON_INTERPRET=1)" if triton.interpreting()
                   and triton.is_available() else
                   f"unavailable: {triton.unavailable_reason()}" if not triton.is_available() else
                   "installed, but no CUDA device (set TRITON_INTERPRET=1 before importing to run it on CPU)"),
    }
    from .integrations.trl import TESTED_TRL_VERSIONS
    from .integrations.verl import TESTED_VERL_VERSIONS

    return {
        "logo-kernels": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_description(),
        "torch": torch.__version__,
        "torch threads": torch.get_num_threads(),
        "cuda": ({"runtime": torch.version.cuda, "devices": [torch.cuda.get_device_name(i)
                                                            for i in range(torch.cuda.device_count())]}
                 if cuda else None),
        "backends": backends,
        "auto picks": {"cpu": "cpp" if "cpp" in available_backends() else "torch",
                       "cuda": ("triton" if cuda and triton.is_available() else "torch") if cuda else None},
        "extension": {"path": spec.origin if spec else None,
                      "built for torch": cpp.built_torch_version(spec.origin if spec else None),
                      "bf16 tiles": ("bf16 products (AVX512-BF16)" if cpp.bf16_dot_enabled() else
                                     "converted to fp32" + ("" if cpp.is_available() else " (no extension)"))},
        "peers": {name: _installed(name) for name in PEERS},
        "trl integration": _integration_status("trl", TESTED_TRL_VERSIONS),
        "verl integration": _integration_status("verl", TESTED_VERL_VERSIONS),
    }


def _integration_status(peer: str, tested: tuple) -> Optional[str]:
    """Whether the installed ``peer`` is one its drop-in was tested with (None: not installed)."""
    version = _installed(peer)
    if version is None:
        return None
    return "tested version" if version in tested else f"untested ({version}; tested: {', '.join(tested)})"


def format_report(data: Dict[str, object]) -> str:
    lines = [f"logo-kernels {data['logo-kernels']} environment report", ""]
    cpu = data["cpu"]
    rows = [("python", data["python"]), ("platform", data["platform"]),
            ("cpu", f"{cpu['model']}, {cpu['cores']} cores, {' '.join(cpu['simd']) or 'no AVX2/AVX-512/NEON'}"),
            ("torch", f"{data['torch']} ({data['torch threads']} threads)"),
            ("cuda", "no CUDA device" if data["cuda"] is None else
             f"{data['cuda']['runtime']}: {', '.join(data['cuda']['devices'])}")]
    rows += [(f"backend {name}", state) for name, state in data["backends"].items()]
    picks = data["auto picks"]
    rows.append(("auto", f"cpu -> {picks['cpu']}" + (f", cuda -> {picks['cuda']}" if picks["cuda"] else "")))
    ext = data["extension"]
    rows.append(("C++ extension", "not built" if ext["path"] is None else
                 f"{ext['path']} (built for torch {ext['built for torch'] or 'unknown: built before 0.2.0'})"))
    if ext["path"] is not None:
        rows.append(("cpp bf16 tiles", ext["bf16 tiles"]))
    rows += [(name, version or "-") for name, version in data["peers"].items()]
    for integration in ("trl integration", "verl integration"):
        if data.get(integration):
            rows.append((integration, data[integration]))
    width = max(len(key) for key, _ in rows)
    lines += [f"  {key:<{width}}  {value}" for key, value in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m logo_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    data = report()
    print(json.dumps(data, indent=2) if args.json else format_report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
