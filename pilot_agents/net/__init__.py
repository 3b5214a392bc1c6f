from . import _native

# Before any submodule loads, so that the warning comes before the stale code runs.
_native.warn_if_stale()
