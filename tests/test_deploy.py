"""Static checks of the deployment files: docker-compose.yml, infra/Dockerfile.*, .env.example and
.dockerignore.

There is no Docker engine where the tests run, so the files are parsed, not run: the compose file
with PyYAML (plus a small reimplementation of compose's `${...}` interpolation), the Dockerfiles
line by line. core/settings.py's docstring is the list of farm variables they must agree with.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import json
import re
import shlex
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.redis_url import parse_sentinel_url
from core.settings import MODELS, Settings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
API_DOCKERFILE = ROOT / "infra" / "Dockerfile.api"
WORKER_DOCKERFILE = ROOT / "infra" / "Dockerfile.worker"
DOCKERFILES = (API_DOCKERFILE, WORKER_DOCKERFILE)

# Settings compose must refuse to start without, rather than run with an empty value.
REQUIRED_SECRETS = ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "REDIS_PASSWORD")
# What the API and every worker need to find the queue and the results bucket.
CONNECTION_ENV = (
    "DALLE_FARM_REDIS_URL",
    "DALLE_FARM_S3_ENDPOINT_URL",
    "DALLE_FARM_S3_BUCKET",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
)
WAITING_CONDITIONS = {"service_healthy", "service_completed_successfully"}
FARM_VARIABLE = re.compile(r"\b(?:DALLE_FARM|AWS)_[A-Z0-9_]+\b")


# -- compose ----------------------------------------------------------------------------------


@functools.cache
def compose_text() -> str:
    return COMPOSE_FILE.read_text(encoding="utf-8")


@functools.cache
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(compose_text())
    assert isinstance(loaded, dict), "docker-compose.yml is not a mapping"
    return loaded


def services() -> dict[str, dict[str, Any]]:
    found = compose().get("services")
    assert isinstance(found, dict) and found, "docker-compose.yml has no services"
    return found


def environment(service: str) -> dict[str, str]:
    """A service's environment as a mapping (compose allows a mapping or a list of NAME=value)."""
    raw = services()[service].get("environment") or {}
    if isinstance(raw, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {name: "" if value is None else str(value) for name, value in raw.items()}


def command_words(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(word) for word in value]


def bucket_service() -> str:
    """The one-shot service that creates the results bucket with `mc mb`."""
    for name, service in services().items():
        if "mc mb" in " ".join(command_words(service.get("command"))):
            return name
    raise AssertionError("no service creates the bucket (`mc mb`)")


def referenced_variables(text: str) -> set[str]:
    """Names in `${...}` expressions, nested ones included; `$${...}` is a literal."""
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text.replace("$$", "")))


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Compose's interpolation: $$, $NAME and ${NAME}, ${NAME:-default}, ${NAME-default},
    ${NAME:?error}, ${NAME?error} and ${NAME:+value}, with nesting inside the braces."""
    out: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char != "$":
            out.append(char)
            index += 1
        elif text.startswith("$$", index):
            out.append("$")
            index += 2
        elif text.startswith("${", index):
            end = index + 2
            depth = 1
            while depth:
                if end >= len(text):
                    raise ValueError(f"unclosed ${{ in {text!r}")
                depth += {"{": 1, "}": -1}.get(text[end], 0)
                end += 1
            out.append(_expand(text[index + 2 : end - 1], variables))
            index = end
        else:
            match = re.match(r"\$([A-Za-z_][A-Za-z0-9_]*)", text[index:])
            if match is None:
                out.append(char)
                index += 1
            else:
                out.append(variables.get(match.group(1), ""))
                index += match.end()
    return "".join(out)


def _expand(expression: str, variables: Mapping[str, str]) -> str:
    match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", expression, re.DOTALL)
    if match is None:
        raise ValueError(f"not a compose variable expression: ${{{expression}}}")
    name, operator, operand = match.groups()
    value = variables.get(name)
    is_set = value is not None and (value != "" or not (operator or "").startswith(":"))
    if operator is None:
        return value or ""
    if operator.endswith("-"):
        return value if is_set and value is not None else interpolate(operand, variables)
    if operator.endswith("?"):
        if not is_set or value is None:
            raise KeyError(f"{name}: {interpolate(operand, variables)}")
        return value
    return interpolate(operand, variables) if is_set else ""


def interpolate_tree(node: Any, variables: Mapping[str, str]) -> Any:
    """The parsed compose file with every string interpolated, as compose does before use."""
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, list):
        return [interpolate_tree(item, variables) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, variables) for key, value in node.items()}
    return node


def resolved_environment(service: str, variables: Mapping[str, str]) -> dict[str, str]:
    return {name: interpolate(value, variables) for name, value in environment(service).items()}


# -- .env.example, settings.py, pyproject.toml ------------------------------------------------


@functools.cache
def env_example_lines() -> list[str]:
    return ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()


def env_example_entries() -> Iterator[tuple[int, str, str, bool]]:
    """(line index, name, value, commented out) for each `NAME=value` or `# NAME=value` line."""
    for index, line in enumerate(env_example_lines()):
        match = re.fullmatch(r"(#\s*)?([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            yield index, match.group(2), match.group(3), match.group(1) is not None


def env_example_documented() -> set[str]:
    return {name for _, name, _, _ in env_example_entries()}


def env_example_values() -> dict[str, str]:
    """What compose would read from a .env copied from .env.example."""
    return {name: value for _, name, value, commented in env_example_entries() if not commented}


@functools.cache
def settings_variables() -> frozenset[str]:
    """Every variable core/settings.py's docstring lists: the source of truth."""
    source = (ROOT / "core" / "settings.py").read_text(encoding="utf-8")
    docstring = ast.get_docstring(ast.parse(source)) or ""
    names = frozenset(FARM_VARIABLE.findall(docstring))
    assert "DALLE_FARM_REDIS_URL" in names, "core/settings.py's docstring lists no variables"
    return names


@functools.cache
def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)


def requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, f"not a requirement: {requirement!r}"
    return match.group(0).lower().replace("_", "-")


# -- Dockerfiles ------------------------------------------------------------------------------


@functools.cache
def instructions(path: Path) -> tuple[tuple[str, str], ...]:
    """(KEYWORD, arguments) per instruction: `\\` continuations joined, comment lines dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, arguments = full.partition(" ")
        found.append((keyword.upper(), arguments.strip()))
    assert not pending, f"{path.name} ends inside a `\\` continuation"
    return tuple(found)


def arguments_of(path: Path, keyword: str) -> list[str]:
    return [arguments for found, arguments in instructions(path) if found == keyword]


def exec_form(arguments: str) -> list[str]:
    """The words of a CMD/ENTRYPOINT in JSON (exec) form, or of its shell form."""
    if arguments.startswith("["):
        words = json.loads(arguments)
        assert isinstance(words, list)
        return [str(word) for word in words]
    return shlex.split(arguments)


def shell_commands(path: Path) -> list[list[str]]:
    """Each simple command of every RUN, split at &&, ||, ; and |."""
    commands: list[list[str]] = []
    for arguments in arguments_of(path, "RUN"):
        current: list[str] = []
        for word in shlex.split(arguments):
            if word in ("&&", "||", ";", "|"):
                commands.append(current)
                current = []
            else:
                current.append(word)
        commands.append(current)
    return [command for command in commands if command]


def pip_installs(path: Path) -> list[list[str]]:
    """The arguments after `pip install` (or `python -m pip install`) of each such command."""
    found = []
    for command in shell_commands(path):
        words = command[2:] if command[:2] == ["python", "-m"] else command
        if words[:2] in (["pip", "install"], ["pip3", "install"]):
            found.append(words[2:])
    return found


def copy_sources(path: Path) -> list[str]:
    """Build-context paths that COPY and ADD take (not those copied from another stage)."""
    sources: list[str] = []
    for keyword, arguments in instructions(path):
        if keyword not in ("COPY", "ADD"):
            continue
        words = exec_form(arguments)
        if any(word.startswith("--from=") for word in words):
            continue
        paths = [word for word in words if not word.startswith("--")]
        sources.extend(paths[:-1])
    return sources


def base_image(path: Path) -> str:
    """The FROM image, with ARG defaults declared before FROM filled in."""
    defaults: dict[str, str] = {}
    for keyword, arguments in instructions(path):
        if keyword == "ARG" and "=" in arguments:
            name, _, value = arguments.partition("=")
            defaults[name] = value.strip("\"'")
        elif keyword == "FROM":
            return interpolate(arguments.split()[0], defaults)
    raise AssertionError(f"{path.name} has no FROM")


@functools.cache
def dockerignore_patterns() -> tuple[str, ...]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return tuple(
        line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")
    )


def is_ignored(relative_path: str) -> bool:
    """Whether .dockerignore drops the path or a folder above it (plain and **/ patterns)."""
    parts = Path(relative_path).parts
    prefixes = ["/".join(parts[: count + 1]) for count in range(len(parts))]
    for pattern in dockerignore_patterns():
        if pattern.startswith("!"):
            continue
        for prefix in prefixes:
            name = prefix.rsplit("/", 1)[-1]
            if fnmatch.fnmatchcase(prefix, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatchcase(name, pattern[3:])
            ):
                return True
    return False


# -- compose: services, health, waiting --------------------------------------------------------


def test_compose_has_the_farm_services() -> None:
    names = set(services())
    assert {"redis", "minio", "api", "worker"} <= names
    assert bucket_service() in names


def test_redis_persists_its_data_and_never_evicts() -> None:
    redis = services()["redis"]
    words = command_words(redis.get("command"))
    assert words[:1] == ["redis-server"]
    options = dict(zip(words[1::2], words[2::2], strict=False))
    assert options.get("--appendonly") == "yes", words
    assert options.get("--maxmemory-policy") == "noeviction", words
    assert any(str(volume).endswith(":/data") for volume in redis.get("volumes", []))


def test_every_dependency_waits_for_health_or_completion() -> None:
    for name, service in services().items():
        depends_on = service.get("depends_on")
        if depends_on is None:
            continue
        assert isinstance(depends_on, dict), f"{name}: depends_on must give a condition per service"
        for dependency, spec in depends_on.items():
            condition = (spec or {}).get("condition")
            assert condition in WAITING_CONDITIONS, f"{name} → {dependency}: {condition!r}"
            if condition == "service_healthy":
                assert "healthcheck" in services()[dependency], f"{dependency} has no healthcheck"
            else:
                assert services()[dependency].get("restart") == "no", (
                    f"{dependency} must not restart, or it never completes"
                )


@pytest.mark.parametrize("service", ["redis", "minio", "api"])
def test_long_running_services_have_healthchecks(service: str) -> None:
    healthcheck = services()[service].get("healthcheck") or {}
    test = healthcheck.get("test")
    assert test and not healthcheck.get("disable"), f"{service} has no healthcheck"
    assert command_words(test)[0] in ("CMD", "CMD-SHELL"), test


def test_api_and_worker_wait_for_the_bucket() -> None:
    for name in ("api", "worker"):
        depends_on = services()[name]["depends_on"]
        assert depends_on["redis"]["condition"] == "service_healthy"
        assert depends_on["minio"]["condition"] == "service_healthy"
        assert depends_on[bucket_service()]["condition"] == "service_completed_successfully"


def test_worker_reserves_nvidia_gpus_and_finishes_its_job_on_stop() -> None:
    worker = services()["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        device.get("driver") == "nvidia" and "gpu" in device.get("capabilities", [])
        for device in devices
    ), devices
    grace = re.fullmatch(r"(\d+)(s|m)", str(worker.get("stop_grace_period", "")))
    assert grace, "the worker needs a stop_grace_period long enough to finish a job"
    assert int(grace.group(1)) * {"s": 1, "m": 60}[grace.group(2)] >= 60


def test_compose_builds_the_images_from_the_repository_root() -> None:
    for name, dockerfile in (("api", API_DOCKERFILE), ("worker", WORKER_DOCKERFILE)):
        build = services()[name]["build"]
        assert build["context"] == "."
        assert ROOT / build["dockerfile"] == dockerfile


def test_compose_commands_run_the_farm() -> None:
    assert command_words(services()["api"]["command"])[:2] == ["dalle-farm", "api"]
    assert command_words(services()["worker"]["command"])[:2] == ["dalle-farm", "worker"]


# -- compose: secrets and settings -------------------------------------------------------------


def test_compose_interpolates_with_the_env_example() -> None:
    resolved = interpolate_tree(compose(), env_example_values())
    assert resolved["services"]["redis"]["command"][-1] == env_example_values()["REDIS_PASSWORD"]


@pytest.mark.parametrize("secret", REQUIRED_SECRETS)
def test_required_secrets_have_no_default(secret: str) -> None:
    text = compose_text()
    assert f"${{{secret}:?" in text, f"{secret} must be required with ${{{secret}:?...}}"
    assert not re.search(rf"\$\{{{secret}:?-", text), f"{secret} must not have a default"
    values = env_example_values()
    del values[secret]
    with pytest.raises(KeyError, match=secret):
        interpolate_tree(compose(), values)


def test_api_and_worker_reach_the_same_queue_and_bucket() -> None:
    for service in ("api", "worker"):
        missing = [name for name in CONNECTION_ENV if name not in environment(service)]
        assert not missing, f"{service} does not set {missing}"
    api = resolved_environment("api", env_example_values())
    worker = resolved_environment("worker", env_example_values())
    for name in CONNECTION_ENV:
        assert api[name] == worker[name], name


@pytest.mark.parametrize("service", ["api", "worker"])
def test_compose_environment_is_valid_for_settings(service: str) -> None:
    variables = env_example_values()
    env = resolved_environment(service, variables)
    settings = Settings.from_env(env)
    assert settings.redis_url == f"redis://:{variables['REDIS_PASSWORD']}@redis:6379/0"
    assert settings.s3_endpoint_url == "http://minio:9000"
    assert settings.s3_bucket == variables["DALLE_FARM_S3_BUCKET"]
    assert settings.model in MODELS
    assert env["AWS_ACCESS_KEY_ID"] == variables["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == variables["MINIO_ROOT_PASSWORD"]
    bucket_env = resolved_environment(bucket_service(), variables)
    assert bucket_env["DALLE_FARM_S3_BUCKET"] == settings.s3_bucket
    # Workers load the model from the weights folder; the API reads its tokenizer files.
    assert str(settings.models_root) == "/models"
    volumes = [interpolate(volume, variables) for volume in services()[service]["volumes"]]
    assert any(volume.split(":")[1:] == ["/models", "ro"] for volume in volumes), volumes


SERVER_ENV = (
    "DALLE_FARM_REQUEST_TIMEOUT_S",
    "DALLE_FARM_IDLE_TIMEOUT_S",
    "DALLE_FARM_MAX_CONNECTIONS",
    "DALLE_FARM_MAX_HEADER_BYTES",
    "DALLE_FARM_MAX_EVENT_STREAMS",
)


def test_the_api_passes_its_http_server_settings() -> None:
    """The API's port is published directly (no proxy), so its timeouts and limits must be
    settable from .env; empty values keep core/settings.py's defaults."""
    missing = [name for name in SERVER_ENV if name not in environment("api")]
    assert not missing, f"the api service does not set {missing}"
    env = resolved_environment("api", env_example_values())
    defaults = {name: value for name, value in env.items() if name not in SERVER_ENV}
    assert Settings.from_env(env) == Settings.from_env(defaults)
    variables = env_example_values() | {"DALLE_FARM_REQUEST_TIMEOUT_S": "12"}
    assert Settings.from_env(resolved_environment("api", variables)).request_timeout_s == 12


def test_a_gpu_node_can_point_the_worker_at_another_host() -> None:
    variables = env_example_values() | {
        "DALLE_FARM_REDIS_URL": "redis://:secret@head.internal:6379/0",
        "DALLE_FARM_S3_ENDPOINT_URL": "http://head.internal:9000",
    }
    settings = Settings.from_env(resolved_environment("worker", variables))
    assert settings.redis_url == "redis://:secret@head.internal:6379/0"
    assert settings.s3_endpoint_url == "http://head.internal:9000"


def test_farm_variables_in_compose_exist_in_settings_and_env_example() -> None:
    used = {
        name
        for service in services()
        for name in environment(service)
        if name.startswith("DALLE_FARM_")
    } | {name for name in referenced_variables(compose_text()) if name.startswith("DALLE_FARM_")}
    assert used, "compose sets no DALLE_FARM_* variable"
    assert used <= settings_variables(), used - settings_variables()
    assert used <= env_example_documented(), used - env_example_documented()


def test_every_compose_variable_is_documented_in_env_example() -> None:
    undocumented = referenced_variables(compose_text()) - env_example_documented()
    assert not undocumented, f"add to .env.example: {sorted(undocumented)}"


def test_every_settings_variable_is_in_env_example() -> None:
    missing = settings_variables() - env_example_documented()
    assert not missing, f"add to .env.example: {sorted(missing)}"


def test_env_example_explains_each_variable() -> None:
    lines = env_example_lines()
    for index, name, _, _ in env_example_entries():
        assert index and lines[index - 1].startswith("#"), f".env.example: no comment above {name}"


# -- Dockerfiles --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_starts_from_a_base_image(path: Path) -> None:
    keywords = [keyword for keyword, _ in instructions(path)]
    assert "FROM" in keywords
    assert set(keywords[: keywords.index("FROM")]) <= {"ARG"}, "only ARG may precede FROM"


def test_api_image_is_slim_python_and_the_worker_image_has_cuda() -> None:
    assert base_image(API_DOCKERFILE).startswith("python:3.11-slim")
    assert "cuda" in base_image(WORKER_DOCKERFILE)


def test_api_image_never_installs_torch() -> None:
    installs = pip_installs(API_DOCKERFILE)
    assert installs, "the API image installs nothing with pip"
    for arguments in installs:
        requirements = [word for word in arguments if not word.startswith("-")]
        assert "torch" not in {requirement_name(word) for word in requirements if word != "."}
        if "." in arguments:
            assert "--no-deps" in arguments, "the project must be installed with --no-deps"
    assert any("." in arguments for arguments in installs), "the API image never installs ."


def test_api_image_installs_pyproject_dependencies_except_torch() -> None:
    """The explicit list in the API image must follow pyproject.toml's, less torch."""
    expected = {
        requirement
        for requirement in pyproject()["project"]["dependencies"]
        if requirement_name(requirement) != "torch"
    }
    listed = {
        word
        for arguments in pip_installs(API_DOCKERFILE)
        for word in arguments
        if not word.startswith("-") and word != "."
    }
    assert listed == expected, (
        f"missing: {expected - listed}; not in pyproject: {listed - expected}"
    )


def test_worker_image_installs_the_project() -> None:
    installs = pip_installs(WORKER_DOCKERFILE)
    assert any("." in arguments for arguments in installs), "the worker image never installs ."


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_images_run_as_a_non_root_user(path: Path) -> None:
    users = arguments_of(path, "USER")
    assert users, f"{path.name} sets no USER"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_api_image_exposes_8000_and_checks_health() -> None:
    assert any("8000" in arguments.split() for arguments in arguments_of(API_DOCKERFILE, "EXPOSE"))
    (healthcheck,) = arguments_of(API_DOCKERFILE, "HEALTHCHECK")
    assert "/healthz" in healthcheck


@pytest.mark.parametrize(
    ("path", "command"), [(API_DOCKERFILE, "api"), (WORKER_DOCKERFILE, "worker")]
)
def test_images_run_the_farm_command(path: Path, command: str) -> None:
    cmd = arguments_of(path, "CMD")
    assert cmd, f"{path.name} has no CMD"
    assert exec_form(cmd[-1])[:2] == ["dalle-farm", command]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_copied_files_exist_and_reach_the_build_context(path: Path) -> None:
    sources = copy_sources(path)
    assert sources, f"{path.name} copies nothing"
    for source in sources:
        assert (ROOT / source).exists(), f"{path.name} copies {source}, which does not exist"
        assert not is_ignored(source), f"{path.name} copies {source}, which .dockerignore drops"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_images_copy_what_the_package_build_needs(path: Path) -> None:
    copied = {source.rstrip("/") for source in copy_sources(path)}
    project = pyproject()
    packages = project["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = {"pyproject.toml", project["project"]["readme"]}
    needed |= {pattern.rstrip("*") for pattern in packages}
    assert needed <= copied, f"{path.name} does not copy {sorted(needed - copied)}"


# -- .dockerignore ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [".venv", ".git", ".env", "pretrained", "dalle-farm-data"])
def test_dockerignore_keeps_local_state_out_of_the_context(path: str) -> None:
    assert is_ignored(path)


def test_dockerignore_keeps_the_env_example() -> None:
    assert not is_ignored(".env.example")


SENTINEL_FILE = ROOT / "infra" / "docker-compose.sentinel.yml"


def test_the_sentinel_option_fails_over_to_a_replica_the_farm_follows() -> None:
    """infra/docker-compose.sentinel.yml: two replicas of `redis`, three sentinels with a quorum
    of two watching it, and the farm's services pointed at the sentinels."""
    text = SENTINEL_FILE.read_text(encoding="utf-8")
    assert referenced_variables(text) <= env_example_documented() | {"REDIS_PASSWORD"}
    overlay = yaml.safe_load(text)
    added = overlay["services"]
    # Two replicas, so that one can be lost or promoted and new jobs are still confirmed on
    # a replica (DALLE_FARM_REDIS_CONFIRM_REPLICAS is 1 with sentinels).
    for name in ("redis-replica", "redis-replica-2"):
        replica = command_words(added[name]["command"])
        assert replica[replica.index("--replicaof") + 1 :][:2] == ["redis", "6379"]
        assert replica[replica.index("--replica-announce-ip") + 1] == name
        assert "--masterauth" in replica
    assert "--masterauth" in command_words(added["redis"]["command"])
    sentinels = [name for name in added if name.startswith("sentinel-")]
    assert len(sentinels) == 3
    for name in sentinels:
        script = " ".join(command_words(added[name]["command"]))
        monitor = re.search(r"sentinel monitor (\S+) (\S+) (\d+) (\d+)", script)
        assert monitor is not None and monitor.groups() == ("farm", "redis", "6379", "2")
        assert "sentinel auth-pass farm" in script and "--sentinel" in script
    variables = env_example_values()
    for service in ("api", "worker"):
        url = interpolate(added[service]["environment"]["DALLE_FARM_REDIS_URL"], variables)
        target = parse_sentinel_url(url)
        assert target.service == "farm"
        assert {host for host, _ in target.sentinels} == set(sentinels)
        assert target.password == variables["REDIS_PASSWORD"]
        assert Settings.from_env({"DALLE_FARM_REDIS_URL": url}).redis_url == url
        waits = added[service]["depends_on"]
        assert all(waits[name]["condition"] == "service_healthy" for name in sentinels)
