"""Security: weights only through safetensors, no pickle loading of untrusted files, remote-code modules that do
nothing at import, and a Hub token that never shows up in output or logs."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hub_server import HubServer, hub_server_fixture, hub_subprocess_env  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "clusterstm"
REMOTE_CODE = sorted((PACKAGE / "models").glob("*_clusterstm.py"))
SOURCES = sorted(PACKAGE.rglob("*.py")) + sorted((REPO / "scripts").glob("*.py"))


class _Payload:
    """Unpickling this creates `marker`: proof that loading ran code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _poisoned_pickle(path: Path, marker: Path) -> None:
    torch.save({"state": {}, "param_groups": [], "payload": _Payload(str(marker))}, path)


# ---------------------------------------------------------------------------------------------------------------------
# No pickle loading in our code
# ---------------------------------------------------------------------------------------------------------------------


def _call_name(node: ast.Call) -> str:
    try:
        return ast.unparse(node.func)
    except Exception:  # pragma: no cover
        return ""


def _keyword(node: ast.Call, name: str):
    for keyword in node.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def test_sources_never_unpickle():
    assert len(SOURCES) > 10 and REMOTE_CODE
    problems = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), filename=str(path))
        where = path.relative_to(REPO)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] + (
                    [node.module] if isinstance(node, ast.ImportFrom) else []
                )
                for name in names:
                    if name and name.split(".")[0] in {
                        "pickle",
                        "cPickle",
                        "dill",
                        "cloudpickle",
                        "joblib",
                        "marshal",
                        "shelve",
                    }:
                        problems.append(f"{where}:{node.lineno} imports {name}")
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node)
            weights_only = _keyword(node, "weights_only")
            if name.endswith(("torch.load", "serialization.load")):
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    problems.append(f"{where}:{node.lineno} torch.load without weights_only=True")
            if isinstance(weights_only, ast.Constant) and weights_only.value is False:
                problems.append(f"{where}:{node.lineno} weights_only=False")
            allow_pickle = _keyword(node, "allow_pickle")
            if name.endswith("load") and isinstance(allow_pickle, ast.Constant) and allow_pickle.value is True:
                problems.append(f"{where}:{node.lineno} {name}(allow_pickle=True)")
            use_safetensors = _keyword(node, "use_safetensors")
            if isinstance(use_safetensors, ast.Constant) and use_safetensors.value is False:
                problems.append(f"{where}:{node.lineno} use_safetensors=False")
            remote = _keyword(node, "trust_remote_code")
            if isinstance(remote, ast.Constant) and remote.value is True:
                problems.append(f"{where}:{node.lineno} trust_remote_code=True hard-coded")
            if name.endswith("load_state"):
                load_kwargs = _keyword(node, "load_kwargs")
                if load_kwargs is not None and "weights_only" in ast.unparse(load_kwargs):
                    problems.append(f"{where}:{node.lineno} load_state with weights_only override")
            if name.endswith(("save_pretrained", "save_state", "save_model")):
                safe = _keyword(node, "safe_serialization")
                if isinstance(safe, ast.Constant) and safe.value is False:
                    problems.append(f"{where}:{node.lineno} safe_serialization=False")
    assert problems == []


def test_accelerate_resume_refuses_pickled_code(tmp_path):
    """`accelerator.load_state` (our resume path) reads model weights from safetensors and optimizer, scheduler and RNG
    states with `torch.load(weights_only=True)` (accelerate 1.15 default): a poisoned state file fails, runs nothing."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    folder = tmp_path / "checkpoint-1"
    accelerator.save_state(str(folder), safe_serialization=True)
    names = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors" in names and not any(n.startswith("pytorch_model") for n in names)
    accelerator.load_state(str(folder))  # the genuine files load

    marker = tmp_path / "pwned"
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        poisoned = tmp_path / f"poisoned_{name}"
        shutil.copytree(folder, poisoned)
        _poisoned_pickle(poisoned / name, marker)
        if name.startswith("random_states"):
            # accelerate catches any error while restoring RNG states and only logs it at INFO level: nothing runs,
            # but the run would continue with un-restored RNG (so exact resume silently breaks).
            accelerator.load_state(str(poisoned))
        else:
            with pytest.raises(Exception, match="(?i)weights.only|unpickl|unsupported global"):
                accelerator.load_state(str(poisoned))
        assert not marker.exists(), name


def test_teacher_refuses_pickle_weights(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from clusterstm.teacher.teacher import ClusterSTMTeacher

    small = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**small, "vocab_size": 20, "max_position_embeddings": 8},
        vision_config={**small, "image_size": 8, "patch_size": 4},
        projection_dim=8,
    )
    folder = tmp_path / "teacher"
    CLIPModel(config).save_pretrained(folder)
    assert ClusterSTMTeacher.from_pretrained(folder).model_kind == "clip"
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    _poisoned_pickle(folder / "pytorch_model.bin", marker)
    with pytest.raises(ValueError, match="no safetensors weights") as error:
        ClusterSTMTeacher.from_pretrained(folder)
    assert "teacher" in str(error.value) and not marker.exists()


def test_student_checkpoint_with_pickled_weights_runs_no_code(tmp_path):
    from clusterstm.hub.export import init_checkpoint
    from clusterstm.models.modeling_clusterstm import ClusterSTMModel

    folder = init_checkpoint("tiny", tmp_path / "ckpt", seed=0)
    for weights in folder.glob("*.safetensors*"):
        weights.unlink()
    marker = tmp_path / "pwned"
    _poisoned_pickle(folder / "pytorch_model.bin", marker)
    with pytest.raises(Exception):  # noqa: B017 - transformers' own error; what matters is that nothing ran
        ClusterSTMModel.from_pretrained(folder)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# Remote-code modules only define things
# ---------------------------------------------------------------------------------------------------------------------

_ALLOWED_TOP_LEVEL_CALLS = {"logging.get_logger", "frozenset", "TypeVar", "dict", "tuple", "set", "list"}


@pytest.mark.parametrize("path", REMOTE_CODE, ids=lambda p: p.name)
def test_remote_code_top_level_is_definitions_only(path):
    tree = ast.parse(path.read_text())
    for index, node in enumerate(tree.body):
        where = f"{path.name}:{node.lineno}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if isinstance(node, ast.Import) or node.level == 0:
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not any(m.split(".")[0] == "clusterstm" for m in modules), f"{where}: absolute self-import"
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if isinstance(node, ast.Expr):
            assert index == 0 and isinstance(node.value, ast.Constant), f"{where}: top-level expression"
            continue
        if isinstance(node, ast.Try):
            # optional dependency: `try: import x / except ImportError: x = None`
            for part in node.body + [stmt for handler in node.handlers for stmt in handler.body]:
                assert isinstance(part, (ast.Import, ast.ImportFrom, ast.Assign, ast.Pass)), (
                    f"{where}: {ast.unparse(part)}"
                )
            continue
        assert isinstance(node, (ast.Assign, ast.AnnAssign)), f"{where}: top-level {type(node).__name__}"
        for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
            assert ast.unparse(call.func) in _ALLOWED_TOP_LEVEL_CALLS, f"{where}: top-level call {ast.unparse(call)}"


_AUDIT_SCRIPT = r"""
import importlib, json, os, sys
sys.dont_write_bytecode = True
sys.path.insert(0, sys.argv[1])
names = sys.argv[2:]
# 1) import a first copy: every dependency (torch, transformers lazy modules, PIL, av ...) is loaded and cached
for name in names:
    importlib.import_module("warm." + name)
events = []
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def hook(event, args):
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None))[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & WRITE_FLAGS
        )
        if writing:
            events.append(("write", str(path)))
    elif event in ("os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.chmod", "os.truncate", "os.symlink",
                   "shutil.rmtree", "shutil.copyfile", "shutil.move"):
        events.append((event, str(args[0]) if args else ""))
    elif event.startswith(("subprocess.", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.fork",
                           "os.startfile", "pty.", "ctypes.dlopen")):
        events.append((event, repr(args)[:200]))
    elif event.startswith(("socket.", "urllib.", "http.", "ftplib.", "smtplib.", "webbrowser.")):
        events.append((event, repr(args)[:200]))

sys.addaudithook(hook)
# 2) import the remote-code copy the way transformers does (a package of flat siblings), under the hook
for name in names:
    importlib.import_module("remote." + name)
sys.stdout.write("EVENTS=" + json.dumps(events) + "\n")
"""


def test_remote_code_import_has_no_side_effects(tmp_path):
    for package in ("warm", "remote"):
        folder = tmp_path / package
        folder.mkdir()
        (folder / "__init__.py").write_text("")
        for path in REMOTE_CODE:
            shutil.copy(path, folder / path.name)
    script = tmp_path / "audit.py"
    script.write_text(_AUDIT_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), *[p.stem for p in REMOTE_CODE]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    events = json.loads(result.stdout.split("EVENTS=", 1)[1])
    assert events == []


def test_audit_hook_would_see_side_effects(tmp_path):
    """The audit test is not vacuous: a module that writes a file or starts a process at import is caught."""
    for package in ("warm", "remote"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / "evil_clusterstm.py").write_text(
            textwrap.dedent(
                """
                import os, subprocess, sys
                if __name__.startswith("remote"):
                    open(os.path.join(os.path.dirname(__file__), "dropped.txt"), "w").close()
                    subprocess.run([sys.executable, "-c", "pass"])
                """
            )
        )
    (tmp_path / "audit.py").write_text(_AUDIT_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(tmp_path / "audit.py"), str(tmp_path), "evil_clusterstm"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    events = json.loads(result.stdout.split("EVENTS=", 1)[1])
    kinds = {kind for kind, _ in events}
    assert "write" in kinds and "subprocess.Popen" in kinds


# ---------------------------------------------------------------------------------------------------------------------
# The Hub token never appears in output or logs (the `clusterstm push` command)
# ---------------------------------------------------------------------------------------------------------------------

_SECRET = "hf_CliFakeToken_7d2a91_never_print"


def _cli(args: list[str], endpoint: str, home: Path, token: str) -> subprocess.CompletedProcess:
    env = hub_subprocess_env(endpoint, home, token=token)
    env.pop("HF_HUB_DISABLE_IMPLICIT_TOKEN")  # the CLI takes the token from HF_TOKEN, as a user's shell would
    env["HF_HUB_VERBOSITY"] = "debug"  # the most talkative huggingface_hub logging
    env["TRANSFORMERS_VERBOSITY"] = "debug"
    env["PYTHONPATH"] = str(REPO / "src")
    return subprocess.run(
        [sys.executable, "-m", "clusterstm.cli", *args],
        cwd=home.parent,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_push_never_prints_the_token(tmp_path):
    from clusterstm.hub.export import init_checkpoint

    folder = init_checkpoint("tiny", tmp_path / "ckpt", seed=0)
    home = tmp_path / "hf_home"
    with HubServer(token=_SECRET) as server:
        ok = _cli(["push", str(folder), "--hub_model_id", "tester/cli"], server.endpoint, home, _SECRET)
        assert ok.returncode == 0, ok.stderr[-3000:]
        assert "tester/cli" in server.repos and "config.json" in server.files("tester/cli")
        # a rejected token: the command fails, and neither the good nor the bad token is echoed
        wrong = _SECRET + "_wrong"
        bad = _cli(["push", str(folder), "--hub_model_id", "tester/other"], server.endpoint, home, wrong)
        assert bad.returncode != 0 and "tester/other" not in server.repos
        requests = repr(server.requests)
    assert "Pushed" in ok.stdout
    for text in (ok.stdout, ok.stderr, bad.stdout, bad.stderr, requests):
        assert "CliFakeToken" not in text
    # nothing written under HF_HOME holds it either (no token file: it came from the environment)
    for path in home.rglob("*") if home.exists() else []:
        if path.is_file():
            assert b"CliFakeToken" not in path.read_bytes(), path


# ---------------------------------------------------------------------------------------------------------------------
# Publishing uploads an allow-list only; links out of the folder are refused; cards hold no local paths
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def _pushable(tmp_path_factory):
    from clusterstm.hub.export import init_checkpoint

    return init_checkpoint("tiny", tmp_path_factory.mktemp("push") / "ckpt", seed=0)


def _leaky_copy(source: Path, tmp_path: Path) -> Path:
    """A training output folder with everything that must never be published next to the checkpoint."""
    folder = tmp_path / "run"
    shutil.copytree(source, folder)
    (folder / ".env").write_text("HF_TOKEN=hf_secret_in_dotenv\n")
    (folder / "logs").mkdir()
    (folder / "logs" / "train_log.jsonl").write_text('{"step": 1}\n')
    for name in (".tmp-checkpoint-3", "checkpoint-2"):
        (folder / name).mkdir()
        (folder / name / "optimizer.bin").write_bytes(b"optimizer state")
        (folder / name / "random_states_0.pkl").write_bytes(b"rng state")
    (folder / "notes.txt").write_text("private notes")
    (folder / "train_results.json").write_text("{}")
    (folder / "teacher").mkdir()
    (folder / "teacher" / "config.json").write_text("{}")
    (folder / "teacher" / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (folder / "teacher" / "secret.txt").write_text("not part of a teacher")
    return folder


def test_push_uploads_the_allow_list_only(hub_server, _pushable, tmp_path):
    from clusterstm.hub.publish import push_checkpoint, select_upload_files

    folder = _leaky_copy(_pushable, tmp_path)
    private_key = tmp_path / "id_rsa"
    private_key.write_text("-----BEGIN PRIVATE KEY----- private")
    os.symlink(private_key, folder / "id_rsa")  # a link that is not allow-listed: stays local
    (folder / "generation_config.json").unlink(missing_ok=True)
    os.symlink(folder / "config.json", folder / "generation_config.json")  # a link inside the folder: resolved
    push_checkpoint(folder, "tester/allow", token=hub_server.token, endpoint=hub_server.endpoint)
    files = hub_server.files("tester/allow")
    uploaded = set(files) - {".gitattributes"}
    expected = {name for name, _ in select_upload_files(folder)[0]}
    assert uploaded == expected
    assert {"config.json", "model.safetensors", "README.md", "modeling_clusterstm.py", "tokenizer.json"} <= uploaded
    assert {"teacher/config.json", "teacher/model.safetensors", "generation_config.json"} <= uploaded
    for name in uploaded:
        assert not name.startswith((".env", "logs", ".tmp-checkpoint", "checkpoint-")), name
        assert name not in ("notes.txt", "id_rsa", "train_results.json", "teacher/secret.txt"), name
    assert files["generation_config.json"] == (folder / "config.json").read_bytes()
    for content in files.values():
        assert b"PRIVATE KEY" not in content and b"hf_secret_in_dotenv" not in content


@pytest.mark.parametrize("linked", ["model.safetensors", "teacher"])
def test_push_refuses_links_out_of_the_folder(hub_server, _pushable, tmp_path, linked):
    from clusterstm.hub.publish import push_checkpoint

    folder = tmp_path / "ckpt"
    shutil.copytree(_pushable, folder)
    outside = tmp_path / "outside"
    outside.mkdir()
    if linked == "teacher":
        (outside / "config.json").write_text("{}")
        target = outside
    else:
        target = outside / "model.safetensors"
        shutil.move(folder / "model.safetensors", target)
    os.symlink(target, folder / linked)
    with pytest.raises(ValueError, match=f"{linked}.*symbolic link pointing outside"):
        push_checkpoint(folder, "tester/links", token=hub_server.token, endpoint=hub_server.endpoint)
    assert "tester/links" not in hub_server.repos  # refused before any request


def test_model_card_never_holds_local_paths(tmp_path):
    from huggingface_hub import metadata_load

    from clusterstm.hub.model_card import build_model_card, hub_model_reference, write_model_card

    local = tmp_path / "users" / "alice" / "my-pretrained"
    local.mkdir(parents=True)
    card = build_model_card({"teacher_name_or_path": str(tmp_path / "teachers" / "clip")}, {"base_model": str(local)})
    text = str(card)
    assert str(tmp_path) not in text and "alice" not in text
    assert "my-pretrained (local checkpoint)" in text and "clip (local checkpoint)" in text
    assert "base_model" not in card.data.to_dict()
    write_model_card(tmp_path, {}, {"base_model": "./runs/pretrain"})
    assert "base_model" not in metadata_load(tmp_path / "README.md")
    assert hub_model_reference("openai/clip-vit-base-patch16") == (
        "openai/clip-vit-base-patch16",
        "openai/clip-vit-base-patch16",
    )
    assert hub_model_reference("/abs/path/ckpt") == (None, "ckpt (local checkpoint)")
    assert hub_model_reference("a model trained here") == (None, "a model trained here")
    card = build_model_card({}, {"base_model": "tester/clusterstm-base"})
    assert card.data.base_model == "tester/clusterstm-base"
