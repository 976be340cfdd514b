#!/usr/bin/env python3
"""Runs one fixed QMP session against a VMM's QMP socket and records the
shape (keys and JSON types, not values) of every reply and event, so that
skiff-vmm's replies can be compared with QEMU's.

    qmp_shapes.py SOCKET --record OUT.json      # e.g. against QEMU, once
    qmp_shapes.py SOCKET --compare FIXTURE.json # exit 1 on a difference

The session: the greeting, qmp_capabilities, the query commands both
implement, stop/cont with their events, human-monitor-command, the error
replies for an unknown command, a bad argument, a missing argument and a
second qmp_capabilities, then quit and its SHUTDOWN event. Only a plain
socket is used, so the exact bytes (CRLF, id echo) are checked as well.
"""

import argparse
import json
import socket
import sys
import time


# Keys whose values are part of the protocol, compared literally.
LITERAL = {"class", "event", "reason", "status", "running", "guest", "enabled", "present"}


def shape(v):
    if isinstance(v, dict):
        return {k: ("=" + json.dumps(x) if k in LITERAL and isinstance(x, (str, bool)) else shape(x))
                for k, x in sorted(v.items())}
    if isinstance(v, list):
        # Elements of one list share a shape; keep the union of keys.
        merged = None
        for x in v:
            s = shape(x)
            if isinstance(merged, dict) and isinstance(s, dict):
                merged = {**merged, **s}
            elif merged is None:
                merged = s
        return [] if merged is None else [merged]
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "str"
    if v is None:
        return "null"
    return type(v).__name__


class Session:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.sock.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.sock.settimeout(30)
        self.buf = b""
        self.events = []
        self.problems = []

    def read_msg(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the VMM closed the QMP socket")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        if not line.endswith(b"\r"):
            self.problems.append(f"a reply line does not end in CRLF: {line[:80]!r}")
        return json.loads(line)

    def call(self, cmd, args=None, id_=None, raw=None):
        if raw is not None:
            self.sock.sendall(raw)
        else:
            msg = {"execute": cmd}
            if args is not None:
                msg["arguments"] = args
            if id_ is not None:
                msg["id"] = id_
            # No newline, as qemu.qmp sends it.
            self.sock.sendall(json.dumps(msg).encode())
        while True:
            m = self.read_msg()
            if "event" in m:
                self.events.append(m)
                continue
            if id_ is not None and m.get("id") != id_:
                self.problems.append(f"{cmd}: id {id_!r} not echoed: {m}")
            return m

    def wait_event(self, name, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name:
                    return self.events.pop(i)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {name} event")
            self.events.append(self.read_msg())


def run(path):
    s = Session(path)
    out = {"greeting": shape(s.read_msg())}
    out["qmp_capabilities"] = shape(s.call("qmp_capabilities"))
    for cmd in ["query-version", "query-status", "query-name", "query-kvm",
                "query-cpus-fast", "query-block", "query-chardev", "query-commands"]:
        out[cmd] = shape(s.call(cmd, id_=f"id-{cmd}"))
    out["stop"] = shape(s.call("stop", id_=1))
    out["event STOP"] = shape(s.wait_event("STOP"))
    out["query-status (paused)"] = shape(s.call("query-status"))
    out["cont"] = shape(s.call("cont"))
    out["event RESUME"] = shape(s.wait_event("RESUME"))
    out["human-monitor-command info status"] = shape(
        s.call("human-monitor-command", {"command-line": "info status"}))
    out["error: unknown command"] = shape(s.call("no-such-command", id_=7))
    out["error: bad argument type"] = shape(
        s.call("human-monitor-command", {"command-line": 42}))
    out["error: missing argument"] = shape(s.call("human-monitor-command", {}))
    out["error: qmp_capabilities again"] = shape(s.call("qmp_capabilities"))
    out["error: not an object"] = shape(s.call(None, raw=b"[1, 2]"))
    out["quit"] = shape(s.call("quit"))
    out["event SHUTDOWN"] = shape(s.wait_event("SHUTDOWN"))
    return out, s.problems


def diff(want, got, where=""):
    if isinstance(want, dict) and isinstance(got, dict):
        d = []
        for k in sorted(set(want) | set(got)):
            if k not in got:
                d.append(f"{where}.{k}: missing")
            elif k not in want:
                d.append(f"{where}.{k}: not in QEMU's reply")
            else:
                d += diff(want[k], got[k], f"{where}.{k}")
        return d
    if isinstance(want, list) and isinstance(got, list):
        if want and got:
            return diff(want[0], got[0], where + "[]")
        return []
    return [] if want == got else [f"{where}: {got} where QEMU has {want}"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("socket")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--record")
    g.add_argument("--compare")
    a = ap.parse_args()
    shapes, problems = run(a.socket)
    if a.record:
        with open(a.record, "w") as f:
            json.dump(shapes, f, indent=1, sort_keys=True)
            f.write("\n")
    else:
        with open(a.compare) as f:
            want = json.load(f)
        problems += [f"{k}: {d}" for k in want for d in diff(want[k], shapes.get(k, "absent"))]
    for p in problems:
        print("qmp-shapes:", p)
    print(f"qmp-shapes: {len(shapes)} replies and events, {len(problems)} difference(s)")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
