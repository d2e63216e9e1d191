"""``order="global"``: the data a rank sees is its rows of the one-process stream, whatever the world size.

Checked with the ``rank``/``world_size`` overrides (no processes): R ranks of batch B, stacked in rank order, give the
batches of one process with batch R x B, for training (workers and shuffling included) and validation; the saved
position is the same at any world size and resumes on another one.
"""

import itertools

import pytest
import torch

N = 5


def _batches(dm, n=N):
    return list(itertools.islice(dm.train_dataloader(), n))


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_stack_to_the_single_process_batches(make_dm, workers):
    kwargs = {"num_workers": workers, "shuffle_buffer": 4, "order": "global"}
    single = _batches(make_dm(batch_size=4, **kwargs))
    ranks = [_batches(make_dm(batch_size=2, rank=r, world_size=2, **kwargs)) for r in range(2)]
    for step in range(N):
        assert torch.equal(torch.cat([ranks[0][step], ranks[1][step]]), single[step])
    # the default order reads other documents on each rank: the ranks' batches do not stack to the single
    # process's (rank 0 may start with the same documents as the single process; the other rank does not)
    sharded = [
        _batches(make_dm(batch_size=2, rank=r, world_size=2, num_workers=workers, shuffle_buffer=4)) for r in range(2)
    ]
    assert not torch.equal(torch.cat([sharded[0][0], sharded[1][0]]), single[0])


def test_validation_rows_stack_to_the_single_process_batches(make_dm, corpus):
    kwargs = {"val_split": "train", "val_batches": 3, "order": "global"}
    single = list(make_dm(batch_size=4, **kwargs).val_dataloader())
    ranks = [list(make_dm(batch_size=2, rank=r, world_size=2, **kwargs).val_dataloader()) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 3
    for step in range(3):
        assert torch.equal(torch.cat([ranks[0][step], ranks[1][step]]), single[step])


def test_position_resumes_on_another_world_size(make_dm):
    kwargs = {"num_workers": 2, "order": "global"}
    straight = _batches(make_dm(batch_size=4, **kwargs), 2 * N)
    first = make_dm(batch_size=2, rank=1, world_size=2, **kwargs)
    _batches(first)
    state = first.state_dict()
    assert "world_size" not in state and state["order"] == "global"
    resumed = make_dm(batch_size=4, **kwargs)  # one process with the same global batch
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(_batches(resumed), straight[N:], strict=True))


def test_a_one_process_sharded_position_continues_globally(make_dm):
    straight = _batches(make_dm(batch_size=4, num_workers=2), 2 * N)  # order sharded, one process
    first = make_dm(batch_size=4, num_workers=2)
    _batches(first)
    ranks = []
    for rank in range(2):
        resumed = make_dm(batch_size=2, num_workers=2, order="global", rank=rank, world_size=2)
        resumed.load_state_dict(first.state_dict())
        ranks.append(_batches(resumed))
    assert all(torch.equal(torch.cat(rows), b) for *rows, b in zip(*ranks, straight[N:], strict=True))


def test_order_mismatch_is_refused(make_dm):
    sharded = make_dm(rank=0, world_size=2)  # a rank's own documents: not a position in the global stream
    _batches(sharded, 1)
    with pytest.raises(ValueError, match="order='sharded'.*order='global'"):
        make_dm(order="global").load_state_dict(sharded.state_dict())
    with pytest.raises(ValueError, match="order='diagonal' must be one of"):
        make_dm(order="diagonal")
