"""W&B's history and summary records, decoded fast.

A ``.wandb`` file holds one protobuf ``Record`` per ``log`` call, each item's value as
JSON text. Parsing every record with the SDK's classes and every value with
``json.loads`` costs a Python object per point; here a run's records are read through
flat message classes built at run time (``_flat_types``), their value texts joined and
parsed by one ``json.loads`` a batch, and the common shapes (a number at a step) taken
straight from the bytes (``FastDecoder``).
"""

from __future__ import annotations

import json
import operator
from typing import Any

Items = list[tuple[tuple[str, ...], str]]


def _item_value_json(it: Any) -> str:
    if it.value_json:
        return it.value_json
    which = it.WhichOneof("value") if "value" in it.DESCRIPTOR.oneofs_by_name else None
    if which is None or which == "none":
        return "null"
    if which == "json":
        return it.json
    return json.dumps(getattr(it, which), allow_nan=True)


def pb_items(items: Any) -> Items:
    out = []
    for it in items:
        nk = it.nested_key
        out.append((tuple(nk) if nk else (it.key,), it.value_json or _item_value_json(it)))
    return out


HISTORY_TAG, SUMMARY_TAG = 0x12, 0x1A  # Record.history = 2, Record.summary = 3
HISTORY_BATCH = 2048


SUMMARY_BATCH = 4096


# W&B's own summary key, in every other summary record: ``nested_key: "_wandb"``
_WANDB_KEY = b"\x12\x06_wandb"


def record_kind(payload: bytes) -> int:
    """The tag of the record's first field after ``num``: history, summary or other."""
    if not payload:
        return 0
    p = 0
    if payload[0] == 0x08:  # num, a varint
        p = 1
        while p < len(payload) and payload[p] & 0x80:
            p += 1
        p += 1
    return payload[p] if p < len(payload) else 0


def _varint_bytes(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class FastDecoder:
    _types: tuple[Any, Any, Any] | None = None

    def __init__(self) -> None:
        if FastDecoder._types is None:
            FastDecoder._types = _flat_types()
        batch_t, rec_t, items_t = FastDecoder._types
        self.batch, self.rec, self.items = batch_t(), rec_t(), items_t()
        self.paths: dict[bytes, tuple[str, ...]] = {}

    def history(self, payloads: list[bytes]) -> tuple[list[int], list[int], list[str], list[str]] | None:
        """(item count per record, step per record, keys, value_jsons), or None."""
        self.batch.ParseFromString(b"".join(b"\x0a" + _varint_bytes(len(p)) + p for p in payloads))
        counts, steps, raw = [], [], []
        for rec in self.batch.rec:
            h = rec.history
            items = h.item
            counts.append(len(items))
            steps.append(h.step.num)
            raw.extend(items)
        if len(counts) != len(payloads):
            return None
        return self._items(raw, counts, steps)

    def summary_batch(self, payloads: list[bytes]) -> list[tuple[tuple[str, ...], str | bytes]] | None:
        """The net effect of consecutive summary records: (path, value_json) for every path
        they set, with its last value. None when a record removes a path, or when a path
        of one kind of record nests inside a path of the other: then order matters record
        by record, and the caller replays them one at a time.

        The SDK writes two summary records per ``log`` call: the logged keys, one nested
        key per item, and W&B's own ``_wandb.runtime`` / ``_runtime``. Each kind is
        decoded in bulk: its records concatenated parse as one (protobuf merges repeated
        fields), giving every update in order in one C call. The first kind's items then
        line up in one more parse, as in history; the second's are split where their
        value_json field starts, each distinct path decoded once. A path both kinds set
        takes the value of whichever record set it last.
        """
        rec, its = self.rec, self.items
        kinds = [_WANDB_KEY in p for p in payloads]
        plain = [p for p, own in zip(payloads, kinds, strict=True) if not own]
        other = [p for p, own in zip(payloads, kinds, strict=True) if own]
        first: dict[tuple[str, ...], str | bytes] = {}
        if plain:
            rec.ParseFromString(b"".join(plain))
            if rec.summary.remove:
                return None
            updates = list(rec.summary.update)
            got = self._items(updates, [], [])
            if got is None:
                other, first = payloads, {}  # all of them item by item
            else:
                first = {(k,): v for k, v in dict(zip(got[2], got[3], strict=True)).items()}
        second: dict[tuple[str, ...], str | bytes] = {}
        if other:
            rec.ParseFromString(b"".join(other))
            if rec.summary.remove:
                return None
            known = self.paths
            for b in rec.summary.update:
                cut = _value_start(b)
                if cut is None:
                    return None
                head, start = cut
                path = known.get(head)
                if path is None:
                    its.ParseFromString(head)
                    keys, nested = list(its.key), list(its.nested_key)
                    if its.value_json or len(keys) + bool(nested) != 1:
                        return None
                    path = known[head] = tuple(nested) if nested else (keys[0],)
                second[path] = b[start:]
        for path in second.keys() & first.keys():
            if self._last_sets_in(payloads, kinds, path) is False:
                second.pop(path)  # a record of the first kind set it last
            else:
                first.pop(path)
        for a in first:
            for b in second:
                if a[: len(b)] == b or b[: len(a)] == a:
                    return None  # one nests in the other: order decides
        return [*first.items(), *second.items()]

    def _last_sets_in(self, payloads: list[bytes], kinds: list[bool], path: tuple[str, ...]) -> bool | None:
        """Whether the last record that sets ``path`` is of the second kind (checked with
        the SDK's classes: it takes a record or two, from the end)."""
        from wandb.proto import wandb_internal_pb2 as pb

        rec = pb.Record()
        needle = path[-1].encode()
        for i in range(len(payloads) - 1, -1, -1):
            if needle in payloads[i]:
                rec.ParseFromString(payloads[i])
                if any(p == path for p, _ in pb_items(rec.summary.update)):
                    return kinds[i]
        return None

    def _items(
        self, raw: list[bytes], counts: list[int], steps: list[int]
    ) -> tuple[list[int], list[int], list[str], list[str]] | None:
        its = self.items
        its.ParseFromString(b"".join(raw))
        keys, values = its.nested_key, its.value_json
        n = len(raw)
        if len(keys) != n or len(values) != n or its.key:
            return None
        if not _all_start_with_nested_key(raw):
            return None
        return counts, steps, list(keys), list(values)


def _all_start_with_nested_key(items: list[bytes]) -> bool:
    """Every item opens with a nested_key field (tag 0x12). Serializers write fields in
    number order and key (1) is absent, so with as many nested keys as items, each item
    has exactly one; and with as many value_jsons, exactly one value."""
    return all(items) and set(map(_first_byte, items)) == {0x12}


_first_byte = operator.itemgetter(0)


def _value_start(b: bytes) -> tuple[bytes, int] | None:
    """Split an item into its path fields and the start of its value_json bytes.

    Walks the path fields (key = 1, nested_key = 2) by their lengths, so a 0x82 byte
    inside a name or a length is never mistaken for the value's tag; None if the item
    has any other shape.
    """
    p, n = 0, len(b)
    while p < n:
        tag = b[p]
        if tag == 0x82 and p + 1 < n and b[p + 1] == 0x01:
            length, q = b[p + 2], p + 3
            if length >= 0x80:
                length, shift = length & 0x7F, 7
                while True:
                    x = b[q]
                    q += 1
                    length |= (x & 0x7F) << shift
                    if x < 0x80:
                        break
                    shift += 7
            return (b[:p], q) if q + length == n else None
        if tag != 0x12 and tag != 0x0A:
            return None
        length, q = b[p + 1], p + 2
        if length >= 0x80:
            return None  # a name over 127 bytes: rare; the SDK's classes handle it
        p = q + length
    return None


def _flat_types() -> tuple[Any, Any, Any]:
    """Our own views of wandb_internal.proto's Record, HistoryRecord and HistoryItem."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="trackbridge_flat.proto", package="tbflat", syntax="proto3")

    def message(name: str, fields: list[tuple[str, int, int, int, str | None]]) -> None:
        m = fdp.message_type.add(name=name)
        for fname, number, ftype, label, tname in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if tname:
                f.type_name = tname

    rep, opt, msg = F.LABEL_REPEATED, F.LABEL_OPTIONAL, F.TYPE_MESSAGE
    message("Step", [("num", 1, F.TYPE_INT64, opt, None)])
    message(
        "Items",
        [
            ("key", 1, F.TYPE_STRING, rep, None),
            ("nested_key", 2, F.TYPE_STRING, rep, None),
            ("value_json", 16, F.TYPE_STRING, rep, None),
        ],
    )
    message("History", [("item", 1, F.TYPE_BYTES, rep, None), ("step", 2, msg, opt, ".tbflat.Step")])
    message("Summary", [("update", 1, F.TYPE_BYTES, rep, None), ("remove", 2, F.TYPE_BYTES, rep, None)])
    message("Rec", [("history", 2, msg, opt, ".tbflat.History"), ("summary", 3, msg, opt, ".tbflat.Summary")])
    message("Batch", [("rec", 1, msg, rep, ".tbflat.Rec")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    get = message_factory.GetMessageClass
    return tuple(get(pool.FindMessageTypeByName(f"tbflat.{n}")) for n in ("Batch", "Rec", "Items"))  # type: ignore[return-value]
