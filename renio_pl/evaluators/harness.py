"""What runs inside the sandbox for code evaluation, and the codec its reports use.

`main()` (run as `python -S -c <this file's source>`) reads a pickled payload from stdin,
executes one program the way EvalPlus 0.3.1 does (`exec` in fresh globals with output
swallowed, then the entry point called on each input under its own SIGALRM time limit),
and reports every call on fd 3. It never sees expected outputs: outputs are compared
outside, by `renio_pl.evaluators.code_oracles`, so a program cannot fake a pass.

Untrusted mode (solutions) also disables the functions EvalPlus's `reliability_guard`
disables (`open`, `os.remove`, `subprocess.Popen`, ... : results match EvalPlus's, it is
not the security boundary, the sandbox is) and preloads numpy when the program mentions it
(EvalPlus's worker has numpy loaded; importing it after the guard fails). Trusted mode
(canonical solutions) deep-copies each input and times the call, as EvalPlus's
`trusted_exec` does.

Report lines (JSON), one per call in input order:
    {"i": index, "t": seconds, "sha": digest or null, "value": bool, "error": "Type: text" or null}
A value line, ``[kind, data]``, follows when "value" is true. Otherwise (a large output)
the harness waits for a reply: ``value`` (send it, or ``["missing"]``) or ``next``. A
program that cannot be loaded reports ``{"load": "Type: text"}``. Trusted mode adds
``"floats"`` (EvalPlus's `is_floats` of the output) and ``"by_digest"`` (`equal_by_digest`:
an output with the same digest is equal to it) and always sends values up to its cap.

`digest` is the sha256 of the output pickled without memo: equal digests mean equal
outputs, and an expected digest is useless to a program without the expected output.
`encode`/`decode`: JSON when the value is plain JSON data, else a tagged JSON form.
"""

from __future__ import annotations

import builtins
import copy
import hashlib
import io
import json
import math
import os
import pickle
import signal
import sys
import time

REPORT_FD = 3
_JSON_SCALARS = {type(None), bool, int, float, str}
_MAX_NODES = 2_000_000  # a tagged encoding visits at most this many objects


class TimeoutException(Exception):
    """A call ran past its time limit (an Exception, as in EvalPlus, so `except Exception` sees it)."""


def is_floats(value: object) -> bool:
    """EvalPlus's test for float outputs: a float, a non-empty list/tuple of floats, a float array."""
    if isinstance(value, float):
        return True
    if isinstance(value, (list, tuple)) and value:
        return all(isinstance(item, float) for item in value)
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.ndarray) and value.dtype in (numpy.float64, numpy.float32)


class _Digest:
    """A write-only file for `pickle` that only hashes and counts what it is given."""

    def __init__(self) -> None:
        self.sha, self.size = hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return len(data)


def digest(value: object) -> tuple[str | None, int]:
    """sha256 hex of `value` pickled without memo, and the pickle's size; (None, 0) if unpicklable.

    Equal digests mean the same types and values, hence equal outputs unless NaN or an
    `__eq__` that is not structural is involved (`equal_by_digest` tells).
    """
    sink = _Digest()
    pickler = pickle.Pickler(sink, protocol=5)
    pickler.fast = True  # no memo: equal values give equal bytes however their objects are shared
    try:
        pickler.dump(value)
    except Exception:
        return None, 0
    return sink.sha.hexdigest(), sink.size


def equal_by_digest(value: object) -> bool:
    """Whether a copy of `value` (unpickled, so no shared objects) equals it: no NaN, no numpy arrays."""
    try:
        return bool(pickle.loads(pickle.dumps(value, protocol=5)) == value)
    except Exception:
        return False


def encode(value: object, limit: int) -> str | None:
    """The JSON text of `["json", value]` for plain JSON data, else of `["tagged", form]`.

    None when the text would be longer than `limit` characters or the value is too large
    or deep to walk.
    """
    try:
        if _is_plain_json(value):
            text = json.dumps(["json", value])
            return text if len(text) <= limit else None
    except (ValueError, RecursionError):  # ints over the str-digits limit, deep nesting
        pass
    try:
        text = json.dumps(["tagged", _tag(value, [_MAX_NODES], set())])
    except (_TooBig, RecursionError, ValueError):
        return None
    return text if len(text) <= limit else None


def _is_plain_json(value: object) -> bool:
    """Only lists, str-keyed dicts and JSON scalars of exactly those types, all the way down."""
    stack, budget = [value], _MAX_NODES  # the budget also ends cycles (a list holding itself)
    while stack:
        budget -= 1
        if budget < 0:
            return False
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            if set(map(type, item)) - {str}:
                return False
            children = item.values()
        elif kind is list:
            children = item
        else:
            return kind in _JSON_SCALARS
        kinds = set(map(type, children))
        if kinds - _JSON_SCALARS - {list, dict}:
            return False
        if kinds & {list, dict}:
            stack.extend(child for child in children if type(child) in (list, dict))
    return True


class _TooBig(Exception):
    pass


_TAG_OF = {tuple: "tuple", set: "set", frozenset: "frozenset", dict: "dict", list: "list",
           int: "int", float: "float", str: "str", bytes: "bytes", bytearray: "bytearray", complex: "complex"}


def _tag(value: object, budget: list, active: set) -> object:
    """The tagged JSON form; every dict in it is a tag: {"tuple": [...]}, {"dict": [[k, v], ...]}, ..."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooBig
    kind = type(value)
    if kind in (type(None), bool, str) or (kind is float and value == value and abs(value) != float("inf")):
        return value
    if kind is int:
        return value if value.bit_length() < 63 else {"int": hex(value)}
    if kind is float:
        return {"float": repr(value)}  # nan, inf, -inf
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, (numpy.generic, numpy.ndarray)):
        if value.dtype.kind not in "biufcU":
            return {"opaque": f"numpy.{value.dtype}"}
        item = value.tolist()
        tag = "ndarray" if isinstance(value, numpy.ndarray) else "numpy"
        return {tag: value.dtype.str, "shape": list(numpy.shape(value)), "value": _tag(item, budget, active)}
    if kind.__module__ in ("fractions", "decimal") and kind.__name__ in ("Fraction", "Decimal"):
        return {kind.__name__: str(value)}
    base = next((b for b in _TAG_OF if isinstance(value, b) and b is not bool), None)
    if base is None:
        return {"opaque": f"{kind.__module__}.{kind.__qualname__}"}
    if kind is not base:  # namedtuple, OrderedDict, IntEnum, ...: equal to the base, not of its type
        return {"subclass": _tag(base(value), budget, active)}
    if base in (int, float, str):
        return value
    if base is complex:
        return {"complex": [_tag(value.real, budget, active), _tag(value.imag, budget, active)]}
    if base in (bytes, bytearray):
        return {_TAG_OF[base]: value.decode("latin-1")}
    if id(value) in active:
        return {"opaque": "cycle"}
    active.add(id(value))
    try:
        if base is dict:
            return {"dict": [[_tag(k, budget, active), _tag(v, budget, active)] for k, v in value.items()]}
        items = [_tag(item, budget, active) for item in value]
        return items if base is list else {_TAG_OF[base]: items}
    finally:
        active.discard(id(value))


class Opaque:
    """An output that cannot be sent over (a generator, a class instance, ...): equal to nothing."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<opaque {self.name}>"


_SUBCLASSES = {base: type(f"Foreign{base.__name__.title()}", (base,), {}) for base in
               (int, float, str, bytes, complex, list, tuple, dict, set, frozenset, bytearray)}


def decode(text: str | bytes) -> object:
    """The value `encode` encoded (a subclass comes back as a private subclass of its base).

    Raises:
        ValueError, TypeError, RecursionError: `text` is not what `encode` writes.
    """
    kind, data = json.loads(text)
    if kind == "json":
        return data
    if kind == "tagged":
        return _untag(data, 16 * len(text) + 1024)
    raise ValueError(f"unknown value kind {kind!r}")


def _untag(data: object, max_array_bytes: int) -> object:
    if isinstance(data, list):
        return [_untag(item, max_array_bytes) for item in data]
    if not isinstance(data, dict):
        return data
    tag, payload = next(iter(data.items()))
    if tag in ("tuple", "set", "frozenset"):
        items = (_untag(item, max_array_bytes) for item in payload)
        return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)
    if tag == "dict":
        return {_untag(key, max_array_bytes): _untag(value, max_array_bytes) for key, value in payload}
    if tag == "int":
        return int(payload, 16)
    if tag == "float":
        return float(payload)
    if tag == "complex":
        return complex(_untag(payload[0], max_array_bytes), _untag(payload[1], max_array_bytes))
    if tag in ("bytes", "bytearray"):
        return {"bytes": bytes, "bytearray": bytearray}[tag](payload, "latin-1")
    if tag in ("Fraction", "Decimal"):
        module = __import__({"Fraction": "fractions", "Decimal": "decimal"}[tag])
        return getattr(module, tag)(payload)
    if tag in ("numpy", "ndarray"):
        import numpy

        dtype = numpy.dtype(payload)
        if dtype.kind not in "biufcU" or dtype.itemsize * math.prod(data["shape"]) > max_array_bytes:
            raise ValueError(f"refusing a numpy {dtype} of shape {data['shape']}")  # a forged allocation bomb
        array = numpy.array(_untag(data["value"], max_array_bytes), dtype=dtype).reshape(data["shape"])
        return array if tag == "ndarray" else array[()]
    if tag == "subclass":
        value = _untag(payload, max_array_bytes)
        return _SUBCLASSES[type(value)](value)
    if tag == "opaque":
        return Opaque(payload)
    raise ValueError(f"unknown tag {tag!r}")


# ---------------------------------------------------------------- inside the sandbox


def _disable_like_evalplus() -> None:
    """Disables what EvalPlus 0.3.1's `reliability_guard` disables, so programs behave as there."""
    import faulthandler
    import shutil
    import subprocess

    faulthandler.disable()
    os.environ["OMP_NUM_THREADS"] = "1"
    builtins.exit = builtins.quit = builtins.open = builtins.help = None
    for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
                 "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown",
                 "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"):
        setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None


class _WriteOnly(io.StringIO):
    """Swallows a program's output; reading raises, as EvalPlus's WriteOnlyStringIO does."""

    def read(self, *args, **kwargs):
        raise OSError

    def readline(self, *args, **kwargs):
        raise OSError

    def readlines(self, *args, **kwargs):
        raise OSError

    def readable(self, *args, **kwargs):
        return False


def _swallowed(function, *args):
    """Calls `function(*args)` with stdout, stderr and stdin replaced by a fresh write-only buffer."""
    saved = sys.stdout, sys.stderr, sys.stdin
    sys.stdout = sys.stderr = sys.stdin = _WriteOnly()
    try:
        return function(*args)
    finally:
        sys.stdout, sys.stderr, sys.stdin = saved


def _send(*lines: str) -> None:
    data = "".join(line + "\n" for line in lines).encode("utf-8", "surrogatepass")
    while data:
        data = data[os.write(REPORT_FD, data):]


def _receive_line() -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(REPORT_FD, 64)
        if not chunk:
            os._exit(0)  # the evaluator hung up: it has its verdict
        line += chunk
    return line.strip()


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error)[:200]}"


def main() -> None:
    """Runs the payload on stdin: {"code", "entry_point", "inputs", "time_limits" (None: trusted),
    "path", "inline_bytes", "value_bytes"}; reports on fd 3 (module docstring)."""
    payload = pickle.loads(sys.stdin.buffer.read())
    sys.path.extend(payload["path"])
    code, inputs, limits = payload["code"], payload["inputs"], payload["time_limits"]
    trusted = limits is None

    def on_alarm(signum, frame):
        raise TimeoutException("Timed out!")

    signal.signal(signal.SIGALRM, on_alarm)
    if not trusted:
        if "numpy" in code:
            import numpy  # noqa: F401
        _disable_like_evalplus()
    namespace: dict = {}
    try:
        # compiled apart: `exec(str)` would inherit this file's `from __future__ import annotations`,
        # and a program's unimported annotation names (`List`) would not fail as under EvalPlus
        _swallowed(exec, compile(code, "<program>", "exec", dont_inherit=True), namespace)
        function = namespace[payload["entry_point"]]
    except BaseException as error:
        _send(json.dumps({"load": _error_text(error)}))
        os._exit(0)
    for index, arguments in enumerate(inputs):
        if trusted:
            arguments = copy.deepcopy(arguments)
        error = output = None
        started = time.perf_counter()
        try:
            if not trusted:
                signal.setitimer(signal.ITIMER_REAL, limits[index])
            output = _swallowed(function, *arguments)
        except BaseException as raised:
            error = _error_text(raised)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        seconds = time.perf_counter() - started
        header = {"i": index, "t": seconds, "sha": None, "value": False, "error": error}
        if error is not None:
            _send(json.dumps(header))
            if not trusted:
                os._exit(0)
            continue
        header["sha"], size = digest(output)
        inline = size <= payload["inline_bytes"] or trusted
        value = encode(output, payload["value_bytes"]) if inline and size <= 2 * payload["value_bytes"] else None
        header["value"] = value is not None
        if trusted:
            header.update(floats=is_floats(output), by_digest=equal_by_digest(output))
        _send(json.dumps(header), *([value] if value is not None else []))
        if not inline and _receive_line() == b"value":
            _send(encode(output, payload["value_bytes"]) or '["missing"]')
    os._exit(0)


if __name__ == "__main__":
    main()
