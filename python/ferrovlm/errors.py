"""ferrovlm's exception classes (defined by the native module, re-exported here).

- ``FerroVLMError``: base of all of them.
- ``ConfigError``: a config file is missing, unreadable, or holds a bad value (names file and key).
- ``CheckpointError``: weight files missing, corrupt, truncated, or a tensor missing / mis-shaped.
- ``ModelNotCachedError`` (a ``CheckpointError``): a hub id not in the local cache and not downloadable.
- ``InputError``: malformed call inputs (shapes, ids, image-token counts).
- ``InternalError``: a bug in ferrovlm.
- ``DistributedError`` (``ferrovlm.distributed``): data-parallel training cannot go on (a rank died or timed out).
"""

from ._core import (
    CheckpointError,
    ConfigError,
    FerroVLMError,
    InputError,
    InternalError,
    ModelNotCachedError,
    ProcessorError,
)

__all__ = [
    "FerroVLMError",
    "ConfigError",
    "CheckpointError",
    "ModelNotCachedError",
    "InputError",
    "InternalError",
    "ProcessorError",
]
