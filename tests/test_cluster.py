"""Where users run: cluster.yaml against the autoscaler's own schema, and `ray job submit` of a tiny
IOIS run to a real two-node Ray cluster on 127.0.0.1 whose second node alone holds the synthesis
resource. Each node has a disk of its own, as on a real cluster: its own home, temporary and Ray
folders (the job's working directory among them), and the head's are hidden from the other node."""
import copy
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
import yaml
from cli_utils import ENV, ROOT

from ioisray.config import load_config
from ioisray.models.diffusion import create_unet
from ioisray.recipes.launch import LOCAL_RAY_SYSTEM, LOCAL_RAY_TRAIN


def test_cluster_yaml_passes_the_autoscaler_schema_and_opens_no_ray_port():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))  # what `ray up` checks, with Ray's defaults filled in
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["train_gpu"]["min_worker"] = 1  # a typo the schema must catch
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(broken))

    # Nothing but SSH may be opened to the internet; the dashboard listens on the head's loopback.
    for rule in raw["provider"].get("security_group", {}).get("IpPermissions", []):
        if any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])):
            assert (rule.get("FromPort"), rule.get("ToPort")) == (22, 22), rule
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start

    # The cluster job config asks for resources that exactly one worker type offers, none on the head.
    cfg = load_config(ROOT / "configs/ham10000_cluster.yaml")
    types = raw["available_node_types"]

    def offering(request):
        return [n for n, t in types.items() if all(t["resources"].get(k, 0) >= v for k, v in request.items())]

    assert offering(cfg.synthesis.resources) == ["synthesis_gpu"]
    assert offering(cfg.ray.resources_per_worker) == ["train_gpu"]
    assert not types[raw["head_node_type"]]["resources"].get("GPU")
    assert cfg.output_dir.startswith("s3://") and cfg.ray.address == "auto"


def test_cluster_yaml_boots_an_image_that_fits_the_pins_on_every_node_type():
    import re
    import tomllib

    from packaging.specifiers import SpecifierSet
    from ray.autoscaler._private.util import prepare_config

    config = prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ray_pin = next(d.split("==")[1] for d in project["dependencies"] if d.startswith("ray["))
    docker = config["docker"]
    for name, node_type in config["available_node_types"].items():
        # Without an ImageId, `ray up` boots the autoscaler's default AMI (Ubuntu 18.04, too old for the pins).
        ami = node_type["node_config"].get("ImageId")
        assert ami, f"{name} names no ImageId: it would boot the autoscaler's default AMI (Ubuntu 18.04)"
        assert re.fullmatch(r"resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
                            r"base-oss-nvidia-driver-gpu-ubuntu-2[24]\.04/latest/ami-id|ami-[0-9a-f]{8,17}", ami), ami
        head = name == config["head_node_type"]
        image = (docker.get("head_image") if head else node_type.get("docker", {}).get("worker_image")
                 or docker.get("worker_image")) or docker["image"]
        # Ray's own image of the pinned Ray, on a Python the package supports.
        match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-gpu", image)
        assert match and match[1] == ray_pin, f"{name}: {image} is not Ray's image of ray=={ray_pin}"
        assert SpecifierSet(project["requires-python"]).contains(f"3.{match[2]}"), image
        if node_type["resources"].get("GPU"):
            assert "--gpus all" in node_type.get("docker", {}).get("worker_run_options", []), name
    # The setup commands install with the image's own pip: no other interpreter, no second Ray.
    for command in config["setup_commands"] + config["head_setup_commands"]:
        assert re.match(r"pip install ", command) and not re.search(r"python3?\.\d|pip3\.\d|\bray[=<>\[]", command)
    # The cluster job's data is in the head's container, whose user is `ray`.
    assert load_config(ROOT / "configs/ham10000_cluster.yaml").data.root.startswith("/home/ray/")


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# The nodes run as ioisray runs its own local Ray (recipes/launch.py): Ray Train's worker poll, no
# preemption watcher or metrics, idle workers kept a while (Ray's default ends them after 1 s, and Ray
# Data then starts a fresh Python process for every read task). They change no behaviour tested here.
NODE_ENV = {**ENV, **LOCAL_RAY_TRAIN}


def _ray_start(log, env, *args, hidden=()):
    """A Ray node; `hidden`: folders it cannot see (an empty tmpfs over each, in a mount namespace of its
    own), as another machine's disk."""
    command = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())",
               "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1", *args]
    if hidden:
        mounts = " && ".join(f"mount -t tmpfs tmpfs {shlex.quote(str(folder))}" for folder in hidden)
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "sh",
                   *command]
    with open(log, "w") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _own_disk(folder, temp):
    """A node's own home (`folder`) and temporary folder (in `temp`, its short Ray folder: the dashboard's
    forkserver puts a socket there, and a socket path longer than 107 bytes cannot be bound)."""
    folder.mkdir(parents=True)
    tmp = os.path.join(temp, "tmp")
    os.makedirs(tmp)
    return {"HOME": str(folder), "TMPDIR": tmp}


def _ray_cli(*args, timeout=120):
    for _ in range(30):  # the head's job agent may answer a few seconds after its dashboard
        done = subprocess.run([sys.executable, "-c", "import sys; from ray.scripts.scripts import main; "
                               "sys.exit(main())", *args], env=ENV, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
        if "No available agent to submit job" not in done.stderr:
            return done
        time.sleep(2)
    return done


def _stop(proc):
    """`ray start --block` ends the processes it started when it gets SIGTERM."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_for_job(client, job_id, timeout):
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(1)
    client.stop_job(job_id)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s:\n{client.get_job_logs(job_id)[-4000:]}")


# What `ray up` leaves on the head for its autoscaler (~/ray_bootstrap_config.yaml): the driver reads from
# it what the cluster can scale to. Here: the head, and at most one node of the second node's type.
BOOTSTRAP = {"max_workers": 1, "head_node_type": "head",
             "available_node_types": {"head": {"resources": {"CPU": 4}, "max_workers": 0, "node_config": {}},
                                      "synthesis_node": {"resources": {"CPU": 2, "synthesis": 2, "trainer": 1},
                                                         "min_workers": 0, "max_workers": 1, "node_config": {}}}}


@pytest.mark.ray
def test_ray_job_submit_on_a_two_node_cluster(tmp_path):
    from ray.job_submission import JobStatus

    # Each node's own disk: home, temporary folder, Ray's folder (short: Ray's socket paths must fit 107
    # bytes), which holds the job's working directory. The second node cannot see the head's.
    head, worker = tmp_path / "head", tmp_path / "worker"
    head_temp, worker_temp = (tempfile.mkdtemp(prefix=prefix, dir="/tmp") for prefix in ("rayh", "rayw"))
    head_disk, worker_disk = _own_disk(head, head_temp), _own_disk(worker, worker_temp)
    (head / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(BOOTSTRAP))
    nodes = []
    try:
        for attempt in range(3):  # a busy host may start a node slower than Ray waits for it: start it again
            gcs, dash, client_port, *node_ports = _free_ports(13)  # two nodes on one host: no default ports
            address = f"http://127.0.0.1:{dash}"
            # Every process the nodes start is told the cluster's address, as ioisray tells its local Ray's: Ray
            # Train's placement-group cleaner otherwise guesses, and fails, when another Ray runs on the host.
            env = {**NODE_ENV, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}
            started = _ray_start(tmp_path / "head.log", {**env, **head_disk}, "--head", f"--port={gcs}",
                                 f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
                                 f"--ray-client-server-port={client_port}", "--num-cpus=4", f"--temp-dir={head_temp}",
                                 f"--system-config={json.dumps(LOCAL_RAY_SYSTEM)}", *_node_ports(node_ports[:5]))
            nodes.append(started)
            client = _connect(address, started)
            if client is not None:
                break
        else:
            raise AssertionError("the head did not start:\n" + (tmp_path / "head.log").read_text()[-3000:])
        # A job with a bad config, submitted now: it runs while the second node joins.
        bad = f"bad_{uuid.uuid4().hex[:6]}"
        submit = _ray_cli("job", "submit", f"--address={address}", "--working-dir", ".", "--runtime-env",
                          "configs/cluster/runtime_env.yaml", f"--submission-id={bad}", "--no-wait", "--",
                          sys.executable, "-m", "ioisray.cli", "train", "configs/digits.yaml", "train.epochs=0")
        assert submit.returncode == 0, submit.stdout + submit.stderr
        worker_env = {**env, **worker_disk}
        for attempt in range(3):  # ports picked in advance may have been taken since: pick again
            # `trainer`: Ray Train's rank 0 runs on this node, away from the driver, in the runs below.
            joined = _ray_start(tmp_path / "worker.log", worker_env, f"--address=127.0.0.1:{gcs}", "--num-cpus=2",
                                '--resources={"synthesis": 2, "trainer": 1}', f"--temp-dir={worker_temp}",
                                *_node_ports(node_ports[5:10] if attempt == 0 else _free_ports(5)),
                                hidden=(head, head_temp))
            nodes.append(joined)
            deadline = time.time() + 120
            while len(_alive(address)) < 2 and joined.poll() is None and time.time() < deadline:
                time.sleep(1)
            if len(_alive(address)) == 2:
                break
        else:
            raise AssertionError("the second node did not join:\n" + (tmp_path / "worker.log").read_text()[-3000:])
        synthesis_node = next(n.node_id for n in _alive(address) if n.resources_total.get("synthesis"))

        shared = tmp_path / "shared"  # what both nodes reach, named by file:// URIs: a shared mount
        for unet in (shared / "unet", head / "unet"):
            create_unet("tiny", num_classes=10, image_size=16).save_pretrained(unet, safe_serialization=True)
        store, name = shared / "store", f"job_{uuid.uuid4().hex[:6]}"
        entry = [sys.executable, "-m", "ioisray.cli", "train", "configs/digits.yaml", "ray.address=auto",
                 "model.name=resnet10t", "data.image_size=16", "train.batch_size=16", "train.epochs=1",
                 "ray.num_workers=1", "ray.cpus_per_worker=1", "ray.resources_per_worker={trainer: 1}",
                 "synthesis.budget=24",
                 "synthesis.chunk_size=4", "synthesis.pool_size=1", "synthesis.num_cpus=0.5", "sampler.steps=4",
                 "synthesis.resources={synthesis: 1}", f"diffusion.model_dir=file://{shared / 'unet'}",
                 "baseline=null", f"output_dir=file://{store}"]
        # Jobs the cluster must refuse at once, naming the key: paths on the head's disk, which rank 0 and the
        # synthesis actor on the other node cannot reach, and more synthesis actors than it can ever place.
        refused = {"local_output": (["output_dir=outputs"],  # in the head's copy of the working directory
                                    "output_dir: 'outputs' is a path on one node's disk, but this cluster has 2 nodes"),
                   "local_model": ([f"diffusion.model_dir={head / 'unet'}"],
                                   f"diffusion.model_dir: '{head / 'unet'}' is a path on one node's disk"),
                   "too_many_actors": (["synthesis.pool_size=3"],
                                       "synthesis.pool_size=3 x synthesis.resources (1 synthesis) = 3 synthesis, but "
                                       "the cluster has or can scale to 2 synthesis")}

        def submit(job, overrides=()):
            # The real CLI, as a user runs it: code uploaded from the working directory, outputs elsewhere.
            done = _ray_cli("job", "submit", f"--address={address}", "--working-dir", ".", "--runtime-env",
                            "configs/cluster/runtime_env.yaml", f"--submission-id={job}", "--no-wait", "--",
                            *entry, f"name={job}", *overrides)
            assert done.returncode == 0, done.stdout + done.stderr

        submit(name)
        status = _wait_for_job(client, name, timeout=600)
        logs = client.get_job_logs(name)
        assert status == JobStatus.SUCCEEDED, logs[-4000:]

        run = store / name
        results = json.loads((run / "metrics.json").read_text())
        # Rank 0, on the other node, wrote the checkpoints and events to the run's storage; the driver read them.
        assert list((run / "tensorboard").glob("events.out.tfevents.*")) and (run / "real_vs_synthetic.png").is_file()
        # metrics.json's results and the best weights come from rank 0's final checkpoint, which the
        # finished run then removed (train.keep_checkpoints is off).
        assert (run / "best_model.safetensors").is_file() and results["test"] is not None
        assert not (run / "checkpoints").exists()
        for h in results["history"]:
            assert h["synthetic_per_class"] == h["quotas"] and sum(h["quotas"]) == 24
            assert h["synthesis_node_ids"] == [synthesis_node], "synthesis ran off the synthesis node"
        # The synthesis actor fetched the model into its own node's cache.
        assert list((worker / ".cache" / "ioisray" / "staging").glob("*/download-*/config.json"))

        for job, (overrides, _) in refused.items():  # after the run: they would only slow it down
            submit(f"{job}_{name[4:]}", overrides)
        for job, (_, line) in refused.items():
            job_id = f"{job}_{name[4:]}"
            assert _wait_for_job(client, job_id, timeout=240) == JobStatus.FAILED, client.get_job_logs(job_id)[-3000:]
            assert f"ioisray: error: {line}" in client.get_job_logs(job_id), client.get_job_logs(job_id)[-3000:]

        # The job with a bad config failed fast, and says why in `ray job logs`.
        assert _wait_for_job(client, bad, timeout=120) == JobStatus.FAILED
        logs = _ray_cli("job", "logs", f"--address={address}", bad)
        assert "train.epochs" in logs.stdout, logs.stdout[-2000:] + logs.stderr[-2000:]
    finally:
        for proc in reversed(nodes):
            _stop(proc)
        for folder in (head_temp, worker_temp):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(address):
    from ray.util.state import list_nodes

    return [n for n in list_nodes(address=address) if n.state == "ALIVE"]


def _node_ports(ports):
    keys = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port", "--runtime-env-agent-port"]
    return [f"{k}={p}" for k, p in zip(keys, ports)]


def _connect(address, node, timeout=300):
    """A job client once the head's dashboard answers; None if the head's `node` process ended first."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + timeout
    while True:
        try:
            return JobSubmissionClient(address)
        except Exception:  # connection refused until the dashboard is up
            if node.poll() is not None:
                return None
            if time.time() > deadline:
                raise
            time.sleep(1)
