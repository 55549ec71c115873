"""ferrovlm's exception classes (defined by the native module, re-exported here).

- ``FerroVLMError``: base of all of them.
- ``ConfigError``: a config file is missing, unreadable, or holds a bad value (names file and key).
- ``CheckpointError``: weight files missing, corrupt, truncated, or a tensor missing / mis-shaped.
- ``ModelNotCachedError`` (a ``CheckpointError``): a hub id not in the local cache and not downloadable.
- ``InputError``: malformed call inputs (shapes, ids, image-token counts).
- ``DeviceError``: a device this build or machine cannot give (``device_map="cuda"`` on a CPU-only build, or
  without an NVIDIA driver / GPU); the message says what is missing and how to get it.
- ``InternalError``: a bug in ferrovlm.
- ``DistributedError`` (``ferrovlm.distributed``): data-parallel training cannot go on (a rank died or timed out).
"""

from ._core import (
    CheckpointError,
    ConfigError,
    DeviceError,
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
    "DeviceError",
]
