"""meshtrain: train LLMs with 3D parallelism (dp, pp, tp) on PyTorch's own distributed stack.

Plugins mark their hook implementations with `meshtrain.hookimpl`; the contracts they fill in live
in `meshtrain.contracts`.
"""

import pluggy

from meshtrain.errors import ConfigError, UserError

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("meshtrain")

__all__ = ["ConfigError", "UserError", "__version__", "hookimpl"]
