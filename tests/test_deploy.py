"""The deploy/ recipes: parse, use the fields the tools expect, install like CI."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_installs_like_the_readme_and_ci():
    docker = (ROOT / "deploy" / "container" / "Dockerfile").read_text()
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    install = re.search(r"pip install (-e \S+)", docker).group(1)
    first_lines = "\n".join(readme.splitlines()[:6])
    assert f"pip install {install}" in first_lines  # the README's demo command
    assert re.search(r"pip install -e \"?\.\[test\]\"?", ci)  # CI: the same, with test extras
    assert re.search(r"pip install -e \"?\.\[test\]\"?", first_lines)


def test_daskcluster_resource_fields():
    doc = yaml.safe_load((ROOT / "deploy" / "k8s" / "daskcluster.yaml").read_text())
    assert doc["apiVersion"] == "kubernetes.dask.org/v1" and doc["kind"] == "DaskCluster"
    worker = doc["spec"]["worker"]
    assert worker["replicas"] >= 1
    container = worker["spec"]["containers"][0]
    assert container["args"][:2] == ["dask", "worker"]
    assert container["envFrom"][0]["secretRef"]["name"] == "boldflow-object-store"
    sched = doc["spec"]["scheduler"]
    assert sched["spec"]["containers"][0]["args"] == ["dask", "scheduler"]
    env = {e["name"]: e["value"] for e in sched["spec"]["containers"][0]["env"]}
    assert float(env["DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION"]) == 1.0
    ports = {p["name"]: p["port"] for p in sched["service"]["ports"]}
    assert ports == {"tcp-comm": 8786, "http-dashboard": 8787}
    secret = yaml.safe_load((ROOT / "deploy" / "k8s" / "secret-example.yaml").read_text())
    assert secret["metadata"]["name"] == "boldflow-object-store"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])


def test_slurm_recipe():
    conf = yaml.safe_load((ROOT / "deploy" / "slurm" / "jobqueue.yaml").read_text())
    slurm = conf["jobqueue"]["slurm"]
    for key in ("cores", "processes", "memory", "walltime", "job-script-prologue"):
        assert key in slurm
    assert slurm["cores"] % slurm["processes"] == 0
    assert conf["distributed"]["scheduler"]["worker-saturation"] == 1.0
    ast.parse((ROOT / "deploy" / "slurm" / "start_cluster.py").read_text())
