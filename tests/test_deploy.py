"""The deployment files hold what Ray, KubeRay and Docker need: deploy/rayjob.yaml (a KubeRay RayJob),
deploy/runtime_env.yaml (a Ray runtime_env), the Dockerfile and ray_cluster.yaml (the AWS launcher)."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from ray.runtime_env import RuntimeEnv

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
RAYJOB = DEPLOY / "rayjob.yaml"
RUNTIME_ENV = DEPLOY / "runtime_env.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CLUSTER = ROOT / "ray_cluster.yaml"

TORCH_PIN = "torch==2.13.0"
TORCH_INDEX = "https://download.pytorch.org/whl/cu128"
# runtime_env fields a user may set (RuntimeEnv accepts any other name as a plugin's, so typos pass it).
RUNTIME_ENV_FIELDS = {f for f in RuntimeEnv.known_fields if not f.startswith("_")}
SECRET_NAME = re.compile(r"(?:^|_)(?:SECRET|TOKEN|PASSWORD|ACCESS_KEY)(?:_|$)", re.IGNORECASE)


# ---- shared inputs ----


@pytest.fixture(scope="module")
def vqa_options() -> set[str]:
    """Every option `python -m jobs.vqa --help` lists (the job's real argparse parser)."""
    out = subprocess.run(
        [sys.executable, "-m", "jobs.vqa", "--help"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    ).stdout
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out))
    assert {"--manifest", "--output", "--num-actors"} <= options, out
    return options


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


@pytest.fixture(scope="module")
def cluster_spec(rayjob) -> dict:
    return rayjob["spec"]["rayClusterSpec"]


@pytest.fixture(scope="module")
def gpu_group(cluster_spec) -> dict:
    (group,) = [g for g in cluster_spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    return group


def pod_specs(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]
    ]


def entrypoint_options(entrypoint: str) -> tuple[list[str], dict[str, str | None]]:
    """`python -m jobs.vqa --a 1 --b --c=2` → (["python", "-m", "jobs.vqa"], {"--a": "1", "--b": None, "--c": "2"})."""
    argv = shlex.split(entrypoint)
    command, rest = argv[:3], argv[3:]
    options: dict[str, str | None] = {}
    i = 0
    while i < len(rest):
        token = rest[i]
        assert token.startswith("--"), f"stray argument {token!r} in the entrypoint"
        name, eq, value = token.partition("=")
        if not eq and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            value, i = rest[i + 1], i + 1
        options[name] = value if (eq or value) else None
        i += 1
    return command, options


# ---- a Dockerfile reader: instructions, stages, ARG/ENV substitution, pip commands ----


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int
    env: dict[str, str] = field(default_factory=dict)  # RUN: the ARG/ENV values its shell sees


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)
    variables: dict[str, str] = field(default_factory=dict)


def dockerfile_instructions(text: str) -> list[Instruction]:
    """Instructions as Docker reads them: a trailing backslash continues the line; comment lines
    (parser directives included) are dropped, also inside a continued instruction; blank lines too."""
    instructions, parts, start = [], [], 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not parts:
            start = number
        continued = stripped.endswith("\\")
        parts.append(stripped[:-1].strip() if continued else stripped)
        if not continued:
            keyword, _, args = " ".join(parts).partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip(), start))
            parts = []
    assert not parts, "the Dockerfile ends inside a continued instruction"
    return instructions


def substitute(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), value)


def assignments(args: str) -> dict[str, str]:
    """`ARG A=1 B` / `ENV A=1 B="x y"` → {"A": "1", "B": ...}; `ENV A 1` (the old form) too."""
    tokens = shlex.split(args)
    if len(tokens) >= 2 and "=" not in tokens[0]:
        return {tokens[0]: " ".join(tokens[1:])}
    return {k: v for k, _, v in (t.partition("=") for t in tokens)}


def dockerfile_stages(text: str) -> list[Stage]:
    """The stages, each with its instructions; ARG defaults (global ones redeclared in the stage)
    and ENV values are substituted into later instructions of the stage."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in dockerfile_instructions(text):
        if ins.keyword == "FROM":
            tokens = [t for t in shlex.split(ins.args) if not t.startswith("--")]
            image = substitute(tokens[0], global_args)
            name = tokens[2] if len(tokens) == 3 and tokens[1].upper() == "AS" else None
            stages.append(Stage(image, name))
        elif not stages:
            assert ins.keyword == "ARG", f"line {ins.line}: only ARG may come before the first FROM"
            global_args.update(assignments(ins.args))
        else:
            stage = stages[-1]
            if ins.keyword == "ARG":
                for k, v in assignments(ins.args).items():
                    stage.variables[k] = substitute(v, stage.variables) if v else global_args.get(k, "")
            elif ins.keyword == "ENV":
                stage.variables.update({k: substitute(v, stage.variables) for k, v in assignments(ins.args).items()})
            if ins.keyword == "RUN":  # the shell expands its variables, with the values of this point
                stage.instructions.append(Instruction("RUN", ins.args, ins.line, dict(stage.variables)))
            else:
                stage.instructions.append(Instruction(ins.keyword, substitute(ins.args, stage.variables), ins.line))
    return stages


def run_commands(ins: Instruction) -> list[list[str]]:
    """A shell-form RUN's simple commands (split at && ; | ||), without RUN's own --flags or leading
    VAR=value assignments, with the ARG/ENV values of that point substituted (what the shell would see)."""
    if ins.args.startswith("["):
        return [json.loads(ins.args)]
    lexer = shlex.shlex(substitute(ins.args, ins.env), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in {"&&", "||", ";", "|", "(", ")"}:
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    while commands[0] and commands[0][0].startswith("--"):  # RUN's own flags: --mount=..., --network=...
        commands[0].pop(0)
    commands = [c[next((i for i, t in enumerate(c) if not re.fullmatch(r"\w+=.*", t)), len(c)) :] for c in commands]
    return [c for c in commands if c]


OPTIONS_WITH_VALUE = {
    "-i", "--index-url", "--extra-index-url", "-c", "--constraint", "-r", "--requirement",
    "-f", "--find-links", "-w", "--wheel-dir", "-t", "--target",
}  # fmt: skip


@dataclass
class PipCall:
    stage: int
    position: int  # the instruction's index in its stage
    subcommand: str  # install / wheel
    requirements: list[str]
    options: dict[str, str | None]


def pip_calls(stages: list[Stage]) -> list[PipCall]:
    calls = []
    for s, stage in enumerate(stages):
        for p, ins in enumerate(stage.instructions):
            if ins.keyword != "RUN":
                continue
            for argv in run_commands(ins):
                if Path(argv[0]).name in {"pip", "pip3"}:
                    rest = argv[1:]
                elif Path(argv[0]).name.startswith("python") and argv[1:3] == ["-m", "pip"]:
                    rest = argv[3:]
                else:
                    continue
                if not rest or rest[0] not in {"install", "wheel"}:
                    continue
                requirements, options, i = [], {}, 1
                while i < len(rest):
                    token = rest[i]
                    if token.startswith("-"):
                        name, eq, value = token.partition("=")
                        if not eq and name in OPTIONS_WITH_VALUE:
                            value, i = rest[i + 1], i + 1
                        options[name] = value if (eq or name in OPTIONS_WITH_VALUE) else None
                    else:
                        requirements.append(token)
                    i += 1
                calls.append(PipCall(s, p, rest[0], requirements, options))
    return calls


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return dockerfile_stages(DOCKERFILE.read_text())


def test_dockerfile_reader_handles_continuations_comments_and_args():
    text = (
        "# syntax=docker/dockerfile:1\nARG V=1.0\nFROM base:${V} AS b\nARG V\nENV P=/x \\\n"
        "    Q=y\nRUN --mount=type=cache,target=/c a=1 pip install \\\n  # a comment inside\n"
        '  "pkg==${V}" -i https://i && echo $P\nRUN python3 -m pip wheel --no-deps x\n'
    )
    (stage,) = dockerfile_stages(text)
    assert (stage.image, stage.name) == ("base:1.0", "b")
    assert stage.variables == {"V": "1.0", "P": "/x", "Q": "y"}
    run = stage.instructions[-2]
    assert run_commands(run) == [["pip", "install", "pkg==1.0", "-i", "https://i"], ["echo", "/x"]]
    install, wheel = pip_calls([stage])
    assert (install.subcommand, install.requirements, install.options) == ("install", ["pkg==1.0"], {"-i": "https://i"})
    assert (wheel.subcommand, wheel.position, wheel.requirements) == ("wheel", 3, ["x"])
    assert wheel.options == {"--no-deps": None}


# ---- deploy/rayjob.yaml ----


def test_rayjob_is_a_rayjob_that_cleans_up(rayjob, cluster_spec, stages):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert cluster_spec["enableInTreeAutoscaling"] is True
    # rayVersion tells KubeRay which Ray it is dealing with: the one the image pins.
    (ray_pin,) = [r for c in pip_calls(stages) for r in c.requirements if re.match(r"ray(\[.*\])?==", r)]
    assert cluster_spec["rayVersion"] == ray_pin.split("==")[1]


def test_rayjob_entrypoint_uses_real_job_options(rayjob, gpu_group, vqa_options):
    command, options = entrypoint_options(rayjob["spec"]["entrypoint"])
    assert command == ["python", "-m", "jobs.vqa"]
    unknown = set(options) - vqa_options
    assert not unknown, f"options `python -m jobs.vqa --help` does not list: {sorted(unknown)}"
    assert options["--manifest"].startswith("s3://")
    assert options["--output"].startswith("s3://")
    # The GPU group may be at zero pods when the job starts: the job must ask for GPUs itself,
    # and for no more actors than the group can hold (one GPU per pod).
    assert float(options["--gpus-per-actor"]) == 1
    assert 1 <= int(options.get("--num-actors") or 1) <= gpu_group["maxReplicas"]


def test_rayjob_runtime_env_is_valid(rayjob, cluster_spec, stages):
    text = rayjob["spec"]["runtimeEnvYAML"]
    assert isinstance(text, str)
    env = yaml.safe_load(text)
    assert isinstance(env, dict) and env
    assert set(env) <= RUNTIME_ENV_FIELDS, f"not runtime_env fields: {sorted(set(env) - RUNTIME_ENV_FIELDS)}"
    RuntimeEnv(**env)  # raises on malformed fields (env_vars not str → str, bad pip, ...)
    assert "working_dir" not in env, "the image holds the package; a local working_dir does not exist in the pod"
    # The HF cache is where the image puts it and where the pods mount a volume.
    hf_home = env["env_vars"]["HF_HOME"]
    assert stages[-1].variables["HF_HOME"] == hf_home
    for pod in pod_specs(cluster_spec):
        mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert hf_home in mounts


def test_rayjob_head_is_cpu_only_and_gpu_group_autoscales(cluster_spec, gpu_group):
    head = cluster_spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head["rayStartParams"]["num-gpus"] == "0"
    for group in [head, *cluster_spec["workerGroupSpecs"]]:
        # KubeRay's rayStartParams is a map of strings: a bare number or boolean is refused.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]
    (head_container,) = head["template"]["spec"]["containers"]
    for kind in ("requests", "limits"):
        assert "nvidia.com/gpu" not in head_container["resources"].get(kind, {})

    assert 0 <= gpu_group["minReplicas"] <= gpu_group["replicas"] <= gpu_group["maxReplicas"]
    assert gpu_group["maxReplicas"] >= 1
    (worker,) = gpu_group["template"]["spec"]["containers"]
    for kind in ("requests", "limits"):
        resources = worker["resources"][kind]
        assert int(resources["nvidia.com/gpu"]) == 1
        assert resources["cpu"] and resources["memory"]
    assert worker["image"] == head_container["image"]
    assert worker["image"] == "ghcr.io/example/glimpse-batch:latest"


def test_rayjob_takes_s3_credentials_from_a_secret_or_a_service_account(cluster_spec):
    for pod in pod_specs(cluster_spec):
        for container in pod["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            for e in env.values():
                if SECRET_NAME.search(e["name"]):
                    assert "value" not in e, f"literal {e['name']} in {container['name']}"
                    assert e["valueFrom"]["secretKeyRef"]["name"] and e["valueFrom"]["secretKeyRef"]["key"]
            # Both the driver (head) and the workers reach S3: each pod gets keys or an IRSA account.
            if "serviceAccountName" not in pod:
                assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env), container["name"]


AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
AWS_SECRET_VALUE = re.compile(r"(?i)(?:secret_access_key|aws_secret)[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+]{40}\b")


@pytest.mark.parametrize(
    "path", [RAYJOB, RUNTIME_ENV, DEPLOY / "README.md", DOCKERFILE, DOCKERIGNORE, CLUSTER], ids=lambda p: p.name
)
def test_no_literal_aws_secrets(path):
    text = path.read_text()
    assert not AWS_KEY_ID.search(text)
    assert not AWS_SECRET_VALUE.search(text)
    if path.suffix == ".yaml":
        env_vars = {}
        if path == RAYJOB:
            env_vars = yaml.safe_load(yaml.safe_load(text)["spec"]["runtimeEnvYAML"]).get("env_vars", {})
        elif path == RUNTIME_ENV:
            env_vars = yaml.safe_load(text).get("env_vars", {})
        assert not [k for k in env_vars if SECRET_NAME.search(k)], "a runtime_env is shown in the dashboard"


def test_secret_scan_catches_literal_keys():
    assert AWS_KEY_ID.search("AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE")
    assert AWS_SECRET_VALUE.search("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")


# ---- deploy/runtime_env.yaml ----


@pytest.fixture(scope="module")
def runtime_env() -> dict:
    return yaml.safe_load(RUNTIME_ENV.read_text())


def test_runtime_env_file_is_valid(runtime_env):
    assert isinstance(runtime_env, dict)
    assert set(runtime_env) <= RUNTIME_ENV_FIELDS, sorted(set(runtime_env) - RUNTIME_ENV_FIELDS)
    RuntimeEnv(**runtime_env)
    assert runtime_env["working_dir"] == "."


def test_runtime_env_uploads_the_code_and_not_the_clutter(runtime_env):
    # Ray's own matcher for `excludes` (gitignore patterns, relative to the working_dir).
    from ray._private.runtime_env.packaging import _get_excludes

    excluded = _get_excludes(ROOT, runtime_env["excludes"])
    for path in (".venv", ".cache", "out", ".git", "pipeline/glimpse/__pycache__/engine.cpython-311.pyc"):
        assert excluded(ROOT / path), path
    for path in ("pyproject.toml", "jobs/vqa.py", "pipeline/job.py", "pipeline/samples", "schemas"):
        assert not excluded(ROOT / path), path


def test_runtime_env_pip_lists_the_dependencies_but_not_torch_or_ray(runtime_env):
    tomllib = pytest.importorskip("tomllib")
    packages = runtime_env["pip"]["packages"] if isinstance(runtime_env["pip"], dict) else runtime_env["pip"]

    def name(requirement: str) -> str:
        return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    expected = {name(r): r.replace(" ", "") for r in declared if name(r) not in {"torch", "ray"}}
    listed = {name(r): r.replace(" ", "") for r in packages}
    assert "torch" not in listed and "ray" not in listed, "the cluster's own torch and Ray must stay"
    assert listed == expected


# ---- Dockerfile and .dockerignore ----


def test_dockerfile_builds_on_cuda_and_installs_torch_before_the_package(stages):
    final = stages[-1]
    assert final.image.startswith("nvidia/cuda:") and "runtime" in final.image, final.image
    calls = [c for c in pip_calls(stages) if c.stage == len(stages) - 1 and c.subcommand == "install"]
    (torch,) = [c for c in calls if TORCH_PIN in c.requirements]
    assert (torch.options.get("--index-url") or torch.options.get("-i")) == TORCH_INDEX
    (package,) = [c for c in calls if any(r.endswith("[gpu]") for r in c.requirements)]
    assert torch.position < package.position, "torch must be installed, pinned, before the package"
    # The [gpu] requirement is the directory the package's source was copied to.
    (source,) = [r.removesuffix("[gpu]") for r in package.requirements if r.endswith("[gpu]")]
    copied_to = {
        shlex.split(i.args)[-1].rstrip("/")
        for i in final.instructions
        if i.keyword == "COPY" and "pyproject.toml" in i.args
    }
    assert source.rstrip("/") in copied_to


def test_dockerfile_builds_flash_attn_against_the_same_torch(stages):
    (build,) = [c for c in pip_calls(stages) if any(r.startswith("flash-attn") for r in c.requirements)]
    stage_calls = [c for c in pip_calls(stages) if c.stage == build.stage]
    assert "--no-build-isolation" in build.options
    before = [r for c in stage_calls if c.position <= build.position and c is not build for r in c.requirements]
    assert TORCH_PIN in before and {"packaging", "ninja", "psutil"} <= set(before)
    assert "devel" in stages[build.stage].image, "nvcc is only in the CUDA devel images"
    # ...and the runtime stage takes the wheel from that stage, before the package (whose `gpu`
    # extra would otherwise send pip to build flash-attn where there is no nvcc).
    builder = stages[build.stage].name
    assert builder and build.stage < len(stages) - 1
    (wheel_install,) = [
        c
        for c in pip_calls(stages)
        if c.stage == len(stages) - 1 and any(re.search(r"flash_attn-\S*\.whl$", r) for r in c.requirements)
    ]
    assert f"from={builder}" in stages[-1].instructions[wheel_install.position].args
    (package,) = [c for c in pip_calls(stages) if any(r.endswith("[gpu]") for r in c.requirements)]
    assert wheel_install.position < package.position


def test_dockerfile_leaves_the_command_to_kuberay_and_runs_as_a_user(stages):
    final = stages[-1]
    keywords = [i.keyword for s in stages for i in s.instructions]
    assert "CMD" not in keywords and "ENTRYPOINT" not in keywords
    users = [i.args for i in final.instructions if i.keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert any(i.keyword == "WORKDIR" for i in final.instructions)
    assert final.variables["HF_HOME"].startswith("/")
    # KubeRay's exec probes (older operators or Ray versions) run wget through bash.
    apt = [c for i in final.instructions if i.keyword == "RUN" for c in run_commands(i)]
    assert any(c[:2] == ["apt-get", "install"] and "wget" in c for c in apt)


def dockerignored(path: str, patterns: list[str]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        pattern = pattern.strip("/")
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatch(part, pattern[3:]) for part in parts):
                return True
        elif any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            return True
    return False


def test_dockerignore_keeps_clutter_out_and_the_copied_sources_in(stages):
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and line[0] != "#"]
    for path in (".venv", ".cache", "out", ".git", "pipeline/__pycache__"):
        assert dockerignored(path, patterns), path
    sources = []
    for ins in stages[-1].instructions:
        if ins.keyword == "COPY" and "--from" not in ins.args:
            sources += [t for t in shlex.split(ins.args)[:-1] if not t.startswith("--")]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not dockerignored(source, patterns), f"{source} is copied but .dockerignore drops it"
    # Every package pyproject.toml installs is in the image's copy of the source.
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for include in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert include.rstrip("*") in sources, include
    assert project["project"]["readme"] in sources


# ---- ray_cluster.yaml ----


def test_ray_cluster_has_a_head_gpu_workers_and_an_instance_profile():
    config = yaml.safe_load(CLUSTER.read_text())
    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    gpu_types = [n for k, n in nodes.items() if k != config["head_node_type"] and n["resources"].get("GPU", 0) >= 1]
    assert gpu_types
    for node in gpu_types:
        profile = node["node_config"]["IamInstanceProfile"]
        assert profile.get("Name") or profile.get("Arn")
    assert all(n["node_config"].get("ImageId") for n in nodes.values())


def test_deploy_readme_names_what_ray_cluster_needs():
    config = yaml.safe_load(CLUSTER.read_text())
    readme = (DEPLOY / "README.md").read_text()
    profiles = {
        n["node_config"]["IamInstanceProfile"].get("Name")
        for n in config["available_node_types"].values()
        if "IamInstanceProfile" in n["node_config"]
    }
    assert profiles and all(p in readme for p in profiles)
    assert "ImageId" in readme and "AMI" in readme
    for command in (
        "kubectl apply -f deploy/rayjob.yaml",
        "kubectl get rayjob",
        "--runtime-env deploy/runtime_env.yaml",
    ):
        assert command in readme, command
