"""Instructions per ``distribute``, per worker frame and per codec call, counted by callgrind.

Wall-clock figures swing by ±15 % on a shared machine; the number of
instructions a loop executes does not. This module runs the measured loops in a
child Python under ``valgrind --tool=callgrind`` and reads the counts back:

* ``distribute``: a started ``Distributor`` whose pump is stopped, so only the
  producer's own work runs (encode once, one ring append per listener), for the
  small object and the Pod, with 1 and 4 process listeners, and with one listener
  and ``codec="msgpack"``;
* a worker frame: the worker's read + decode + dispatch loop (``serve``) over a
  file of frames, into a no-op handler, for the native loop and its pure-Python
  twin, and decoding with the ``msgpack`` package instead of msgspec;
* the codec alone: the default codec's ``encode`` of one notification and the
  worker's decode of it, with nothing around them. From these, ``codec_share``:
  the part of fanout's own instructions per notification (one ``distribute``,
  then one frame in each listener's worker) that the codec's encode and decodes
  are, the instruction-count twin of the bench's wall-clock "share of the
  codec-bound limit" (which also pays the kernel, page faults and caches).

Only the measured loop is counted: the child asks callgrind (client requests,
the same ``xchg rbx, rbx`` sequence ``<valgrind/callgrind.h>`` emits, run from an
executable page through ctypes) to zero its counters, collect, and dump around
each loop, in the main thread alone (``--separate-threads=yes``). Each figure
is ``(loop - baseline) / iterations``, both counted in the same run: the baseline
is the same loop doing nothing (``distribute``) or ``serve`` over an empty file
(frames), so the harness's own cost cancels out.

Run ``python -m fanout.bench.instructions`` (or ``benchmarks/instructions.py``);
``fanout bench --instructions`` puts the figures in its ``--json`` document.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import glob
import json
import mmap
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["DEFAULT_ITERATIONS", "available", "codec_shares", "measure", "table"]

DEFAULT_ITERATIONS = 2000
# Callgrind's client requests (<valgrind/callgrind.h>): VG_USERREQ_TOOL_BASE('C','T') + n.
_BASE = (ord("C") << 24) | (ord("T") << 16)
DUMP_STATS_AT, ZERO_STATS, TOGGLE_COLLECT = _BASE + 3, _BASE + 1, _BASE + 2
# uint64 request(uint64 *args): valgrind's "special instruction" preamble for amd64
# (rotations of rdi by 3+13+61+51 = 128 bits: a no-op natively), then xchg rbx, rbx;
# args in rax, the default result (0) in rdx, valgrind's answer comes back in rdx.
_AMD64_REQUEST = bytes.fromhex(
    "4889f8"  # mov rax, rdi
    "31d2"  # xor edx, edx
    "48c1c703"
    "48c1c70d"
    "48c1c73d"
    "48c1c733"  # rol rdi, 3 / 13 / 61 / 51
    "4887db"  # xchg rbx, rbx
    "4889d0"  # mov rax, rdx
    "c3"  # ret
)


def available() -> str | None:
    """Return None when instructions can be counted here, else why not."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"instruction counts need an x86-64 machine, not {platform.machine()}"
    if not sys.platform.startswith("linux"):
        return "instruction counts need Linux (valgrind)"
    if shutil.which("valgrind") is None:
        return "valgrind not installed (Debian/Ubuntu: apt-get install valgrind)"
    return None


class _Callgrind:
    """Callgrind's client requests, from Python; no-ops when not under valgrind."""

    def __init__(self) -> None:
        self._page = mmap.mmap(-1, mmap.PAGESIZE)
        self._page.write(_AMD64_REQUEST)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self._page))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.mprotect(addr, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
            err = ctypes.get_errno()
            raise OSError(
                err, f"cannot make the client-request page executable: {os.strerror(err)}"
            )
        self._call = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p)(addr)
        self._args = (ctypes.c_uint64 * 6)()

    def request(self, code: int, arg: int = 0) -> int:
        self._args[0] = code
        self._args[1] = arg
        return int(self._call(ctypes.addressof(self._args)))

    def count(self, label: str, loop: Callable[[], Any]) -> None:
        """Count ``loop()``'s instructions into a dump named ``label``.

        A full collection first: the cyclic collector then starts from empty
        counters, so its passes fall at the same allocations in every run and
        the figure stays repeatable, their cost included.
        """
        name = ctypes.create_string_buffer(label.encode())
        request = self.request
        gc.collect()
        request(ZERO_STATS)
        request(TOGGLE_COLLECT)
        loop()
        request(TOGGLE_COLLECT)
        request(DUMP_STATS_AT, ctypes.addressof(name))


# -- the child: runs under callgrind ------------------------------------------------------


def _empty(items: list[Any]) -> Callable[[], None]:
    """A baseline: the measured loops' iteration over ``items``, doing nothing."""

    def loop() -> None:
        for _item in items:
            pass

    return loop


def _distribute_cases(cg: _Callgrind, n: int, payloads: Sequence[str]) -> None:
    import fanout
    from fanout.bench.payloads import load_payload

    def distributing(d: Any, notes: list[Any]) -> Callable[[], None]:
        distribute = d.distribute

        def loop() -> None:
            for note in notes:
                distribute(note)

        return loop

    for name in payloads:
        payload = load_payload(name)
        notes = [fanout.Update(*payload.pair(i)) for i in range(n)]
        cg.count(f"distribute-baseline {name}", _empty(notes))
        # The default codec (msgspec) with 1 and 4 listeners; codec="msgpack" with
        # one, to show what the msgspec encode buys.
        cases: tuple[tuple[int, Any, str], ...] = (
            (1, "msgspec", ""),
            (4, "msgspec", ""),
            (1, "msgpack", " msgpack"),
        )
        for listeners, codec, suffix in cases:
            d = fanout.Distributor(codec=codec)
            regs = [d.add_listener(fanout.Handler()) for _ in range(listeners)]
            d.start()
            try:
                for reg in regs:
                    reg.wait_ready(600)
                d.pump.stop()
                loop = distributing(d, notes)
                for label in (None, f"distribute {name} L={listeners}{suffix}"):
                    if label is None:
                        loop()  # warm-up: rings grown, caches filled
                    else:
                        cg.count(label, loop)
                    for reg in regs:  # forget what was queued
                        for lane in reg.lanes:
                            lane.ring.rewind()
                            lane.ring.drop_unsent(1 << 62)
            finally:
                d.stop(drain=False)


def _native_worker() -> Callable[..., Any] | None:
    """The native ``serve``, or None in a build without the extensions."""
    try:
        from fanout.native._worker import serve
    except ImportError:
        return None
    return serve


def _frames_file(payloads: list[bytes]) -> str:
    from fanout.wire.protocol import HEADER

    fd, path = tempfile.mkstemp(prefix="fanout-frames-")
    with os.fdopen(fd, "wb") as f:
        for seq, payload in enumerate(payloads, 1):
            f.write(HEADER.pack(len(payload), seq))
            f.write(payload)
    return path


def _frame_cases(cg: _Callgrind, n: int, payloads: Sequence[str]) -> None:
    import fanout
    from fanout.bench.payloads import load_payload
    from fanout.native import _worker_py
    from fanout.wire.protocol import SLOT_WORDS

    serves = [("py", _worker_py.serve)]
    native = _native_worker()
    if native is not None:
        serves.insert(0, ("native", native))
    codec = fanout.MsgpackCodec()
    handler = fanout.Handler()
    slot = memoryview(bytearray(8 * SLOT_WORDS)).cast("Q")
    decode = codec.unpacker()  # what workers use: msgspec

    def serving(
        serve: Callable[..., Any], path: str, unpack: Callable[[Any], Any] = decode
    ) -> Callable[[], None]:
        def loop() -> None:
            fd = os.open(path, os.O_RDONLY)
            try:
                serve(fd, slot, unpack, handler, _unexpected, _unexpected)
            finally:
                os.close(fd)

        return loop

    empty = _frames_file([])
    try:
        for impl, serve in serves:
            serving(serve, empty)()  # warm-up
            cg.count(f"frame-baseline {impl}", serving(serve, empty))
        for name in payloads:
            payload = load_payload(name)
            t_ns = time.monotonic_ns()
            encoded = [codec.encode(fanout.Update(*payload.pair(i)), t_ns) for i in range(n)]
            path = _frames_file(encoded)
            try:
                for impl, serve in serves:
                    serving(serve, path)()  # warm-up
                    cg.count(f"frame {name} {impl}", serving(serve, path))
                # Decoding with the msgpack package instead of msgspec, as workers
                # did when msgspec was not installed.
                impl, serve = serves[0]
                cg.count(f"frame {name} {impl} msgpack", serving(serve, path, codec.unpack))
            finally:
                os.unlink(path)
    finally:
        os.unlink(empty)
    if slot[0] == 0:
        raise RuntimeError("serve handled no frame")


def _codec_cases(cg: _Callgrind, n: int, payloads: Sequence[str]) -> None:
    import fanout
    from fanout.bench.payloads import load_payload
    from fanout.wire.codec import get_codec

    codec = get_codec("msgspec")  # the default: what distribute encodes with
    decode = codec.unpacker()  # what workers decode with
    encode = codec.encode
    for name in payloads:
        payload = load_payload(name)
        notes = [fanout.Update(*payload.pair(i)) for i in range(n)]
        frames = [encode(note, 0) for note in notes]

        def encoding(notes: list[Any] = notes) -> None:
            for note in notes:
                encode(note, 0)

        def decoding(frames: list[bytes] = frames) -> None:
            for frame in frames:
                decode(frame)

        cg.count(f"codec-baseline {name}", _empty(notes))
        for part, loop in (("encode", encoding), ("decode", decoding)):
            loop()  # warm-up
            cg.count(f"codec {name} {part}", loop)


def _unexpected(seq: int, payload: bytes, *exc: Any) -> None:
    raise RuntimeError(f"frame {seq} failed in the instruction count: {exc!r}")


def _child(n: int, payloads: Sequence[str], only: str | None) -> None:
    import fanout

    cg = _Callgrind()
    if only in (None, "frame"):
        _frame_cases(cg, n, payloads)
    if only in (None, "distribute"):
        _distribute_cases(cg, n, payloads)
    if only in (None, "codec"):
        _codec_cases(cg, n, payloads)
    print(json.dumps({"native": fanout.NATIVE}))


# -- the parent: starts the child under valgrind and reads the dumps ---------------------

_DESC = re.compile(r"^desc: Trigger: Client Request: (.*)$", re.M)
_TOTAL = re.compile(r"^(?:summary|totals): (\d+)", re.M)


def _read_dumps(directory: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    # --separate-threads=yes: "-01" is the main thread, where the loops run.
    for path in glob.glob(os.path.join(directory, "cg.out.*-01")):
        with open(path) as f:
            text = f.read()
        desc, total = _DESC.search(text), _TOTAL.search(text)
        if desc and total:
            counts[desc.group(1).strip()] = int(total.group(1))
    return counts


def _per_iteration(counts: dict[str, int], n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, total in sorted(counts.items()):
        what, _, rest = label.partition(" ")
        if what not in ("distribute", "frame", "codec"):
            continue
        base = counts[f"{what}-baseline {rest.split()[1 if what == 'frame' else 0]}"]
        out.setdefault(what, {})[rest] = round((total - base) / n, 1)
    return out


def codec_shares(result: dict[str, Any]) -> dict[str, float]:
    """The codec's part of fanout's instructions per notification, per payload and L.

    ``(encode + L x decode) / (distribute to L + L x frame)``: the default codec's
    encode and the worker's decode, over what fanout runs for the same
    notification (the producer's ``distribute``, then a frame in each of the L
    listeners' workers; the native worker loop when it is built). Cases the result
    lacks are left out.
    """
    shares: dict[str, float] = {}
    codec = result.get("codec", {})
    frames = result.get("frame", {})
    for case, dist in result.get("distribute", {}).items():
        name, _, rest = case.partition(" L=")
        if not rest.isdigit():  # "small L=1 msgpack": not the default codec
            continue
        L = int(rest)
        enc, dec = codec.get(f"{name} encode"), codec.get(f"{name} decode")
        frame = frames.get(f"{name} native", frames.get(f"{name} py"))
        if enc is None or dec is None or frame is None:
            continue
        shares[case] = round((enc + L * dec) / (dist + L * frame), 3)
    return shares


def measure(
    iterations: int = DEFAULT_ITERATIONS,
    payloads: Sequence[str] = ("small", "pod"),
    native: bool | None = None,
    only: str | None = None,
) -> dict[str, Any]:
    """Count instructions per ``distribute`` and per worker frame under callgrind.

    Args:
        iterations: Loop iterations per figure: more gives steadier averages and
            a longer run (about 15 s + 10 ms per iteration under valgrind).
        payloads: Payload names (``small``, ``pod`` or a JSON file path).
        native: Whether ``distribute`` uses the native rings and pump
            (``FANOUT_NO_EXTENSIONS`` unset) or the pure-Python twins; None:
            as this process's environment says. (Frames are counted on both
            loops whenever the native one is built.)
        only: ``"distribute"``, ``"frame"`` or ``"codec"`` to count only those;
            None: all three.

    Returns:
        ``{"distribute": {"small L=1": 1234.5, ...}, "frame": {"small native": ...},
        "codec": {"small encode": ..., "small decode": ...}, "codec_share":
        {"small L=4": 0.9, ...}, "iterations": n, "native": bool, "valgrind":
        version}``, or ``{"error": why}`` when valgrind cannot run here.
        ``codec_share`` (see :func:`codec_shares`) has the cases whose three
        counts were all measured.

    Raises:
        RuntimeError: valgrind ran but the child failed or produced no counts.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if only not in (None, "distribute", "frame", "codec"):
        raise ValueError(f"only must be 'distribute', 'frame', 'codec' or None, got {only!r}")
    why = available()
    if why is not None:
        return {"error": why}
    env = dict(os.environ, PYTHONHASHSEED="0")
    if native is not None:
        env.pop("FANOUT_NO_EXTENSIONS", None)
        if not native:
            env["FANOUT_NO_EXTENSIONS"] = "1"
    with tempfile.TemporaryDirectory(prefix="fanout-callgrind-") as tmp:
        cmd = [
            "valgrind",
            "--tool=callgrind",
            "--collect-atstart=no",
            "--separate-threads=yes",
            f"--callgrind-out-file={tmp}/cg.out.%p",
            sys.executable,
            "-m",
            "fanout.bench.instructions",
            "--child",
            "--iterations",
            str(iterations),
            *(arg for p in payloads for arg in ("--payload", p)),
            *(("--only", only) if only else ()),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"the callgrind child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        counts = _read_dumps(tmp)
    if not counts:
        raise RuntimeError("callgrind wrote no counts for the measured loops")
    version = subprocess.run(["valgrind", "--version"], capture_output=True, text=True)
    result = _per_iteration(counts, iterations)
    shares = codec_shares(result)
    if shares:
        result["codec_share"] = shares
    result.update(
        iterations=iterations,
        native=json.loads(proc.stdout.splitlines()[-1])["native"],
        valgrind=version.stdout.strip(),
        unit="instructions per distribute / frame / codec call, loop baseline subtracted",
    )
    return result


def table(result: dict[str, Any]) -> str:
    """The figures of :func:`measure` as text, or why there are none."""
    if "error" in result:
        return f"instruction counts: {result['error']}"
    impl = "native" if result["native"] else "pure-Python twins"
    lines = [
        f"instructions per call ({impl}, {result['iterations']} iterations, {result['valgrind']}):"
    ]
    for what in ("distribute", "frame", "codec"):
        for case, value in result.get(what, {}).items():
            lines.append(f"  {what:<10} {case:<22} {value:>12,.1f}")
    shares = result.get("codec_share", {})
    if shares:
        lines.append("the codec's part of fanout's instructions per notification")
        lines.append("  (encode + L x decode) / (distribute to L + L x worker frame):")
        for case, share in shares.items():
            lines.append(f"  {case:<33} {100 * share:>11.0f}%")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fanout.bench.instructions",
        description=(
            "Instructions per distribute, per worker frame and per codec call, under callgrind."
        ),
    )
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    parser.add_argument("--payload", action="append", help="small, pod or a JSON file")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument(
        "--no-extensions", action="store_true", help="distribute with the pure-Python twins"
    )
    parser.add_argument(
        "--only", choices=["distribute", "frame", "codec"], help="count only these"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    payloads = args.payload or ["small", "pod"]
    if args.child:
        _child(args.iterations, payloads, args.only)
        return 0
    native = False if args.no_extensions else None
    result = measure(args.iterations, payloads, native=native, only=args.only)
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
