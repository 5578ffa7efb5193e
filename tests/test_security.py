"""Security: no unsafe deserialisation anywhere, API keys compared in constant time and never logged or echoed,
CORS off unless configured, containers that run as non-root."""

from __future__ import annotations

import ast
import hmac
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient
from starlette.middleware.cors import CORSMiddleware

from service import dependencies
from service.app import create_app
from service.settings import Settings
from tests.live import QUESTION, REPO, b64, png, start_server, stop_server, wait_ready

# --- unsafe deserialisation ------------------------------------------------------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}


def python_files() -> list[Path]:
    """Every Python file of the repository that git knows (tracked or not ignored): what ships and what runs."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [REPO / p for p in listed if (REPO / p).is_file()]


def unsafe_calls(source: str, filename: str) -> list[str]:
    """Where `source` can run code hidden in data: pickle-family imports, torch.load without weights_only=True,
    numpy loads with allow_pickle=True, yaml.load without a safe loader."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where}: imports {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kwargs = {k.arg: k.value for k in node.keywords}
        if name == "torch.load" or name.endswith(".torch.load"):
            flag = kwargs.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"{where}: torch.load without weights_only=True")
        allow = kwargs.get("allow_pickle")
        if name in ("np.load", "numpy.load") and isinstance(allow, ast.Constant) and allow.value is True:
            found.append(f"{where}: {name}(allow_pickle=True)")
        if (
            name in ("yaml.load", "yaml.load_all")
            and "safe" not in ast.unparse(kwargs.get("Loader", ast.Constant(""))).lower()
        ):
            found.append(f"{where}: {name} without a safe Loader")
    return found


def test_no_unsafe_deserialisation_in_any_python_file() -> None:
    files = python_files()
    assert len(files) > 40 and REPO / "service" / "app.py" in files
    found = [hit for path in files for hit in unsafe_calls(path.read_text(), str(path.relative_to(REPO)))]
    assert found == [], found


@pytest.mark.parametrize(
    ("source", "hit"),
    [
        ("import pickle", "imports pickle"),
        ("from joblib import load", "imports joblib"),
        ("import torch\ntorch.load('x.pt')", "torch.load without weights_only=True"),
        ("import torch\ntorch.load('x.pt', weights_only=False)", "torch.load without weights_only=True"),
        ("import numpy as np\nnp.load('x.npy', allow_pickle=True)", "allow_pickle=True"),
        ("import yaml\nyaml.load(open('x'), Loader=yaml.Loader)", "without a safe Loader"),
    ],
)
def test_the_scan_finds_each_unsafe_form(source: str, hit: str) -> None:
    found = unsafe_calls(source, "x.py")
    assert len(found) == 1 and hit in found[0], found


def test_the_scan_accepts_the_safe_forms() -> None:
    safe = "import torch, yaml, numpy as np\ntorch.load('x', weights_only=True)\nnp.load('x.npy')\n"
    assert unsafe_calls(safe + "yaml.safe_load('a')\nyaml.load('a', Loader=yaml.SafeLoader)\n", "x.py") == []


def test_a_tampered_checkpoint_is_refused(tiny_student_dir: Path, tmp_path: Path) -> None:
    import shutil

    from training.student import load_student

    student = tmp_path / "student"
    shutil.copytree(tiny_student_dir, student)
    weights = bytearray((student / "model.safetensors").read_bytes())
    weights[-5] ^= 0x01  # a bit of the last tensor's data: still a valid safetensors file
    (student / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_student(student)


# --- API keys ----------------------------------------------------------------------------------------------

KEYS = ["k-alpha-7Qm2x9SECRET", "k-bravo-4Lp8z1SECRET", "k-charlie-0Rt5w3SECRET"]


@pytest.fixture(scope="module")
def keyed_client(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(bundles=[tiny_bundle], store=tmp_path_factory.mktemp("store"), api_keys=",".join(KEYS))  # type: ignore[arg-type]
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.mark.parametrize("given", [KEYS[0], KEYS[2], "wrong", KEYS[1][:-1], KEYS[1] + "x", "é-not-ascii"])
def test_every_key_is_compared_in_constant_time_without_early_exit(
    keyed_client: TestClient, monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(dependencies.hmac, "compare_digest", counting)
    r = keyed_client.get("/images/abc", headers={"X-API-Key": given.encode()})  # bytes: UTF-8 on the wire
    assert r.status_code == (404 if given in KEYS else 401)
    # One constant-time comparison per configured key, whichever matched (or none): no early exit, no `==`.
    assert len(compared) == len(KEYS) and {b for _, b in compared} == {k.encode() for k in KEYS}


def test_key_comparison_in_the_source_is_hmac_only() -> None:
    source = Path(dependencies.__file__).read_text()
    tree = ast.parse(source)
    fn = next(
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == "require_api_key"
    )
    body = ast.unparse(fn)
    assert "hmac.compare_digest" in body
    compares = [ast.unparse(n) for n in ast.walk(fn) if isinstance(n, ast.Compare)]
    assert not [c for c in compares if "key" in c and ("==" in c or "!=" in c or " in " in c)], compares


@pytest.mark.slow
def test_api_keys_never_reach_logs_responses_or_metrics(tiny_bundle: Path, tmp_path: Path) -> None:
    """A real server at DEBUG with access logs: keys sent right and wrong, in both headers, never show up."""
    env = {
        "DIDE_BUNDLES": str(tiny_bundle),
        "DIDE_STORE": str(tmp_path / "store"),
        "DIDE_API_KEYS": ",".join(KEYS),
        "DIDE_LOG_LEVEL": "DEBUG",
    }
    server = start_server(env, tmp_path / "server.log")
    seen = []
    try:
        wait_ready(server)
        with httpx.Client(base_url=server.url, timeout=30) as c:
            body = {"image": b64(png(1)), "question": QUESTION}
            for headers in (
                {"X-API-Key": KEYS[0]},
                {"Authorization": f"Bearer {KEYS[1]}"},
                {"X-API-Key": KEYS[2] + "-wrong"},
                {"Authorization": f"Bearer {KEYS[0][:-3]}"},
                {"X-API-Key": ""},
            ):
                for r in (c.post("/vqa", json=body, headers=headers), c.get("/images/nope", headers=headers)):
                    seen.append(r.text + str(r.headers))
            for path in ("/metrics", "/readyz", "/openapi.json", "/healthz"):
                seen.append(c.get(path).text)
    finally:
        stop_server(server)
    log = server.log_text()
    assert " 200" in log and " 401" in log  # the access log is on: the check below is not vacuous
    assert "SECRET" not in log, [line for line in log.splitlines() if "SECRET" in line]
    assert not [s for s in seen if "SECRET" in s]


# --- CORS ----------------------------------------------------------------------------------------------------


def test_cors_is_off_by_default_and_never_a_wildcard_with_credentials(tiny_bundle: Path, tmp_path: Path) -> None:
    assert Settings(bundles=[tiny_bundle]).cors_origins == []  # type: ignore[arg-type]
    off = create_app(Settings(bundles=[tiny_bundle], store=tmp_path))  # type: ignore[arg-type]
    assert not [m for m in off.user_middleware if m.cls is CORSMiddleware]
    on = create_app(Settings(bundles=[tiny_bundle], store=tmp_path, cors_origins="https://app.example"))  # type: ignore[arg-type]
    (cors,) = [m for m in on.user_middleware if m.cls is CORSMiddleware]
    assert cors.kwargs["allow_origins"] == ["https://app.example"]
    assert not cors.kwargs.get("allow_credentials") and "*" not in cors.kwargs["allow_origins"]
    with TestClient(on) as c:
        r = c.get("/healthz", headers={"Origin": "https://app.example"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-credentials" not in r.headers


# --- containers ----------------------------------------------------------------------------------------------


def image_stages(dockerfile: str) -> dict[str, list[str]]:
    """Instructions (continuation lines joined) of each stage that defines a CMD or ENTRYPOINT: the images."""
    lines = re.sub(r"\\\n", " ", dockerfile).splitlines()
    stages: dict[str, list[str]] = {}
    name = ""
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            match = re.search(r"\bAS\s+(\S+)", line, re.IGNORECASE)
            name = match.group(1) if match else f"stage{len(stages)}"
            stages[name] = []
        elif name:
            stages[name].append(line)
    return {n: ins for n, ins in stages.items() if any(i.split()[0].upper() in ("CMD", "ENTRYPOINT") for i in ins)}


def test_every_image_runs_as_a_non_root_user() -> None:
    stages = image_stages((REPO / "Dockerfile").read_text())
    assert {"runtime", "trainer"} <= set(stages), list(stages)
    for name, instructions in stages.items():
        users = [i.split()[1] for i in instructions if i.upper().startswith("USER ")]
        assert users, f"stage {name} has no USER: it would run as root"
        user, _, group = users[-1].partition(":")
        assert user not in ("0", "root") and group not in ("0", "root"), f"stage {name} runs as {users[-1]}"
        last_user = max(i for i, ins in enumerate(instructions) if ins.upper().startswith("USER "))
        assert not [i for i in instructions[last_user:] if i.upper().startswith("RUN ")], f"{name}: RUN after USER"


def test_compose_and_kubernetes_keep_the_containers_unprivileged() -> None:
    for path in sorted(REPO.glob("docker-compose*.yml")):
        for name, service in (yaml.safe_load(path.read_text()).get("services") or {}).items():
            assert str(service.get("user", "")).split(":")[0] not in ("0", "root"), f"{path.name}: {name} as root"
            assert not service.get("privileged"), f"{path.name}: {name} is privileged"
    for path in sorted((REPO / "deploy" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            spec = ((doc or {}).get("spec") or {}).get("template", {}).get("spec")
            if not spec:
                continue
            assert spec.get("securityContext", {}).get("runAsNonRoot") is True, path.name
            for container in spec.get("containers", []) + spec.get("initContainers", []):
                context = container.get("securityContext", {})
                assert context.get("allowPrivilegeEscalation") is False, f"{path.name}: {container['name']}"
                assert not context.get("privileged"), f"{path.name}: {container['name']}"
