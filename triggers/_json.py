"""The JSON that triggers stores: compact, and with Celery's extra types.

Values that Celery's JSON serializer round-trips — ``datetime``, ``date``,
``time``, ``Decimal``, ``UUID`` (kombu's encoder) — are stored tagged and read
back as the same types; anything else JSON cannot hold is refused.
"""

from __future__ import annotations

import json
from typing import Any

from kombu.utils import json as kombu_json

__all__ = ["Decoder", "Encoder", "dumps", "from_plain", "lenient_round_trip", "loads", "round_trip",
           "to_plain"]

class Encoder(kombu_json.JSONEncoder):
    """kombu's encoder: tags the extra types as ``{"__type__": ..., "__value__": ...}``."""


class Decoder(json.JSONDecoder):
    """Reads what :class:`Encoder` wrote, the extra types included."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("object_hook", kombu_json.object_hook)
        super().__init__(*args, **kwargs)


_encoder = Encoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_decoder = Decoder()
_TAG = "__type__"


def dumps(value: Any) -> str:
    """Compact JSON text, as stored; TypeError / ValueError for what cannot be stored."""
    return _encoder.encode(value)


def loads(text: str | bytes) -> Any:
    """The value that :func:`dumps` wrote."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("utf-8")
    if _TAG not in text:
        return json.loads(text)  # no tagged values: the C decoder, without a hook
    return _decoder.decode(text)


def to_plain(value: Any) -> Any:
    """Plain JSON data (dicts, lists, strings, numbers) with the extra types tagged."""
    return json.loads(dumps(value))


def from_plain(value: Any) -> Any:
    """The value :func:`to_plain` tagged, with the extra types restored."""
    if isinstance(value, dict):
        return kombu_json.object_hook({key: from_plain(item) for key, item in value.items()})
    if isinstance(value, list):
        return [from_plain(item) for item in value]
    return value


class _LenientEncoder(Encoder):
    def default(self, o: Any) -> Any:
        try:
            return super().default(o)
        except TypeError:
            return repr(o)


def lenient_round_trip(value: Any) -> Any:
    """Like :func:`round_trip`, with ``repr()`` for what JSON cannot hold."""
    return loads(json.dumps(value, cls=_LenientEncoder, allow_nan=False))


def round_trip(value: Any) -> Any:
    """``value`` as it will read back once stored (tuples become lists, and so on)."""
    return loads(dumps(value))
