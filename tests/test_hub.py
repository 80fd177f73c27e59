"""Publishing checkpoints to a Hub-protocol server on loopback and loading them back by repo id."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from hub_server import HubServer, hub_server_fixture, run_hub_subprocess  # noqa: F401
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import RepositoryNotFoundError
from transformers import AutoModel, AutoProcessor

from clusterstm.hub.export import init_checkpoint
from clusterstm.hub.publish import check_checkpoint_folder, find_missing_checkpoint_files, push_checkpoint

_TEXT = "a red circle moves left"


@pytest.fixture(scope="module")
def _tiny_checkpoint(tmp_path_factory):
    """One `clusterstm init` folder and the in-process output of its dual encoder on a fixed clip."""
    folder = init_checkpoint("tiny", tmp_path_factory.mktemp("hub") / "ckpt", seed=0)
    clip = np.random.default_rng(0).integers(0, 256, size=(8, 64, 64, 3), dtype=np.uint8)
    model = AutoModel.from_pretrained(folder).eval()
    inputs = AutoProcessor.from_pretrained(folder)(videos=[clip], text=[_TEXT], return_tensors="pt")
    with torch.no_grad():
        output = model(**inputs).logits_per_video
    return folder, {"text": _TEXT, "input_ids": inputs["input_ids"].tolist(), "output": output.tolist(), "clip": clip}


@pytest.fixture
def checkpoint(_tiny_checkpoint, tmp_path):
    """A private copy per test, so tests may delete files from it."""
    folder, reference = _tiny_checkpoint
    copy = tmp_path / "ckpt"
    shutil.copytree(folder, copy)
    np.save(tmp_path / "clip.npy", reference["clip"])
    return copy, reference


_LOAD_SCRIPT = """
import json
import numpy as np
import torch
from transformers import AutoModel, AutoProcessor

try:
    import clusterstm  # noqa: F401
    raise SystemExit("clusterstm must not be importable here")
except ImportError:
    pass

model = AutoModel.from_pretrained({repo!r}, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained({repo!r}, trust_remote_code=True)
inputs = processor(videos=[np.load("clip.npy")], text=[{text!r}], return_tensors="pt")
with torch.no_grad():
    output = model(**inputs).logits_per_video
print("RESULT=" + json.dumps({{"input_ids": inputs["input_ids"].tolist(), "output": output.tolist(), "module": type(model).__module__}}))
"""


def test_push_then_load_by_repo_id_in_clean_subprocess(hub_server, checkpoint, tmp_path):
    folder, reference = checkpoint
    commit = push_checkpoint(folder, "tester/tinyvt", token=hub_server.token, endpoint=hub_server.endpoint)
    assert commit.oid == hub_server.repos["tester/tinyvt"].branches["main"]
    files = hub_server.files("tester/tinyvt")
    for name in (
        "config.json",
        "model.safetensors",
        "configuration_clusterstm.py",
        "modeling_clusterstm.py",
        "README.md",
    ):
        assert name in files, name
    assert files["config.json"] == (folder / "config.json").read_bytes()

    result = run_hub_subprocess(
        _LOAD_SCRIPT.format(repo="tester/tinyvt", text=reference["text"]), hub_server.endpoint, tmp_path
    )
    loaded = json.loads(result.stdout.split("RESULT=", 1)[1])
    assert loaded["module"].startswith("transformers_modules")  # remote code, not a local class
    assert loaded["input_ids"] == reference["input_ids"]
    torch.testing.assert_close(torch.tensor(loaded["output"]), torch.tensor(reference["output"]))
    # The weights really came from the server (the subprocess has its own empty HF_HOME).
    assert any(m == "GET" and p.endswith("/model.safetensors") for m, p in hub_server.requests)


def test_hf_hub_download_and_revision_branch(hub_server, checkpoint, tmp_path):
    folder, _ = checkpoint
    push_checkpoint(folder, "tester/tinyvt", token=hub_server.token, endpoint=hub_server.endpoint)
    # Only allow-listed files are published (see test_security): change one of them on the branch.
    (folder / "generation_config.json").write_text("only on dev")
    push_checkpoint(folder, "tester/tinyvt", revision="dev", token=hub_server.token, endpoint=hub_server.endpoint)
    assert hub_server.files("tester/tinyvt", "dev")["generation_config.json"] == b"only on dev"
    assert hub_server.files("tester/tinyvt", "main")["generation_config.json"] != b"only on dev"

    cache = tmp_path / "cache"
    path = hf_hub_download("tester/tinyvt", "config.json", cache_dir=cache, endpoint=hub_server.endpoint)
    assert open(path, "rb").read() == (folder / "config.json").read_bytes()
    dev = hf_hub_download(
        "tester/tinyvt", "generation_config.json", revision="dev", cache_dir=cache, endpoint=hub_server.endpoint
    )
    assert open(dev).read() == "only on dev"


def test_private_repo_needs_the_token(hub_server, checkpoint, tmp_path):
    folder, _ = checkpoint
    push_checkpoint(folder, "tester/secret", private=True, token=hub_server.token, endpoint=hub_server.endpoint)
    assert hub_server.repos["tester/secret"].private
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(
            "tester/secret", "config.json", cache_dir=tmp_path / "c1", endpoint=hub_server.endpoint, token=False
        )
    path = hf_hub_download(
        "tester/secret", "config.json", cache_dir=tmp_path / "c2", endpoint=hub_server.endpoint, token=hub_server.token
    )
    assert open(path, "rb").read() == (folder / "config.json").read_bytes()


def test_incomplete_checkpoint_is_refused_before_any_request(hub_server, checkpoint):
    folder, _ = checkpoint
    check_checkpoint_folder(folder)  # complete
    (folder / "configuration_clusterstm.py").unlink()  # imported relatively by modeling_clusterstm.py
    (folder / "README.md").unlink()
    for name in ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json"):
        (folder / name).unlink(missing_ok=True)
    missing = find_missing_checkpoint_files(folder)
    assert any("configuration_clusterstm.py" in m for m in missing)
    with pytest.raises(ValueError, match="configuration_clusterstm.py") as err:
        push_checkpoint(folder, "tester/tinyvt", token=hub_server.token, endpoint=hub_server.endpoint)
    assert "README.md" in str(err.value) and "processor config" in str(err.value)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ValueError, match=r"\*\.safetensors"):
        check_checkpoint_folder(folder)
    assert hub_server.requests == []
    with pytest.raises(ValueError, match="namespace/name"):
        push_checkpoint(folder, "no-namespace", token=hub_server.token, endpoint=hub_server.endpoint)


def test_token_never_in_logs_or_output(checkpoint, caplog, capsys):
    from huggingface_hub.utils import logging as hf_logging

    folder, _ = checkpoint
    secret = "hf_DistinctiveFakeToken_4f1c9e_never_print"
    hf_logging.set_verbosity_debug()
    try:
        with HubServer(token=secret) as server, caplog.at_level(logging.DEBUG):
            push_checkpoint(folder, "tester/tinyvt", token=secret, endpoint=server.endpoint)
            with pytest.raises(Exception) as err:  # wrong token: the error must not echo any token either
                push_checkpoint(folder, "tester/other", token=secret + "_wrong", endpoint=server.endpoint)
            assert "tester/tinyvt" in server.repos and "tester/other" not in server.repos
            requests = repr(server.requests)
    finally:
        hf_logging.set_verbosity_warning()
    captured = capsys.readouterr()
    assert caplog.records  # debug logging was really captured
    for text in (caplog.text, captured.out, captured.err, str(err.value), repr(err.value), requests):
        assert secret not in text
        assert "DistinctiveFakeToken" not in text
