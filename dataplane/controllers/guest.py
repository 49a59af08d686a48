"""``/instances/{id}/exec``, ``/files`` and ``/stat``: work inside a guest through its agent.

The edge parses and checks the request, asks the instance manager for the agent's channel
(which refuses unless the instance is Running) and runs one operation of ``managers.agent`` on
it. Files stream both ways: nothing here holds a file whole.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
import signal as signals
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import quote

import anyio
from litestar import Controller, Request, WebSocket, get, post, put, websocket
from litestar.background_tasks import BackgroundTask
from litestar.di import NamedDependency
from litestar.exceptions import WebSocketDisconnect
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.response import Stream

from dataplane.errors import ApiError, domain_status
from dataplane.runtime import Runtime
from managers.agent import (
    EXEC_DEFAULT_TIMEOUT,
    EXEC_MAX_TIMEOUT,
    EXEC_OUTPUT_LIMIT,
    EXEC_STDIN_LIMIT,
    AgentError,
    Channel,
    ExecExit,
    ExecResult,
    ExecSpec,
    FileStat,
    FileType,
    TtySize,
    interactive_exec,
    read_file,
    run_exec,
    stat,
    write_file,
)
from managers.errors import DomainError
from managers.instances import InstanceManager

_MAX_PATH = 4096
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MODE = re.compile(r"0?[0-7]{3,4}")
_EXEC_FIELDS = frozenset(
    {"command", "env", "workdir", "user", "stdin", "encoding", "timeout_seconds"}
)
_STREAM_TAGS = {"stdout": b"\x01", "stderr": b"\x02"}
# WebSocket stdin messages held while the guest has no room for them.
_STDIN_QUEUE = 16
# A WebSocket close code for a request that is not valid (policy), and for a failure.
_WS_INVALID = 1008
_WS_FAILED = 1011


def _invalid(message: str, details: Mapping[str, object] | None = None) -> ApiError:
    return ApiError(400, "invalid_request", message, dict(details or {}))


def _text(value: str) -> bool:
    """Text the guest can receive: encodable (no lone surrogates) and without NUL."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return "\0" not in value


def _text_list(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _invalid(f"{what} must be a non-empty list of strings")
    if not all(_text(item) for item in value):
        raise _invalid(f"{what} must be valid Unicode without NUL characters")
    return tuple(value)


def _env(pairs: Mapping[str, object]) -> dict[str, str]:
    env: dict[str, str] = {}
    for name, value in pairs.items():
        if not _ENV_NAME.fullmatch(name):
            raise _invalid(f"environment variable name {name!r} is not valid")
        if not isinstance(value, str) or not _text(value):
            raise _invalid(f"environment variable {name!r} must be valid Unicode without NUL")
        env[name] = value
    return env


def _optional_text(value: object, what: str, *, absolute: bool = False) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or not _text(value):
        raise _invalid(f"{what} must be a non-empty string of valid Unicode without NUL")
    if absolute and not value.startswith("/"):
        raise _invalid(f"{what} {value!r} must be an absolute path")
    return value


@dataclass(frozen=True, slots=True)
class ExecRequest:
    """``POST /instances/{id}/exec``'s body, checked (the contract check may be off)."""

    spec: ExecSpec
    stdin: bytes | None
    base64_output: bool
    timeout_seconds: float

    @classmethod
    def from_json(cls, data: object) -> ExecRequest:
        if not isinstance(data, dict):
            raise _invalid("the body must be a JSON object")
        unknown = set(data) - _EXEC_FIELDS
        if unknown:
            raise _invalid(f"unknown fields: {', '.join(sorted(unknown))}")
        encoding = data.get("encoding", "utf-8")
        if encoding not in ("utf-8", "base64"):
            raise _invalid("encoding must be 'utf-8' or 'base64'")
        env = data.get("env") or {}
        if not isinstance(env, dict):
            raise _invalid("env must be an object of strings")
        timeout = data.get("timeout_seconds", EXEC_DEFAULT_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise _invalid("timeout_seconds must be a number")
        if not 0 < timeout <= EXEC_MAX_TIMEOUT:
            raise _invalid(f"timeout_seconds must be above 0 and at most {EXEC_MAX_TIMEOUT:g}")
        stdin_text = data.get("stdin")
        stdin: bytes | None = None
        if stdin_text is not None:
            if not isinstance(stdin_text, str):
                raise _invalid("stdin must be a string")
            if encoding == "base64":
                try:
                    stdin = base64.b64decode(stdin_text, validate=True)
                except (binascii.Error, ValueError) as exc:
                    raise _invalid(f"stdin is not valid base64: {exc}") from exc
            else:
                try:
                    stdin = stdin_text.encode()
                except UnicodeEncodeError:
                    raise _invalid(
                        "stdin must be valid Unicode (use base64 for other bytes)"
                    ) from None
            if len(stdin) > EXEC_STDIN_LIMIT:
                raise ApiError(413, "payload_too_large", f"stdin is over {EXEC_STDIN_LIMIT} bytes")
        spec = ExecSpec(
            command=_text_list(data.get("command"), "command"),
            env=_env(env),
            workdir=_optional_text(data.get("workdir"), "workdir", absolute=True),
            user=_optional_text(data.get("user"), "user"),
        )
        return cls(spec, stdin, encoding == "base64", float(timeout))


def _output(data: bytes, base64_output: bool) -> str:
    return base64.b64encode(data).decode() if base64_output else data.decode(errors="replace")


def exec_json(result: ExecResult, base64_output: bool) -> dict[str, Any]:
    return {
        "exit_code": result.exit_code,
        "signal": result.signal,
        "stdout": _output(result.stdout, base64_output),
        "stderr": _output(result.stderr, base64_output),
        "stdout_truncated": result.stdout_truncated,
        "stderr_truncated": result.stderr_truncated,
        "timed_out": result.timed_out,
        "duration_ms": result.duration_ms,
    }


def stat_json(info: FileStat) -> dict[str, Any]:
    seconds, nanos = divmod(info.mtime_ns, 1_000_000_000)
    mtime = datetime.fromtimestamp(seconds, UTC).replace(microsecond=nanos // 1000)
    return {
        "path": info.path,
        "type": str(info.type),
        "size": info.size,
        "mode": f"{info.mode:04o}",
        "uid": info.uid,
        "gid": info.gid,
        "mtime": mtime.isoformat().replace("+00:00", "Z"),
        "link_target": info.link_target,
    }


def guest_path(path: str) -> str:
    if not path.startswith("/") or not _text(path) or len(path) > _MAX_PATH:
        raise _invalid(f"path must be absolute, without NUL, at most {_MAX_PATH} bytes")
    return path


def file_mode(text: str) -> int:
    if not _MODE.fullmatch(text):
        raise _invalid(f"mode {text!r} must be octal permission bits such as 644 or 0755")
    return int(text, 8)


def _manager(runtime: Runtime) -> InstanceManager:
    return runtime.require_instances()


class GuestController(Controller):
    path = "/instances/{instance_id:str}"

    @post("/exec", status_code=200)
    async def exec_command(
        self, runtime: NamedDependency[Runtime], instance_id: FromPath[str], data: JSONBody[Any]
    ) -> dict[str, Any]:
        request = ExecRequest.from_json(data)
        channel = await _manager(runtime).agent(instance_id)
        result = await run_exec(
            channel,
            request.spec,
            stdin=request.stdin,
            timeout_seconds=request.timeout_seconds,
            output_limit=EXEC_OUTPUT_LIMIT,
        )
        return exec_json(result, request.base64_output)

    @websocket("/exec")
    async def exec_interactive(
        self,
        socket: WebSocket[Any, Any, Any],
        runtime: NamedDependency[Runtime],
        instance_id: FromPath[str],
    ) -> None:
        await socket.accept()
        try:
            spec = _interactive_spec(socket.query_params)
        except ApiError as error:
            await _ws_fail(socket, error.code, error.message, _WS_INVALID)
            return
        try:
            channel = await _manager(runtime).agent(instance_id)
            async with interactive_exec(channel, spec) as process:
                await socket.send_json({"type": "started", "pid": process.pid})
                ended = await _relay(socket, process)
        except DomainError as error:
            code = _WS_INVALID if domain_status(error) < 500 else _WS_FAILED
            await _ws_fail(socket, error.code, error.message, code)
            return
        except WebSocketDisconnect:
            return  # the client went away; leaving the block killed the process group
        if ended is None:
            return
        with contextlib.suppress(WebSocketDisconnect):
            await socket.send_json(
                {"type": "exit", "exit_code": ended.exit_code, "signal": ended.signal}
            )
            await socket.close(1000)

    @get("/exec")
    async def exec_without_upgrade(self, instance_id: FromPath[str]) -> None:
        raise ApiError(
            426,
            "upgrade_required",
            "GET on this path opens an interactive exec: send 'Upgrade: websocket' "
            "(POST runs a command to completion)",
            headers={"Upgrade": "websocket", "Connection": "Upgrade"},
        )

    @get("/stat")
    async def stat_path(
        self,
        runtime: NamedDependency[Runtime],
        instance_id: FromPath[str],
        path: Annotated[str, QueryParameter(name="path")],
    ) -> dict[str, Any]:
        channel = await _manager(runtime).agent(instance_id)
        return stat_json(await stat(channel, guest_path(path)))

    @get("/files")
    async def download(
        self,
        runtime: NamedDependency[Runtime],
        instance_id: FromPath[str],
        path: Annotated[str, QueryParameter(name="path")],
    ) -> Stream:
        channel = await _manager(runtime).agent(instance_id)
        transfer = _download(channel, guest_path(path))
        # The stat comes first, so a missing file is an error answer, not a broken stream.
        head = await anext(transfer)
        assert isinstance(head, FileStat)

        async def body() -> AsyncIterator[bytes]:
            async for chunk in transfer:
                assert isinstance(chunk, bytes)
                yield chunk

        directory = head.type is FileType.DIRECTORY
        name = path.rstrip("/").rsplit("/", 1)[-1] or "root"
        return Stream(
            body(),
            media_type="application/x-tar" if directory else "application/octet-stream",
            headers={
                "X-File-Type": str(head.type),
                "Content-Disposition": _attachment(name + (".tar" if directory else "")),
            },
            # Runs however the response ended (sent, or its client gone): the session is
            # closed then, not whenever the generator is collected.
            background=BackgroundTask(transfer.aclose),
        )

    @put("/files", status_code=200, request_max_body_size=None)
    async def upload(
        self,
        request: Request[Any, Any, Any],
        runtime: NamedDependency[Runtime],
        instance_id: FromPath[str],
        path: Annotated[str, QueryParameter(name="path")],
        mode: Annotated[str, QueryParameter(name="mode")] = "644",
    ) -> dict[str, Any]:
        target = guest_path(path)
        bits = file_mode(mode)
        channel = await _manager(runtime).agent(instance_id)
        await write_file(channel, target, bits, request.stream())
        return stat_json(await stat(channel, target))


async def _download(channel: Channel, path: str) -> AsyncGenerator[FileStat | bytes, None]:
    """The file's stat, then its bytes; closing it ends the agent's session."""
    async with read_file(channel, path) as (head, chunks):
        yield head
        async for chunk in chunks:
            yield chunk


def _attachment(name: str) -> str:
    # RFC 6266: a plain ASCII fallback, and the exact name percent-encoded.
    fallback = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name
    )
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name)}"


def _interactive_spec(query: Any) -> ExecSpec:
    command = tuple(query.getall("command", []))
    if not command:
        raise _invalid("give the command as ?command=argv0&command=argv1…")
    tty = query.get("tty", "false").lower() in ("1", "true", "yes")
    env: dict[str, str] = {}
    for item in query.getall("env", []):
        name, sep, value = item.partition("=")
        if not sep:
            raise _invalid(f"env {item!r} must be NAME=value")
        env[name] = value
    try:
        rows = int(query.get("rows", "24"))
        cols = int(query.get("cols", "80"))
    except ValueError:
        raise _invalid("rows and cols must be integers") from None
    if not (0 < rows <= 65535 and 0 < cols <= 65535):
        raise _invalid("rows and cols must be between 1 and 65535")
    return ExecSpec(
        command=_text_list(list(command), "command"),
        env=_env(env),
        workdir=_optional_text(query.get("workdir"), "workdir", absolute=True),
        user=_optional_text(query.get("user"), "user"),
        tty=TtySize(rows, cols) if tty else None,
    )


async def _relay(socket: WebSocket[Any, Any, Any], process: Any) -> ExecExit | None:
    """Client messages to the process and its output to the client; the exit, or None when
    the client left first."""
    ended: ExecExit | None = None
    failure: Exception | None = None
    # Stdin waits here for the guest's credit, so that reading the socket (controls, the
    # client leaving) never waits behind it; bounded, so a client cannot queue unbounded input.
    stdin_in, stdin_out = anyio.create_memory_object_stream[bytes](_STDIN_QUEUE)
    async with anyio.create_task_group() as tasks:

        async def from_client() -> None:
            async with stdin_in:
                while True:
                    message: dict[str, Any] = dict(await socket.receive())
                    if message["type"] == "websocket.disconnect":
                        tasks.cancel_scope.cancel()
                        return
                    try:
                        data = message.get("bytes")
                        if data:
                            await stdin_in.send(data)
                        elif message.get("text"):
                            await _control(process, str(message["text"]))
                    except ApiError as error:
                        # A bad control message is answered and ignored; the session goes on.
                        with contextlib.suppress(WebSocketDisconnect):
                            await socket.send_json(
                                {"type": "error", "code": error.code, "message": error.message}
                            )
                    except AgentError:
                        return  # the output side sees the same failure and reports it

        async def to_process() -> None:
            with contextlib.suppress(AgentError):
                async with stdin_out:
                    async for data in stdin_out:
                        await process.write(data)

        tasks.start_soon(from_client)
        tasks.start_soon(to_process)
        try:
            async for kind, item in process.output():
                if isinstance(item, ExecExit):
                    ended = item
                    break
                await socket.send_bytes(_STREAM_TAGS[kind] + item)
        except WebSocketDisconnect:
            pass  # the client left: leaving the session kills the process group
        except Exception as error:
            failure = error
        tasks.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return ended


async def _control(process: Any, text: str) -> None:
    try:
        message = json.loads(text)
    except ValueError:
        raise _invalid("a text message must be a JSON control message") from None
    kind = message.get("type") if isinstance(message, dict) else None
    if kind == "stdin_eof":
        await process.close_input()
    elif kind == "resize":
        rows, cols = message.get("rows"), message.get("cols")
        if not all(isinstance(v, int) and 0 < v <= 65535 for v in (rows, cols)):
            raise _invalid("resize needs integer rows and cols between 1 and 65535")
        await process.resize(rows, cols)
    elif kind == "signal":
        await process.signal(_signal_number(message.get("signal")))
    else:
        raise _invalid(f"unknown control message type {kind!r}")


def _signal_number(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65:
        return value
    if isinstance(value, str):
        name = value.upper() if value.upper().startswith("SIG") else "SIG" + value.upper()
        try:
            return int(signals.Signals[name])
        except KeyError:
            pass
    raise _invalid(f"unknown signal {value!r}")


async def _ws_fail(socket: WebSocket[Any, Any, Any], code: str, message: str, close: int) -> None:
    with contextlib.suppress(WebSocketDisconnect):
        await socket.send_json({"type": "error", "code": code, "message": message})
        await socket.close(close, message[:120])
