"""Importing this module enables the verl drop-in (:mod:`logo_kernels.integrations.verl`) in the process.

verl's Ray workers build and run the models in their own processes, where a call to ``enable()`` in the driver
script does not reach. verl imports the modules named in ``VERL_USE_EXTERNAL_MODULES`` whenever a process imports
verl, so

    export VERL_USE_EXTERNAL_MODULES=logo_kernels.integrations.verl_autoenable

(or ``runtime_env: {env_vars: {...}}`` in Ray) enables it in every worker, before any model is patched. The op's
backend comes from ``LOGO_VERL_BACKEND`` (default ``auto``), its gradient filtering from ``LOGO_VERL_FILTER_EPS``
(unset: exact; ``auto`` or a float, docs/filtering.md); ``LOGO_VERL_ALLOW_UNTESTED=1`` tries an untested verl.
"""
import os

from .verl import enable


def _filter_eps(value):
    """LOGO_VERL_FILTER_EPS -> None, "auto" or a float (an unparsable value is refused by enable(), naming it)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return value if value == "auto" else float(value)
    except ValueError:
        raise ValueError(f"LOGO_VERL_FILTER_EPS must be 'auto' or a float, got {value!r}") from None


enable(backend=os.environ.get("LOGO_VERL_BACKEND", "auto"),
       allow_untested=os.environ.get("LOGO_VERL_ALLOW_UNTESTED", "0").strip().lower() in ("1", "true", "yes"),
       filter_eps=_filter_eps(os.environ.get("LOGO_VERL_FILTER_EPS")))
