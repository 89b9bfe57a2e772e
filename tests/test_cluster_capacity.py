"""What a run may ask of a Ray cluster (ioisray/cluster.py): requests are compared with what the cluster
can scale to (its autoscaler's node types), not with what is up now, a request it can never place is one
line naming the keys instead of a wait for ever, and on more than one node no path may be node-local."""
import math
import os

import pytest
import yaml
from cli_utils import ROOT

from ioisray import cluster
from ioisray.config import ConfigError, load_config
from ioisray.experiments import max_concurrent_trials, trial_resources


@pytest.fixture(scope="module")
def cluster_yaml_types(tmp_path_factory):
    """The node types of this repository's cluster.yaml, read as `ray up` leaves them on its head
    (the bootstrap config: cluster.yaml with the autoscaler's defaults filled in)."""
    from ray.autoscaler._private.util import prepare_config

    bootstrap = tmp_path_factory.mktemp("head") / "ray_bootstrap_config.yaml"
    bootstrap.write_text(yaml.safe_dump(prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))))
    return cluster._bootstrap_node_types(str(bootstrap))


def test_an_autoscaling_cluster_is_judged_by_what_its_node_types_can_add(cluster_yaml_types):
    shapes, most, max_nodes = cluster_yaml_types
    assert most["GPU"] == 8 and most["train_gpu"] == 4 and most["synthesis_gpu"] == 4 and max_nodes == 9
    head_only = [{"CPU": 8.0, "memory": 3e10}]  # a fresh `ray up` cluster: min_workers 0, no GPU node yet
    can_scale = cluster.combine(head_only, cluster_yaml_types, on_a_cluster=True)
    job = load_config(ROOT / "configs/ham10000_cluster.yaml")
    # What `ioisray tune` and `ioisray benchmark` used to compare with (ray.cluster_resources() at submit
    # time) refuses the job; what the cluster can scale to takes two such trials side by side.
    with pytest.raises(ConfigError, match="one trial needs .* but the cluster has 8$"):
        max_concurrent_trials({"CPU": 8.0}, trial_resources(job))
    assert max_concurrent_trials(can_scale.most, trial_resources(job), has=can_scale.has) == 2
    cluster.check_fits([cluster.trainer_request(job), cluster.pool_request(job)], can_scale)  # fits: no error

    more = load_config(ROOT / "configs/ham10000_cluster.yaml", ["synthesis.pool_size=5"])
    with pytest.raises(ConfigError, match=r"^synthesis.pool_size=5 x synthesis.resources \(1 synthesis_gpu\) = 5 "
                                          r"synthesis_gpu, but the cluster has or can scale to 4 synthesis_gpu$"):
        cluster.check_fits([cluster.trainer_request(more), cluster.pool_request(more)], can_scale)
    with pytest.raises(ConfigError, match="needs 5 synthesis_gpu .* but the cluster has or can scale to 4"):
        max_concurrent_trials(can_scale.most, trial_resources(more), has=can_scale.has)
    big = load_config(ROOT / "configs/ham10000_cluster.yaml", ["ray.cpus_per_worker=16"])
    with pytest.raises(ConfigError, match=r"^ray.cpus_per_worker, ray.use_gpu, ray.resources_per_worker: each of the "
                                          r"ray.num_workers=2 processes asks for \{CPU: 16, GPU: 1, train_gpu: 1\}, "
                                          r"but no node of the cluster has that much"):
        cluster.check_fits([cluster.trainer_request(big)], can_scale)


def test_the_cluster_wide_limit_on_workers_bounds_what_the_node_types_add(tmp_path):
    config = {"max_workers": 3, "head_node_type": "head",
              "available_node_types": {"head": {"resources": {"CPU": 4}, "max_workers": 0},
                                       "big": {"resources": {"CPU": 8, "GPU": 4}, "max_workers": 2},
                                       "small": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 5}}}
    path = tmp_path / "bootstrap.yaml"
    path.write_text(yaml.safe_dump(config))
    _, most, max_nodes = cluster._bootstrap_node_types(str(path))
    assert most == {"CPU": 4 + 3 * 8, "GPU": 2 * 4 + 1 * 1} and max_nodes == 4
    assert cluster._bootstrap_node_types(str(tmp_path / "none.yaml")) is None


def test_one_gpu_cannot_hold_the_trainer_and_four_synthesis_actors():
    ham = load_config(ROOT / "configs/ham10000.yaml", ["data.root=/x"])
    one_gpu = cluster.combine([{"CPU": 32.0, "GPU": 1.0}], None, on_a_cluster=False)  # a local Ray on one H100
    assert one_gpu.autoscaler is False and not one_gpu.multi_node
    with pytest.raises(ConfigError, match=r"^ray.num_workers=1 x ray.use_gpu \(1 GPU\) \+ synthesis.pool_size=4 x "
                                          r"synthesis.num_gpus \(1 GPU\) = 5 GPU, but the cluster has 1 GPU$"):
        cluster.check_fits([cluster.trainer_request(ham), cluster.pool_request(ham)], one_gpu)
    cluster.check_fits([cluster.trainer_request(ham)], one_gpu)  # the trainer alone fits


def test_processes_that_fit_one_by_one_and_in_total_but_not_together_on_the_nodes_are_refused(tmp_path):
    # Two nodes: the head, and one that alone has both the trainer's and the synthesis resource. Rank 0
    # with 2 CPUs leaves no room there for the synthesis actor, though 6 CPUs are there in all.
    two_nodes = cluster.combine([{"CPU": 4.0}, {"CPU": 2.0, "synthesis": 2.0, "trainer": 1.0}], None,
                                on_a_cluster=False)
    overrides = ["ray.num_workers=1", "ray.resources_per_worker={trainer: 1}", "synthesis.pool_size=1",
                 "synthesis.num_cpus=0.5", "synthesis.resources={synthesis: 1}"]
    tight = load_config(ROOT / "configs/digits.yaml", [*overrides, "ray.cpus_per_worker=2"])
    with pytest.raises(ConfigError, match=r"^ray.num_workers=1 x \{CPU: 2, trainer: 1\} and synthesis.pool_size=1 x "
                                          r"\{CPU: 0.5, synthesis: 1\} cannot be placed on the cluster's nodes "
                                          r"together \(ray.cpus_per_worker, ray.resources_per_worker, "
                                          r"synthesis.num_cpus, synthesis.resources;"):
        cluster.check_fits([cluster.trainer_request(tight), cluster.pool_request(tight)], two_nodes)
    roomy = load_config(ROOT / "configs/digits.yaml", [*overrides, "ray.cpus_per_worker=1"])
    cluster.check_fits([cluster.trainer_request(roomy), cluster.pool_request(roomy)], two_nodes)
    # Node types the autoscaler can add count as many times as it may add them.
    config = {"max_workers": 2, "head_node_type": "head",
              "available_node_types": {"head": {"resources": {"CPU": 4}},
                                       "gpu": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 2}}}
    (tmp_path / "bootstrap.yaml").write_text(yaml.safe_dump(config))
    scalable = cluster.combine([{"CPU": 4.0}], cluster._bootstrap_node_types(str(tmp_path / "bootstrap.yaml")), True)
    gpus = load_config(ROOT / "configs/digits.yaml", ["ray.num_workers=1", "ray.use_gpu=true", "ray.cpus_per_worker=6",
                                                      "synthesis.pool_size=1", "synthesis.num_gpus=1",
                                                      "synthesis.num_cpus=6"])
    cluster.check_fits([cluster.trainer_request(gpus), cluster.pool_request(gpus)], scalable)  # one GPU node each
    three = gpus.model_copy(update={"synthesis": gpus.synthesis.model_copy(update={"pool_size": 2})})
    with pytest.raises(ConfigError, match="= 3 GPU, but the cluster has or can scale to 2 GPU"):
        cluster.check_fits([cluster.trainer_request(three), cluster.pool_request(three)], scalable)
    halves = gpus.model_copy(update={"synthesis": gpus.synthesis.model_copy(update={"num_gpus": 0.5})})
    with pytest.raises(ConfigError, match="cannot be placed on the cluster's nodes together"):  # 6 + 6 CPUs > 8
        cluster.check_fits([cluster.trainer_request(halves), cluster.pool_request(
            halves.model_copy(update={"synthesis": halves.synthesis.model_copy(update={"pool_size": 2})}))], scalable)


def test_a_cluster_whose_autoscaler_cannot_be_seen_is_warned_about_not_refused(capsys):
    ham = load_config(ROOT / "configs/ham10000.yaml", ["data.root=/x", "ray.address=auto"])
    unseen = cluster.combine([{"CPU": 8.0}], None, on_a_cluster=True)
    assert unseen.autoscaler is None
    cluster.check_fits([cluster.trainer_request(ham), cluster.pool_request(ham)], unseen)
    assert "warning: " in capsys.readouterr().out


def test_node_local_paths_are_refused_on_more_than_one_node(cluster_yaml_types):
    scalable = cluster.combine([{"CPU": 8.0}], cluster_yaml_types, on_a_cluster=True)  # one node up, 9 possible
    two_up = cluster.combine([{"CPU": 8.0}, {"CPU": 2.0}], None, on_a_cluster=True)
    on_cluster = ["ray.address=auto", "output_dir=s3://bucket/runs", "diffusion.model_dir=gs://bucket/unet"]
    for capacity in (scalable, two_up):
        cfg = load_config(ROOT / "configs/digits.yaml", on_cluster)
        cluster.check_shared_paths(cfg, capacity)  # URIs every node reaches
        cluster.check_shared_paths(load_config(ROOT / "configs/digits.yaml", [
            *on_cluster, "output_dir=file:///mnt/efs/runs", "diffusion.model_dir=file:///mnt/efs/unet"]), capacity)
        for key, value in (("output_dir", "outputs"), ("diffusion.model_dir", "/home/ray/unet"),
                           ("model.weights", "/home/ray/resnet.safetensors"),
                           ("synthesis.filter_model", "/home/ray/judge_run")):
            extra = ["synthesis.filter=0.5"] if key == "synthesis.filter_model" else []
            cfg = load_config(ROOT / "configs/digits.yaml", [*on_cluster, f"{key}={value}", *extra])
            with pytest.raises(ConfigError, match=rf"^{key}: '{value}' is a path on one node's disk, but this "
                                                  r"cluster has (2|up to 9) nodes"):
                cluster.check_shared_paths(cfg, capacity)
    # One node, no autoscaler, or a Ray of ioisray's own: local paths are fine.
    cluster.check_shared_paths(load_config(ROOT / "configs/digits.yaml", ["ray.address=auto"]),
                               cluster.combine([{"CPU": 8.0}], None, on_a_cluster=True))
    cluster.check_shared_paths(load_config(ROOT / "configs/digits.yaml"), two_up)


@pytest.mark.ray
def test_the_capacity_of_a_real_ray_and_of_an_autoscaler_reported_to_its_gcs():
    import ray
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    from ioisray.config import Config
    from ioisray.recipes.launch import ray_session

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    local = Config(ray={"local_num_cpus": 3})
    with ray_session(local):
        here = cluster.capacity(local)
        assert here.autoscaler is False and here.most["CPU"] == 3 and not here.most.get("GPU")
        # An autoscaler that reports its node types to the GCS (where Ray Train reads them too).
        reported = autoscaler_pb2.ClusterConfig()
        for name, count, resources in (("head", 1, {"CPU": 3}), ("gpu", 4, {"CPU": 8, "GPU": 1, "train_gpu": 1}),
                                       ("spot", -1, {"CPU": 4})):
            group = reported.node_group_configs.add(name=name, max_count=count)
            group.resources.update(resources)
        key, namespace = ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE
        _internal_kv_put(key, reported.SerializeToString(), namespace=namespace)
        try:
            remote = Config(ray={"address": "auto"})  # read as from a cluster's driver
            scalable = cluster.capacity(remote)
            assert scalable.autoscaler is True and scalable.most["GPU"] == 4 and scalable.most["train_gpu"] == 4
            assert math.isinf(scalable.most["CPU"]) and math.isinf(scalable.max_nodes) and scalable.multi_node
            assert {"CPU": 8.0, "GPU": 1.0, "train_gpu": 1.0} in scalable.nodes
            assert cluster.capacity(local).autoscaler is False  # ioisray's own Ray: never an autoscaler's
        finally:
            _internal_kv_del(key, namespace=namespace)
        assert cluster.capacity(remote).autoscaler is None
