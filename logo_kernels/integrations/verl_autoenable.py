"""Importing this module enables the verl drop-in (:mod:`logo_kernels.integrations.verl`) in the process.

verl's Ray workers build and run the models in their own processes, where a call to ``enable()`` in the driver
script does not reach. verl imports the modules named in ``VERL_USE_EXTERNAL_MODULES`` whenever a process imports
verl, so

    export VERL_USE_EXTERNAL_MODULES=logo_kernels.integrations.verl_autoenable

(or ``runtime_env: {env_vars: {...}}`` in Ray) enables it in every worker, before any model is patched. The op's
backend comes from ``LOGO_VERL_BACKEND`` (default ``auto``); ``LOGO_VERL_ALLOW_UNTESTED=1`` tries an untested verl.
"""
import os

from .verl import enable

enable(backend=os.environ.get("LOGO_VERL_BACKEND", "auto"),
       allow_untested=os.environ.get("LOGO_VERL_ALLOW_UNTESTED", "0").strip().lower() in ("1", "true", "yes"))
