"""getenv: os.environ.get for the variables read on every op call (SDKERNELS_BACKEND, TRITON_INTERPRET, ...).

os.environ.get costs 0.5 us for a set variable and 1.5 us for an unset one (Mapping.get catches a KeyError), and an
op call reads several. This reads the same live mapping as one dict lookup, so a variable changed after import
(monkeypatch.setenv, os.environ[...] = ...) still counts at the next call.
"""
from __future__ import annotations

import os


def _environ_data():
    """(os.environ's own dict of encoded variables (CPython's os._Environ keeps it in ``_data``), its key encoder), or
    (os.environ, str) where that dict is not there."""
    environ = os.environ
    data = getattr(environ, "_data", None)
    encode, decode = getattr(environ, "encodekey", None), getattr(environ, "decodevalue", None)
    if not isinstance(data, dict) or encode is None or decode is None:
        return environ, str
    return data, encode


# ``env_key(name) in ENVIRON`` is ``name in os.environ`` (live) without a call: the hot paths ask it before getenv,
# ``KEY in ENVIRON and getenv(name)``, so that a variable that is not set (most of them, on most calls) costs no call.
ENVIRON, env_key = _environ_data()


def _dict_reader():
    """getenv over os.environ's own dict (see _environ_data), or plain os.environ.get where that dict is not there."""
    environ = os.environ
    data = ENVIRON
    decode = getattr(environ, "decodevalue", None)
    if data is environ:
        return environ.get
    keys = {}

    def getenv(name: str, default=None):
        # Subscripts and `in`, not dict.get: no calls of their own (most variables read here are unset).
        try:
            key = keys[name]
        except KeyError:
            key = keys[name] = env_key(name)
        return decode(data[key]) if key in data else default

    return getenv


getenv = _dict_reader()


def cache_dir() -> str:
    """Where sdkernels keeps what it builds or measures once per machine: $SDKERNELS_CACHE, else ~/.cache/sdkernels
    (the JIT-compiled CUDA extension, the measured backend choices)."""
    return getenv("SDKERNELS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sdkernels")
