"""A real single-node Apache Kafka broker (KRaft, combined broker+controller) for local runs.

The broker comes from the Maven Central jars named in ``infra/kafka/pom.xml``: Maven copies the
runtime classpath once into ``$LOOPMESH_CACHE_DIR`` (default ``~/.cache/loopmesh``) under
``kafka-<version>/libs``, and the broker is started with ``java -cp '<libs>/*' kafka.Kafka``.
No Kafka tarball, no Docker. Readiness is a real protocol round trip (ApiVersions, then Metadata)
that must list this broker and the cluster id it was formatted with.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from loopmesh.devstack.process import (
    ManagedProcess,
    StartAborted,
    check_abort,
    free_port,
    log_tail,
)
from loopmesh.mesh.errors import SetupError

KAFKA_VERSION = "4.4.0"
"""Kafka release the launcher asks Maven for (passed as ``-Dkafka.version`` to the pom)."""

NODE_ID = 1

_REPO_ROOT = Path(__file__).resolve().parents[3]
_DEFAULT_POM = _REPO_ROOT / "infra" / "kafka" / "pom.xml"
_POM_ENV = "LOOPMESH_KAFKA_POM"
_CACHE_ENV = "LOOPMESH_CACHE_DIR"
_MARKER = "libs.complete"
_JVM_HEAP = "-Xmx512m"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Console only: ManagedProcess sends stdout to the log file, so one file holds everything and
# INFO keeps it readable (Kafka's own default config would also write several side files).
_LOG4J2_PROPERTIES = """\
status = warn
name = loopmesh-kafka
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
# Per-request logging is noise at INFO; warnings still show.
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.channel.name = kafka.network.RequestChannel$
logger.channel.level = WARN
"""


# --- jar resolution ------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root of LoopMesh's download cache: ``$LOOPMESH_CACHE_DIR`` or ``~/.cache/loopmesh``."""
    env = os.environ.get(_CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loopmesh"


def default_pom_path() -> Path:
    """The pom to resolve: ``$LOOPMESH_KAFKA_POM`` or ``infra/kafka/pom.xml`` in the repo."""
    env = os.environ.get(_POM_ENV)
    return Path(env).expanduser() if env else _DEFAULT_POM


def _which(tool: str, hint: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise SetupError(f"`{tool}` was not found on PATH; {hint}")
    return found


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    return _which(
        "java", "Kafka 4.x needs a Java 17+ runtime (e.g. apt-get install openjdk-17-jre)"
    )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # Two test workers or CLI calls resolving at once would otherwise copy into the same dir.
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve_libs(pom_path: Path | None = None, *, timeout: float = 900.0) -> Path:
    """Directory of the broker's runtime jars, copied there by Maven on first use.

    A marker holding the pom's hash is written only after a complete copy, so an interrupted
    copy, or an edited pom, is redone on the next call.
    """
    pom = (pom_path or default_pom_path()).resolve()
    if not pom.is_file():
        raise SetupError(f"Kafka pom not found at {pom}; set {_POM_ENV} to its path")
    root = cache_dir() / f"kafka-{KAFKA_VERSION}"
    libs = root / "libs"
    marker = root / _MARKER
    fingerprint = hashlib.sha256(pom.read_bytes() + KAFKA_VERSION.encode()).hexdigest()

    with _file_lock(root / ".lock"):
        if marker.is_file() and marker.read_text().strip() == fingerprint and libs.is_dir():
            return libs
        mvn = _which("mvn", "Maven is needed once to fetch the Kafka jars from Maven Central")
        partial = root / "libs.partial"
        shutil.rmtree(partial, ignore_errors=True)
        argv = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={partial}",
            "-DincludeScope=runtime",
            f"-Dkafka.version={KAFKA_VERSION}",
        ]
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise SetupError(
                f"Maven did not finish resolving Kafka jars in {timeout:.0f}s"
            ) from exc
        if done.returncode != 0:
            # Maven's -q still emits colour resets; they are noise in an exception message.
            plain = _ANSI.sub("", done.stdout + done.stderr)
            output = "\n".join(plain.splitlines()[-40:])
            raise SetupError(
                f"Maven failed ({done.returncode}) resolving Kafka {KAFKA_VERSION} jars "
                f"from {pom}:\n{output}"
            )
        if not (partial / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file():
            raise SetupError(f"Maven succeeded but {partial} lacks kafka_2.13-{KAFKA_VERSION}.jar")
        # Marker first: a crash between these steps must leave the copy looking incomplete.
        marker.unlink(missing_ok=True)
        shutil.rmtree(libs, ignore_errors=True)
        partial.rename(libs)
        marker.write_text(fingerprint + "\n")
    return libs


# --- readiness probe: a minimal Kafka wire-protocol client -----------------------------------

_API_METADATA = 3
_API_VERSIONS = 18
# Last version before flexible encoding, so plain structs suffice; Kafka 4.4 serves v0-v13.
_METADATA_VERSION = 4


class _Reader:
    """Big-endian cursor over one response body."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def _take(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self._data, self._pos)
        self._pos += struct.calcsize(fmt)
        return int(value)

    def int16(self) -> int:
        return self._take(">h")

    def int32(self) -> int:
        return self._take(">i")

    def nullable_string(self) -> str | None:
        size = self.int16()
        if size < 0:
            return None
        text = self._data[self._pos : self._pos + size].decode()
        self._pos += size
        return text


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("broker closed the connection mid-response")
        chunks += chunk
    return bytes(chunks)


def _round_trip(
    sock: socket.socket, api_key: int, version: int, correlation_id: int, body: bytes
) -> _Reader:
    client_id = b"loopmesh-probe"
    # Request header v1; both requests used here predate flexible (tagged-field) headers.
    header = struct.pack(">hhih", api_key, version, correlation_id, len(client_id)) + client_id
    message = header + body
    sock.sendall(struct.pack(">i", len(message)) + message)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    reader = _Reader(_recv_exact(sock, size))
    if reader.int32() != correlation_id:
        raise ConnectionError("response correlation id does not match the request")
    return reader


def probe_metadata(host: str, port: int, timeout: float = 3.0) -> tuple[str | None, list[int]]:
    """One real Metadata round trip: the cluster id and the broker ids the broker reports.

    Raises ``SetupError`` if the broker no longer serves the Metadata version spoken here, and
    ``OSError`` / ``struct.error`` while it is not up yet.
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        # ApiVersions v0 is answered by every broker, even with UNSUPPORTED_VERSION, so this
        # tells us up front whether our Metadata version is still served.
        versions = _round_trip(sock, _API_VERSIONS, 0, 1, b"")
        versions.int16()  # error code; the version list comes back either way
        metadata_range: tuple[int, int] | None = None
        for _ in range(versions.int32()):
            key, low, high = versions.int16(), versions.int16(), versions.int16()
            if key == _API_METADATA:
                metadata_range = (low, high)
        if metadata_range is None or not (
            metadata_range[0] <= _METADATA_VERSION <= metadata_range[1]
        ):
            raise SetupError(
                f"broker at {host}:{port} serves Metadata versions {metadata_range}, "
                f"the probe speaks v{_METADATA_VERSION}"
            )
        # Body: topics = empty array (no topic details), allow_auto_topic_creation = false.
        reply = _round_trip(sock, _API_METADATA, _METADATA_VERSION, 2, struct.pack(">ib", 0, 0))
        reply.int32()  # throttle_time_ms
        broker_ids = []
        for _ in range(reply.int32()):
            broker_ids.append(reply.int32())
            reply.nullable_string()  # host
            reply.int32()  # port
            reply.nullable_string()  # rack
        return reply.nullable_string(), broker_ids


# --- the broker ----------------------------------------------------------------------------


def _new_cluster_id() -> str:
    # Kafka's Uuid.toString: URL-safe base64 of 16 bytes, unpadded. Kafka itself rerolls ids
    # starting with "-" because the storage tool would read them as an option.
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not text.startswith("-"):
            return text


def _read_properties(path: Path) -> dict[str, str]:
    props: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    return props


def _prop_value(value: str) -> str:
    return value.replace("\\", "\\\\")


class KafkaBroker:
    """One Kafka 4.x broker+controller (node 1) whose state lives under ``data_dir``.

    Ports are chosen once, when None is passed, and kept for the object's life so ``restart``
    comes back on the same address with the same data.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        controller_port: int | None = None,
        pom_path: Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.controller_port = controller_port if controller_port is not None else free_port(host)
        while controller_port is None and self.controller_port == self.port:
            # The OS may hand back the port it just gave us, since free_port releases it.
            self.controller_port = free_port(host)
        if self.controller_port == self.port:
            raise SetupError(f"broker and controller ports must differ (both {self.port})")
        self.pom_path = pom_path
        self._process: ManagedProcess | None = None
        self._cluster_id: str | None = None
        self._probe_error: str | None = None

    # Layout under data_dir; the log dir also holds the KRaft metadata log.
    @property
    def log_dir(self) -> Path:
        return self.data_dir / "kafka-logs"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "broker.log"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def cluster_id(self) -> str | None:
        """The KRaft cluster id, known once storage has been formatted."""
        return self._cluster_id

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    def start(self, timeout: float = 120.0, *, abort: threading.Event | None = None) -> None:
        """Resolve jars, format storage on first use, launch, and wait for a Metadata reply.

        ``timeout`` bounds formatting plus readiness; a first-time jar download is bounded
        separately because it depends on the network, not on the broker. Once ``abort`` is
        set the start-up stops between steps and in the readiness wait (``StartAborted``).
        """
        if self.running:
            raise SetupError(f"Kafka broker is already running (pid {self.pid})")
        libs = resolve_libs(self.pom_path)
        check_abort(abort, "kafka")
        java = _java()
        deadline = time.monotonic() + timeout
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_configs()
        jvm = [
            java,
            _JVM_HEAP,
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            "-Djava.awt.headless=true",
            "-cp",
            str(libs / "*"),  # expanded by the JVM, not a shell
        ]
        self._cluster_id = self._format_once(jvm, timeout)
        check_abort(abort, "kafka")
        # Kafka's own start script uses G1 with short pauses; the rest is the same JVM setup.
        gc = ["-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20"]
        argv = [*jvm, *gc, "kafka.Kafka", str(self.config_path)]
        self._process = ManagedProcess("kafka", argv, log_path=self.log_path, cwd=self.data_dir)
        self._process.start()
        self._probe_error = None
        try:
            self._process.wait_ready(
                self._ready, max(deadline - time.monotonic(), 1.0), abort=abort
            )
        except StartAborted:
            raise
        except SetupError as exc:
            # wait_ready swallows probe errors; the last one often says why (wrong cluster...).
            raise SetupError(f"{exc}\nlast readiness probe: {self._probe_error}") from exc

    def stop(self, timeout: float = 30.0, *, hurry: threading.Event | None = None) -> None:
        """Graceful shutdown (SIGTERM: controlled shutdown, clean log close); SIGKILL after.

        ``hurry`` set (a second Ctrl-C) shortens the wait to ``HURRY_GRACE``.
        """
        if self._process is not None:
            self._process.stop(timeout, hurry)

    def kill(self) -> None:
        """SIGKILL, as a crash: the next start runs Kafka's log recovery."""
        if self._process is not None:
            self._process.kill()

    def restart(self, timeout: float = 120.0) -> None:
        """Stop if still running, then start on the same ports and data dir."""
        self.stop()
        self.start(timeout)

    def __enter__(self) -> KafkaBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _write_configs(self) -> None:
        h, log_dir = self.host, _prop_value(str(self.log_dir))
        lines = [
            "# Generated by loopmesh.devstack.kafka on every start; edits are overwritten.",
            "process.roles=broker,controller",
            f"node.id={NODE_ID}",
            # Static voter set: one node, no dynamic quorum (no --standalone format needed).
            f"controller.quorum.voters={NODE_ID}@{h}:{self.controller_port}",
            f"listeners=PLAINTEXT://{h}:{self.port},CONTROLLER://{h}:{self.controller_port}",
            f"advertised.listeners=PLAINTEXT://{h}:{self.port}",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            f"log.dirs={log_dir}",
            "num.partitions=1",
            "auto.create.topics.enable=true",
            "default.replication.factor=1",
            "min.insync.replicas=1",
            # Internal topics default to RF 3 and would never be created on one node.
            "offsets.topic.replication.factor=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            # Nobody else will join; the 3 s default only slows every first group join.
            "group.initial.rebalance.delay.ms=0",
            # After a SIGKILL the restarted controller holds the dead incarnation's registration
            # until its session expires (9 s by default), refusing the new one meanwhile.
            "broker.session.timeout.ms=5000",
            "broker.heartbeat.interval.ms=1000",
        ]
        self.config_path.write_text("\n".join(lines) + "\n")
        (self.data_dir / "log4j2.properties").write_text(_LOG4J2_PROPERTIES)

    def _format_once(self, jvm: list[str], timeout: float) -> str:
        """Format the log dir on the first start only; return the cluster id it carries."""
        meta = self.log_dir / "meta.properties"
        if not meta.is_file():
            id_file = self.data_dir / "cluster.id"
            if not id_file.is_file():
                id_file.write_text(_new_cluster_id() + "\n")
            cluster_id = id_file.read_text().strip()
            argv = [
                *jvm,
                "kafka.tools.StorageTool",
                "format",
                "--cluster-id",
                cluster_id,
                "--config",
                str(self.config_path),
                "--ignore-formatted",  # a format interrupted after meta.properties is fine
            ]
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("ab") as log:
                try:
                    code = subprocess.run(
                        argv,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        cwd=self.data_dir,
                        timeout=timeout,
                        check=False,
                    ).returncode
                except subprocess.TimeoutExpired as exc:
                    raise SetupError(
                        f"Kafka storage format timed out after {timeout:.0f}s; "
                        f"log {self.log_path}:\n{log_tail(self.log_path)}"
                    ) from exc
            if code != 0 or not meta.is_file():
                raise SetupError(
                    f"Kafka storage format failed (exit {code}); "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
        # meta.properties is the truth: it survives even if cluster.id is lost or edited.
        formatted_id = _read_properties(meta).get("cluster.id")
        if not formatted_id:
            raise SetupError(f"{meta} has no cluster.id; delete {self.data_dir} to start afresh")
        return formatted_id

    def _ready(self) -> bool:
        try:
            cluster_id, broker_ids = probe_metadata(self.host, self.port)
        except Exception as exc:
            self._probe_error = f"{type(exc).__name__}: {exc}"
            raise
        # Our cluster id guards against some other broker already sitting on this port;
        # our node id being listed means the broker is registered and unfenced.
        if cluster_id != self._cluster_id or NODE_ID not in broker_ids:
            self._probe_error = f"cluster id {cluster_id!r}, broker ids {broker_ids}"
            return False
        return True
