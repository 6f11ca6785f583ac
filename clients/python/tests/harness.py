"""Start and stop the real tidegate binaries for the integration tests.

Every wait here is bounded; every process is started in its own session and is
SIGKILLed by the fixtures' teardown if it is still running.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_BIN = REPO_ROOT / "target" / "release" / "tidegate"
LISTENING = re.compile(r"listening on (https?://\S+)")
START_TIMEOUT = 30.0


def tidegate_bin() -> Path:
    return Path(os.environ.get("TIDEGATE_BIN") or DEFAULT_BIN)


def child_env() -> dict[str, str]:
    # TIDEGATE_* variables are config overrides for the binary: keep the tests'
    # config authoritative (TIDEGATE_BIN itself would be read as a config key).
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEGATE_")}
    env.pop("OPENAI_API_KEY", None)
    env.pop("ANTHROPIC_API_KEY", None)
    env.setdefault("RUST_LOG", "info")
    env.setdefault("RUST_BACKTRACE", "1")
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """One child process that announces ``listening on http://...`` on stdout."""

    def __init__(self, name: str, args: list[str], log_path: Path) -> None:
        self.name = name
        self.args = args
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.stdout_lines: list[str] = []
        self.popen = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=child_env(),
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read_stdout, name=f"{name}-stdout", daemon=True)
        self._reader.start()
        self.url = self._wait_listening(START_TIMEOUT)

    def _read_stdout(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            self.stdout_lines.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def _wait_listening(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise RuntimeError(f"{self.name}: no 'listening on' line within {timeout}s\n{self.log_tail()}")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                rc = self.popen.wait(timeout=5)
                raise RuntimeError(f"{self.name} exited with {rc} before listening\n{self.log_tail()}")
            m = LISTENING.search(line)
            if m:
                return m.group(1).rstrip("/")

    def running(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.running():
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for exit (bounded); raises subprocess.TimeoutExpired."""
        return self.popen.wait(timeout=timeout)

    def kill(self) -> None:
        if self.running():
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except PermissionError:  # pragma: no cover
                self.popen.kill()
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
        self._close()

    def _close(self) -> None:
        if not self._log.closed:
            self._log.close()
        if self.popen.stdout is not None:
            try:
                self.popen.stdout.close()
            except Exception:  # pragma: no cover
                pass

    def log_tail(self, n: int = 60) -> str:
        try:
            self._log.flush()
        except ValueError:
            pass
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return f"--- {self.name} ({self.log_path}) last {n} lines ---\n" + "\n".join(lines[-n:])


class Mock:
    def __init__(self, tmp: Path, args: list[str] | None = None, name: str = "mock") -> None:
        command = [str(tidegate_bin()), "mock-upstream", "--listen", "127.0.0.1:0", *(args or [])]
        self.proc = Proc(name, command, tmp / f"{name}.log")
        self.url = self.proc.url

    def complete(self, body: dict[str, Any]) -> str:
        """The exact answer: the same body with stream:false, straight to the mock."""
        b = dict(body)
        b["stream"] = False
        r = httpx.post(f"{self.url}/v1/chat/completions", json=b, timeout=30)
        r.raise_for_status()
        content = r.json()["choices"][0]["message"]["content"]
        assert isinstance(content, str) and content
        return content

    def stats(self) -> dict[str, Any]:
        r = httpx.get(f"{self.url}/mock/stats", timeout=10)
        r.raise_for_status()
        result: dict[str, Any] = r.json()
        return result

    def stop(self) -> None:
        self.proc.kill()


class Gateway:
    """A gateway "service": successive processes on one port and one store path."""

    def __init__(
        self,
        tmp: Path,
        mock_url: str,
        *,
        grace: str = "1s",
        exit_timeout: str = "2s",
        extra: str = "",
        upstream: str = "",
    ) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = tmp / "data"
        self.config = tmp / "tidegate.toml"
        self.config.write_text(
            f"""listen = "127.0.0.1:{self.port}"

[drain]
grace = "{grace}"
exit_timeout = "{exit_timeout}"

[store]
kind = "embedded"
path = {json.dumps(str(self.store))}

[[upstreams]]
name = "mock"
protocol = "openai"
base_url = "{mock_url}/v1"
models = ["*"]
continuation = "continue_final_message"
{upstream}
{extra}"""
        )
        self.generations: list[Proc] = []

    @property
    def proc(self) -> Proc:
        return self.generations[-1]

    def start(self) -> Proc:
        n = len(self.generations) + 1
        p = Proc(
            f"gateway#{n}",
            [str(tidegate_bin()), "serve", "--config", str(self.config), "--listen", f"127.0.0.1:{self.port}"],
            self.tmp / f"gateway-{n}.log",
        )
        self.generations.append(p)
        assert p.url == self.url, f"gateway announced {p.url}, expected {self.url}"
        return p

    def stop_all(self) -> None:
        for p in self.generations:
            p.kill()

    def logs(self) -> str:
        return "\n".join(p.log_tail() for p in self.generations)


class Restarter(threading.Thread):
    """Stops the running gateway (signal), waits for it to exit, then starts a new one.

    Runs beside the consumer so the client really meets a gateway that is
    draining, then down (connection refused), then back.
    """

    def __init__(self, gw: Gateway, sig: int, *, down_for: float = 0.5, exit_timeout: float = 15.0,
                 restart: bool = True) -> None:
        super().__init__(name="restarter", daemon=True)
        self.gw = gw
        self.sig = sig
        self.down_for = down_for
        self.exit_timeout = exit_timeout
        self.restart = restart
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self.t_signal: float | None = None
        self.t_exit: float | None = None
        self.t_up: float | None = None

    def run(self) -> None:
        try:
            old = self.gw.proc
            self.t_signal = time.monotonic()
            old.signal(self.sig)
            self.exit_code = old.wait(self.exit_timeout)
            self.t_exit = time.monotonic()
            if self.restart:
                time.sleep(self.down_for)
                self.gw.start()
                self.t_up = time.monotonic()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def finish(self, timeout: float = 60.0) -> None:
        self.join(timeout)
        assert not self.is_alive(), "restarter did not finish in time"
        if self.error is not None:
            raise AssertionError(f"restarting the gateway failed: {self.error!r}") from self.error
