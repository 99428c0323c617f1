"""Shards on object storage: harvest into `s3://`, open (sha256 verified) and train from there; store faults.

A local S3-compatible server (moto's, on 127.0.0.1 and a free port) stands in for the object
store; pyarrow reaches it through the usual AWS_* settings (AWS_ENDPOINT_URL included). Outages are
made by stopping that server at the Nth remote storage call of a run and starting it again on the same
port (`Outage`); a store that never answers is port 1; throttling and 5xx, which moto does not send,
come from a small fake endpoint (`FakeS3`); refused credentials from moto with its auth checks on.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from support.configs import make
from support.tiny_corpus import tiny_llama_with_corpus
from token_journey import storage
from token_journey.config.harvest import HarvestConfig
from token_journey.config.sae import SAEConfig
from token_journey.config.tracking import TrackingConfig
from token_journey.data import shards
from token_journey.data.harvest import harvest
from token_journey.data.shards import open_activations, read_shard
from token_journey.errors import TokenJourneyError
from token_journey.layout import Location, Uri, activations_folder, is_uri, location
from token_journey.sae.train_layer import train_layer
from token_journey.storage import StorageError

BUCKET = "token-journey"
REPO = Path(__file__).resolve().parents[1]


class Store:
    """moto's S3 server on a fixed free port, which a test may stop and start again on that port.

    moto keeps its buckets and objects in this process, not in the server, so they outlive a
    restart (`test_the_store_keeps_its_objects_across_a_restart` checks it)."""

    def __init__(self) -> None:
        self.server_mod = pytest.importorskip("moto.server")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.up = False
        self.start()

    def start(self) -> None:
        self.server = self.server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.up = True

    def stop(self) -> None:
        self.server.stop()
        self.up = False


@pytest.fixture(scope="module")
def store():
    server = Store()
    yield server
    if server.up:
        server.stop()


@pytest.fixture(scope="module")
def s3(store):
    """A moto S3 server with one empty bucket; pyarrow pointed at it through the environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{store.port}")
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{store.port}", scheme="http", region="us-east-1", allow_bucket_creation=True).create_dir(BUCKET)
        yield f"s3://{BUCKET}"


def harvest_config() -> HarvestConfig:
    return make(HarvestConfig, layers=(1,), sites=("resid_post",), batch_size=8, shard_rows=256, row_group_rows=64)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny model and its prepared corpus (under `<root>/corpus`): (root, model)."""
    root = tmp_path_factory.mktemp("storage")
    return root, tiny_llama_with_corpus(root, n_docs=40, max_tokens=1024, eval_tokens=256)


@pytest.fixture(scope="module")
def harvested(s3, tiny_lm):
    """The same tiny model and corpus harvested once to a local folder and once to `s3://.../acts`."""
    root, lm = tiny_lm
    cfg = harvest_config()
    local = root / "acts"
    harvest(lm, cfg, root / "corpus", local, torch.device("cpu"))
    remote = f"{s3}/acts"
    harvest(lm, cfg, root / "corpus", remote, torch.device("cpu"))
    return root, local, Uri(remote)


def train_from(activations: Location | str, out: Path) -> Path:
    """Train a tiny TopK SAE (6 steps) on layer 1 of `activations` into `out/saes`; its folder."""
    sae = make(
        SAEConfig,
        architecture="topk",
        name="topk",
        width=16,
        k=2,
        batch_size=32,
        train_tokens=32 * 6,
        checkpoint_every=4,
        eval_tokens=64,
        buffer_rows=128,
        lr_warmup_steps=1,
        sparsity_warmup_steps=1,
        log_every=2,
    )
    return train_layer(
        sae,
        activations=location(activations),
        saes=out / "saes",
        timings=out / "timings",
        site="resid_post",
        layer=1,
        model="tiny",
        seed=0,
        tracking=make(TrackingConfig, mode="disabled"),
        name="topk",
        device="cpu",
    )


def test_a_harvest_on_s3_holds_the_same_bytes_and_trains(harvested):
    root, local, remote = harvested
    assert not (root / "s3:").exists()  # no local folder took the URI's name
    for split in ("train", "eval"):
        here, there = activations_folder(local, "resid_post", 1, split), activations_folder(remote, "resid_post", 1, split)
        assert isinstance(there, Uri) and there.startswith(f"{remote}/resid_post/layer_1")
        names = sorted(p.name for p in here.iterdir() if p.is_file())
        assert storage.file_names(there) == names and len(names) >= 2  # same files, same names, no leftovers
        for name in names:  # shards and manifest, byte for byte
            assert storage.read_bytes(there / name) == (here / name).read_bytes(), name
        a = open_activations(local, "resid_post", 1, split, verify=True)
        b = open_activations(str(remote), "resid_post", 1, split, verify=True)
        assert b.manifest == a.manifest and len(b.manifest["shards"]) > (split == "train")
        assert b.read_all().equals(a.read_all())
        assert torch.equal(b.tensor(), a.tensor())
    folders = [train_from(acts, root / f"run-{i}") for i, acts in enumerate((local, remote))]
    info = [json.loads((f / "train.json").read_text()) for f in folders]
    assert info[0]["steps"] == 6 and info[1] == info[0]  # the same rows in the same order: the same SAE
    files = [{p.name: p.read_bytes() for p in f.iterdir()} for f in folders]
    assert files[1] == files[0]


def test_a_damaged_object_is_refused_in_one_line(harvested):
    _, _, remote = harvested
    fs, _ = storage.filesystem(remote)
    copy = location(remote.replace("/acts", "/damaged"))
    source, target = activations_folder(remote, "resid_post", 1), activations_folder(copy, "resid_post", 1)
    for name in storage.file_names(source):
        fs.copy_file(storage.filesystem(source / name)[1], storage.filesystem(target / name)[1])
    assert open_activations(copy, "resid_post", 1).rows > 0
    shard = target / "shard-00001.parquet"
    data = bytearray(storage.read_bytes(shard))
    data[len(data) // 3] ^= 0xFF  # one flipped byte in the middle of the activation pages
    storage.write_bytes(shard, bytes(data))
    with pytest.raises(TokenJourneyError) as info:
        open_activations(copy, "resid_post", 1)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"shard {shard} is damaged") and "rerun harvest" in message
    storage.delete(shard)
    with pytest.raises(TokenJourneyError, match="does not match the files: missing \\['shard-00001.parquet'\\]"):
        open_activations(copy, "resid_post", 1)


# Store faults: retried while transient, then one line naming the URI and the cause (see token_journey.storage).

DEAD = "s3://no-bucket/acts?endpoint_override=127.0.0.1:1&scheme=http"
"""A store that never answers: nothing listens on port 1."""

FAST_RETRIES = {"TOKEN_JOURNEY_STORAGE_RETRIES": "10", "TOKEN_JOURNEY_STORAGE_BACKOFF_S": "0.05"}
"""Retries that outlast a 0.3 s outage within about a second (the defaults wait up to 31 s)."""

POINTS = (0.0, 0.25, 0.5, 0.75, 1.0)
"""Where in a run the store goes down: a fraction of the run's remote storage calls."""

STORAGE_CALLS = ("file_names", "is_file", "is_dir", "file_size", "delete", "read_bytes", "write_bytes", "write_parquet", "read_with", "sha256")


class Outage:
    """Counts the remote calls of `token_journey.storage`'s functions; at call `at` stops the store, and
    starts it again `down_s` seconds later from a timer thread (never, when `down_s` is None).

    A `read_with` call is interrupted after its file is open, inside the Parquet read, so a read that
    fails half way is exercised as well as an operation that fails from its start."""

    def __init__(self, store: Store, at: int | None = None, down_s: float | None = 0.3) -> None:
        self.store, self.at, self.down_s = store, at, down_s
        self.calls, self.hit = 0, False
        self.lock = threading.Lock()
        self.timer: threading.Timer | None = None

    def install(self, monkeypatch: pytest.MonkeyPatch) -> Outage:
        for name in STORAGE_CALLS:
            monkeypatch.setattr(storage, name, self._wrap(name, getattr(storage, name)))
        return self

    def _due(self, args: tuple) -> bool:
        """Count this call if it reaches the store; True for the call to interrupt."""
        if not any(isinstance(a, str) and is_uri(a) for a in args):
            return False
        with self.lock:
            self.calls += 1
            return self.calls == self.at

    def _interrupt(self) -> None:
        if self.hit:  # once (a retried read_with calls its reader again)
            return
        self.hit = True
        self.store.stop()
        if self.down_s is not None:
            self.timer = threading.Timer(self.down_s, self.store.start)
            self.timer.start()

    def _wrap(self, name: str, real):
        def call(*args, **kwargs):
            if not self._due(args):
                return real(*args, **kwargs)
            if name == "read_with":
                where, read = args

                def interrupted(source):
                    self._interrupt()
                    return read(source)

                return real(where, interrupted)
            self._interrupt()
            return real(*args, **kwargs)

        return call

    def end(self) -> None:
        """Wait for the restart, or restart the store now: the next test needs it."""
        if self.timer is not None:
            self.timer.join()
        if not self.store.up:
            self.store.start()


@pytest.fixture
def outage(store, monkeypatch):
    """`outage(at, down_s)` installs an `Outage` (fast retries set); the store is up again after the test."""
    for key, value in FAST_RETRIES.items():
        monkeypatch.setenv(key, value)
    made: list[Outage] = []

    def start(at: int | None, down_s: float | None = 0.3) -> Outage:
        made.append(Outage(store, at, down_s).install(monkeypatch))
        return made[-1]

    yield start
    for run in made:
        run.end()


def remote_calls(store: Store, work) -> int:
    """How many remote storage calls `work()` makes, uninterrupted."""
    with pytest.MonkeyPatch.context() as mp:
        counter = Outage(store).install(mp)
        work()
    return counter.calls


def at_point(point: float, calls: int) -> int:
    return 1 + round(point * (calls - 1))


def harvest_files(root: Location) -> dict[str, bytes]:
    """Every file of the harvested (resid_post, 1), both splits: name -> bytes."""
    files = {}
    for split in ("train", "eval"):
        folder = activations_folder(root, "resid_post", 1, split)
        files.update({f"{split}/{name}": storage.read_bytes(folder / name) for name in storage.file_names(folder)})
    return files


def retries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "token_journey.storage" and "retrying" in r.getMessage()]


@pytest.fixture(scope="module")
def harvest_calls(store, tiny_lm, s3):
    root, lm = tiny_lm
    return remote_calls(store, lambda: harvest(lm, harvest_config(), root / "corpus", f"{s3}/acts-counted", torch.device("cpu")))


@pytest.fixture(scope="module")
def trained(store, harvested):
    """An SAE trained from the s3 harvest without a fault: (its files, the remote storage calls it took)."""
    root, _, remote = harvested
    folder: list[Path] = []
    calls = remote_calls(store, lambda: folder.append(train_from(remote, root / "trained-reference")))
    return {p.name: p.read_bytes() for p in folder[0].iterdir()}, calls


def test_the_store_keeps_its_objects_across_a_restart(store, s3):
    """What the outage tests rely on: moto's data lives in this process, not in its server."""
    where = location(f"{s3}/restart/kept.bin")
    storage.write_bytes(where, b"kept")
    store.stop()
    store.start()
    assert storage.read_bytes(where) == b"kept"


def test_a_multipart_upload_cut_by_an_outage_never_appears(store, s3):
    """What a retried write relies on: once a part failed, closing the upload, even after the store is
    back, does not complete it, so no partial object ever sits under the final key. (Left to the garbage
    collector instead, pyarrow 26 does not complete it either, but its destructor took 30 s here.)"""
    fs, path = storage.filesystem(location(f"{s3}/partial/cut.bin"))
    stream = fs.open_output_stream(path)
    stream.write(os.urandom(12 << 20))  # more than a part (pyarrow uploads 10 MiB parts): the first part goes up
    time.sleep(1.0)  # ... and is stored by now
    store.stop()
    try:
        stream.write(os.urandom(12 << 20))  # the second part meets the outage
        time.sleep(0.2)
    finally:
        store.start()
    with pytest.raises(OSError, match="UploadPart"):
        stream.close()
    assert fs.get_file_info(path).type == pafs.FileType.NotFound


@pytest.mark.parametrize("point", POINTS)
def test_a_harvest_rides_out_a_store_restart(point, harvested, tiny_lm, harvest_calls, outage, caplog):
    root, lm = tiny_lm
    at = at_point(point, harvest_calls)
    target = Uri(f"s3://{BUCKET}/acts-restart-{at}")
    run = outage(at)
    with caplog.at_level(logging.WARNING, logger="token_journey.storage"):
        harvest(lm, harvest_config(), root / "corpus", target, torch.device("cpu"))
    run.end()
    assert run.hit and retries(caplog), f"the outage at call {at} of {harvest_calls} was never met"
    assert harvest_files(target) == harvest_files(harvested[2])  # the same shards and manifests, byte for byte


@pytest.mark.parametrize("point", POINTS)
def test_training_rides_out_a_store_restart(point, harvested, trained, outage, caplog, tmp_path):
    reference, calls = trained
    at = at_point(point, calls)
    run = outage(at)
    with caplog.at_level(logging.WARNING, logger="token_journey.storage"):
        folder = train_from(harvested[2], tmp_path)
    run.end()
    assert run.hit and retries(caplog), f"the outage at call {at} of {calls} was never met"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == reference  # the same SAE, byte for byte


@pytest.mark.parametrize("point", (0.15, 0.6, 0.9))
def test_a_harvest_cut_off_by_an_outage_lists_no_missing_shard_and_a_rerun_completes(point, harvested, tiny_lm, harvest_calls, outage, monkeypatch):
    root, lm = tiny_lm
    at = at_point(point, harvest_calls)
    target = Uri(f"s3://{BUCKET}/acts-cut-{at}")
    monkeypatch.setenv("TOKEN_JOURNEY_STORAGE_RETRIES", "2")
    run = outage(at, down_s=None)
    with pytest.raises(StorageError) as info:
        harvest(lm, harvest_config(), root / "corpus", target, torch.device("cpu"))
    message = str(info.value)
    assert "\n" not in message and f"{target}/resid_post/layer_1" in message and "after 2 attempts" in message
    run.end()  # the store is back, with whatever the cut-off harvest left
    left = harvest_files(target)
    assert left != harvest_files(harvested[2])  # the harvest was really cut off
    for split in ("train", "eval"):  # a manifest, where one was written, lists only whole shards
        try:
            open_activations(target, "resid_post", 1, split, verify=True)
        except TokenJourneyError as exc:
            assert "has no manifest" in str(exc) or "was not harvested" in str(exc), exc
    harvest(lm, harvest_config(), root / "corpus", target, torch.device("cpu"))
    assert harvest_files(target) == harvest_files(harvested[2])


def dead_store_env(monkeypatch: pytest.MonkeyPatch, attempts: int) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    for key, value in {
        "TOKEN_JOURNEY_STORAGE_RETRIES": str(attempts),
        "TOKEN_JOURNEY_STORAGE_BACKOFF_S": "0.01",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(key, value)


def test_a_store_that_stays_down_ends_in_one_line_naming_it(monkeypatch, caplog):
    dead_store_env(monkeypatch, attempts=3)
    root = Uri(DEAD)
    with caplog.at_level(logging.WARNING, logger="token_journey.storage"):
        with pytest.raises(StorageError) as info:
            open_activations(root, "resid_post", 1)
    message = str(info.value)
    assert "\n" not in message and message.startswith("cannot list s3://no-bucket/acts/resid_post/layer_1?endpoint_override=")
    assert "connection refused after 3 attempts" in message and "AWS_ENDPOINT_URL" in message
    assert len(retries(caplog)) == 2 and "attempt 2 of 3" in retries(caplog)[1]
    shard = root / "shard-00000.parquet"
    with pytest.raises(StorageError, match=r"^cannot read s3://no-bucket/acts/shard-00000\.parquet\?.*connection refused"):
        read_shard(shard)  # an unreachable shard is not a damaged one
    calls = {
        "write": lambda: storage.write_bytes(shard, b"x"),
        "look up": lambda: storage.is_file(shard),
        "read": lambda: storage.sha256(shard),
        "delete": lambda: storage.delete(shard),
    }
    for action, call in calls.items():
        with pytest.raises(StorageError, match=f"^cannot {action} s3://no-bucket/acts/shard-00000.parquet"):
            call()
    monkeypatch.setenv("TOKEN_JOURNEY_STORAGE_DEADLINE_S", "0")  # the time bound alone stops the retries
    with pytest.raises(StorageError, match="connection refused after 1 attempt over"):
        storage.read_bytes(shard)


def test_a_shard_is_kept_when_the_store_fails_while_a_resumed_harvest_checks_it(tmp_path, monkeypatch):
    """complete_shards deletes a shard it cannot read as one of this run; a store fault says nothing about the shard."""
    (tmp_path / "shard-00000.parquet").write_bytes(b"a finished shard")

    def store_down(path):
        raise StorageError(f"cannot read {path} (connection refused after 6 attempts over 31.0 s: ...)")

    monkeypatch.setattr(shards, "_footer", store_down)
    with pytest.raises(StorageError, match="connection refused"):
        shards.complete_shards(tmp_path, "run", n_shards=1)
    assert (tmp_path / "shard-00000.parquet").read_bytes() == b"a finished shard"


def test_the_train_stage_on_a_store_that_stays_down_prints_one_error_line(tmp_path, monkeypatch):
    dead_store_env(monkeypatch, attempts=2)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), WANDB_MODE="disabled")
    proc = subprocess.run(
        [sys.executable, "stages/train_sae.py", f'paths.activations="{DEAD}"', f"hydra.run.dir={tmp_path}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last.startswith("error: cannot list s3://no-bucket/acts/") and "connection refused after 2 attempts" in last


def test_a_missing_bucket_is_named_in_one_line(s3, tiny_lm, caplog):
    root, lm = tiny_lm
    with caplog.at_level(logging.WARNING, logger="token_journey.storage"):
        with pytest.raises(StorageError) as info:
            harvest(lm, harvest_config(), root / "corpus", "s3://no-such-bucket/acts", torch.device("cpu"))
    message = str(info.value)
    assert "\n" not in message and message.startswith(
        "s3://no-such-bucket/acts/resid_post/layer_1/shard-00000.parquet: bucket 'no-such-bucket' does not exist; create it"
    )
    assert not retries(caplog)  # a permanent fault is not retried


def test_refused_credentials_are_named_in_one_line(harvested, monkeypatch, caplog):
    """moto checks credentials only once told to (INITIAL_NO_AUTH_ACTION_COUNT, here 0: from the next request
    on); it then refuses any key its IAM does not hold, such as these."""
    settings = pytest.importorskip("moto.settings")
    _, _, remote = harvested
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    folder = activations_folder(remote, "resid_post", 1)
    with caplog.at_level(logging.WARNING, logger="token_journey.storage"):
        with pytest.raises(StorageError) as listing:
            open_activations(remote, "resid_post", 1)
        with pytest.raises(StorageError) as reading:
            read_shard(folder / "shard-00000.parquet")
    for info, where in ((listing, folder), (reading, folder / "shard-00000.parquet")):
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{where}: access denied (AWS Error ")
        assert "check the storage credentials (AWS_ACCESS_KEY_ID" in message
    assert "INVALID_ACCESS_KEY_ID" in str(listing.value)
    assert not retries(caplog)


class FakeS3(ThreadingHTTPServer):
    """An S3 endpoint that answers its first `faults` requests with `status` and an S3 error `code`, then
    lists an empty folder: throttling and 5xx as a real store sends them, which moto does not."""

    def __init__(self, status: int, code: str, faults: int) -> None:
        self.status, self.code, self.faults, self.served = status, code, faults, []
        super().__init__(("127.0.0.1", 0), FakeS3Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"s3://bkt/x?endpoint_override=127.0.0.1:{self.server_address[1]}&scheme=http"


class FakeS3Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        server = self.server
        fault = len(server.served) < server.faults
        status = server.status if fault else 200
        server.served.append(status)
        body = (
            f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{server.code}</Code><Message>try later</Message><RequestId>1</RequestId></Error>"
            if fault
            else "<?xml version='1.0' encoding='UTF-8'?><ListBucketResult xmlns='http://s3.amazonaws.com/doc/2006-03-01/'>"
            "<Name>bkt</Name><Prefix>x/</Prefix><KeyCount>0</KeyCount><MaxKeys>1000</MaxKeys><Delimiter>/</Delimiter>"
            "<IsTruncated>false</IsTruncated></ListBucketResult>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize(
    "status, code, cause",
    [
        (503, "SlowDown", "throttled"),
        (429, "TooManyRequests", "throttled"),
        (500, "InternalError", "server error"),
        (503, "ServiceUnavailable", "server error"),
    ],
)
def test_throttling_and_5xx_are_retried_then_reported(status, code, cause, monkeypatch, caplog):
    dead_store_env(monkeypatch, attempts=3)
    passing = FakeS3(status, code, faults=2)
    with caplog.at_level(logging.WARNING, logger="token_journey.storage"):
        assert storage.file_names(location(passing.uri)) == []
    assert passing.served[:3] == [status, status, 200] and len(retries(caplog)) == 2 and cause in retries(caplog)[0]
    lasting = FakeS3(status, code, faults=10**6)
    with pytest.raises(StorageError) as info:
        storage.file_names(location(lasting.uri))
    assert str(info.value).startswith(f"cannot list {lasting.uri} ({cause} after 3 attempts over ")
    assert lasting.served == [status] * 3
    for server in (passing, lasting):
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "status, code, start", [(403, "AccessDenied", "{where}: access denied ("), (404, "NoSuchBucket", "{where}: bucket 'bkt' does not exist; create it")]
)
def test_permanent_faults_are_not_retried(status, code, start, monkeypatch):
    """A listing of a missing bucket is an empty folder to pyarrow, so the bucket is missed by a write."""
    dead_store_env(monkeypatch, attempts=5)
    server = FakeS3(status, code, faults=10**6)
    where = location(server.uri) / "y"
    with pytest.raises(StorageError) as info:
        if code == "NoSuchBucket":
            storage.write_bytes(where, b"y")
        else:
            storage.file_names(where)
    assert str(info.value).startswith(start.format(where=where))
    assert server.served == [status]
    server.shutdown()
    server.server_close()


CAPTURED = [  # what pyarrow 26 printed against moto, a stopped moto, and an endpoint answering S3 errors
    (
        "When listing objects under key 'a/' in bucket 'bkt': AWS Error NETWORK_CONNECTION during ListObjectsV2 operation: "
        "curlCode: 7, Could not connect to server; Details: Failed to connect to 127.0.0.1:57591 after 0 ms: Could not connect to server",
        "connection refused",
        True,
    ),
    (
        "When uploading part for key 'a/x' in bucket 'bkt': AWS Error NETWORK_CONNECTION during UploadPart operation: curlCode: 28, "
        "Timeout was reached; Details: Operation too slow. Less than 1 bytes/sec transferred the last 3 seconds",
        "timed out",
        True,
    ),
    (
        "When getting information for key 'a' in bucket 'bkt': AWS Error NETWORK_CONNECTION during HeadObject operation: "
        "curlCode: 6, Could not resolve hostname; Details: Could not resolve host: no-such-host.invalid",
        "host name not resolved",
        True,
    ),
    (
        "When listing objects under key 'a/' in bucket 'bkt': AWS Error SLOW_DOWN during ListObjectsV2 operation: "
        "Please reduce your request rate. (Request ID: 1)",
        "throttled",
        True,
    ),
    (
        "When getting information for key 'a/y' in bucket 'bkt': AWS Error UNKNOWN (HTTP status 429) during HeadObject operation: No response body.",
        "throttled",
        True,
    ),
    (
        "When listing objects under key 'a/' in bucket 'bkt': AWS Error UNKNOWN (HTTP status 429) during ListObjectsV2 operation: "
        "Unable to parse ExceptionName: TooManyRequests Message: Too many (Request ID: 1)",
        "throttled",
        True,
    ),
    (
        "When getting information for key 'a/y' in bucket 'bkt': AWS Error UNKNOWN (HTTP status 503) during HeadObject operation: No response body.",
        "server error",
        True,
    ),
    (
        "When initiating multiple part upload for key 'a/z' in bucket 'bkt': AWS Error INTERNAL_FAILURE during CreateMultipartUpload "
        "operation: We encountered an internal error. Please try again. (Request ID: 1)",
        "server error",
        True,
    ),
    (
        "When listing objects under key 'a/' in bucket 'bkt': AWS Error SERVICE_UNAVAILABLE during ListObjectsV2 operation: "
        "Service unavailable (Request ID: 1)",
        "server error",
        True,
    ),
    (
        "When listing objects under key 'a/' in bucket 'bkt': AWS Error UNKNOWN (HTTP status 502) during ListObjectsV2 operation: No response body.",
        "server error",
        True,
    ),
    (
        "When listing objects under key 'a/' in bucket 'bkt': AWS Error REQUEST_TIMEOUT during ListObjectsV2 operation: timeout (Request ID: 1)",
        "timed out",
        True,
    ),
    (
        "When initiating multiple part upload for key 'a/x' in bucket 'nobkt': AWS Error NO_SUCH_BUCKET during CreateMultipartUpload "
        "operation: The specified bucket does not exist (Request ID: QMGRpOuIoDUn7eMEAlhvVtSCMzSaxPDY2I04iwMC4EJZLC7nm7vQ)",
        "bucket does not exist",
        False,
    ),
    ("When getting information for key 'a/y' in bucket 'bkt': AWS Error ACCESS_DENIED during HeadObject operation: No response body.", "access denied", False),
    (
        "When listing objects under key 'a/' in bucket 'bkt': AWS Error INVALID_ACCESS_KEY_ID during ListObjectsV2 operation: The AWS "
        "Access Key Id you provided does not exist in our records. (Request ID: dGXJ9EE6fzJtkIAmFnGzDFoQnLWlvzgO2arO1nk2q4SgBjEKNImo)",
        "access denied",
        False,
    ),
    (
        "When listing objects under key 'a/' in bucket 'bkt': AWS Error SIGNATURE_DOES_NOT_MATCH during ListObjectsV2 operation: sig (Request ID: 1)",
        "access denied",
        False,
    ),
    (
        "When listing objects under key 'a/' in bucket 'bkt': AWS Error UNKNOWN (HTTP status 400) during ListObjectsV2 operation: "
        "Unable to parse ExceptionName: ExpiredToken Message: expired (Request ID: 1)",
        "access denied",
        False,
    ),
    (
        "When getting information for key 'a/y' in bucket 'bkt': AWS Error UNKNOWN (HTTP status 400) during HeadObject operation: No response body.",
        "store error",
        False,
    ),
    ("[Errno 2] Path does not exist 'bkt/a/zz'. Detail: [errno 2] No such file or directory", None, None),
    ("could not verify page integrity, CRC checksum verification failed for page_ordinal 0", None, None),
    ("Parquet magic bytes not found in footer. Either the file is corrupted or this is not a parquet file.", None, None),
]


@pytest.mark.parametrize("message, cause, transient", CAPTURED, ids=[c[1] or "not a store fault" for c in CAPTURED])
def test_the_classifier_on_real_messages(message, cause, transient):
    fault = storage.classify(message)
    if cause is None:
        assert fault is None
    else:
        assert (fault.cause, fault.transient) == (cause, transient)


def test_a_retry_bound_that_is_not_a_number_is_refused(monkeypatch):
    monkeypatch.setenv("TOKEN_JOURNEY_STORAGE_RETRIES", "many")
    with pytest.raises(TokenJourneyError, match="TOKEN_JOURNEY_STORAGE_RETRIES='many' is not a number"):
        storage.read_bytes(location(DEAD) / "x")
