"""One JSON policy for task arguments and batch items, and Redis replies as text.

Task messages and batch items are encoded alike: kombu's JSON encoder (which carries ``datetime``,
``date``, ``time``, ``UUID`` and ``Decimal`` values and decodes them back to their types), compact,
with NaN and infinity refused (they are not JSON: Flower, other consumers and non-Python workers
cannot read them). A value nested deeper than Python's recursion limit is refused too. A refused
task argument raises ``TaskArgumentError``, a refused batch item ``BatchItemError``; nothing is
sent or buffered.
"""

from __future__ import annotations

import json
from typing import Any

from kombu.serialization import registry
from kombu.utils import json as kombu_json

from taskyard.seams import Seam

# kombu internals (checked by tests/test_seams.py): its JSON markers' decoder and the registry's
# content-type map.
SEAMS = (
    Seam("kombu.utils.json", "object_hook", params=("o",)),
    Seam("kombu.serialization.SerializerRegistry", "type_to_name", "instance"),
    Seam(
        "kombu.serialization.SerializerRegistry",
        "register",
        params=("name", "encoder", "decoder", "content_type", "content_encoding"),
    ),
)

#: Name of the task serializer of taskyard apps (``task_serializer``); its content type is
#: plain ``application/json``, so any Celery worker that accepts "json" reads its messages.
SERIALIZER = "taskyard-json"
CONTENT_TYPE = "application/json"

# One encoder and decoder for the process: JSONEncoder.encode and JSONDecoder.decode keep no
# state between calls, and building them once saves their construction on every item.
_ENCODER = kombu_json.JSONEncoder(allow_nan=False, separators=(",", ":"))
# kombu internals: object_hook turns kombu's {"__type__": ..., "__value__": ...} markers back
# into datetime, UUID, Decimal... values, as kombu's own loads does.
_DECODER = json.JSONDecoder(object_hook=kombu_json.object_hook)

#: Errors of :func:`dumps` for a value outside the policy.
ENCODE_ERRORS = (TypeError, ValueError, RecursionError)


def dumps(value: Any) -> str:
    """``value`` as compact JSON text.

    Raises:
        TypeError: a value of a type JSON cannot carry.
        ValueError: NaN or infinity.
        RecursionError: nested too deeply.
    """
    return _ENCODER.encode(value)


def loads(text: str | bytes) -> Any:
    """The value of JSON text made by :func:`dumps`."""
    return _DECODER.decode(text.decode() if isinstance(text, bytes) else text)


def register() -> None:
    """Register :data:`SERIALIZER` with kombu (idempotent, no I/O)."""
    # kombu internals: register() also replaces the decoder of the content type (None keeps
    # kombu's own JSON decoder) and maps the content type back to the new name; that mapping
    # names the type in kombu's "untrusted content" errors, so it goes back to "json".
    registry.register(SERIALIZER, dumps, None, content_type=CONTENT_TYPE, content_encoding="utf-8")
    registry.type_to_name[CONTENT_TYPE] = "json"


def text(value: Any) -> str:
    """A Redis reply (bytes, str, or a number) as text; None as ""."""
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)
