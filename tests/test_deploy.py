"""Deployment checks: compose files, Dockerfile lint, Prometheus config and rules, dashboard, k8s, live scrape."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bench.images import b64, solid_png
from bench.server import free_port, start_server, wait_ready

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
RULES_YML = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD_DIR = DEPLOY / "grafana" / "dashboards"
DATASOURCES_DIR = DEPLOY / "grafana" / "provisioning" / "datasources"
COMPOSE_FILES = (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"])
API_JOB = "dide-api"
INSTALL_HINT = "run `deploy/install-tools.sh` as root to install promtool, prometheus, docker-compose and hadolint"
# Grafana's built-in interval variables, and what the live test puts in their place.
GRAFANA_INTERVALS = re.compile(r"\$\{?__(rate_interval|interval|range)\}?")


def tool(name: str) -> str:
    """Path of a checking tool; a skip (or, with DIDE_REQUIRE_TOOLS=1, a failure) when it is missing."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    if os.environ.get("DIDE_REQUIRE_TOOLS") == "1":
        pytest.fail(f"{name} not found and DIDE_REQUIRE_TOOLS=1: {INSTALL_HINT}")
    pytest.skip(f"{name} not found: {INSTALL_HINT}")


def run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120, check=False, **kwargs)


def dashboards() -> list[Path]:
    return sorted(DASHBOARD_DIR.glob("*.json"))


def panels_of(dashboard: dict) -> Iterator[dict]:
    """Every panel, including those folded inside rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) for every query in every dashboard."""
    out = []
    for path in dashboards():
        for panel in panels_of(json.loads(path.read_text())):
            for target in panel.get("targets", []):
                out.append((f"{path.name}: {panel['title']} [{target['refId']}]", target["expr"]))
    return out


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES_YML.read_text())["groups"] for rule in group["rules"]]


def contract_metric_names() -> set[str]:
    """Sample names the service exports (from service/metrics.py), plus the recording rules' names."""
    from service.metrics import Metrics

    suffixes = {"histogram": ("_bucket", "_count", "_sum"), "counter": ("_total",), "gauge": ("",)}
    names = {family.name + end for family in Metrics().registry.collect() for end in suffixes[family.type]}
    return names | {rule["record"] for rule in rules() if "record" in rule}


def metric_names_in(expr: str) -> set[str]:
    """The project's metric names an expression uses: `dide_*` names and `level:metric:operations` names."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    return set(re.findall(r"\b(?:dide_\w+|\w+:\w+:\w+)", without_strings))


# ---- docker compose --------------------------------------------------------------------------------------


def compose(files: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    """docker-compose over `files`, with DIDE_VARIANT cleared so the files' own defaults are what is checked."""
    command = [tool("docker-compose")]
    for name in files:
        command += ["-f", name]
    return run([*command, *args], env={**os.environ, "DIDE_VARIANT": ""})


@pytest.mark.parametrize("files", COMPOSE_FILES, ids=["cpu", "gpu"])
def test_compose_config_is_valid(files: list[str]) -> None:
    result = compose(files, "config", "-q")
    assert result.returncode == 0, result.stderr


def compose_config(files: list[str]) -> dict:
    result = compose(files, "config")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_services_fit_together() -> None:
    services = compose_config(["docker-compose.yml"])["services"]
    api = services["api"]
    # Scalable: no fixed host port on the api; the proxy publishes one.
    assert "ports" not in api and api["expose"] == ["8000"]
    assert services["proxy"]["ports"]
    assert api["depends_on"]["demo-build"]["condition"] == "service_completed_successfully"
    assert api["command"][0] == "dide-serve" and api["build"]["target"] == "runtime"
    # Plain `docker compose up` must start on a host without a GPU: CPU image, no device reservation.
    assert api["build"]["args"]["VARIANT"] == "cpu"
    assert "deploy" not in api
    assert services["demo-build"]["build"]["target"] == "trainer"
    assert services["demo-build"]["command"][:2] == ["dide-demo", "build"]
    assert services["cache"]["profiles"] == ["cache"]
    assert services["cache"]["command"][:2] == ["dide-cache", "build"]
    assert any(":/images" in str(v) for v in services["cache"]["volumes"])
    for name in ("api", "demo-build", "cache"):
        assert any("dide-data" in str(v) for v in services[name]["volumes"]), name
    grafana_env = services["grafana"]["environment"]
    assert grafana_env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana_env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for name in ("api", "demo-build", "cache"):
        assert services[name]["command"][0] in scripts, f"{name} runs a command pyproject.toml does not define"


def test_compose_gpu_override_reserves_a_gpu() -> None:
    services = compose_config(list(COMPOSE_FILES[1]))["services"]
    for name in ("api", "cache"):
        assert services[name]["build"]["args"]["VARIANT"] == "gpu"
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_prometheus_discovers_the_compose_api_service() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == API_JOB]
    assert job["dns_sd_configs"][0]["names"] == ["api"]
    assert job["dns_sd_configs"][0]["port"] == 8000


# ---- Dockerfile ------------------------------------------------------------------------------------------


def dockerfiles() -> list[Path]:
    skip = {".venv", ".git", "node_modules"}
    return [p for p in REPO.rglob("*Dockerfile*") if p.is_file() and not skip & set(p.relative_to(REPO).parts)]


def test_hadolint_passes_on_every_dockerfile() -> None:
    hadolint = tool("hadolint")
    files = dockerfiles()
    assert REPO / "Dockerfile" in files
    for path in files:
        result = run([hadolint, "--no-color", str(path)])
        assert result.returncode == 0, f"{path.relative_to(REPO)}:\n{result.stdout}{result.stderr}"


def dockerfile_stages() -> dict[str, str]:
    """Stage name -> its text (the FROM line included)."""
    stages: dict[str, str] = {}
    name = None
    for line in (REPO / "Dockerfile").read_text().splitlines():
        match = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            name = match.group(1) or f"stage{len(stages)}"
            stages[name] = ""
        if name is not None:
            stages[name] += line + "\n"
    return stages


def test_runtime_image_installs_serving_extras_only() -> None:
    stages = dockerfile_stages()
    assert list(stages)[-1] == "runtime", "the runtime image must be the default (last) target"
    runtime_sources = set(re.findall(r"COPY --from=(\S+)", stages["runtime"]))
    assert runtime_sources == {"python", "serving-venv"}
    serving = stages["serving-venv"]
    assert set(re.findall(r"extra=([\w-]+)", serving)) == {"serving", "serving-gpu"}
    assert "find_spec('torch')" in serving, "the build must fail when torch reaches the runtime virtualenv"
    assert "pytorch.org" not in serving and "--extra training" not in serving
    assert "USER 10001" in stages["runtime"] and "HEALTHCHECK" in stages["runtime"]
    assert "/readyz" in stages["runtime"]
    assert "--extra training" in stages["trainer-venv"]


def requirement_closure(extras: list[str]) -> set[str]:
    """Names of every distribution the project's core + `extras` pull in, following installed metadata."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pending = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        pending += [Requirement(r) for r in project["optional-dependencies"][extra]]
    seen: set[str] = set()
    while pending:
        req = pending.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue  # not installed here (e.g. onnxruntime-gpu): its own requirements cannot be followed
        for text in requires:
            sub = Requirement(text)
            wanted = ["", *sorted(req.extras)]
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in wanted):
                pending.append(sub)
    return seen


@pytest.mark.parametrize("extra", ["serving", "serving-gpu"])
def test_runtime_dependencies_have_no_torch(extra: str) -> None:
    closure = requirement_closure([extra])
    assert {"fastapi", "numpy"} <= closure
    assert any(name.startswith("onnxruntime") for name in closure)
    assert "torch" not in closure, f"the {extra} extra pulls in torch"
    assert "torch" in requirement_closure(["training"])  # the walk does see torch where it is


def test_constraints_pin_every_direct_dependency() -> None:
    pins: dict[str, str] = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not pinned with ==: {line!r}"
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    direct = [*project["dependencies"]]
    for extra in ("serving", "serving-gpu", "training"):
        direct += project["optional-dependencies"][extra]
    for text in direct:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in deploy/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {req}"
    assert pins["onnxruntime"] == pins["onnxruntime-gpu"], "CPU and GPU images should run one ORT version"


# ---- Prometheus ------------------------------------------------------------------------------------------


def test_promtool_check_config() -> None:
    result = run([tool("promtool"), "check", "config", str(PROMETHEUS_YML)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    result = run([tool("promtool"), "check", "rules", str(RULES_YML)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests() -> None:
    """The alerts fire on bad series (slow p99, 5xx ratio, a replica not ready) and stay quiet otherwise."""
    result = run([tool("promtool"), "test", "rules", str(DEPLOY / "prometheus" / "rules-test.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_cover_the_slo_alerts() -> None:
    alerts = {rule["alert"]: rule["expr"] for rule in rules() if "alert" in rule}
    assert set(alerts) == {"DideLatencyP99OverSLO", "DideHighErrorRatio", "DideReplicasNotReady"}
    known = contract_metric_names() | {"up"}
    for rule in rules():
        unknown = metric_names_in(rule["expr"]) - known
        assert not unknown, f"{rule.get('record') or rule['alert']} uses unknown metrics {unknown}"


# ---- Grafana ---------------------------------------------------------------------------------------------


def test_dashboard_is_provisionable() -> None:
    assert dashboards(), "no dashboard JSON"
    datasources = [
        ds for path in DATASOURCES_DIR.glob("*.yml") for ds in yaml.safe_load(path.read_text())["datasources"]
    ]
    uids = {ds["uid"] for ds in datasources if ds["type"] == "prometheus"}
    assert uids == {"prometheus"}
    for path in dashboards():
        text = path.read_text()
        assert "${DS_" not in text and "__inputs" not in text, f"{path.name} has import placeholders"
        dashboard = json.loads(text)
        assert dashboard["uid"], path.name
        panels = list(panels_of(dashboard))
        assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
        for panel in panels:
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] in uids, panel["title"]
            assert panel["targets"], f"panel {panel['title']!r} has no query"
            for target in panel["targets"]:
                assert target["expr"].strip(), f"panel {panel['title']!r} has an empty query"
                assert target.get("datasource", panel["datasource"])["uid"] in uids


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    exprs = [expr for _, expr in dashboard_exprs()]
    joined = "\n".join(exprs)
    for quantile in ("0.5", "0.95", "0.99"):
        assert re.search(
            rf"histogram_quantile\({quantile}, sum by \(le, endpoint\) \(rate\(dide_request_duration", joined
        )
    for needle in (
        "rate(dide_request_duration_seconds_count",
        'status_class="5xx"',
        "dide_stage_duration_seconds_bucket",
        "dide_batch_size",
        "dide_queue_depth",
        "dide_cache_hits_total",
        "dide_cache_misses_total",
        "dide_build_info",
    ):
        assert needle in joined, needle
    known = contract_metric_names()
    for where, expr in dashboard_exprs():
        unknown = metric_names_in(expr) - known
        assert not unknown, f"{where} uses metrics the service does not export: {unknown}"


# ---- Kubernetes ------------------------------------------------------------------------------------------


def k8s_objects() -> dict[tuple[str, str], dict]:
    objects = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def test_k8s_deployment_probes_and_resources() -> None:
    objects = k8s_objects()
    deployment = objects[("Deployment", "dide-api")]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert container["command"][0] == "dide-serve"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    service = objects[("Service", "dide-api")]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    port_names = {port["name"] for port in container["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= port_names
    mounted = {m["name"] for m in container["volumeMounts"]}
    assert mounted <= {v["name"] for v in pod["spec"]["volumes"]}


def test_k8s_indexed_job_shards_the_cache_build() -> None:
    job = k8s_objects()[("Job", "dide-cache-build")]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    (container,) = spec["template"]["spec"]["containers"]
    script = " ".join(container.get("command", []) + container.get("args", []))
    assert "dide-cache build" in script
    match = re.search(r"--shard\s+\"?\$\{?JOB_COMPLETION_INDEX\}?/\$\{?(\w+)\}?", script)
    assert match, f"--shard K/N must take K from JOB_COMPLETION_INDEX: {script}"
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert int(env[match.group(1)]) == spec["completions"] == spec["parallelism"]


def test_k8s_merge_job_merges_every_shard() -> None:
    objects = k8s_objects()
    build, merge = objects[("Job", "dide-cache-build")], objects[("Job", "dide-cache-merge")]
    (container,) = merge["spec"]["template"]["spec"]["containers"]
    assert "dide-cache merge" in container["args"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["SHARDS"]) == build["spec"]["completions"]


@pytest.mark.slow
def test_k8s_cache_jobs_build_and_merge_shards(tmp_path: Path, tiny_bundle: Path) -> None:
    """Run the Indexed Job's script once per completion index, then the merge Job's, with the real
    `dide-cache` and the volumes mapped to temporary folders: the merged store holds every image once."""
    from PIL import Image

    data, images, bin_dir = tmp_path / "data", tmp_path / "images", tmp_path / "bin"
    for folder in (data / "bundles", images, bin_dir):
        folder.mkdir(parents=True)
    shutil.copytree(tiny_bundle, data / "bundles" / "vqa")
    for i in range(7):
        Image.new("RGB", (32, 32), (30 * i, 90, 200 - 20 * i)).save(images / f"img{i}.png")
    shim = bin_dir / "dide-cache"  # the console script pip would install, for this interpreter
    shim.write_text(f'#!/bin/sh\nexec {shlex.join(entry_point_command("dide-cache"))} "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    objects = k8s_objects()
    for name in ("dide-cache-build", "dide-cache-merge"):
        spec = objects[("Job", name)]["spec"]
        (container,) = spec["template"]["spec"]["containers"]
        script = container["args"][0].replace("/data", str(data)).replace("/images", str(images))
        job_env = {**env, **{e["name"]: e["value"] for e in container["env"]}}
        indexes = range(spec["completions"]) if spec.get("completionMode") == "Indexed" else [None]
        for index in indexes:
            if index is not None:
                job_env["JOB_COMPLETION_INDEX"] = str(index)
            result = run([*container["command"], script], env=job_env)
            assert result.returncode == 0, f"{name} [{index}]: {result.stderr[-2000:]}"
    bundle = ["--store", str(data / "store"), "--bundle", str(data / "bundles" / "vqa")]
    verify = run([str(shim), "verify", *bundle], env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    stats = json.loads(run([str(shim), "stats", *bundle], env=env).stdout)
    assert stats["rows"] == 7


def test_install_script_parses() -> None:
    result = run(["bash", "-n", str(DEPLOY / "install-tools.sh")])
    assert result.returncode == 0, result.stderr


# ---- live: the api and a real Prometheus with the project's own configuration -----------------------------


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}")
        try:
            if check():
                return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def http_json(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def stop(proc: subprocess.Popen, log: Path) -> str:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return log.read_text(errors="replace")[-3000:]


def entry_point_command(script: str) -> list[str]:
    """`python -c` calling the function pyproject.toml's [project.scripts] maps `script` to."""
    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"][script]
    module, func = target.split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}(sys.argv[1:]))"]


def render_prometheus_config(directory: Path, api: str, prometheus: str) -> Path:
    """The project's prometheus.yml with the api job pointed at `api`, a 1 s cadence, the same rule files."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    api_job = jobs[API_JOB]
    assert api_job.pop("dns_sd_configs"), "the api job is expected to discover replicas by DNS"
    api_job["static_configs"] = [{"targets": [api]}]
    if "prometheus" in jobs:
        jobs["prometheus"]["static_configs"] = [{"targets": [prometheus]}]
    for rule_file in config["rule_files"]:
        shutil.copy(PROMETHEUS_YML.parent / rule_file, directory / rule_file)
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def promql_instant(base: str, expr: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        payload = json.loads(response.read())
    assert payload["status"] == "success", payload
    return payload["data"]["result"]


def alert_condition_operand(expr: str) -> str:
    """`X > 0.1` -> `X`: an alert's expression is empty while healthy, the quantity it compares is not."""
    match = re.fullmatch(r"(?s)(.+?)\s*(?:>|<|>=|<=|==|!=)\s*[0-9.eE+-]+\s*", expr.strip())
    assert match, f"alert expression is not `<quantity> <op> <threshold>`: {expr}"
    return match.group(1)


@pytest.mark.slow
def test_every_dashboard_and_rule_query_returns_data(tmp_path: Path, tiny_bundle: Path) -> None:
    """Start `dide-serve` and a real Prometheus (the project's config, target rewritten), send traffic, then
    every dashboard query and every rule must return at least one series. Recording rules are checked by
    querying the recorded series; alert rules, which are empty while healthy, by evaluating the quantity
    their condition compares (`X` of `X > threshold`), which must exist."""
    prometheus_bin = tool("prometheus")
    prom_port = free_port()
    api_log, prom_log = tmp_path / "api.log", tmp_path / "prometheus.log"
    env = {"DIDE_BUNDLES": str(tiny_bundle), "DIDE_STORE": str(tmp_path / "store"), "DIDE_THREADS": "2"}
    server = start_server(env, api_log)
    api, api_base = server.process, server.url
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    config = render_prometheus_config(prom_dir, api_base.removeprefix("http://"), f"127.0.0.1:{prom_port}")
    with prom_log.open("w") as log:
        prometheus = subprocess.Popen(
            [
                prometheus_bin,
                f"--config.file={config}",
                f"--storage.tsdb.path={prom_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            cwd=prom_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prom_base = f"http://127.0.0.1:{prom_port}"
    try:
        wait_ready(server)
        wait_until(
            lambda: urllib.request.urlopen(f"{prom_base}/-/ready", timeout=2).status == 200,
            60,
            "prometheus to be ready",
            prometheus,
        )
        # Traffic: new images (image-cache misses), the same image again (hits), repeated questions (text
        # hits), concurrent requests (micro-batches), and bad requests (4xx).
        images = [b64(solid_png((40 * i, 255 - 40 * i, 128))) for i in range(4)]
        bodies = [{"image": image, "question": f"what shape is it {i % 2}?"} for i, image in enumerate(images * 3)]
        with ThreadPoolExecutor(max_workers=4) as pool:
            statuses = list(pool.map(lambda body: http_json(f"{api_base}/vqa", body)[0], bodies))
        assert statuses == [200] * len(bodies)
        assert http_json(f"{api_base}/vqa", {"question": "no image"})[0] == 422

        queries: dict[str, str] = {}
        for where, expr in dashboard_exprs():
            queries[where] = GRAFANA_INTERVALS.sub("1m", expr)
            assert "$" not in queries[where], f"{where}: unknown dashboard variable in {expr}"
        for rule in rules():
            if "record" in rule:
                queries[f"rule {rule['record']}"] = rule["record"]
                queries[f"rule {rule['record']} (expr)"] = rule["expr"]
            else:
                queries[f"alert {rule['alert']}"] = alert_condition_operand(rule["expr"])

        def all_series_present() -> bool:
            return all(promql_instant(prom_base, q) for q in queries.values())

        try:
            wait_until(all_series_present, 60, "every query to return a series")
        except AssertionError:
            empty = {where: q for where, q in queries.items() if not promql_instant(prom_base, q)}
            pytest.fail(f"queries without data: {json.dumps(empty, indent=1)}")
        build = promql_instant(prom_base, "dide_build_info")[0]["metric"]
        assert build["job"] == API_JOB and build["provider"]
        ready = promql_instant(prom_base, "dide:replicas_not_ready:count")
        assert float(ready[0]["value"][1]) == 0.0
    except BaseException:
        print("---- api log ----\n" + stop(api, api_log))
        print("---- prometheus log ----\n" + stop(prometheus, prom_log))
        raise
    finally:
        for proc, log in ((api, api_log), (prometheus, prom_log)):
            if proc.poll() is None:
                stop(proc, log)
