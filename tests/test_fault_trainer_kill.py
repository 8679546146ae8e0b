"""Fault 3: the trainer process is SIGKILLed mid-run, twice.

``python -m loopmesh.trainer`` runs as a child process on the session Kafka broker and the
session model repository (a model name of its own, so the session tritonserver can load it).
First it is killed in the middle of a long fit, then at the moment its publish starts writing
files (the first sign of its temporary directory; if the publish wins the race the version is
complete, which is allowed too). Throughout, a poller checks the repository: every numeric
version directory visible is complete (model.onnx, weights.safetensors, model.py,
metadata.json whose sha256 verifies). After each restart the killed run is reported as
ended (failed, or published when its version made it), never "running", and a final trigger
publishes a complete version that Triton loads and serves. A second, in-process test makes
the lost race deterministic: a version written just before the process died is recorded as
published and announced.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient

from loopmesh.devstack.process import free_port, log_tail
from loopmesh.devstack.synthetic import SyntheticConfig, SyntheticWorld, examples
from loopmesh.devstack.triton import TritonServer
from loopmesh.gen.loopmesh.v1 import trainer_pb2, trainer_pb2_grpc
from loopmesh.mesh import model_repo
from loopmesh.mesh.events import ModelPublished
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.trainer.core import TrainerCore
from loopmesh.trainer.dataset import Dataset
from loopmesh.trainer.settings import DatasetSettings, TopicNames, TrainerScope
from loopmesh.trainer.train import FitResult
from tests.helpers import eventually

pytestmark = pytest.mark.e2e  # assembles the mesh: several services on real parts

ROWS = 600
HIDDEN = "[1024, 1024]"  # ~4 MB model.onnx: the publish takes long enough to be caught
VERSION_FILES = {
    model_repo.MODEL_FILE,
    model_repo.WEIGHTS_FILE,
    model_repo.METADATA_FILE,
    model_repo.BACKEND_FILE,
}
FAILED = trainer_pb2.RUN_STATUS_FAILED
PUBLISHED = trainer_pb2.RUN_STATUS_PUBLISHED
LOAD_TIMEOUT = 120.0


def problems_in(repo: Path, model: str, checked: dict[int, str]) -> list[str]:
    """What is wrong with the visible versions (a version is checked fully once, when seen)."""
    out = []
    for version in model_repo.list_versions(repo, model):
        vdir = model_repo.version_dir(repo, model, version)
        present = {p.name for p in vdir.iterdir()}
        if missing := VERSION_FILES - present:
            out.append(f"version {version} visible without {sorted(missing)}")
            continue
        if version in checked:
            continue
        if not model_repo.verify_sha256(repo, model, version):
            out.append(f"version {version} visible with a model.onnx that fails its sha256")
            continue
        checked[version] = model_repo.read_metadata(repo, model, version)["run_id"]
    return out


class RepositoryWatch:
    """Checks the model's directory in a thread every few ms; optionally kills on a publish."""

    def __init__(self, repo: Path, model: str) -> None:
        self.repo, self.model = repo, model
        self.problems: list[str] = []
        self.versions: dict[int, str] = {}
        """Complete versions seen, with the run that wrote them."""
        self.kill_on_publish: int | None = None
        """A pid to SIGKILL as soon as a publish starts (temp dir or new version seen)."""
        self.caught: str = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RepositoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        mdir = self.repo / self.model
        while not self._stop.is_set():
            pid = self.kill_on_publish
            if pid is not None:
                names = os.listdir(mdir) if mdir.is_dir() else []
                temp = [n for n in names if n.startswith(".tmp-")]
                new = [n for n in names if n.isdigit() and int(n) not in self.versions]
                if temp or new:
                    os.kill(pid, signal.SIGKILL)
                    self.kill_on_publish = None
                    self.caught = "temp dir" if temp else "complete version"
            self.problems.extend(problems_in(self.repo, self.model, self.versions))
            time.sleep(0.001)


@dataclass
class Trainer:
    """``python -m loopmesh.trainer`` as a child process."""

    env: dict[str, str]
    log: Path
    address: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self, **overrides: str) -> None:
        env = {**self.env, **overrides}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "loopmesh.trainer"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @contextlib.contextmanager
    def reaped(self) -> Iterator[None]:
        """Kill whatever process is left when the test ends (failed or not)."""
        try:
            yield
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=30)

    def killed(self) -> bool:
        assert self.proc is not None
        return self.proc.wait(timeout=30) == -signal.SIGKILL

    @contextlib.asynccontextmanager
    async def stub(self) -> AsyncIterator[trainer_pb2_grpc.TrainerServiceStub]:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)

            async def serving() -> bool:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"trainer exited:\n{log_tail(self.log)}")
                try:
                    await stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=2)
                except grpc.aio.AioRpcError:
                    return False
                return True

            await eventually(serving, timeout=90, interval=0.3)
            yield stub


def seed(data_dir: Path, model: str, rule: int, start: datetime) -> None:
    """ROWS labelled examples under the world's ``rule`` (rule 1 inverts most of rule 0)."""
    world = SyntheticWorld(SyntheticConfig(seed=5 + rule))
    world.set_rule(rule)
    batch = world.sample(ROWS)
    Dataset(data_dir).append(
        examples(
            batch,
            world.draw_labels(batch).tolist(),
            model_name=model,
            start=start,
            spacing=timedelta(milliseconds=50),
        )
    )


async def test_killed_trainer_never_exposes_a_partial_version_and_retrains_cleanly(
    kafka_settings: KafkaSettings, model_repository: Path, triton: TritonServer, tmp_path: Path
) -> None:
    suffix = uuid.uuid4().hex[:8]
    model = f"killed_{suffix}"
    data_dir = tmp_path / "trainer"
    seed(data_dir, model, rule=0, start=datetime.now(UTC) - timedelta(hours=3))
    port = free_port()
    env = {
        **os.environ,
        "LOOPMESH_KAFKA__BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
        "LOOPMESH_KAFKA__DEFAULT_PARTITIONS": str(kafka_settings.default_partitions),
        "LOOPMESH_MODEL_REPOSITORY": str(model_repository),
        "LOOPMESH_TRAINER__MODEL_NAME": model,
        "LOOPMESH_TRAINER__DATA_DIR": str(data_dir),
        "LOOPMESH_TRAINER__SERVER__PORT": str(port),
        "LOOPMESH_TRAINER__DATASET__MIN_ROWS": "100",
        "LOOPMESH_TRAINER__TRAINING__HIDDEN": HIDDEN,
        # Only TriggerTraining starts runs here.
        "LOOPMESH_TRAINER__TRIGGERS__MIN_NEW_EXAMPLES": "1000000000",
        **{
            f"LOOPMESH_TRAINER__TOPICS__{which.upper()}": f"{name}.{suffix}"
            for which, name in TopicNames().model_dump().items()
        },
    }
    trainer = Trainer(env, tmp_path / "trainer.log", f"127.0.0.1:{port}")
    trigger = trainer_pb2.TriggerTrainingRequest

    with RepositoryWatch(model_repository, model) as watch, trainer.reaped():
        # 1. Killed in the middle of a fit that would go on for minutes.
        trainer.start(
            LOOPMESH_TRAINER__TRAINING__MAX_EPOCHS="100000",
            LOOPMESH_TRAINER__TRAINING__PATIENCE="100000",
        )
        async with trainer.stub() as stub:
            first = await stub.TriggerTraining(trigger(reason="long"), timeout=10)
            assert first.started
            # Still running 1.5 s on (well into the fit), and nothing published yet.
            until = time.monotonic() + 1.5
            while time.monotonic() < until:
                status = await stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10)
                assert status.running.run_id == first.run.run_id
                assert status.newest_version == 0
                await asyncio.sleep(0.2)
            os.kill(trainer.pid, signal.SIGKILL)
        assert trainer.killed()
        assert model_repo.list_versions(model_repository, model) == []

        # 2. Restarted: the killed run is reported failed; the next run is killed as soon as
        # its publish starts.
        short = {
            "LOOPMESH_TRAINER__TRAINING__MAX_EPOCHS": "2",
            "LOOPMESH_TRAINER__TRAINING__PATIENCE": "2",
        }
        trainer.start(**short)
        async with trainer.stub() as stub:
            runs = (await stub.ListRuns(trainer_pb2.ListRunsRequest(), timeout=10)).runs
            assert [(r.run_id, r.status) for r in runs] == [(first.run.run_id, FAILED)]
            assert "abandoned" in runs[0].error and runs[0].HasField("finished_at")
            status = await stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10)
            assert not status.HasField("running") and status.runs_total == 1
            watch.kill_on_publish = trainer.pid
            second = await stub.TriggerTraining(trigger(reason="publish"), timeout=10)
            assert second.started
            await eventually(lambda: _now(watch.kill_on_publish is None), timeout=90)
        assert trainer.killed(), log_tail(trainer.log)
        written = [v for v, run in watch.versions.items() if run == second.run.run_id]

        # 3. Restarted on newer data under another rule (so the candidate beats whatever
        # made it out of run 2): both killed runs are recorded, a new version is published.
        seed(data_dir, model, rule=1, start=datetime.now(UTC) - timedelta(hours=1))
        trainer.start(
            # A small network: quick to train and to load (no warm start across shapes).
            LOOPMESH_TRAINER__TRAINING__HIDDEN="[32, 16]",
            LOOPMESH_TRAINER__TRAINING__MAX_EPOCHS="30",
            LOOPMESH_TRAINER__TRAINING__PATIENCE="30",
            LOOPMESH_TRAINER__DATASET__WINDOW_ROWS=str(ROWS),
        )
        async with trainer.stub() as stub:
            runs = (await stub.ListRuns(trainer_pb2.ListRunsRequest(), timeout=10)).runs
            assert [r.run_id for r in runs] == [second.run.run_id, first.run.run_id]
            assert all(r.status != trainer_pb2.RUN_STATUS_RUNNING for r in runs)
            if written:  # the publish won the race: the run is found again as published
                assert (runs[0].status, runs[0].version) == (PUBLISHED, written[0])
            else:
                assert runs[0].status == FAILED and "abandoned" in runs[0].error
            third = await stub.TriggerTraining(trigger(reason="clean", wait=True), timeout=120)
            assert third.run.status == PUBLISHED, (third.run.decision, third.run.error)
            versions = await stub.ListVersions(trainer_pb2.ListVersionsRequest(), timeout=10)
            assert all(v.intact for v in versions.versions)
        assert trainer.proc is not None
        trainer.proc.terminate()
        assert trainer.proc.wait(timeout=60) == 0, log_tail(trainer.log)
        new = third.run.version
        assert new == (written[0] + 1 if written else 1)
        assert model_repo.verify_sha256(model_repository, model, new)
        meta = model_repo.read_metadata(model_repository, model, new)
        assert meta["run_id"] == third.run.run_id
    assert watch.problems == [], watch.problems
    assert watch.versions[new] == third.run.run_id
    print(f"publish kill caught: {watch.caught}")

    # Triton loads the model (a killed publish's temp directory, if any, is ignored) and the
    # new version answers like its model.onnx says it should: a finite probability.
    x = np.zeros((1, len(meta["feature_names"])), dtype=np.float32)
    inp = aioclient.InferInput(model_repo.INPUT_NAME, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    async with aioclient.InferenceServerClient(triton.grpc_url) as client:
        await client.load_model(model, client_timeout=LOAD_TIMEOUT)
        try:
            result = await client.infer(model, [inp], model_version=str(new), client_timeout=30)
        finally:
            await client.unload_model(model, client_timeout=LOAD_TIMEOUT)
    out = result.as_numpy(model_repo.OUTPUT_NAME)
    assert out is not None and out.shape == (1, 1) and 0.0 < float(out[0, 0]) < 1.0


async def test_a_run_whose_version_was_published_before_the_crash_is_recorded_and_announced(
    tmp_path: Path,
) -> None:
    """The other side of the race above, made deterministic in-process: the version reached the
    repository, then the process died before recording the run or announcing the version."""
    repo, data_dir = tmp_path / "models", tmp_path / "trainer"
    seed(data_dir, "crashed", rule=0, start=datetime.now(UTC) - timedelta(hours=1))
    scope = TrainerScope(
        model_name="crashed", data_dir=data_dir, dataset=DatasetSettings(min_rows=10)
    )
    released = threading.Event()

    def blocked_fit(*args: object, **kwargs: object) -> FitResult:
        released.wait(timeout=60)
        raise RuntimeError("the process is gone by now")

    dead = TrainerCore(scope, repo, fit=blocked_fit)
    started, record = dead.trigger(["manual: crash"])
    assert started
    try:
        # What the dying run got done: its version, complete, under its run id.
        model_repo.write_version(
            repo,
            "crashed",
            1,
            b"onnx bytes",
            {"feature_names": ["a"], "run_id": record.run_id},
            n_features=1,
        )
        announced: list[ModelPublished] = []

        async def announce(event: ModelPublished) -> None:
            announced.append(event)

        restarted = TrainerCore(scope, repo, announce=announce)
        [found] = restarted.runs()
        assert (found.run_id, found.status, found.version) == (record.run_id, "published", 1)
        await restarted.start()
        await restarted.stop()
        assert [(e.model_version, e.sha256) for e in announced] == [
            (1, model_repo.read_metadata(repo, "crashed", 1)["sha256"])
        ]
        assert [r.run_id for r in TrainerCore(scope, repo).runs()] == [record.run_id]
    finally:
        released.set()
        await dead.stop()


async def _now(value: bool) -> bool:
    return value
