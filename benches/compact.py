#!/usr/bin/env python3
"""What one outbox record (a group commit's requests) compresses to, per
request, stored four ways, on a dump of a real backlog (issue 12's
"compact record format" question):

  envelope        the envelope as the gateway writes it (what 0.1.0 stored)
  fields          what the envelope is made from: the request as received,
                  clientId and messageId as 16 bytes, receivedAt as 8
  envelope-id     the envelope without the messageId's 36 characters (the
                  entry holds its 16 bytes anyway)
  envelope-ids    also clientId and receivedAt as binary

Each record's entries are compressed with `zstd -1`, as the outbox does.

  edgegate outbox dump --data-dir DIR > dump.jsonl
  python3 benches/compact.py dump.jsonl
"""
import datetime
import json
import struct
import subprocess
import sys
import uuid
from collections import OrderedDict


def zstd_len(data):
    out = subprocess.run(["zstd", "-1", "-c", "-q", "--no-check"], input=data,
                         capture_output=True, check=True).stdout
    return len(out)


def cut(text, part):
    at = text.rfind(part)
    return text[:at] + text[at + len(part):], at


def millis(stamp):
    when = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return int(when.timestamp() * 1000)


def entry(row, way):
    v, key = row["value"], row["key"].encode()
    env = json.dumps(v, separators=(",", ":")).encode()
    mid = uuid.UUID(v["messageId"]).bytes
    if way == "envelope":
        return struct.pack("<HI", len(key), len(env)) + key + mid + env
    if way == "fields":
        req = json.dumps(v["deviceRequest"], separators=(",", ":")).encode()
        bound = (v["deviceUid"] or "").encode()
        return (struct.pack("<HIB", len(key), len(req), len(bound)) + key + mid
                + uuid.UUID(v["clientId"]).bytes + struct.pack("<Q", millis(v["receivedAt"]))
                + bound + req)
    env, at = cut(env, v["messageId"].encode())
    if way == "envelope-id":
        return struct.pack("<HII", len(key), len(env), at) + key + mid + env
    env, ct = cut(env, v["clientId"].encode())
    env, rt = cut(env, v["receivedAt"].encode())
    return (struct.pack("<HIIII", len(key), len(env), at, ct, rt) + key + mid
            + uuid.UUID(v["clientId"]).bytes + struct.pack("<Q", millis(v["receivedAt"])) + env)


records = OrderedDict()
for line in open(sys.argv[1]):
    row = json.loads(line)
    if row["kind"] == "request":
        records.setdefault(row["seq"], []).append(row)
n = sum(len(rows) for rows in records.values())
print(f"requests={n} records={len(records)}", end="")
for way in ["envelope", "fields", "envelope-id", "envelope-ids"]:
    raw = packed = 0
    for rows in records.values():
        body = b"".join(entry(row, way) for row in rows)
        raw += len(body)
        packed += zstd_len(body)
    print(f" {way}_raw={raw / n:.1f} {way}_zstd={packed / n:.1f}", end="")
print()
