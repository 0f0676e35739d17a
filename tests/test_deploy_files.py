"""The deployment files validate with the real tools, offline, and agree with one another.

Tools (all from package registries, run as subprocesses): kubernetes-validate, hadolint and
check-jsonschema from the `test` extra; promtool from Debian's `prometheus` package when installed
(scripts/test.sh installs it where it can), else a structural check with PyYAML. promtool checks
the Prometheus config, the alert rules (and runs their unit tests) and the PromQL of the Grafana
dashboard; tests/test_metrics.py checks that every metric they read is one the server exports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = ROOT / "configs" / "prometheus.yml"
ALERT_RULES = ROOT / "configs" / "prometheus-alerts.yml"
ALERT_RULE_TESTS = ROOT / "tests" / "data" / "prometheus-alerts-test.yml"
GRAFANA = ROOT / "configs" / "grafana"
# Grafana's variables in the dashboard's queries, replaced by what a query could be sent with.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
K8S = ROOT / "configs" / "kubernetes"
# Applied by `kubectl apply -k`; the other two manifests are validated but deliberately not applied.
K8S_APPLIED = ["configmap.yaml", "pvc.yaml", "deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml"]
K8S_NOT_APPLIED = ["secret.example.yaml", "prometheus-adapter-rules.yaml"]
# The oldest Kubernetes the manifests target (PDB unhealthyPodEvictionPolicy is GA in 1.31), and the
# newest whose schemas the installed kubernetes-validate ships ("newest"); nothing is fetched.
K8S_OLDEST = "1.31.0"
CONSOLE_SCRIPT = "internvl-serve"
DEFAULT_DRAIN_TIMEOUT_S = 30
BUILD_TOOLS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|make|cmake|[a-z0-9.+-]+-dev)\b")


# ---- helpers --------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    """The venv's own copy first (pytest may run without the venv on PATH), then PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    # NO_COLOR keeps escape codes out of the messages we assert on.
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def _output(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n{proc.stdout}{proc.stderr}"


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _k8s(name: str) -> dict[str, Any]:
    return _load(K8S / name)


def _seconds(duration: str | int) -> float:
    """A Compose/Docker duration such as '1m30s' or '45s' in seconds."""
    if isinstance(duration, int):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions per build stage as (KEYWORD, arguments), continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[list[tuple[str, str]]] = [[]]
    for line in logical:
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), rest.strip()))
    return stages


def _final_stage() -> list[tuple[str, str]]:
    return _dockerfile_stages()[-1]


def _one(stage: list[tuple[str, str]], keyword: str) -> str:
    found = [rest for kw, rest in stage if kw == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {found}"
    return found[0]


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for kw, rest in stage:
        if kw == "ENV":
            env.update(dict(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", rest)))
    return env


def _exposed_port() -> int:
    return int(_one(_final_stage(), "EXPOSE").split("/")[0])


def _healthcheck_command() -> list[str]:
    healthcheck = _one(_final_stage(), "HEALTHCHECK")
    _, _, exec_form = healthcheck.partition(" CMD ")
    command = json.loads(exec_form)
    assert isinstance(command, list), "HEALTHCHECK CMD must be exec form (a JSON list)"
    return command


def _drain_timeout_s() -> float:
    return float(_env(_final_stage()).get("INTERNVL_DRAIN_TIMEOUT_S", DEFAULT_DRAIN_TIMEOUT_S))


def _pod_spec() -> dict[str, Any]:
    return _k8s("deployment.yaml")["spec"]["template"]["spec"]


def _container() -> dict[str, Any]:
    containers = _pod_spec()["containers"]
    assert len(containers) == 1
    return containers[0]


def _container_port(port: int | str) -> int:
    """A probe's or Service's port, resolving a named port against the container's ports."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    assert port in named, f"port name {port!r} is not a container port"
    return named[port]


# ---- the real validators --------------------------------------------------------------------------


@pytest.mark.parametrize("version", [K8S_OLDEST, "newest"])
def test_kubernetes_manifests_pass_strict_schema_validation(version: str) -> None:
    from kubernetes_validate import utils

    if version == "newest":
        version = utils.latest_version()
    assert version in utils.all_versions(), f"kubernetes-validate ships no schemas for {version}"
    files = [str(K8S / name) for name in K8S_APPLIED + K8S_NOT_APPLIED]
    proc = _run(_tool("kubernetes-validate"), "--strict", "--kubernetes-version", version, *files)
    print(_output(proc))
    assert proc.returncode == 0, _output(proc)
    # A kind without a schema is only a warning there; every document here must really be checked.
    assert "WARN" not in proc.stdout + proc.stderr, _output(proc)
    assert proc.stdout.count(" passed for resource ") == len(files), _output(proc)


def test_kubernetes_validate_rejects_an_unknown_field(tmp_path: Path) -> None:
    manifest = _k8s("deployment.yaml")
    manifest["spec"]["replicaz"] = 2
    bad = tmp_path / "deployment.yaml"
    bad.write_text(yaml.safe_dump(manifest))
    proc = _run(_tool("kubernetes-validate"), "--strict", "--kubernetes-version", K8S_OLDEST, str(bad))
    assert proc.returncode != 0 and "replicaz" in proc.stdout + proc.stderr, _output(proc)


def test_dockerfile_passes_hadolint() -> None:
    proc = _run(_tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE))
    print(_output(proc))
    assert proc.returncode == 0 and not proc.stdout.strip(), _output(proc)


def test_hadolint_flags_an_unpinned_pip_install(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install --no-cache-dir requests\n")
    proc = _run(_tool("hadolint"), "--no-color", "--failure-threshold", "style", str(bad))
    assert proc.returncode != 0 and "DL3013" in proc.stdout, _output(proc)


def test_compose_file_matches_the_compose_spec() -> None:
    proc = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    print(_output(proc))
    assert proc.returncode == 0, _output(proc)


def test_compose_spec_check_rejects_an_unknown_key(tmp_path: Path) -> None:
    compose = _load(COMPOSE)
    compose["services"]["internvl-serve"]["gpus_please"] = 1
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(yaml.safe_dump(compose))
    proc = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(bad))
    assert proc.returncode != 0 and "gpus_please" in proc.stdout + proc.stderr, _output(proc)


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        print("prometheus config: promtool missing, PyYAML structural check only")
        pytest.skip(
            "promtool not installed (Debian package prometheus); "
            "test_prometheus_config_structure checked configs/prometheus.yml with PyYAML instead"
        )
    print(f"prometheus config: checked with {promtool}")
    proc = _run(promtool, "check", "config", str(PROMETHEUS_CONFIG))
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout + proc.stderr, _output(proc)


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool not installed (Debian package prometheus); test_alert_rules_structure checks the rules"
        )
    return promtool


def test_alert_rules_pass_promtool() -> None:
    proc = _run(_promtool(), "check", "rules", str(ALERT_RULES))
    assert proc.returncode == 0 and "SUCCESS: 4 rules found" in proc.stdout + proc.stderr, _output(proc)


def test_alert_rules_fire_as_their_unit_tests_say() -> None:
    proc = _run(_promtool(), "test", "rules", str(ALERT_RULE_TESTS))
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout + proc.stderr, _output(proc)


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    rules = _load(ALERT_RULES)
    rules["groups"][0]["rules"][0]["expr"] = "sum by (model_name (internvl:num_requests_waiting)"
    bad = tmp_path / "alerts.yml"
    bad.write_text(yaml.safe_dump(rules))
    proc = _run(_promtool(), "check", "rules", str(bad))
    assert proc.returncode != 0, _output(proc)


def _dashboard_exprs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for key, value in node.items() if key != "expr" for e in _dashboard_exprs(value)]
    if isinstance(node, list):
        return [e for item in node for e in _dashboard_exprs(item)]
    return []


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each query of the dashboard, its Grafana variables filled in, as a recording rule promtool parses."""
    rules = []
    for path in sorted((GRAFANA / "dashboards").glob("*.json")):
        for index, expr in enumerate(_dashboard_exprs(json.loads(path.read_text()))):
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            rules.append({"record": f"dashboard:{path.stem.replace('-', '_')}:{index}", "expr": expr})
    assert len(rules) >= 20
    as_rules = tmp_path / "dashboard-rules.yml"
    as_rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = _run(_promtool(), "check", "rules", str(as_rules))
    assert proc.returncode == 0 and f"SUCCESS: {len(rules)} rules found" in proc.stdout, _output(proc)


def test_alert_rules_structure() -> None:
    rules = [rule for group in _load(ALERT_RULES)["groups"] for rule in group["rules"]]
    names = [rule["alert"] for rule in rules]
    assert len(set(names)) == len(names) == 4
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]) and rule["labels"]["severity"] in {
            "warning",
            "critical",
        }
        assert "internvl:" in rule["expr"] and rule["annotations"]["summary"]
    tested = {a["alertname"] for t in _load(ALERT_RULE_TESTS)["tests"] for a in t["alert_rule_test"]}
    assert tested == set(names), "every alert has a promtool unit test"


def test_prometheus_loads_the_alert_rules() -> None:
    config = _load(PROMETHEUS_CONFIG)
    assert [PROMETHEUS_CONFIG.parent / f for f in config["rule_files"]] == [ALERT_RULES]
    prometheus = _load(COMPOSE)["services"]["prometheus"]
    mounts = {str(v).split(":")[0]: str(v).split(":")[1] for v in prometheus["volumes"]}
    # Next to the config file in the container, as rule_files (relative to it) expects.
    config_dir = Path(mounts["./configs/prometheus.yml"]).parent
    assert mounts["./configs/prometheus-alerts.yml"] == str(config_dir / config["rule_files"][0])


def test_prometheus_config_structure() -> None:
    config = _load(PROMETHEUS_CONFIG)
    assert set(config) <= {"global", "scrape_configs", "rule_files", "alerting", "remote_write"}
    assert re.fullmatch(r"\d+[smh]", config["global"]["scrape_interval"])
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert len(jobs) == len(config["scrape_configs"]), "job names must be unique"
    job = jobs["internvl-serve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    # The compose service name and the image's exposed port.
    assert targets == [f"internvl-serve:{_exposed_port()}"]


# ---- the Dockerfile -------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_on_a_pinned_cuda_base() -> None:
    stages = _dockerfile_stages()
    preamble, build_stages = stages[0], stages[1:]
    assert len(build_stages) >= 2
    args = dict(re.findall(r"^(\w+)=(\S+)$", "\n".join(rest for kw, rest in preamble if kw == "ARG"), re.M))
    for stage in build_stages:
        image = stage[0][1].split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert image.startswith("nvidia/cuda:"), image
        tag = image.partition(":")[2]
        assert re.fullmatch(r"\d+\.\d+\.\d+-\w+-ubuntu\d+\.\d+", tag), f"unpinned base tag {image}"
    final = _final_stage()
    assert any(kw == "COPY" and rest.startswith("--from=builder /opt/venv") for kw, rest in final)


def test_dockerfile_final_stage_has_no_build_tools() -> None:
    for kw, rest in _final_stage():
        if kw == "RUN":
            assert not BUILD_TOOLS.search(rest), f"build tool in the final stage: {rest}"


def test_every_pip_install_skips_the_cache() -> None:
    for stage in _dockerfile_stages():
        for kw, rest in stage:
            if kw == "RUN" and "pip install" in rest:
                assert "--no-cache-dir" in rest, rest


def test_dockerfile_runtime_contract() -> None:
    final = _final_stage()
    env = _env(final)
    user = _one(final, "USER").split(":")[0]
    assert user not in {"root", "0"}
    assert env["HF_HOME"] == "/models"
    assert json.loads(_one(final, "VOLUME")) == [env["HF_HOME"]]
    assert _one(final, "STOPSIGNAL") == "SIGTERM"
    entrypoint = json.loads(_one(final, "ENTRYPOINT"))
    cmd = json.loads(_one(final, "CMD"))
    # Exec form and the package's own console command last, so SIGTERM reaches the server.
    assert isinstance(entrypoint, list) and entrypoint[-1] == CONSOLE_SCRIPT
    assert f'{CONSOLE_SCRIPT} = "server.cli:main"' in (ROOT / "pyproject.toml").read_text()
    assert cmd[cmd.index("--port") + 1] == env["INTERNVL_PORT"] == str(_exposed_port())
    assert cmd[cmd.index("--host") + 1] == env["INTERNVL_HOST"] == "0.0.0.0"
    assert "INTERNVL_MODEL" not in env, "an image default would outrank the ConfigMap's model"
    health = _healthcheck_command()
    assert f"http://127.0.0.1:{_exposed_port()}/health" in " ".join(health)
    assert "--start-period=" in _one(final, "HEALTHCHECK")


# ---- Compose --------------------------------------------------------------------------------------


def test_compose_agrees_with_the_dockerfile() -> None:
    server = _load(COMPOSE)["services"]["internvl-serve"]
    assert server["build"]["dockerfile"] == DOCKERFILE.name
    assert server["build"].get("context", ".") == "."
    container_ports = {int(str(p).rsplit(":", 1)[1]) for p in server["ports"]}
    assert container_ports == {_exposed_port()}
    assert server["healthcheck"]["test"] == ["CMD", *_healthcheck_command()]
    hf_home = _env(_final_stage())["HF_HOME"]
    assert any(str(v).split(":")[1] == hf_home for v in server["volumes"])
    assert float(server["environment"]["INTERNVL_DRAIN_TIMEOUT_S"]) == _drain_timeout_s()


def test_compose_server_service() -> None:
    compose = _load(COMPOSE)
    server = compose["services"]["internvl-serve"]
    assert {"INTERNVL_MODEL", "INTERNVL_API_KEY"} <= set(server["environment"])
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert server["restart"] == "unless-stopped"
    assert _seconds(server["stop_grace_period"]) > _drain_timeout_s()
    # The cache volume is a named volume, so weights survive `docker compose down`.
    cache_volume = next(str(v).split(":")[0] for v in server["volumes"] if ":/models" in str(v))
    assert cache_volume in compose["volumes"]


def test_compose_prometheus_service() -> None:
    prometheus = _load(COMPOSE)["services"]["prometheus"]
    image, _, tag = prometheus["image"].partition(":")
    assert image == "prom/prometheus" and re.fullmatch(r"v\d+\.\d+\.\d+", tag), prometheus["image"]
    assert prometheus["depends_on"] == {"internvl-serve": {"condition": "service_healthy"}}
    mounts = {str(v).split(":")[0]: str(v).split(":")[1] for v in prometheus["volumes"]}
    config_in_container = mounts["./configs/prometheus.yml"]
    assert f"--config.file={config_in_container}" in prometheus["command"]


def test_compose_grafana_service() -> None:
    compose = _load(COMPOSE)
    grafana = compose["services"]["grafana"]
    image, _, tag = grafana["image"].partition(":")
    assert image == "grafana/grafana" and re.fullmatch(r"\d+\.\d+\.\d+", tag), grafana["image"]
    assert all(str(p).startswith("127.0.0.1:") for p in grafana["ports"]), "Grafana stays on loopback"
    mounts = {str(v).split(":")[0]: str(v).split(":")[1] for v in grafana["volumes"]}
    for source in mounts:
        if source.startswith("./"):
            assert (ROOT / source).exists(), source
        else:
            assert source in compose["volumes"], source
    provisioning = Path(mounts["./configs/grafana/provisioning"])
    assert provisioning == Path("/etc/grafana/provisioning")  # where Grafana looks
    # The data source is the compose network's Prometheus; the dashboards are read where they are mounted.
    datasources = _load(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    prometheus_port = _load(COMPOSE)["services"]["prometheus"]["ports"][0].rsplit(":", 1)[1]
    assert [(d["type"], d["url"]) for d in datasources] == [
        ("prometheus", f"http://prometheus:{prometheus_port}")
    ]
    providers = _load(GRAFANA / "provisioning" / "dashboards" / "internvl-serve.yml")["providers"]
    assert [p["options"]["path"] for p in providers] == [mounts["./configs/grafana/dashboards"]]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent == Path(mounts["./configs/grafana/dashboards"])
    assert (GRAFANA / "dashboards" / Path(home).name).is_file()
    assert "prometheus" in grafana["depends_on"]


def test_grafana_dashboard_structure() -> None:
    for path in sorted((GRAFANA / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] and dashboard["title"], path
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert (
            variables["datasource"]["type"] == "datasource"
            and variables["datasource"]["query"] == "prometheus"
        )
        panels = [p for p in dashboard["panels"] if p["type"] != "row"]
        assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"]), "panel ids are unique"
        for panel in panels:
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"] and all(
                'model_name=~"$model_name"' in t["expr"] for t in panel["targets"]
            )


# ---- Kubernetes -----------------------------------------------------------------------------------


def test_kustomization_applies_every_manifest() -> None:
    kustomization = _k8s("kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(K8S_APPLIED)
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == set(K8S_APPLIED + K8S_NOT_APPLIED)
    images = {i["name"] for i in kustomization["images"]}
    assert _container()["image"].split(":")[0] in images


def test_deployment_ports_and_probes_agree_with_the_dockerfile() -> None:
    container = _container()
    port = _exposed_port()
    assert [p["containerPort"] for p in container["ports"]] == [port]
    # No `command:`, so the image's ENTRYPOINT (tini -- internvl-serve) is what runs.
    assert "command" not in container
    args = container["args"]
    assert args[args.index("--port") + 1] == str(port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health", probe
        assert _container_port(get["port"]) == port, probe
    annotations = _k8s("deployment.yaml")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_deployment_probes_allow_a_long_load_and_tolerate_slow_health() -> None:
    container = _container()
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 120


def test_deployment_drains_before_it_is_killed() -> None:
    container = _container()
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    env = {e["name"]: e for e in container["env"]}
    drain = float(env["INTERNVL_DRAIN_TIMEOUT_S"]["value"])
    assert drain == _drain_timeout_s()
    assert _pod_spec()["terminationGracePeriodSeconds"] > int(pre_stop[1]) + drain


def test_deployment_gpu_cache_secret_and_config() -> None:
    pod, container = _pod_spec(), _container()
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}

    cache = volumes[mounts[_env(_final_stage())["HF_HOME"]]]
    assert cache["persistentVolumeClaim"]["claimName"] == _k8s("pvc.yaml")["metadata"]["name"]

    config_path = Path(container["args"][container["args"].index("--config") + 1])
    config_volume = volumes[mounts[str(config_path.parent)]]
    configmap = _k8s("configmap.yaml")
    assert config_volume["configMap"]["name"] == configmap["metadata"]["name"]
    server_config = yaml.safe_load(configmap["data"][config_path.name])
    assert isinstance(server_config, dict) and server_config["model"]
    assert "api_key" not in server_config, "the API key belongs in the Secret"

    env = {e["name"]: e for e in container["env"]}
    secret_ref = env["INTERNVL_API_KEY"]["valueFrom"]["secretKeyRef"]
    secret = _k8s("secret.example.yaml")
    assert secret_ref["name"] == secret["metadata"]["name"]
    assert secret_ref["key"] in secret["stringData"]
    assert not secret_ref.get("optional", False), "the server must not start without its key"


def test_deployment_runs_as_the_image_user() -> None:
    pod, container = _pod_spec(), _container()
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    assert str(context["runAsUser"]) == _one(_final_stage(), "USER").split(":")[0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_service_hpa_and_pdb_point_at_the_deployment() -> None:
    deployment = _k8s("deployment.yaml")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = _k8s("service.yaml")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [_container_port(p["targetPort"]) for p in service["spec"]["ports"]] == [_exposed_port()]
    pdb = _k8s("pdb.yaml")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    target = _k8s("hpa.yaml")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_hpa_metric_is_produced_by_the_adapter_rule() -> None:
    metrics = _k8s("hpa.yaml")["spec"]["metrics"]
    names = {m["pods"]["metric"]["name"] for m in metrics if m["type"] == "Pods"}
    assert names, "the HPA scales on a per-pod custom metric"
    adapter = yaml.safe_load(_k8s("prometheus-adapter-rules.yaml")["data"]["config.yaml"])
    exposed = set()
    for rule in adapter["rules"]:
        series = re.match(r"'?([\w:]+)", rule["seriesQuery"]).group(1)
        assert series.startswith("internvl:"), series
        replacement = re.sub(r"\$\{(\d+)\}", r"\\g<\1>", rule["name"]["as"])
        exposed.add(re.sub(rule["name"]["matches"], replacement, series))
    assert names <= exposed, f"{names} not among the adapter's metrics {exposed}"
    assert "internvl_num_requests_waiting" in names


# ---- the server's own settings loader and CLI ------------------------------------------------------


def test_server_config_in_the_configmap_loads(tmp_path: Path) -> None:
    settings = pytest.importorskip("server.settings")
    configmap = _k8s("configmap.yaml")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(configmap["data"]["config.yaml"])
    loaded = settings.Settings.load(cli={}, environ={}, config_file=config_file)
    assert loaded.model == yaml.safe_load(config_file.read_text())["model"]


def test_every_internvl_variable_is_a_server_setting() -> None:
    settings = pytest.importorskip("server.settings")
    known = {settings.ENV_PREFIX + name.upper() for name in settings.Settings.model_fields}
    known |= set(settings.ENV_ALIASES.values()) | {settings.CONFIG_ENV}
    used = set(_env(_final_stage()))
    used |= set(_load(COMPOSE)["services"]["internvl-serve"]["environment"])
    used |= {e["name"] for e in _container()["env"]}
    unknown = {name for name in used if name.startswith("INTERNVL_")} - known
    assert not unknown, f"not server settings: {sorted(unknown)}"


def test_image_and_pod_arguments_are_server_flags() -> None:
    cli = pytest.importorskip("server.cli")
    for argv in (json.loads(_one(_final_stage(), "CMD")), _container()["args"]):
        cli.build_parser().parse_args(argv)  # exits (SystemExit) on an unknown flag


# ---- the two commands and CI ----------------------------------------------------------------------


def test_ci_runs_the_readme_test_command() -> None:
    ci = ROOT / ".ci" / "run"
    assert os.access(ci, os.X_OK)
    text = ci.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert re.search(r"^make test$", text, re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^serve:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


@pytest.mark.parametrize("script", [".ci/run", "scripts/install.sh", "scripts/test.sh"])
def test_shell_scripts_parse(script: str) -> None:
    proc = _run("bash", "-n", str(ROOT / script))
    assert proc.returncode == 0, _output(proc)
