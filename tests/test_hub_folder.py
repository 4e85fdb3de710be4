"""The huggingface_hub folder module: one planner exactly as huggingface_hub's, both sharded formats' files byte for
byte as before the move into one module (issue 22), and the layout records."""

from __future__ import annotations

import hashlib
import random
import zipfile

import pytest
import torch
from huggingface_hub.serialization._base import split_state_dict_into_shards_factory

import ckconv
from ckconv.formats import hub_folder, safetensors_file, torch_sharded
from ckconv.model import Storage, TensorRef

# sha256 of each file of the two folders below, as written before hub_folder existed (main 419e623); a torch shard
# is hashed over its zip records' names and bytes without the random serialization id.
BEFORE = {
    "bin/pytorch_model-00001-of-00002.bin": "fc762c5b899f0c29c11e591fd867b25397609862a3e9c814554953a86a86ce2f",
    "bin/pytorch_model-00002-of-00002.bin": "29f2432e12ceeb606213c84b2fc1f630aa52eca9de2f03478729ac3e3742f32e",
    "bin/pytorch_model.bin.index.json": "cfc1a976f0768aefc162b6e5c964cf8287bf1fa4c7b4d7a5660650a5c0631b23",
    "st/model-00001-of-00002.safetensors": "e550288af2c2ce17e8e4a1c87ea9447c402151746cd7aaf991dfd12cabe10fe2",
    "st/model-00002-of-00002.safetensors": "9fe4a6a8fbca92606d021b8c36b8461c9a5aa69c2cee970f23748f39d2023dd2",
    "st/model.safetensors.index.json": "389374884ee3ad2e0134ec13dd810b6495509ec0fbf1190b37dccf8bb1da7735",
}


def _digest(path):
    data = path.read_bytes()
    if path.suffix == ".bin":
        with zipfile.ZipFile(path) as z:
            data = b"".join(n.encode() + (z.read(n) if "serialization_id" not in n else b"") for n in z.namelist())
    return hashlib.sha256(data).hexdigest()


def test_both_sharded_formats_write_the_same_bytes_as_before(tmp_path):
    sd = {f"layer{i}.weight": torch.arange(64 * (i + 1), dtype=torch.float32).reshape(-1, 8) for i in range(6)}
    sd["head.weight"] = sd["layer0.weight"]  # tied
    ckconv.save({"model": sd, "epoch": 7}, tmp_path / "st", max_shard_size="3KB")
    ckconv.save(sd, tmp_path / "bin", format="torch", max_shard_size="3KB")
    written = {p.relative_to(tmp_path).as_posix(): _digest(p) for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert written == BEFORE


def _refs(rng, n):
    """``n`` named TensorRefs of random sizes, some sharing a storage (views of one another)."""
    storages, named = [], []
    for i in range(n):
        if storages and rng.random() < 0.25:
            st = rng.choice(storages)
        else:
            st = Storage(str(i), "float32", 4 * rng.choice([1, 2, 5, 10, 40, 100, 400]))
            storages.append(st)
        named.append((f"t{i}", TensorRef(st, "float32", (st.nbytes // 4,))))
    return named


@pytest.mark.parametrize("seed", range(40))
def test_the_planner_is_huggingface_hubs(seed):
    """Same names, limit and callbacks: the same files, the same tensors in each, the same total_size."""
    rng = random.Random(seed)
    named = _refs(rng, rng.randint(1, 30))
    limit = rng.choice([4, 40, 100, 400, 1000, 10**6])
    tied = seed % 2 == 0  # torch-sharded counts each storage once; safetensors' tensors are each their own
    size = (lambda ref: ref.storage.nbytes) if tied else (lambda ref: ref.nbytes)
    ident = (lambda ref: id(ref.storage)) if tied else (lambda ref: None)
    ours = hub_folder.split(named, limit, torch_sharded.LAYOUT, storage_size=size, storage_id=ident)
    hub = split_state_dict_into_shards_factory(dict(named), get_storage_size=size, get_storage_id=ident,
                                               filename_pattern="pytorch_model{suffix}.bin", max_shard_size=limit)
    assert ours.files == list(hub.filename_to_tensors)
    assert [sorted(n for n, _ in shard) for shard in ours.shards] == \
        [sorted(names) for names in hub.filename_to_tensors.values()]
    assert ours.weight_map() == {k: hub.tensor_to_filename[k] for k in ours.weight_map()}
    assert ours.total_size == hub.metadata["total_size"]
    position = {name: i for i, (name, _) in enumerate(named)}
    for shard in ours.shards:  # within a shard, names keep their input order
        assert [position[n] for n, _ in shard] == sorted(position[n] for n, _ in shard)


def test_layout_records_name_each_formats_files():
    assert safetensors_file.LAYOUT.shard_names(2) == ["model-00001-of-00002.safetensors",
                                                      "model-00002-of-00002.safetensors"]
    assert torch_sharded.LAYOUT.shard_names(1) == ["pytorch_model-00001-of-00001.bin"]
    layout = safetensors_file.LAYOUT.folder_layout()
    assert layout.index == ("model.safetensors", "model.safetensors.index.json")
    assert layout.owns("model-00003-of-00012.safetensors") and not layout.owns("precious.safetensors")
    assert not torch_sharded.LAYOUT.folder_layout().owns("model-00001-of-00002.safetensors")
    empty = hub_folder.split([], 10, safetensors_file.LAYOUT, storage_size=lambda ref: ref.nbytes)
    assert empty.files == ["model.safetensors"] and empty.shards == [[]] and not empty.is_sharded
