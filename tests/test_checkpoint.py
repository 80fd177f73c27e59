"""`clusterstm init`, Auto-class registration and loading as Hub remote code where the package is absent."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, AutoProcessor

import clusterstm
from clusterstm.hub.export import MODEL_AUTO_MAP, init_checkpoint, remote_code_files


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return init_checkpoint("tiny", tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


def _clip(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(8, 64, 64, 3), dtype=np.uint8)


def test_init_writes_a_complete_hub_ready_folder(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    for required in ("config.json", "model.safetensors", "README.md", "tokenizer.json", "processor_config.json"):
        assert required in names, required
    assert {p.name for p in remote_code_files()} <= names
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "clusterstm"
    assert config["auto_map"] == MODEL_AUTO_MAP
    # The card's metadata parses and names the library.
    from huggingface_hub import ModelCard

    card = ModelCard.load(tiny_checkpoint / "README.md")
    assert card.data.library_name == "transformers"


def test_auto_classes_load_in_process(tiny_checkpoint):
    assert clusterstm.ClusterSTMConfig.model_type == "clusterstm"
    config = AutoConfig.from_pretrained(tiny_checkpoint)
    assert type(config).__name__ == "ClusterSTMConfig"
    assert type(AutoModel.from_pretrained(tiny_checkpoint)).__name__ == "ClusterSTMModel"
    pretraining = AutoModelForPreTraining.from_pretrained(tiny_checkpoint)
    assert type(pretraining).__name__ == "ClusterSTMForPreTraining"
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    assert type(processor).__name__ == "ClusterSTMProcessor"
    inputs = processor(videos=[_clip()], text=["a red circle moves left"], return_tensors="pt")
    assert set(inputs) == {"pixel_values", "input_ids", "attention_mask"}
    assert inputs["pixel_values"].shape == (1, 8, 3, 64, 64)


_REMOTE_SCRIPT = """
import json, sys
import numpy as np
import torch
try:
    import clusterstm  # noqa: F401
    raise SystemExit("clusterstm must not be importable here")
except ImportError:
    pass
from transformers import AutoModel, AutoProcessor

folder = sys.argv[1]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
videos = list(np.load(sys.argv[2]))
inputs = processor(videos=videos, text=["a red circle moves left", "two squares"], return_tensors="pt")
with torch.no_grad():
    out = model(**inputs)
print("RESULT=" + json.dumps({"logits": out.logits_per_video.tolist(), "module": type(model).__module__}))
"""


def test_remote_code_loads_without_the_package_and_matches(tiny_checkpoint, tmp_path):
    clips = np.stack([_clip(0), _clip(1)])
    np.save(tmp_path / "clips.npy", clips)
    script = tmp_path / "load.py"
    script.write_text("import sys\nsys.modules['clusterstm'] = None\n" + textwrap.dedent(_REMOTE_SCRIPT))
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(
        [sys.executable, str(script), str(tiny_checkpoint), str(tmp_path / "clips.npy")],
        cwd=tmp_path,  # not the repository: nothing importable from src/
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.split("RESULT=", 1)[1])
    assert remote["module"].startswith("transformers_modules")

    model = AutoModel.from_pretrained(tiny_checkpoint).eval()
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    inputs = processor(videos=list(clips), text=["a red circle moves left", "two squares"], return_tensors="pt")
    with torch.no_grad():
        local = model(**inputs).logits_per_video
    torch.testing.assert_close(torch.tensor(remote["logits"]), local, rtol=1e-5, atol=1e-5)


def test_cli_init_and_bad_preset(tmp_path):
    out = tmp_path / "cli_ckpt"
    cli = [sys.executable, "-m", "clusterstm.cli"]
    done = subprocess.run([*cli, "init", "--preset", "tiny", "--output_dir", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "model.safetensors").is_file()
    bad = subprocess.run([*cli, "init", "--preset", "huge", "--output_dir", str(out)], capture_output=True, text=True)
    assert bad.returncode != 0 and "huge" in bad.stderr
