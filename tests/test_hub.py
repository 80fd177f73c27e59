"""Publishing checkpoints to a Hub-protocol server on loopback and loading them back by repo id."""

import json
import logging

import pytest
import torch
from hub_server import HubServer, hub_server_fixture, make_tiny_remote_code_checkpoint, run_hub_subprocess  # noqa: F401
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import RepositoryNotFoundError

from clusterstm.hub import check_checkpoint_folder, find_missing_checkpoint_files, push_checkpoint


@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    reference = make_tiny_remote_code_checkpoint(folder, tmp_path / "src")
    return folder, reference


_LOAD_SCRIPT = """
import json
import torch
from transformers import AutoModel, AutoTokenizer

try:
    import clusterstm  # noqa: F401
    raise SystemExit("clusterstm must not be importable here")
except ImportError:
    pass

model = AutoModel.from_pretrained({repo!r}, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained({repo!r}, trust_remote_code=True)
input_ids = tokenizer([{text!r}], return_tensors="pt")["input_ids"]
with torch.no_grad():
    output = model(input_ids)
print("RESULT=" + json.dumps({{"input_ids": input_ids.tolist(), "output": output.tolist(), "module": type(model).__module__}}))
"""


def test_push_then_load_by_repo_id_in_clean_subprocess(hub_server, checkpoint, tmp_path):
    folder, reference = checkpoint
    commit = push_checkpoint(folder, "tester/tinyvt", token=hub_server.token, endpoint=hub_server.endpoint)
    assert commit.oid == hub_server.repos["tester/tinyvt"].branches["main"]
    files = hub_server.files("tester/tinyvt")
    for name in ("config.json", "model.safetensors", "configuration_tinyvt.py", "modeling_tinyvt.py", "README.md"):
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
    (folder / "extra.txt").write_text("only on dev")
    push_checkpoint(folder, "tester/tinyvt", revision="dev", token=hub_server.token, endpoint=hub_server.endpoint)
    assert "extra.txt" in hub_server.files("tester/tinyvt", "dev")
    assert "extra.txt" not in hub_server.files("tester/tinyvt", "main")

    cache = tmp_path / "cache"
    path = hf_hub_download("tester/tinyvt", "config.json", cache_dir=cache, endpoint=hub_server.endpoint)
    assert open(path, "rb").read() == (folder / "config.json").read_bytes()
    dev = hf_hub_download("tester/tinyvt", "extra.txt", revision="dev", cache_dir=cache, endpoint=hub_server.endpoint)
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
    (folder / "configuration_tinyvt.py").unlink()  # imported relatively by modeling_tinyvt.py
    (folder / "README.md").unlink()
    (folder / "preprocessor_config.json").unlink()
    missing = find_missing_checkpoint_files(folder)
    assert any("configuration_tinyvt.py" in m for m in missing)
    with pytest.raises(ValueError, match="configuration_tinyvt.py") as err:
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
