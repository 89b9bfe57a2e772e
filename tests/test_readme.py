"""The README's examples run as written: every `ioisray ...` line of its shell blocks (with smaller
epochs and images appended, and its placeholder paths filled with images the test makes), and its
Python block, in a fresh working folder. The lines that need what a test machine lacks (a GPU, a cloud
account, the HAM10000 data) are listed here by what they need; the README says so where it shows them.
"""
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_utils import ENV, ROOT
from data_fixtures import write_image

pytestmark = pytest.mark.ray

README = (ROOT / "README.md").read_text()
# Appended to a training line: the same command, minutes cheaper (later overrides win).
SMALL = ["train.epochs=1", "train.batch_size=8", "model.name=resnet10t", "data.image_size=16",
         "diffusion.image_size=16", "pretrain.epochs=1", "pretrain.batch_size=8", "pretrain.max_batches_per_epoch=2",
         "pretrain.sample_steps=2", "synthesis.budget=8", "synthesis.chunk_size=4", "synthesis.pool_size=1",
         "synthesis.num_cpus=0.5", "sampler.steps=2"]
RUN_HERE = ("ioisray train configs/imagefolder.yaml", "ioisray evaluate", "ioisray predict")
NEEDS = {  # the lines the suite cannot run, by what they need
    "configs/imagefolder_gpu.yaml": "a GPU",
    "cluster.yaml": "an AWS account",  # ray up, ray dashboard, ray rsync-up, ray down
    "ray job submit": "an AWS account",  # tests/test_cluster.py submits a job to a local two-node cluster
    "ioisray train configs/digits.yaml": "nothing",  # the main job: tests/test_job.py runs it
}
# What the README says of the lines it shows but the suite cannot run.
README_SAYS = "The test suite runs every command on this page but the GPU and cluster ones"


def shell_lines(text: str) -> list[str]:
    """The commands of the ```bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #")[0].strip()
            if command:
                lines.append(command)
    return lines


def make_folder(root: Path, per_class: int = 10) -> Path:
    for c, (name, color) in enumerate({"benign": (200, 40, 40), "malignant": (40, 200, 40),
                                       "normal": (40, 40, 200)}.items()):
        for i in range(per_class):
            write_image(root / name / f"{i:02d}.png", tuple(min(255, v + 3 * i) for v in color))
    return root


def test_every_readme_command_is_run_here_or_named_with_what_it_needs():
    lines = [line for line in shell_lines(README) if line.startswith(("ioisray", "ray"))]
    assert len(lines) >= 6, lines
    unhandled = [line for line in lines if not line.startswith(RUN_HERE) and not any(k in line for k in NEEDS)]
    assert not unhandled, f"README commands that no test runs and that are not named here: {unhandled}"
    assert README_SAYS in " ".join(README.split())


def test_the_readme_own_images_commands_and_python_example_run_as_written(tmp_path):
    images, other, unlabelled = (make_folder(tmp_path / n) for n in ("my_images", "other_clinic", "unlabelled"))
    work = tmp_path / "work"  # a user's working folder: outputs/ lands here
    work.mkdir()
    (work / "configs").symlink_to(ROOT / "configs")
    fill = {"/path/to/my_images": str(images), "/path/to/other_clinic": str(other),
            "/path/to/unlabelled/": f"{unlabelled}/"}
    ran = []
    for line in shell_lines(README):
        if not line.startswith(RUN_HERE):
            continue
        for placeholder, path in fill.items():
            line = line.replace(placeholder, path)
        assert "/path/to/" not in line, line
        args = shlex.split(line)[1:] + (SMALL if line.startswith("ioisray train") else [])
        t0 = time.perf_counter()
        # As a user runs it: without the suite's RAY_AUTH_MODE=disabled, and without Ray's warning about it.
        user_env = {k: v for k, v in ENV.items() if k != "RAY_AUTH_MODE"}
        r = subprocess.run([sys.executable, "-m", "ioisray.cli", *args], cwd=work, env=user_env, capture_output=True,
                           text=True, timeout=600)
        print(f"{args[0]}: {time.perf_counter() - t0:.0f} s")
        assert r.returncode == 0, f"{line}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        assert "Token authentication" not in r.stdout + r.stderr, line
        ran.append(args[0])
    assert ran == ["train", "evaluate", "predict"]
    assert (work / "outputs" / "my_run" / "metrics.json").is_file()
    assert len((work / "predictions.csv").read_text().splitlines()) == 1 + 30

    (python,) = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    r = subprocess.run([sys.executable, "-c", python.replace('"train.epochs=2"', '"train.epochs=2", '
                                                             '"train.max_batches_per_epoch=2"')],
                       cwd=work, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    printed = [line for line in r.stdout.splitlines() if re.fullmatch(r"[0-9.]+", line)]
    assert len(printed) == 2 and printed[0] == printed[1], r.stdout[-3000:]  # evaluate reproduces the run's figure
    # ioisray.predict, as docs/python-api.md shows it, on the run the example trained.
    r = subprocess.run([sys.executable, "-c", "import ioisray, json; print(json.dumps(ioisray.predict("
                        f"'outputs/digits_ce_short', ['{unlabelled}'])))"], cwd=work, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(rows) == 30 and set(rows[0]) == {"path", "predicted", "probabilities"}
    assert rows[0]["predicted"] in rows[0]["probabilities"] and len(rows[0]["probabilities"]) == 10
