"""One Orbax manager for the latest and the best checkpoints; mismatches found by tree structure."""

import jax.numpy as jnp
import numpy as np
import pytest

from dks_jax import checkpointing


def _state(width=3, extra=False):
    state = {"step": jnp.zeros((), jnp.int32), "params": {"w": jnp.ones((width, 2))}}
    if extra:
        state["params"]["b"] = jnp.zeros(2)
    return state


def test_latest_and_best_from_one_manager_and_written_once(tmp_path, caplog):
    ckpts = checkpointing.Checkpoints(tmp_path, max_to_keep=2, async_save=True)
    with caplog.at_level("WARNING"):
        ckpts.save(1, _state())
    assert "did not provide metrics" not in caplog.text  # a save between evaluations is normal
    assert ckpts.save_best(2, _state(), top1=50.0)
    assert not ckpts.save(2, _state(), force=True)  # a best step that is also a save step: once
    ckpts.save(3, _state())
    ckpts.save_best(4, _state(), top1=20.0)  # evaluated, not better: not kept as the best
    ckpts.save(5, _state())
    ckpts.save(6, _state())
    ckpts.wait()
    ckpts.close()
    assert not (tmp_path / "best").exists()
    # After a restart the best is still known (its metrics are on disk) and still kept.
    ckpts = checkpointing.Checkpoints(tmp_path, max_to_keep=2, async_save=False)
    assert ckpts.all_steps() == [2, 5, 6] and ckpts.best_step() == 2
    ckpts.save(7, _state())
    assert ckpts.all_steps() == [2, 6, 7]
    step, restored = ckpts.restore(checkpointing.abstract(_state()))
    assert step == 7
    step, _ = ckpts.restore(checkpointing.abstract(_state()), step=ckpts.best_step())
    assert step == 2
    ckpts.close()


def test_older_runs_best_folder_is_read(tmp_path):
    """A run of an older version kept its best checkpoint in best/<step>/ (its own manager, no
    metrics in checkpoints/): best_step finds it and restore reads it, even when the step is no
    longer among the latest."""
    import orbax.checkpoint as ocp

    older = ocp.CheckpointManager(tmp_path / "best", item_handlers=ocp.StandardCheckpointHandler())
    best = {"step": jnp.full((), 4, jnp.int32), "params": {"w": 5 * jnp.ones((3, 2))}}
    older.save(4, args=ocp.args.StandardSave(best))
    older.wait_until_finished()
    older.close()
    ckpts = checkpointing.Checkpoints(tmp_path, async_save=False)
    ckpts.save(9, _state())
    assert ckpts.best_step() == 4
    step, restored = ckpts.restore(checkpointing.abstract(_state()), step=4)
    assert step == 4 and np.array_equal(restored["params"]["w"], 5 * np.ones((3, 2)))
    with pytest.raises(checkpointing.CheckpointError, match="does not match"):
        ckpts.restore(checkpointing.abstract(_state(width=4)), step=4)
    assert ckpts.restore(checkpointing.abstract(_state()))[0] == 9  # the latest is unchanged
    ckpts.close()


def test_a_different_model_is_named_by_its_tree(tmp_path):
    ckpts = checkpointing.Checkpoints(tmp_path, async_save=False)
    ckpts.save(1, _state())
    with pytest.raises(checkpointing.CheckpointError,
                       match=r"params/w: shape \(3, 2\) in the checkpoint, \(4, 2\) in this run"):
        ckpts.restore(checkpointing.abstract(_state(width=4)))
    with pytest.raises(checkpointing.CheckpointError, match="only in this run: params/b"):
        ckpts.restore(checkpointing.abstract(_state(extra=True)))
    assert ckpts.all_steps() == [1]  # a mismatch is not corruption: nothing set aside
    ckpts.close()


def test_tree_differences():
    a = {"x": np.zeros((2, 3)), "y": {"z": np.zeros(1)}}
    assert checkpointing.tree_differences(a, a) == []
    b = {"x": np.zeros((2, 4)), "q": np.zeros(1)}
    assert checkpointing.tree_differences(a, b) == [
        "only in the checkpoint: y/z", "only in this run: q",
        "x: shape (2, 3) in the checkpoint, (2, 4) in this run"]


def test_unreadable_metadata_counts_as_corrupt(tmp_path):
    ckpts = checkpointing.Checkpoints(tmp_path, async_save=False)
    ckpts.save(1, _state())
    ckpts.save(2, _state())
    for f in (tmp_path / "checkpoints" / "2").rglob("*"):
        if f.is_file() and f.name != "_CHECKPOINT_METADATA":
            f.write_bytes(b"garbage")
    step, _ = ckpts.restore(checkpointing.abstract(_state()))
    assert step == 1 and (tmp_path / "checkpoints" / "corrupt-2").exists()
    assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()
                  if p.name[0].isdigit() or p.name.startswith('corrupt')) == ['1', 'corrupt-2']
    ckpts.close()
