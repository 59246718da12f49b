"""One JSON policy for task arguments and batch items, and Redis replies as text.

Task messages and batch items are encoded alike: kombu's JSON encoder (which carries ``datetime``,
``date``, ``time``, ``UUID`` and ``Decimal`` values and decodes them back to their types), compact,
with NaN and infinity refused (they are not JSON: Flower, other consumers and non-Python workers
cannot read them). Two more refusals keep every path able to carry what was accepted:

- Nesting deeper than :data:`MAX_DEPTH` containers. Past it some path fails where the producer
  cannot see it: a prefork pool pickles arguments to its child and fails from about 480 lists
  deep (pickle spends two stack levels per list), Python's decoder at about 990, Redis' at 1,000.
- A lone surrogate (``"\\udcff"``): it is not Unicode text, so it is not JSON text either; a
  surrogate pair spelled as two code points would come back as one different character.

A refused task argument raises ``TaskArgumentError``, a refused batch item ``BatchItemError``;
nothing is sent or buffered.

Decoding: :func:`loads` reads what kombu's JSON decoder reads, with the same values, and is
kombu's decoder of ``application/json`` in every process with a taskyard app (:func:`register`),
so task bodies, stored messages and batch items all decode through it.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
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
# Without the hook, for text that holds no marker (loads).
_PLAIN = json.JSONDecoder()

# The same encoder without ASCII escapes: its text encodes to UTF-8 only when every code point
# is Unicode text, which is how a lone surrogate is told apart from an escaped pair.
_TEXT_ENCODER = kombu_json.JSONEncoder(allow_nan=False, separators=(",", ":"), ensure_ascii=False)

#: Deepest nesting of lists and mappings a task's arguments (the whole message body) or a batch
#: item may have. Far under what pickle (about 480), Python's decoder (about 990) and Redis'
#: cjson (1,000) take, so the envelope and a flush's list around the items fit too.
MAX_DEPTH = 200

#: Errors of :func:`dumps` for a value outside the policy.
ENCODE_ERRORS = (TypeError, ValueError, RecursionError)

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(r"[\[\]{}]")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def dumps(value: Any) -> str:
    """``value`` as compact JSON text.

    Raises:
        TypeError: a value of a type JSON cannot carry.
        ValueError: NaN or infinity, nesting deeper than :data:`MAX_DEPTH`, a lone surrogate.
    """
    try:
        text: str = _ENCODER.encode(value)
    except RecursionError:
        raise ValueError(f"nested too deeply to encode (the limit is {MAX_DEPTH})") from None
    # Both checks cost C-speed scans of the text on the usual path: the brackets counted
    # (too_deep), and ASCII escapes of surrogates, which only text outside the Basic
    # Multilingual Plane also makes.
    depth = too_deep(text)
    if depth is not None:
        raise ValueError(f"nested {depth} levels deep (the limit is {MAX_DEPTH})")
    if "\\ud" in text:
        try:
            _TEXT_ENCODER.encode(value).encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = exc.object[exc.start : exc.end]
            raise ValueError(
                f"a lone surrogate {bad!r} is not Unicode text (encode the bytes, e.g. base64)"
            ) from None
    return text


def too_deep(text: str | bytes) -> int | None:
    """The nesting of JSON ``text`` when deeper than :data:`MAX_DEPTH`, else None.

    Cheap on the usual path: the opening brackets are counted at C speed (those inside strings
    too, so the count bounds the depth from above) and only a text with more than the limit is
    walked.
    """
    if isinstance(text, bytes):
        if text.count(b"[") + text.count(b"{") <= MAX_DEPTH:
            return None
        text = text.decode("utf-8", "replace")
    elif text.count("[") + text.count("{") <= MAX_DEPTH:
        return None
    depth = _depth(text)
    return depth if depth > MAX_DEPTH else None


def _depth(text: str) -> int:
    """The deepest nesting of JSON ``text`` (brackets inside strings not counted)."""
    brackets = _BRACKET.findall(_STRING.sub("", text))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def loads(text: str | bytes | bytearray | memoryview) -> Any:
    """The value of JSON text, as kombu's JSON decoder gives it, at C speed when it can.

    kombu's decoder calls a Python hook on every object for its typed values (``__type__``
    markers). A text without that name, and without ``\\u`` escapes (which could spell it),
    has no marker, and the plain decoder gives the same value without the hook (measured on a
    no-op task's body: 2.2 against 4.5 µs). The same errors as kombu's: ``ValueError``
    (``UnicodeDecodeError``, ``JSONDecodeError``) for text that is not UTF-8 JSON.
    """
    if not isinstance(text, str):
        text = bytes(text).decode("utf-8")
    decoder = _DECODER if "__type__" in text or "\\u" in text else _PLAIN
    return decoder.decode(text)


def register() -> None:
    """Register :data:`SERIALIZER` with kombu, and :func:`loads` as the decoder of its content
    type (idempotent, no I/O)."""
    # kombu internals: register() also replaces the decoder of the content type, for every
    # message of that type this process decodes (a worker's task bodies, in its pool processes
    # too, and results), and maps the content type back to the new name; that mapping names
    # the type in kombu's "untrusted content" errors, so it goes back to "json".
    registry.register(SERIALIZER, dumps, loads, content_type=CONTENT_TYPE, content_encoding="utf-8")
    registry.type_to_name[CONTENT_TYPE] = "json"


def text(value: Any) -> str:
    """A Redis reply (bytes, str, or a number) as text; None as ""."""
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)
