"""A real single-node Apache Kafka broker (KRaft, combined broker+controller) for local runs,
and a cluster of three such nodes for fault tests.

The broker comes from the Maven Central jars named in ``infra/kafka/pom.xml``: Maven copies the
runtime classpath once into ``$LOOPMESH_CACHE_DIR`` (default ``~/.cache/loopmesh``) under
``kafka-<version>/libs``, and the broker is started with ``java -cp '<libs>/*' kafka.Kafka``.
No Kafka tarball, no Docker. Readiness is a real protocol round trip (ApiVersions, then Metadata)
that must list this broker and the cluster id it was formatted with.

``KafkaBroker`` is the one node ``loopmesh run`` and the tests use; given a ``BrokerTls`` its
only client listener is SSL (PEM key and certificates, mutual TLS when a client CA is given),
the KRaft controller listener staying plaintext on loopback. ``KafkaCluster`` runs three
nodes on loopback (each a broker, a controller and a static voter; its own ports, log dir and
log file), any of which can be SIGKILLed and restarted; ``move_leadership`` makes one node lead
every partition of some topics, so a test can kill the leader of all of them. The small wire
client below speaks the few requests this needs (Metadata, AlterPartitionReassignments,
ElectLeaders), so no Kafka tool has to be installed.
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
import ssl
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
_API_ELECT_LEADERS = 43
_API_ALTER_PARTITION_REASSIGNMENTS = 45
# Flexible versions (Kafka 4.4 serves ElectLeaders v0-v2, AlterPartitionReassignments v0-v1).
_ELECT_LEADERS_VERSION = 2
_ALTER_PARTITION_REASSIGNMENTS_VERSION = 0
_PREFERRED_ELECTION = 0
_ELECTION_NOT_NEEDED = 84
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

    def int8(self) -> int:
        return self._take(">b")

    def int16(self) -> int:
        return self._take(">h")

    def int32(self) -> int:
        return self._take(">i")

    def _text(self, size: int) -> str:
        text = self._data[self._pos : self._pos + size].decode()
        self._pos += size
        return text

    def nullable_string(self) -> str | None:
        size = self.int16()
        return None if size < 0 else self._text(size)

    def int32_array(self) -> tuple[int, ...]:
        return tuple(self.int32() for _ in range(self.int32()))

    # Flexible versions (KIP-482): unsigned varint lengths, +1 so that 0 can mean null.
    def uvarint(self) -> int:
        value = shift = 0
        while True:
            byte = self._data[self._pos]
            self._pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7

    def compact_nullable_string(self) -> str | None:
        size = self.uvarint() - 1
        return None if size < 0 else self._text(size)

    def compact_array_length(self) -> int:
        return max(self.uvarint() - 1, 0)

    def skip_tags(self) -> None:
        for _ in range(self.uvarint()):
            self.uvarint()  # tag
            self._pos += self.uvarint()  # size, then the field itself


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">h", len(data)) + data


def _compact_string(text: str) -> bytes:
    data = text.encode()
    return _uvarint(len(data) + 1) + data


def _compact_array(items: list[bytes]) -> bytes:
    return _uvarint(len(items) + 1) + b"".join(items)


_NO_TAGS = b"\x00"


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("broker closed the connection mid-response")
        chunks += chunk
    return bytes(chunks)


def _round_trip(
    sock: socket.socket,
    api_key: int,
    version: int,
    correlation_id: int,
    body: bytes,
    *,
    flexible: bool = False,
) -> _Reader:
    client_id = b"loopmesh-probe"
    # Request header v1, or v2 (v1 plus tagged fields) for a flexible version of the API.
    header = struct.pack(">hhih", api_key, version, correlation_id, len(client_id)) + client_id
    message = header + (_NO_TAGS if flexible else b"") + body
    sock.sendall(struct.pack(">i", len(message)) + message)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    reader = _Reader(_recv_exact(sock, size))
    if reader.int32() != correlation_id:
        raise ConnectionError("response correlation id does not match the request")
    if flexible:
        reader.skip_tags()  # response header v1
    return reader


def _api_versions(sock: socket.socket) -> dict[int, tuple[int, int]]:
    """The versions the broker serves, by API key (ApiVersions v0: every broker answers it)."""
    versions = _round_trip(sock, _API_VERSIONS, 0, 1, b"")
    versions.int16()  # error code; the version list comes back either way
    served: dict[int, tuple[int, int]] = {}
    for _ in range(versions.int32()):
        key, low, high = versions.int16(), versions.int16(), versions.int16()
        served[key] = (low, high)
    return served


def _require_version(
    served: dict[int, tuple[int, int]], api_key: int, version: int, what: str, where: str
) -> None:
    low, high = served.get(api_key, (1, 0))
    if not low <= version <= high:
        raise SetupError(
            f"broker at {where} serves {what} versions {served.get(api_key)}, "
            f"this client speaks v{version}"
        )


@contextlib.contextmanager
def _connect(
    host: str, port: int, timeout: float, tls: ssl.SSLContext | None = None
) -> Iterator[socket.socket]:
    """A socket to the broker, wrapped in TLS (server name ``host``) when ``tls`` is given."""
    with socket.create_connection((host, port), timeout=timeout) as raw:
        raw.settimeout(timeout)
        if tls is None:
            yield raw
            return
        with tls.wrap_socket(raw, server_hostname=host) as wrapped:
            yield wrapped


def probe_metadata(
    host: str, port: int, timeout: float = 3.0, *, tls: ssl.SSLContext | None = None
) -> tuple[str | None, list[int]]:
    """One real Metadata round trip: the cluster id and the broker ids the broker reports.

    ``tls``: speak TLS with this client context (an SSL listener). Raises ``SetupError`` if
    the broker no longer serves the Metadata version spoken here, and ``OSError`` /
    ``struct.error`` while it is not up yet (``ssl.SSLError`` is an ``OSError``).
    """
    with _connect(host, port, timeout, tls) as sock:
        # ApiVersions v0 is answered by every broker, even with UNSUPPORTED_VERSION, so this
        # tells us up front whether our Metadata version is still served.
        served = _api_versions(sock)
        _require_version(served, _API_METADATA, _METADATA_VERSION, "Metadata", f"{host}:{port}")
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


@dataclass(frozen=True)
class PartitionState:
    """One partition as the cluster's metadata reports it."""

    leader: int
    """Node id of the leader; -1 while the partition has none."""
    replicas: tuple[int, ...]
    """Assigned replicas, the preferred leader first."""
    isr: tuple[int, ...]
    """In-sync replicas: those an ``acks=all`` write waits for."""


def describe_partitions(
    host: str, port: int, topic: str, timeout: float = 3.0
) -> dict[int, PartitionState]:
    """Leader, replicas and ISR of every partition of ``topic`` (Metadata v4, one round trip).

    Raises ``SetupError`` naming the error code when the topic does not exist (yet).
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        served = _api_versions(sock)
        _require_version(served, _API_METADATA, _METADATA_VERSION, "Metadata", f"{host}:{port}")
        body = struct.pack(">i", 1) + _string(topic) + struct.pack(">b", 0)
        reply = _round_trip(sock, _API_METADATA, _METADATA_VERSION, 2, body)
        reply.int32()  # throttle_time_ms
        for _ in range(reply.int32()):  # brokers
            reply.int32()
            reply.nullable_string()
            reply.int32()
            reply.nullable_string()
        reply.nullable_string()  # cluster id
        reply.int32()  # controller id
        out: dict[int, PartitionState] = {}
        for _ in range(reply.int32()):
            error, name = reply.int16(), reply.nullable_string()
            reply.int8()  # is_internal
            if error != 0:
                raise SetupError(f"Metadata for topic {name!r}: error code {error}")
            for _ in range(reply.int32()):
                reply.int16()  # partition error (LEADER_NOT_AVAILABLE shows as leader -1)
                index, leader = reply.int32(), reply.int32()
                replicas, isr = reply.int32_array(), reply.int32_array()
                out[index] = PartitionState(leader, replicas, isr)
        return out


def reassign_replicas(
    host: str, port: int, assignment: dict[str, dict[int, list[int]]], timeout: float = 30.0
) -> None:
    """Give partitions new replica lists (AlterPartitionReassignments; the broker forwards it
    to the active controller). The same replicas in another order move no data: only the
    preferred leader, the first one, changes. Raises ``SetupError`` on any error."""
    topics = [
        _compact_string(name)
        + _compact_array(
            [
                struct.pack(">i", index)
                + _compact_array([struct.pack(">i", r) for r in replicas])
                + _NO_TAGS
                for index, replicas in sorted(partitions.items())
            ]
        )
        + _NO_TAGS
        for name, partitions in sorted(assignment.items())
    ]
    body = struct.pack(">i", int(timeout * 1000)) + _compact_array(topics) + _NO_TAGS
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        version = _ALTER_PARTITION_REASSIGNMENTS_VERSION
        served = _api_versions(sock)
        _require_version(
            served,
            _API_ALTER_PARTITION_REASSIGNMENTS,
            version,
            "AlterPartitionReassignments",
            f"{host}:{port}",
        )
        reply = _round_trip(
            sock, _API_ALTER_PARTITION_REASSIGNMENTS, version, 2, body, flexible=True
        )
        reply.int32()  # throttle_time_ms
        error, message = reply.int16(), reply.compact_nullable_string()
        if error != 0:
            raise SetupError(f"AlterPartitionReassignments failed: error {error} {message}")
        failures = []
        for _ in range(reply.compact_array_length()):
            name = reply.compact_nullable_string()
            for _ in range(reply.compact_array_length()):
                index, error = reply.int32(), reply.int16()
                message = reply.compact_nullable_string()
                reply.skip_tags()
                if error != 0:
                    failures.append(f"{name}[{index}]: error {error} {message}")
            reply.skip_tags()
        if failures:
            raise SetupError("AlterPartitionReassignments failed: " + "; ".join(failures))


def elect_preferred_leaders(
    host: str, port: int, partitions: dict[str, list[int]], timeout: float = 30.0
) -> dict[tuple[str, int], str]:
    """Make each partition's preferred (first) replica its leader (ElectLeaders, preferred).

    Returns the partitions that did not move, with the reason (e.g. the preferred replica is
    not in sync yet); one that already had its preferred leader counts as moved.
    """
    topics = [
        _compact_string(name)
        + _compact_array([struct.pack(">i", p) for p in sorted(indexes)])
        + _NO_TAGS
        for name, indexes in sorted(partitions.items())
    ]
    body = (
        struct.pack(">b", _PREFERRED_ELECTION)
        + _compact_array(topics)
        + struct.pack(">i", int(timeout * 1000))
        + _NO_TAGS
    )
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        served = _api_versions(sock)
        _require_version(
            served, _API_ELECT_LEADERS, _ELECT_LEADERS_VERSION, "ElectLeaders", f"{host}:{port}"
        )
        reply = _round_trip(
            sock, _API_ELECT_LEADERS, _ELECT_LEADERS_VERSION, 2, body, flexible=True
        )
        reply.int32()  # throttle_time_ms
        error = reply.int16()
        if error != 0:
            raise SetupError(f"ElectLeaders failed: error {error}")
        refused: dict[tuple[str, int], str] = {}
        for _ in range(reply.compact_array_length()):
            name = reply.compact_nullable_string() or ""
            for _ in range(reply.compact_array_length()):
                index, error = reply.int32(), reply.int16()
                message = reply.compact_nullable_string()
                reply.skip_tags()
                if error not in (0, _ELECTION_NOT_NEEDED):
                    refused[(name, index)] = f"error {error} {message}"
            reply.skip_tags()
        return refused


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


@dataclass(frozen=True)
class BrokerTls:
    """TLS of a broker's client listener: PEM files, as ``KafkaSettings`` names its own.

    Kafka 3.x+ reads PEM key stores (``ssl.keystore.type=PEM``); the key must be an
    unencrypted PKCS#8 PEM. With ``tls`` the broker has no plaintext client listener at all.
    """

    certfile: Path
    """The broker's certificate (PEM), for the names clients dial (``127.0.0.1`` here)."""
    keyfile: Path
    """Its private key (PKCS#8 PEM, unencrypted)."""
    cafile: Path
    """CA bundle that signed ``certfile``: the broker's own client (inter-broker, itself on
    one node) and the readiness probe verify the listener with it."""
    client_cafile: Path | None = None
    """CA of client certificates; when set, every client must present one (mutual TLS,
    ``ssl.client.auth=required``) and the probe presents ``certfile``."""

    def client_context(self) -> ssl.SSLContext:
        """A client context that verifies the broker (and presents its certificate when the
        listener requires one: it is signed by a CA the listener trusts, see ``start``)."""
        context = ssl.create_default_context(cafile=str(self.cafile))
        if self.client_cafile is not None:
            context.load_cert_chain(str(self.certfile), str(self.keyfile))
        return context


class KafkaBroker:
    """One Kafka 4.x broker+controller (node 1) whose state lives under ``data_dir``.

    Ports are chosen once, when None is passed, and kept for the object's life so ``restart``
    comes back on the same address with the same data. With ``tls`` the client listener is
    SSL only (``bootstrap_servers`` is then an SSL address); without it, PLAINTEXT.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        controller_port: int | None = None,
        pom_path: Path | None = None,
        tls: BrokerTls | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.tls = tls
        self.port = port if port is not None else free_port(host)
        self.controller_port = controller_port if controller_port is not None else free_port(host)
        while controller_port is None and self.controller_port == self.port:
            # The OS may hand back the port it just gave us, since free_port releases it.
            self.controller_port = free_port(host)
        if self.controller_port == self.port:
            raise SetupError(f"broker and controller ports must differ (both {self.port})")
        self.pom_path = pom_path
        self.node_id = NODE_ID
        self._name = "kafka"
        self._jvm_options: tuple[str, ...] = ()
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
        check_abort(abort, self._name)
        java = _java()
        deadline = time.monotonic() + timeout
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_configs()
        jvm = [
            java,
            _JVM_HEAP,
            *self._jvm_options,
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            "-Djava.awt.headless=true",
            "-cp",
            str(libs / "*"),  # expanded by the JVM, not a shell
        ]
        self._cluster_id = self._format_once(jvm, timeout)
        check_abort(abort, self._name)
        # Kafka's own start script uses G1 with short pauses; the rest is the same JVM setup.
        gc = ["-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20"]
        argv = [*jvm, *gc, "kafka.Kafka", str(self.config_path)]
        self._process = ManagedProcess(self._name, argv, log_path=self.log_path, cwd=self.data_dir)
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
        if self.tls is not None:
            self._write_tls_stores(self.tls)
        lines = [
            "# Generated by loopmesh.devstack.kafka on every start; edits are overwritten.",
            *self._server_properties(),
        ]
        self.config_path.write_text("\n".join(lines) + "\n")
        (self.data_dir / "log4j2.properties").write_text(_LOG4J2_PROPERTIES)

    @property
    def _keystore_path(self) -> Path:
        return self.data_dir / "tls" / "keystore.pem"

    @property
    def _truststore_path(self) -> Path:
        return self.data_dir / "tls" / "truststore.pem"

    def _write_tls_stores(self, tls: BrokerTls) -> None:
        """The PEM key store (key, then the certificate chain) and trust store Kafka reads.

        The trust store holds the CA of the broker's own certificate (its inter-broker client
        verifies the listener with it) and the client CA (mutual TLS), one file for both.
        """
        tls_dir = self._keystore_path.parent
        tls_dir.mkdir(parents=True, exist_ok=True)
        tls_dir.chmod(0o700)
        key = tls.keyfile.read_text().strip()
        if "ENCRYPTED" in key or "BEGIN PRIVATE KEY" not in key:
            raise SetupError(
                f"{tls.keyfile}: Kafka's PEM key store needs an unencrypted PKCS#8 key "
                "('BEGIN PRIVATE KEY'); convert it with `openssl pkcs8 -topk8 -nocrypt`"
            )
        self._keystore_path.write_text(key + "\n" + tls.certfile.read_text().strip() + "\n")
        self._keystore_path.chmod(0o600)
        cas = dict.fromkeys(
            path.read_text().strip() for path in (tls.cafile, tls.client_cafile) if path
        )
        self._truststore_path.write_text("\n".join(cas) + "\n")

    def _listener_properties(self) -> list[str]:
        """Listeners: the client one (PLAINTEXT, or SSL only with ``tls``) and the
        controller's, plaintext on ``host`` (loopback) either way."""
        h, name = self.host, "SSL" if self.tls is not None else "PLAINTEXT"
        props = [
            f"listeners={name}://{h}:{self.port},CONTROLLER://{h}:{self.controller_port}",
            f"advertised.listeners={name}://{h}:{self.port}",
            f"listener.security.protocol.map={name}:{name},CONTROLLER:PLAINTEXT",
            "controller.listener.names=CONTROLLER",
            f"inter.broker.listener.name={name}",
        ]
        if self.tls is not None:
            props += [
                "ssl.keystore.type=PEM",
                f"ssl.keystore.location={_prop_value(str(self._keystore_path))}",
                "ssl.truststore.type=PEM",
                f"ssl.truststore.location={_prop_value(str(self._truststore_path))}",
                # Clients dial 127.0.0.1: the inter-broker client checks that name too.
                "ssl.endpoint.identification.algorithm=https",
                "ssl.client.auth=" + ("required" if self.tls.client_cafile else "none"),
            ]
        return props

    def _server_properties(self) -> list[str]:
        h, log_dir = self.host, _prop_value(str(self.log_dir))
        return [
            "process.roles=broker,controller",
            f"node.id={NODE_ID}",
            # Static voter set: one node, no dynamic quorum (no --standalone format needed).
            f"controller.quorum.voters={NODE_ID}@{h}:{self.controller_port}",
            *self._listener_properties(),
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
            tls = self.tls.client_context() if self.tls is not None else None
            cluster_id, broker_ids = probe_metadata(self.host, self.port, tls=tls)
        except Exception as exc:
            self._probe_error = f"{type(exc).__name__}: {exc}"
            raise
        # Our cluster id guards against some other broker already sitting on this port;
        # our node id being listed means the broker is registered and unfenced.
        if cluster_id != self._cluster_id or self.node_id not in broker_ids:
            self._probe_error = f"cluster id {cluster_id!r}, broker ids {broker_ids}"
            return False
        return True


# --- a cluster of three ------------------------------------------------------------------------


class ClusterNode(KafkaBroker):
    """One node of a ``KafkaCluster``: a combined broker+controller, one of the static voters.

    Its own data dir (log dir, ``broker.log``, ``server.properties``) and its own two ports,
    kept across restarts. The cluster writes the shared cluster id into ``cluster.id`` before
    the first start, so every node formats its storage with the same one.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        node_id: int,
        voters: str,
        host: str,
        port: int,
        controller_port: int,
        size: int,
        min_insync_replicas: int,
        pom_path: Path | None = None,
        jvm_options: Sequence[str] = (),
    ) -> None:
        super().__init__(
            data_dir, host=host, port=port, controller_port=controller_port, pom_path=pom_path
        )
        self.node_id = node_id
        self._name = f"kafka-{node_id}"
        self._jvm_options = tuple(jvm_options)
        self._voters = voters
        self._size = size
        self._min_insync = min_insync_replicas

    def _server_properties(self) -> list[str]:
        h, log_dir = self.host, _prop_value(str(self.log_dir))
        rf, isr = self._size, self._min_insync
        return [
            "process.roles=broker,controller",
            f"node.id={self.node_id}",
            # Static voter set: every node, so a majority survives any one of them.
            f"controller.quorum.voters={self._voters}",
            f"listeners=PLAINTEXT://{h}:{self.port},CONTROLLER://{h}:{self.controller_port}",
            f"advertised.listeners=PLAINTEXT://{h}:{self.port}",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            f"log.dirs={log_dir}",
            "num.partitions=1",
            "auto.create.topics.enable=true",
            # As a production cluster: every replica everywhere, a write needs two of them.
            f"default.replication.factor={rf}",
            f"min.insync.replicas={isr}",
            f"offsets.topic.replication.factor={rf}",
            # 50 partitions by default: 150 replicas to create before the first group joins.
            "offsets.topic.num.partitions=10",
            f"transaction.state.log.replication.factor={rf}",
            f"transaction.state.log.min.isr={isr}",
            f"share.coordinator.state.topic.replication.factor={rf}",
            f"share.coordinator.state.topic.min.isr={isr}",
            "unclean.leader.election.enable=false",
            "group.initial.rebalance.delay.ms=0",
            # A SIGKILLed node is fenced (and dropped from every ISR) when its session expires.
            "broker.session.timeout.ms=5000",
            "broker.heartbeat.interval.ms=1000",
        ]


class KafkaCluster:
    """``size`` Kafka 4.x nodes on loopback (three by default), each a combined
    broker+controller and a static KRaft voter, for fault tests.

    Ports are chosen at construction and kept, so a node that is killed and restarted comes
    back on the same address with its data. Brokers default to replication factor ``size``
    and ``min.insync.replicas`` (2 of 3 by default) for the topics they create themselves
    (internal ones, auto-created ones); topics a service declares take
    ``KafkaSettings.replication_factor`` and ``min_insync_replicas``.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        size: int = 3,
        host: str = "127.0.0.1",
        min_insync_replicas: int = 2,
        pom_path: Path | None = None,
        jvm_options: Sequence[str] = (),
    ) -> None:
        if size < 1 or not 1 <= min_insync_replicas <= size:
            raise SetupError(f"a cluster of {size} cannot need {min_insync_replicas} in sync")
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        ports: list[int] = []
        while len(ports) < 2 * size:  # free_port may hand back one it gave before
            port = free_port(host)
            if port not in ports:
                ports.append(port)
        ids = range(1, size + 1)
        voters = ",".join(f"{i}@{host}:{ports[2 * (i - 1) + 1]}" for i in ids)
        self.nodes: dict[int, ClusterNode] = {
            i: ClusterNode(
                self.data_dir / f"node-{i}",
                node_id=i,
                voters=voters,
                host=host,
                port=ports[2 * (i - 1)],
                controller_port=ports[2 * (i - 1) + 1],
                size=size,
                min_insync_replicas=min_insync_replicas,
                pom_path=pom_path,
                jvm_options=jvm_options,
            )
            for i in ids
        }

    @property
    def bootstrap_servers(self) -> str:
        """Every node's listener: clients find the cluster through any live one."""
        return ",".join(node.bootstrap_servers for node in self.nodes.values())

    def node(self, node_id: int) -> ClusterNode:
        return self.nodes[node_id]

    def start(self, timeout: float = 180.0) -> None:
        """Start every node at once and wait until each is registered and unfenced.

        At once because a node is ready only when a majority of voters has elected a
        controller. Nothing is left running when one fails.
        """
        id_file_text = _new_cluster_id() + "\n"
        for node in self.nodes.values():
            node.data_dir.mkdir(parents=True, exist_ok=True)
            id_file = node.data_dir / "cluster.id"
            if not (node.log_dir / "meta.properties").is_file() and not id_file.is_file():
                id_file.write_text(id_file_text)
        resolve_libs(self.nodes[1].pom_path)  # once, before the nodes race for the lock
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            futures = [pool.submit(node.start, timeout) for node in self.nodes.values()]
            errors = [f.exception() for f in futures]
        failed = [e for e in errors if e is not None]
        if failed:
            self.stop()
            raise failed[0]

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every node gracefully (SIGTERM), SIGKILL what outlives ``timeout``."""
        # SIGTERM to all, then wait: they shut down side by side (about 6 s for three on two
        # busy cores), not one after another.
        for node in self.nodes.values():
            if node.running and node._process is not None:
                node._process.terminate()
        deadline = time.monotonic() + timeout
        for node in self.nodes.values():
            if node._process is not None:
                node._process.wait_stopped(deadline)

    def kill(self, node_id: int) -> None:
        """SIGKILL one node, as a crash."""
        self.nodes[node_id].kill()

    def restart(self, node_id: int, timeout: float = 120.0) -> None:
        """Start a stopped or killed node again on its ports and data (log recovery first)."""
        self.nodes[node_id].restart(timeout)

    def __enter__(self) -> KafkaCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- partitions and leaders ----------------------------------------------------------------

    def _live(self) -> list[ClusterNode]:
        live = [n for n in self.nodes.values() if n.running]
        if not live:
            raise SetupError("no node of the cluster is running")
        return live

    def partitions(self, topic: str) -> dict[int, PartitionState]:
        """Leader, replicas and ISR of each partition of ``topic``, asked of a live node."""
        last: Exception | None = None
        for node in self._live():
            try:
                return describe_partitions(node.host, node.port, topic)
            except (OSError, struct.error) as exc:
                last = exc  # that node is going down, or not up yet: ask another
        raise SetupError(f"no live node answered Metadata for {topic!r}: {last}")

    def leaders(self, topic: str) -> dict[int, int]:
        """The leader's node id of each partition of ``topic`` (-1: none at the moment)."""
        return {index: p.leader for index, p in self.partitions(topic).items()}

    def in_sync(self, topics: Sequence[str]) -> bool:
        """Whether every partition of ``topics`` has a leader and all its replicas in sync."""
        for topic in topics:
            for state in self.partitions(topic).values():
                if state.leader < 0 or set(state.isr) != set(state.replicas):
                    return False
        return True

    def move_leadership(self, topics: Sequence[str], node_id: int, timeout: float = 60.0) -> None:
        """Make ``node_id`` the leader of every partition of ``topics`` (a fault test then
        kills the leader of all of them at once).

        Each partition's replica list is reordered with ``node_id`` first (the same replicas,
        so no data moves), then a preferred-leader election runs until every partition is
        led by it. ``node_id`` must hold a replica of each partition (with replication factor
        equal to the cluster's size, it holds one of all).
        """
        deadline = time.monotonic() + timeout
        node = self.nodes[node_id]
        if not node.running:
            raise SetupError(f"node {node_id} is not running")
        assignment: dict[str, dict[int, list[int]]] = {}
        for topic in topics:
            for index, state in self.partitions(topic).items():
                if node_id not in state.replicas:
                    raise SetupError(f"{topic}[{index}] has no replica on node {node_id}")
                if state.replicas[0] != node_id:
                    rest = [r for r in state.replicas if r != node_id]
                    assignment.setdefault(topic, {})[index] = [node_id, *rest]
        if assignment:
            reassign_replicas(node.host, node.port, assignment)
        wanted = {topic: list(self.partitions(topic)) for topic in topics}
        last: object = None
        while time.monotonic() < deadline:
            states = {t: self.partitions(t) for t in topics}
            if all(p.leader == node_id for parts in states.values() for p in parts.values()):
                return
            if all(p.replicas[0] == node_id for parts in states.values() for p in parts.values()):
                last = elect_preferred_leaders(node.host, node.port, wanted)
            else:
                last = "replica order not applied yet"
            time.sleep(0.2)
        raise SetupError(f"node {node_id} did not become leader of {list(topics)}: {last}")
