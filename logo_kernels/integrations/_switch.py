"""The ``enabled()`` block of the trainer drop-ins (trl.py, verl.py): on inside, as it was after."""
import contextlib


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
