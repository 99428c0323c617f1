"""Shards on object storage: harvest into `s3://`, open (sha256 verified) and train from there.

A local S3-compatible server (moto's, on 127.0.0.1 and a free port) stands in for the object
store; pyarrow reaches it through the usual AWS_* settings (AWS_ENDPOINT_URL included).
"""

from __future__ import annotations

import json
import socket

import pyarrow.fs as pafs
import pytest
import torch

from support.configs import make
from support.tiny_corpus import tiny_llama_with_corpus
from token_journey import storage
from token_journey.config.harvest import HarvestConfig
from token_journey.config.sae import SAEConfig
from token_journey.config.tracking import TrackingConfig
from token_journey.data.harvest import harvest
from token_journey.data.shards import open_activations
from token_journey.errors import TokenJourneyError
from token_journey.layout import Uri, activations_folder, location
from token_journey.sae.train_layer import train_layer

BUCKET = "token-journey"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server with one empty bucket; pyarrow pointed at it through the environment."""
    server_mod = pytest.importorskip("moto.server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                          allow_bucket_creation=True).create_dir(BUCKET)
        yield f"s3://{BUCKET}"
    server.stop()


@pytest.fixture(scope="module")
def harvested(s3, tmp_path_factory):
    """The same tiny model and corpus harvested once to a local folder and once to `s3://.../acts`."""
    root = tmp_path_factory.mktemp("storage")
    lm = tiny_llama_with_corpus(root, n_docs=40, max_tokens=1024, eval_tokens=256)
    cfg = make(HarvestConfig, layers=(1,), sites=("resid_post",), batch_size=8, shard_rows=256, row_group_rows=64)
    local = root / "acts"
    harvest(lm, cfg, root / "corpus", local, torch.device("cpu"))
    remote = f"{s3}/acts"
    harvest(lm, cfg, root / "corpus", remote, torch.device("cpu"))
    return root, local, Uri(remote)


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
    sae = make(SAEConfig, architecture="topk", name="topk", width=16, k=2, batch_size=32, train_tokens=32 * 6,
               checkpoint_every=4, eval_tokens=64, buffer_rows=128, lr_warmup_steps=1, sparsity_warmup_steps=1, log_every=2)
    tracking = make(TrackingConfig, mode="disabled")
    folders = [train_layer(sae, activations=acts, saes=root / f"saes-{i}", timings=root / f"timings-{i}", site="resid_post",
                           layer=1, model="tiny", seed=0, tracking=tracking, name="topk", device="cpu")
               for i, acts in enumerate((local, remote))]
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
