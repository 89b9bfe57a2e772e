"""Interrupted runs resume in every mode, in-process (`ray.num_workers=0`) too: Ctrl-C says where the
run stopped, a corrupt newest checkpoint is skipped for the one before it, and no temporary copies of
checkpoints are left behind."""
import shutil
import tempfile
from pathlib import Path

import pytest
from cli_utils import interrupt_after, run_cli

pytestmark = pytest.mark.ray


def test_an_in_process_run_resumes_past_a_corrupt_checkpoint_and_leaves_no_temporary_copies(tmp_path):
    tmp = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))  # short: Ray's socket paths live under $TMPDIR
    args = ["train", "configs/digits_ce.yaml", "ray.num_workers=0", "train.epochs=4", "model.name=resnet10t",
            "data.image_size=16", "name=inproc", f"output_dir={tmp_path}"]
    run = tmp_path / "inproc"
    done, printed = interrupt_after(args, run, epochs=2, env={"TMPDIR": str(tmp)})
    assert 2 <= done < 4
    assert f"run inproc interrupted at epoch {done + 1} of 4 ({done} saved); rerun the same command to resume" \
        in printed, printed[-2000:]
    assert "Traceback" not in printed
    # The newest checkpoint is damaged after the fact (a bad copy, a full disk): the run goes back one.
    newest = run / "checkpoints" / f"epoch_{done:05d}" / "state.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    r = run_cli(*args, env={"TMPDIR": str(tmp)})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert f"skipping checkpoint epoch_{done:05d}" in out and "does not match its checksum" in out
    assert f"resumed from epoch {done - 1} (checkpoint epoch_{done - 1:05d})" in out
    assert f"epoch {done}/4" in out and "epoch 1/4" not in out  # the lost epoch is redone, the rest not
    assert (run / "metrics.json").is_file()
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("ioisray")]  # no checkpoint copies in $TMPDIR
    shutil.rmtree(tmp, ignore_errors=True)
