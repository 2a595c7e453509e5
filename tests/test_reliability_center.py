"""The center stopped mid-checkpoint, in process: what a crash can leave in `checkpoints/` is never loaded.

A checkpoint is written to a temporary file beside it, then renamed, then `latest` is pointed at it
(`common.checkpoint`), so a crash leaves a stray temporary file, or a complete round file that `latest`
does not name yet; `resume` starts from the round `latest` names and recomputes the next. Killing the real
SuperLink and ServerApp after a round is test_reliability_processes.py; checksums and truncated files are
test_checkpoint.py.
"""

from __future__ import annotations

from test_federation_support import run_in_process

from common.checkpoint import latest_checkpoint, load_checkpoint


def test_what_a_crash_leaves_mid_checkpoint_is_never_loaded(sites, config, tmp_path):
    run = {"config": config, "num-server-rounds": 1, "local-steps": 1, "eval-every": 0,
           "out-dir": str(tmp_path)}
    run_in_process(sites, run)
    folder = tmp_path / "checkpoints"
    first = folder / "round-0001.safetensors"
    data = first.read_bytes()
    # killed while writing round 2: a half-written temporary file; and a round-2 file as a writer without
    # the rename would have left it, half there, that `latest` does not name
    (folder / ".round-0002.safetensors.k3j2h1.tmp").write_bytes(data[: len(data) // 2])
    (folder / "round-0002.safetensors").write_bytes(data[: len(data) // 3])
    assert latest_checkpoint(folder) == first

    run_in_process(sites, {**run, "num-server-rounds": 2, "resume": True})
    second = load_checkpoint(folder / "round-0002.safetensors")  # rewritten whole: its checksum verifies
    assert latest_checkpoint(folder).name == "round-0002.safetensors"
    assert second.metadata["round"] == 2
    assert [r["round"] for r in second.metadata["history"] if r["site"] == "all"] == [1, 2]
    assert second.metadata["history"][:4] == load_checkpoint(first).metadata["history"]
