"""d2sd.distributed: round-robin partition, merge, environment parsing; `d2sd.bench` under 2 gloo
ranks on the CPU gathers on rank 0 exactly the tokens of a 1-process run."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from d2sd import bench, distributed
from d2sd.distributed import World
from d2sd.errors import D2SDError

# ---------------------------------------------------------------------------------------------
# Partition and merge
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 5, 8, 13])
@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_shards_are_round_robin_disjoint_and_complete(count: int, size: int) -> None:
    shards = [distributed.shard(count, World(rank=r, size=size)) for r in range(size)]
    for rank, indices in enumerate(shards):
        assert indices == [i for i in range(count) if i % size == rank]
    assert sorted(i for s in shards for i in s) == list(range(count))
    # balanced to within one prompt (more ranks than prompts leave some ranks idle)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_merge_restores_index_order() -> None:
    size, items = 3, [f"prompt{i}" for i in range(7)]
    parts = [
        [(i, items[i]) for i in distributed.shard(len(items), World(rank=r, size=size))]
        for r in range(size)
    ]
    assert distributed.merge_shards(parts, count=len(items)) == items
    assert distributed.merge_shards(reversed(parts)) == items  # rank order does not matter
    with pytest.raises(ValueError, match="index 0 came from two ranks"):
        distributed.merge_shards([[(0, "a")], [(0, "b")]])
    with pytest.raises(ValueError, match=r"missing indices \[1\]"):
        distributed.merge_shards([[(0, "a"), (2, "c")]], count=3)


def test_world_from_env() -> None:
    assert distributed.world_from_env({}) == World(0, 1, 0)
    world = distributed.world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert world == World(rank=3, size=4, local_rank=1)
    assert not world.is_main and world.distributed
    assert distributed.world_from_env({"RANK": "2", "WORLD_SIZE": "4"}).local_rank == 2
    with pytest.raises(D2SDError, match="WORLD_SIZE='two'"):
        distributed.world_from_env({"WORLD_SIZE": "two"})
    with pytest.raises(D2SDError, match="RANK=4, WORLD_SIZE=4"):
        distributed.world_from_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_device_for_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    one, second = World(), World(rank=1, size=2, local_rank=1)
    assert distributed.device_for_rank("cuda:3", one) == "cuda:3"  # one process: as asked
    assert distributed.device_for_rank(None, one) is None
    assert distributed.device_for_rank("cpu", second) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.device_for_rank(None, second) == "cuda:1"
    assert distributed.device_for_rank("cuda", second) == "cuda:1"
    with pytest.raises(D2SDError, match="every rank on one device"):
        distributed.device_for_rank("cuda:0", second)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.device_for_rank(None, second) == "cpu"


def test_single_process_collectives_are_identities() -> None:
    world = World()
    assert distributed.gather_to_main({"a": 1}, world) == [{"a": 1}]
    assert distributed.broadcast_from_main("x", world) == "x"


# ---------------------------------------------------------------------------------------------
# The suite under 2 gloo ranks
# ---------------------------------------------------------------------------------------------

# 3 gsm8k prompts: rank 0 runs prompts 0 and 2, rank 1 prompt 1; mt-bench: one 2-turn prompt each
ARGV = [
    "--datasets", "gsm8k,mt-bench", "--methods", "ar,d2sd", "--temperatures", "0,1",
    "--max-samples", "3", "--max-new-tokens", "6", "--block-size", "4", "--topk", "2",
    "--device", "cpu", "--no-plots",
]  # fmt: skip
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    rank: int, port: int, argv: list[str], expect_code: int = 0, fail_rank: int | None = None
) -> None:
    """One torchrun-like rank (spawned): the tiny target, then the suite's main, which must exit
    with `expect_code`; rank `fail_rank`'s generations raise a D2SDError."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    torch.set_num_threads(1)
    from tests.tiny_models import install_tiny_default_target

    install_tiny_default_target(setattr)
    if rank == fail_rank:
        from d2sd.generate import Decoder

        def fail(self, prompt_ids, config):
            raise D2SDError(f"boom on rank {rank}")

        Decoder.generate = fail
    code = bench.main(argv)
    if code != expect_code:
        raise RuntimeError(f"rank {rank}: d2sd.bench exited with {code}, not {expect_code}")


def _spawn_two_ranks(argv: list[str], *more: object) -> None:
    context = mp.start_processes(
        _rank_main, args=(_free_port(), argv, *more), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1.0):  # raises if a rank failed
            if time.monotonic() > deadline:
                pytest.fail(f"2-rank run did not finish in {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()


def test_two_gloo_ranks_gather_the_one_process_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from tests.test_bench_suite import write_datasets
    from tests.tiny_models import install_tiny_default_target

    data = write_datasets(tmp_path / "data")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    _spawn_two_ranks([*ARGV, "--data-dir", str(data), "--out", str(tmp_path / "two")])

    install_tiny_default_target(monkeypatch.setattr)
    assert bench.main([*ARGV, "--data-dir", str(data), "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()

    two = json.loads((tmp_path / "two" / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert two["settings"]["world_size"] == 2 and one["settings"]["world_size"] == 1
    assert (tmp_path / "two" / "table.md").is_file()
    assert set(two["cells"]) == set(one["cells"]) and len(one["cells"]) == 8
    for key, cell in one["cells"].items():
        gathered = two["cells"][key]
        assert [p["id"] for p in gathered["prompts"]] == [p["id"] for p in cell["prompts"]], key
        # fp32 on the CPU, same seeds: every turn's tokens agree exactly, greedy and sampled
        tokens = lambda c: [[t["tokens"] for t in p["turns"]] for p in c["prompts"]]
        assert tokens(gathered) == tokens(cell), key
        assert gathered["summary"]["tokens"] == cell["summary"]["tokens"]


def test_an_error_on_one_rank_stops_every_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # rank 1 fails inside the first cell; rank 0 must not wait for it forever: both exit 2
    from tests.test_bench_suite import write_datasets

    data = write_datasets(tmp_path / "data")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    argv = [*ARGV, "--datasets", "gsm8k", "--temperatures", "0", "--data-dir", str(data)]
    _spawn_two_ranks([*argv, "--out", str(tmp_path / "out")], 2, 1)
    assert not (tmp_path / "out" / "results.json").exists()  # no cell finished
