"""The environment of the DeepSpeed processes the tests launch on CPU."""
import os

#: DeepSpeed's JIT-built CPU ops (its shared-memory communication op takes ~60 s to compile) are cached per
#: machine, not per checkout, so a fresh clone (CI's) reuses them; TORCH_EXTENSIONS_DIR overrides.
EXTENSIONS_DIR = os.environ.get("TORCH_EXTENSIONS_DIR",
                                os.path.join(os.path.expanduser("~"), ".cache", "logo-kernels", "torch_extensions"))


def deepspeed_cpu_env(base=None, **extra) -> dict:
    """``base`` (default: this process's environment) with DeepSpeed on the CPU accelerator and the shared cache."""
    return dict(os.environ if base is None else base, DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=EXTENSIONS_DIR,
                **extra)
