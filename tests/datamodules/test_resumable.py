"""Exact resume without a trainer: the state after N consumed batches continues with batch N + 1."""

import itertools
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datamodules.packing import StreamPosition
from datamodules.resumable import StreamState


def _take(dm, n):
    return list(itertools.islice(dm.train_dataloader(), n))


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "workers,world_size,options",
    [(0, 1, {}), (2, 1, {}), (0, 2, {}), (2, 2, {}), (2, 2, {"shuffle_buffer": 8, "fim_rate": 0.5, "seed": 3})],
)
def test_resume_from_a_saved_state_continues_exactly(make_dm, tmp_path, workers, world_size, options):
    n = 30  # enough to cross into a second pass over every shard
    for rank in range(world_size):
        args = {"num_workers": workers, "rank": rank, "world_size": world_size, **options}
        uninterrupted = _take(make_dm(**args), 2 * n)
        first = make_dm(**args)
        head = _take(first, n)
        torch.save(first.state_dict(), tmp_path / "data.pt")
        resumed = make_dm(**args)
        resumed.load_state_dict(torch.load(tmp_path / "data.pt", weights_only=True))
        assert _same(uninterrupted, head + _take(resumed, n))


def test_iterating_again_continues_after_the_last_consumed_batch(make_dm):
    dm = make_dm(num_workers=2)
    loader = dm.train_dataloader()
    uninterrupted = _take(make_dm(num_workers=2), 12)
    assert _same(uninterrupted, list(itertools.islice(loader, 5)) + list(itertools.islice(loader, 7)))


def test_only_committed_batches_count(make_dm):
    dm = make_dm()
    loader = dm.train_dataloader()
    loader.auto_commit = False
    batches = list(itertools.islice(loader, 3))  # handed out (as if prefetched), one consumed
    loader.commit(batches[0])
    assert loader.state.batches == 1
    resumed = make_dm()
    resumed.load_state_dict(dm.state_dict())
    assert _same(batches[1:], _take(resumed, 2))


def test_commit_of_a_later_batch_commits_the_earlier_ones(make_dm):
    loader = make_dm().train_dataloader()
    loader.auto_commit = False
    batches = list(itertools.islice(loader, 3))
    loader.commit(batches[1])
    assert loader.state.batches == 2


def test_uncommitted_batches_are_bounded_with_a_warning(make_dm, caplog):
    loader = make_dm().train_dataloader()
    loader.auto_commit = False
    with caplog.at_level(logging.WARNING):
        list(itertools.islice(loader, 70))
    assert "not being committed" in caplog.text
    assert loader.state.batches == 70 - 64


def test_state_round_trips_through_dict_and_tensor():
    state = StreamState([StreamPosition(1, 2, 3), StreamPosition(4, 5, 6)], batches=7, next_stream=1)
    assert StreamState.from_dict(state.to_dict()) == state
    assert StreamState.from_tensor(state.to_tensor()) == state


def test_resume_with_other_workers_is_refused(make_dm):
    state = make_dm(num_workers=2).state_dict()
    with pytest.raises(ValueError, match=r"num_streams=2.*num_streams=1"):
        make_dm(num_workers=0).load_state_dict(state)


def test_resume_of_a_rank_missing_from_the_state_is_refused(make_dm):
    state = make_dm(rank=0, world_size=2).state_dict()  # explicit ranks are not gathered: rank 0 only
    with pytest.raises(ValueError, match=r"rank=1.*\[0\]"):
        make_dm(rank=1, world_size=2).load_state_dict(state)


def test_resume_with_one_worker_matches_the_main_process(make_dm):
    """One worker reads the same single stream as none, so switching between them keeps the position."""
    dm = make_dm(num_workers=0)
    head = _take(dm, 5)
    resumed = make_dm(num_workers=1)
    resumed.load_state_dict(dm.state_dict())
    assert _same(head + _take(resumed, 5), _take(make_dm(), 10))


def test_resume_with_other_seq_len_continues_at_the_same_token(make_dm):
    dm = make_dm()
    head = _take(dm, 3)  # 3 x 2 x 17 = 102 tokens
    resumed = make_dm(seq_len=33)
    resumed.load_state_dict(dm.state_dict())
    stream = torch.cat([b.reshape(-1) for b in _take(make_dm(), 10)])
    assert torch.equal(_take(resumed, 1)[0].reshape(-1), stream[102 : 102 + 2 * 34])
    assert head


def test_state_for_another_dataset_is_ignored(make_dm, caplog):
    state = make_dm(n_files=3).state_dict()
    state["ranks"][0]["batches"] = 99
    dm = make_dm(n_files=1)
    with caplog.at_level(logging.WARNING):
        dm.load_state_dict(state)
    assert "afresh" in caplog.text
    assert _same(_take(dm, 2), _take(make_dm(n_files=1), 2))


_ERROR_WITH_WORKERS_ALIVE = """
from torch.utils.data import IterableDataset
from datamodules.resumable import ResumableLoader, StreamState

class Boom(IterableDataset):
    def __iter__(self):
        raise ValueError("boom")
        yield

loader = ResumableLoader(make_stream=lambda state: Boom(), num_workers=2, state=StreamState.fresh(2))
try:
    next(iter(loader))
except ValueError as err:
    kept = err  # its traceback keeps the loader's workers alive, as an error report (or pytest.raises) does
print("raised", flush=True)
"""


def test_a_process_whose_loader_failed_still_exits():
    # The workers ignore SIGTERM (the main process handles preemption), which is how multiprocessing ends daemonic
    # children at exit before joining them: without the exit hook this process hangs forever.
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", _ERROR_WITH_WORKERS_ALIVE], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "raised", done.stderr
    assert "Traceback" not in done.stderr  # the workers' kill is not reported as a worker failure
