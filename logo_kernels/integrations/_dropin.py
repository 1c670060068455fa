"""What the trainer drop-ins (trl.py, verl.py) share: the contract check at ``enable()``, putting the trainer's own
module attributes back at ``disable()``, and the ``enabled()`` block."""
import contextlib
import warnings


def check_contract(integration: str, contract: str, problems: list, allow_untested: bool, install: str) -> None:
    """Refuses an untested trainer (``problems`` found by the drop-in), or warns with ``allow_untested``."""
    if not problems:
        return
    message = "; ".join(problems) + f" — the {contract} contract may differ"
    if not allow_untested:
        raise RuntimeError(f"logo_kernels.integrations.{integration}: {message}. Install {install} or pass "
                           "allow_untested=True")
    warnings.warn(f"logo_kernels.integrations.{integration}: {message}", RuntimeWarning, stacklevel=4)


def restore_attributes(saved: dict) -> None:
    """``saved`` maps (module, attribute name) to the trainer's own value: each is set back."""
    for (module, name), value in saved.items():
        setattr(module, name, value)


@contextlib.contextmanager
def enabled_block(enable, disable, is_enabled, **options):
    """``enable(**options)`` for the block; ``disable()`` after it unless the drop-in was already on."""
    was = is_enabled()
    enable(**options)
    try:
        yield
    finally:
        if not was:
            disable()
