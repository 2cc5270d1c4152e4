"""mmgcs.shards: the parts deal every input row once, in whole blocks (each the one-process batch at its place); the
merge refuses a missing, unfinished or short part with its name and the remedy, writes nothing, and keeps every part
for the rerun."""

from __future__ import annotations

import time

import pytest

from shard_helpers import BATCH, args_of, bundle, source  # noqa: F401  (module fixtures)

from mmgcs.shards import Shard, merge_parts, part_path, read_state, state_path, write_state
from mmgcs.sharded_predict import merge_and_report, run_part


@pytest.mark.parametrize("rows, block, count, start", [(23, 4, 3, 0), (23, 4, 5, 0), (100, 7, 3, 12), (5, 8, 2, 0),
                                                       (0, 4, 2, 0), (40, 4, 2, 40)])
def test_the_parts_deal_every_row_once_in_blocks(rows, block, count, start):
    owners = [[i for i in range(rows) if Shard(k, count, start, block).owns(i)] for k in range(count)]
    assert sorted(i for part in owners for i in part) == list(range(start, rows))
    assert [len(part) for part in owners] == [Shard(k, count, start, block).rows(rows) for k in range(count)]
    for k, part in enumerate(owners):  # whole blocks, each the one-process batch at that place
        assert all(((i - start) // block) % count == k for i in part)


def test_the_merge_refuses_a_missing_unfinished_or_short_part(bundle, source, tmp_path, capsys):
    out = tmp_path / "p.csv"
    args = args_of("--model", bundle, "--input", source, "--out", out, "--batch-size", BATCH)
    for index in range(2):
        assert run_part(args, index, 2, progress=False) == 0
    second, kept = part_path(out, 1, 2), part_path(out, 1, 2).read_bytes()

    second.unlink()
    assert merge_and_report(out, 2, time.time()) == 2
    err = capsys.readouterr().err
    assert f"part 2 of 2 is missing ({second})" in err and "rerun the same command with --resume" in err

    second.write_bytes(kept)
    state = read_state(out, 1, 2)
    state.complete = False  # what a kill leaves: the state written when the part started
    write_state(out, state)
    assert merge_and_report(out, 2, time.time()) == 2
    err = capsys.readouterr().err
    assert f"part 2 of 2 ({second}) is unfinished" in err and "--resume" in err

    state.complete = True
    write_state(out, state)
    second.write_bytes(b"".join(kept.splitlines(keepends=True)[:-2]))  # a part that lost its last rows
    assert merge_and_report(out, 2, time.time()) == 2
    assert f"part 2 of 2 ({second.name}) ends after" in capsys.readouterr().err

    # Nothing was written, and every part stays for the rerun.
    assert not out.exists() and not out.with_name(out.name + ".merging").exists()
    assert part_path(out, 0, 2).is_file() and state_path(out, 1, 2).is_file()
    second.write_bytes(kept)
    assert merge_parts(out, 2).rows == 23
